"""Byte text corpora: split, SHA-256, windows, TFDS text, unigram baseline."""

import hashlib

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from fracq import data as data_lib
from fracq.data import text

FILES = {
  'a.py': b'import os\n',
  'b.py': b'x = 1\n',
  'c.py': b'def f():\n  pass\n',
  'notes.txt': b'not python',
}


@pytest.fixture
def small_dir(tmp_path):
  for index in range(12):
    (tmp_path / f'm{index:02d}.py').write_bytes(f'# {index}\n'.encode() * 4)
  (tmp_path / 'notes.txt').write_bytes(b'not python')
  (tmp_path / 'pkg.py').mkdir()  # a directory, not a top-level file
  return tmp_path


def test_split_is_by_file_every_tenth_and_disjoint(small_dir):
  corpus = text.stdlib_corpus(str(small_dir))
  names = [f'm{index:02d}.py' for index in range(12)]
  assert corpus.validation_files == ('m09.py',)
  assert set(corpus.train_files) | set(corpus.validation_files) == set(names)
  assert not set(corpus.train_files) & set(corpus.validation_files)
  assert bytes(corpus.validation) == b'# 9\n' * 4
  assert corpus.num_bytes == sum((small_dir / n).stat().st_size for n in names)


def test_stdlib_split_is_disjoint_and_covers_every_file():
  corpus = text.stdlib_corpus()
  files = text.stdlib_files()
  assert len(files) > 20 and files == sorted(files)
  assert not set(corpus.train_files) & set(corpus.validation_files)
  assert sorted(corpus.train_files + corpus.validation_files) == files
  assert corpus.validation_files == tuple(files[9::10])
  assert corpus.validation.size > 10_000


def test_sha256_follows_the_documented_scheme_and_sees_edits(tmp_path):
  for name, content in FILES.items():
    (tmp_path / name).write_bytes(content)
  expected = hashlib.sha256()
  for name in ('a.py', 'b.py', 'c.py'):
    content = FILES[name]
    expected.update(name.encode() + b'\0' + len(content).to_bytes(8, 'little'))
    expected.update(content)
  corpus = text.stdlib_corpus(str(tmp_path))
  assert corpus.sha256 == expected.hexdigest()
  text.stdlib_corpus.cache_clear()
  assert text.stdlib_corpus(str(tmp_path)).sha256 == corpus.sha256
  (tmp_path / 'b.py').write_bytes(b'x = 2\n')
  text.stdlib_corpus.cache_clear()
  assert text.stdlib_corpus(str(tmp_path)).sha256 != corpus.sha256
  assert corpus.provenance()['corpus_bytes'] == corpus.num_bytes == 32


def test_train_batches_are_deterministic_shifted_windows():
  corpus = text.stdlib_corpus()
  batch = text.train_batch(corpus, step=5, batch_size=4, seq_len=16, seed=1)
  again = text.train_batch(corpus, step=5, batch_size=4, seq_len=16, seed=1)
  other = text.train_batch(corpus, step=6, batch_size=4, seq_len=16, seed=1)
  assert batch['inputs'].shape == batch['targets'].shape == (4, 16)
  assert batch['inputs'].dtype == np.int32
  np.testing.assert_array_equal(batch['inputs'], again['inputs'])
  assert not np.array_equal(batch['inputs'], other['inputs'])
  np.testing.assert_array_equal(
    batch['inputs'][:, 1:], batch['targets'][:, :-1]
  )
  # Each row is a window of the train bytes.
  train = bytes(corpus.train)
  for row in np.concatenate([batch['inputs'], batch['targets'][:, -1:]], 1):
    assert bytes(row.astype(np.uint8)) in train


