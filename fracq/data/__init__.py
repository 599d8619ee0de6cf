"""Input pipelines: the embedded digits, TFDS ImageNet / CIFAR, and byte
text (the embedded standard-library corpus, TFDS tiny_shakespeare / lm1b).

Image batches are ``{'image', 'label'}`` (eval adds a per-example
``mask``); text batches are ``{'inputs', 'targets'}`` of int32 bytes (eval
adds a per-position ``mask``). :func:`model_input` picks the model's input
out of either, :func:`model_target` its labels.
"""

from __future__ import annotations

import jax

from fracq.data import digits
from fracq.data import text
from fracq.data import tfds_data

__all__ = [
  'DATASETS',
  'DatasetError',
  'TEXT_DATASETS',
  'eval_batches',
  'input_shape',
  'is_text',
  'model_input',
  'model_target',
  'num_classes',
  'provenance',
  'steps_per_epoch',
  'text_corpus',
  'train_iterator',
]

DatasetError = tfds_data.DatasetError

TEXT_DATASETS = text.DATASETS
DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet2012') + TEXT_DATASETS

# Text configs that leave these unset get these defaults.
DEFAULT_SEQ_LEN = 128


def is_text(name: str) -> bool:
  """Whether ``name`` is a byte-level language-modelling dataset."""
  return name in TEXT_DATASETS


def model_input(batch):
  """The model's input in a batch: ``image`` or text ``inputs``."""
  return batch['inputs'] if 'inputs' in batch else batch['image']


def model_target(batch):
  """The labels in a batch: image ``label`` or text ``targets``."""
  return batch['targets'] if 'targets' in batch else batch['label']


def text_corpus(config) -> text.Corpus:
  """The byte corpus of a text config."""
  return text.load(
    config.dataset,
    data_dir=config.get('data_dir'),
    max_bytes=config.get('text_max_bytes', 0) or 0,
  )


def provenance(config) -> dict:
  """What a run records about its data (text: corpus name, size, SHA-256)."""
  if not is_text(config.dataset):
    return {}
  return text_corpus(config).provenance()


def num_classes(name: str) -> int:
  if name == 'digits':
    return digits.NUM_CLASSES
  if is_text(name):
    return text.VOCAB_SIZE
  if name not in tfds_data.NUM_CLASSES:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {DATASETS}.')
  return tfds_data.NUM_CLASSES[name]


def input_shape(
  name: str, image_size: int, seq_len: int = 0
) -> tuple[int, ...]:
  """One example's input shape (text: ``(seq_len,)`` int32 bytes)."""
  if name == 'digits':
    return (8, 8, 1)
  if is_text(name):
    return (seq_len or DEFAULT_SEQ_LEN,)
  if name.startswith('cifar'):
    return (32, 32, 3)
  return (image_size, image_size, 3)


def _seq_len(config) -> int:
  return config.get('seq_len', DEFAULT_SEQ_LEN)


def steps_per_epoch(config) -> int:
  if config.dataset == 'digits':
    return digits.steps_per_epoch(config.batch_size)
  if is_text(config.dataset):
    return text.steps_per_epoch(
      text_corpus(config), config.batch_size, _seq_len(config)
    )
  return tfds_data.TRAIN_SIZE[config.dataset] // config.batch_size


def _host_slice(batch, local: int):
  pid = jax.process_index()
  return {k: v[pid * local : (pid + 1) * local] for k, v in batch.items()}


def train_iterator(config, start_step: int):
  """Local (this host's) training batches from ``start_step`` on."""
  if config.dataset == 'digits' or is_text(config.dataset):
    local = config.batch_size // jax.process_count()
    if config.dataset == 'digits':
      batch_at = lambda step: digits.train_batch(
        step, config.batch_size, config.seed
      )
    else:
      corpus, seq_len = text_corpus(config), _seq_len(config)
      batch_at = lambda step: text.train_batch(
        corpus, step, config.batch_size, seq_len, config.seed
      )

    def gen():
      step = start_step
      while True:
        yield _host_slice(batch_at(step), local)
        step += 1

    return gen()
  if config.dataset not in DATASETS:
    raise ValueError(
      f'Unknown dataset {config.dataset!r}; choose one of {DATASETS}.'
    )
  return tfds_data.train_iterator(
    config.dataset,
    batch_size=config.batch_size,
    seed=config.seed,
    start_step=start_step,
    data_dir=config.get('data_dir'),
    image_size=config.image_size,
  )


def eval_batches(config):
  local = config.eval_batch_size // jax.process_count()
  if config.dataset == 'digits':
    for b in digits.eval_batches(config.eval_batch_size):
      yield _host_slice(b, local)
    return
  if is_text(config.dataset):
    batches = text.eval_batches(
      text_corpus(config),
      config.eval_batch_size,
      _seq_len(config),
      config.get('eval_windows', 0) or 0,
    )
    for b in batches:
      yield _host_slice(b, local)
    return
  yield from tfds_data.eval_batches(
    config.dataset,
    batch_size=config.eval_batch_size,
    data_dir=config.get('data_dir'),
    image_size=config.image_size,
  )
