"""Byte-level text corpora for language modelling.

``stdlib_text``: real text that needs no download, the ``.py`` source files
at the top level of the running Python's standard library
(``sysconfig.get_paths()['stdlib']``, sorted by name), read as bytes, so the
vocabulary is the 256 byte values. Split by file: the file at (0-based)
sorted position ``i`` goes to validation when ``i % VALIDATION_EVERY ==
VALIDATION_EVERY - 1`` (every 10th file), to train otherwise; each split is
its files' bytes concatenated in name order. Python versions ship different
files, so every run records :attr:`Corpus.sha256` (SHA-256 over each file's
name and bytes, see :func:`stdlib_corpus`) and :attr:`Corpus.num_bytes`.

TFDS text (``tiny_shakespeare``, ``lm1b``): the UTF-8 bytes of the ``text``
feature of every example of a split, each example followed by a newline,
for users who have the data prepared. A split is held in memory (fine for
tiny_shakespeare's 1 MB; lm1b's train split is about 4 GB, so cap it with
``max_bytes``).

Training batches are ``batch_size`` windows of ``seq_len + 1`` consecutive
train bytes at uniformly drawn offsets: ``inputs`` are the first
``seq_len`` bytes, ``targets`` the last ``seq_len`` (shifted by one). Batch
``t`` is a pure function of ``(seed, t)``, so a resumed run sees exactly
the batches an uninterrupted one would.

Evaluation windows tile the validation split: window ``j`` starts at byte
``j * seq_len``, so together they predict every validation byte after the
first exactly once (the last, partial window is padded and its padding
masked). With ``max_windows > 0`` only that many windows are used, evenly
spaced over the split (always the same ones), for a cheaper evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import sysconfig

import numpy as np

from fracq.data import tfds_data

VOCAB_SIZE = 256
VALIDATION_EVERY = 10
# TFDS text datasets: the split evaluated on (lm1b has no validation split).
TFDS_EVAL_SPLIT = {'tiny_shakespeare': 'validation', 'lm1b': 'test'}
DATASETS = ('stdlib_text',) + tuple(TFDS_EVAL_SPLIT)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A byte corpus split into train and validation bytes."""

  name: str
  train: np.ndarray  # uint8
  validation: np.ndarray  # uint8
  sha256: str  # identifies the exact text the run saw
  train_files: tuple[str, ...] = ()
  validation_files: tuple[str, ...] = ()

  @property
  def num_bytes(self) -> int:
    return int(self.train.size + self.validation.size)

  def provenance(self) -> dict:
    """What every run and result records about its text."""
    return {
      'corpus': self.name,
      'corpus_sha256': self.sha256,
      'corpus_bytes': self.num_bytes,
      'corpus_train_bytes': int(self.train.size),
      'corpus_validation_bytes': int(self.validation.size),
    }


def stdlib_files(directory: str | None = None) -> list[str]:
  """Sorted names of the top-level ``.py`` files of the standard library."""
  directory = directory or sysconfig.get_paths()['stdlib']
  return sorted(
    name
    for name in os.listdir(directory)
    if name.endswith('.py') and os.path.isfile(os.path.join(directory, name))
  )


def is_validation_file(index: int) -> bool:
  """Whether the file at sorted position ``index`` is in the validation
  split (every ``VALIDATION_EVERY``-th file)."""
  return index % VALIDATION_EVERY == VALIDATION_EVERY - 1


@functools.lru_cache(maxsize=4)
def stdlib_corpus(directory: str | None = None) -> Corpus:
  """The standard library's top-level ``.py`` files as a byte corpus.

  ``sha256`` hashes, for each file in name order, its UTF-8 name, a zero
  byte, its length as 8 little-endian bytes, then its bytes; so it changes
  with any renamed, added, removed or edited file.
  """
  directory = directory or sysconfig.get_paths()['stdlib']
  names = stdlib_files(directory)
  if not names:
    raise ValueError(
      f'No .py files in {directory!r}: the stdlib_text corpus needs the '
      'running Python standard library sources. Point directory= at a '
      "folder of .py files, or use config.dataset='tiny_shakespeare' with "
      'prepared TFDS data.'
    )
  digest = hashlib.sha256()
  parts = {False: [], True: []}
  files = {False: [], True: []}
  for index, name in enumerate(names):
    with open(os.path.join(directory, name), 'rb') as f:
      content = f.read()
    digest.update(name.encode('utf-8') + b'\0')
    digest.update(len(content).to_bytes(8, 'little'))
    digest.update(content)
    held_out = is_validation_file(index)
    parts[held_out].append(content)
    files[held_out].append(name)
  as_array = lambda chunks: np.frombuffer(b''.join(chunks), np.uint8)
  return Corpus(
    name='stdlib_text',
    train=as_array(parts[False]),
    validation=as_array(parts[True]),
    sha256=digest.hexdigest(),
    train_files=tuple(files[False]),
    validation_files=tuple(files[True]),
  )