def test_eval_windows_cover_the_validation_split_once(small_dir):
  corpus = text.stdlib_corpus(str(small_dir))  # 16 validation bytes
  batches = list(text.eval_batches(corpus, batch_size=2, seq_len=3))
  targets = np.concatenate([b['targets'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert all(b['inputs'].shape == (2, 3) for b in batches)
  assert mask.shape == (6, 3) and mask.sum() == corpus.validation.size - 1
  np.testing.assert_array_equal(targets[mask], corpus.validation[1:])
  starts = text.eval_window_starts(corpus, seq_len=3, max_windows=3)
  np.testing.assert_array_equal(starts, [0, 6, 12])  # 3 of the 5 windows
  with pytest.raises(ValueError, match='seq_len'):
    text.eval_window_starts(corpus, seq_len=16)


def test_unigram_baseline_by_hand(tmp_path):
  for index in range(10):
    (tmp_path / f'f{index}.py').write_bytes(b'ab' if index < 9 else b'aab')
  corpus = text.stdlib_corpus(str(tmp_path))
  counts = np.ones(256)
  counts[ord('a')] += 9
  counts[ord('b')] += 9
  prob = counts / counts.sum()
  expected = -(2 * np.log2(prob[ord('a')]) + np.log2(prob[ord('b')])) / 3
  assert text.unigram_bits_per_byte(corpus) == pytest.approx(expected)


def text_config(dataset, **fields):
  c = ml_collections.ConfigDict(
    dict(
      dataset=dataset,
      batch_size=4,
      eval_batch_size=4,
      seq_len=8,
      eval_windows=0,
      seed=0,
      data_dir=None,
      text_max_bytes=0,
    )
  )
  c.update(fields)
  return c


def test_dataset_dispatch_for_stdlib_text():
  c = text_config('stdlib_text', eval_windows=6)
  assert data_lib.is_text('stdlib_text') and not data_lib.is_text('digits')
  assert data_lib.num_classes('stdlib_text') == 256
  assert data_lib.input_shape('stdlib_text', 224, seq_len=8) == (8,)
  corpus = text.stdlib_corpus()
  assert data_lib.steps_per_epoch(c) == corpus.train.size // 32
  first = next(data_lib.train_iterator(c, 3))
  np.testing.assert_array_equal(
    first['inputs'], text.train_batch(corpus, 3, 4, 8, 0)['inputs']
  )
  batches = list(data_lib.eval_batches(c))
  assert [b['mask'].shape for b in batches] == [(4, 8), (4, 8)]
  # Six evenly spaced windows, the last one the split's partial tail.
  starts = text.eval_window_starts(corpus, 8, max_windows=6)
  assert len(starts) == 6 and starts[-1] + 8 >= corpus.validation.size - 1
  expected = np.minimum(8, corpus.validation.size - 1 - starts).sum()
  assert sum(b['mask'].sum() for b in batches) == expected
  assert data_lib.provenance(c)['corpus_sha256'] == corpus.sha256


@pytest.mark.parametrize(
  'name,eval_split', [('tiny_shakespeare', 'validation'), ('lm1b', 'test')]
)
def test_tfds_text_pipeline_on_mock_data(name, eval_split):
  assert text.TFDS_EVAL_SPLIT[name] == eval_split
  text.tfds_corpus.cache_clear()
  c = text_config(name, seq_len=4)
  try:
    with tfds.testing.mock_data(num_examples=4):
      corpus = data_lib.text_corpus(c)
      batch = next(data_lib.train_iterator(c, 0))
      evals = list(data_lib.eval_batches(c))
  finally:
    text.tfds_corpus.cache_clear()
  # Each example's text feature, newline-terminated.
  assert corpus.train.size > 8 and bytes(corpus.train).count(b'\n') == 4
  assert batch['inputs'].shape == (4, 4)
  np.testing.assert_array_equal(
    batch['inputs'][:, 1:], batch['targets'][:, :-1]
  )
  assert sum(b['mask'].sum() for b in evals) == corpus.validation.size - 1
  assert len(corpus.sha256) == 64


def test_unknown_text_dataset_is_refused():
  with pytest.raises(ValueError, match='choose one of'):
    text.load('wikitext')
