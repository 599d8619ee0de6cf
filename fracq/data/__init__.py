"""Input pipelines: the embedded digits, and TFDS ImageNet / CIFAR."""

from __future__ import annotations

import jax

from fracq.data import digits
from fracq.data import tfds_data

__all__ = [
  'DATASETS',
  'DatasetError',
  'eval_batches',
  'input_shape',
  'num_classes',
  'steps_per_epoch',
  'train_iterator',
]

DatasetError = tfds_data.DatasetError

DATASETS = ('digits', 'cifar10', 'cifar100', 'imagenet2012')


def num_classes(name: str) -> int:
  if name == 'digits':
    return digits.NUM_CLASSES
  if name not in tfds_data.NUM_CLASSES:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {DATASETS}.')
  return tfds_data.NUM_CLASSES[name]


def input_shape(name: str, image_size: int) -> tuple[int, ...]:
  if name == 'digits':
    return (8, 8, 1)
  if name.startswith('cifar'):
    return (32, 32, 3)
  return (image_size, image_size, 3)


def steps_per_epoch(config) -> int:
  if config.dataset == 'digits':
    return digits.steps_per_epoch(config.batch_size)
  return tfds_data.TRAIN_SIZE[config.dataset] // config.batch_size


def train_iterator(config, start_step: int):
  """Local (this host's) training batches from ``start_step`` on."""
  if config.dataset == 'digits':
    n_proc, pid = jax.process_count(), jax.process_index()
    local = config.batch_size // n_proc

    def gen():
      step = start_step
      while True:
        b = digits.train_batch(step, config.batch_size, config.seed)
        yield {k: v[pid * local : (pid + 1) * local] for k, v in b.items()}
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
  if config.dataset == 'digits':
    n_proc, pid = jax.process_count(), jax.process_index()
    local = config.eval_batch_size // n_proc
    for b in digits.eval_batches(config.eval_batch_size):
      yield {k: v[pid * local : (pid + 1) * local] for k, v in b.items()}
    return
  yield from tfds_data.eval_batches(
    config.dataset,
    batch_size=config.eval_batch_size,
    data_dir=config.get('data_dir'),
    image_size=config.image_size,
  )