def _tfds_split_bytes(name, split, data_dir, max_bytes):
  """Every host reads the whole split: all hosts draw windows from the same
  bytes, and each keeps its slice of every global batch."""
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir)
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except Exception as e:  # pylint: disable=broad-except
    if 'mock' in type(e).__module__:
      raise
    if isinstance(e, AssertionError) and 'could not find data' in str(e):
      raise tfds_data.DatasetError(
        tfds_data._missing_message(name, data_dir, e)  # pylint: disable=protected-access
      ) from e
    raise tfds_data.DatasetError(
      f'Reading dataset {name!r} failed: {type(e).__name__}: {e}'
    ) from e
  chunks, size = [], 0
  for example in ds.as_numpy_iterator():
    chunks.append(bytes(example['text']) + b'\n')
    size += len(chunks[-1])
    if max_bytes and size >= max_bytes:
      break
  data = b''.join(chunks)
  return np.frombuffer(data[:max_bytes] if max_bytes else data, np.uint8)


@functools.lru_cache(maxsize=2)
def tfds_corpus(
  name: str, data_dir: str | None = None, max_bytes: int = 0
) -> Corpus:
  """A TFDS text dataset (``tiny_shakespeare``, ``lm1b``) as a byte corpus.

  Train bytes come from the ``train`` split, validation bytes from
  ``TFDS_EVAL_SPLIT[name]``; ``max_bytes > 0`` keeps only the first
  ``max_bytes`` of each. ``sha256`` hashes the train then the validation
  bytes.
  """
  if name not in TFDS_EVAL_SPLIT:
    raise ValueError(
      f'Unknown TFDS text dataset {name!r}; choose one of '
      f'{tuple(TFDS_EVAL_SPLIT)}.'
    )
  train = _tfds_split_bytes(name, 'train', data_dir, max_bytes)
  validation = _tfds_split_bytes(
    name, TFDS_EVAL_SPLIT[name], data_dir, max_bytes
  )
  digest = hashlib.sha256(train.tobytes())
  digest.update(validation.tobytes())
  return Corpus(
    name=name, train=train, validation=validation, sha256=digest.hexdigest()
  )


def load(name: str, data_dir: str | None = None, max_bytes: int = 0) -> Corpus:
  """The corpus ``name`` (one of :data:`DATASETS`)."""
  if name == 'stdlib_text':
    return stdlib_corpus()
  if name in TFDS_EVAL_SPLIT:
    return tfds_corpus(name, data_dir, max_bytes)
  raise ValueError(f'Unknown text dataset {name!r}; choose one of {DATASETS}.')


def _check_length(data: np.ndarray, seq_len: int, what: str) -> None:
  if seq_len < 1 or data.size < seq_len + 1:
    raise ValueError(
      f'config.seq_len={seq_len} does not fit the {what} ({data.size} '
      'bytes); it must be >= 1 and below the split size. Lower '
      'config.seq_len.'
    )


def train_batch(
  corpus: Corpus, step: int, batch_size: int, seq_len: int, seed: int
) -> dict:
  """The training batch of global step ``step`` (deterministic).

  Returns ``inputs`` and ``targets``, int32 ``(batch_size, seq_len)``, with
  ``targets[:, i] == inputs[:, i + 1]``.
  """
  _check_length(corpus.train, seq_len, 'train split')
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, corpus.train.size - seq_len, size=batch_size)
  windows = corpus.train[starts[:, None] + np.arange(seq_len + 1)]
  windows = windows.astype(np.int32)
  return {'inputs': windows[:, :-1], 'targets': windows[:, 1:]}


def eval_window_starts(
  corpus: Corpus, seq_len: int, max_windows: int = 0
) -> np.ndarray:
  """Start offsets of the evaluation windows (see the module docstring)."""
  _check_length(corpus.validation, seq_len, 'validation split')
  count = math.ceil((corpus.validation.size - 1) / seq_len)
  index = np.arange(count)
  if 0 < max_windows < count:
    index = np.round(np.linspace(0, count - 1, max_windows)).astype(np.int64)
  return index * seq_len


def eval_batches(
  corpus: Corpus, batch_size: int, seq_len: int, max_windows: int = 0
):
  """The evaluation windows once, in batches of ``batch_size``.

  Yields ``inputs``, ``targets`` and a per-position ``mask`` (False on the
  padding of the last window and of the last batch).
  """
  data = corpus.validation
  starts = eval_window_starts(corpus, seq_len, max_windows)
  offsets = np.arange(seq_len + 1)
  for first in range(0, len(starts), batch_size):
    chunk = starts[first : first + batch_size]
    index = chunk[:, None] + offsets
    valid = index < data.size
    windows = np.where(valid, data[np.minimum(index, data.size - 1)], 0)
    windows = windows.astype(np.int32)
    mask = valid[:, 1:]
    pad = batch_size - len(chunk)
    if pad:
      windows = np.concatenate(
        [windows, np.zeros((pad, seq_len + 1), np.int32)]
      )
      mask = np.concatenate([mask, np.zeros((pad, seq_len), bool)])
    yield {'inputs': windows[:, :-1], 'targets': windows[:, 1:], 'mask': mask}


def steps_per_epoch(corpus: Corpus, batch_size: int, seq_len: int) -> int:
  """Steps that draw as many target bytes as the train split holds."""
  return max(1, corpus.train.size // (batch_size * seq_len))


def unigram_bits_per_byte(corpus: Corpus) -> float:
  """Validation bits per byte of the train split's byte unigram model.

  The baseline any language model must beat: each validation byte coded
  with the train bytes' frequencies, add-one smoothed over the 256 values
  (so a byte unseen in train costs finite bits).
  """
  counts = np.bincount(corpus.train, minlength=VOCAB_SIZE) + 1.0
  log_prob = np.log2(counts / counts.sum())
  return float(-log_prob[corpus.validation].mean())
