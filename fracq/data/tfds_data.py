"""TFDS input pipelines: ImageNet (imagenet2012) and CIFAR-10/100.

Per-host sharding: each process reads its own slice of the split
(``tfds.split_for_jax_process``) and yields its local part of the global
batch. Training: ImageNet random-resized-crop (area 8-100%, aspect 3/4-4/3)
+ horizontal flip; CIFAR pad-4 random crop + flip. Evaluation: ImageNet
resize to ``image_size / 0.875`` and center-crop; CIFAR as is; the whole
split exactly once, the last batch padded and masked.

Images are normalised with the ImageNet / CIFAR channel means and standard
deviations. Datasets must already be prepared in ``data_dir`` (no download
here); ImageNet is built from the manual download directory.
"""

from __future__ import annotations

import os

import jax
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = {'imagenet2012': 1000, 'cifar10': 10, 'cifar100': 100}
TRAIN_SIZE = {'imagenet2012': 1281167, 'cifar10': 50000, 'cifar100': 50000}
EVAL_SPLIT = {
  'imagenet2012': 'validation',
  'cifar10': 'test',
  'cifar100': 'test',
}


def _missing_message(name: str, data_dir: str | None, err: object) -> str:
  where = data_dir or '~/tensorflow_datasets'
  if name == 'imagenet2012':
    how = (
      'ImageNet cannot be downloaded automatically. Download '
      'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from '
      'image-net.org, put them in <data_dir>/downloads/manual/, then run '
      f'`tfds build imagenet2012 --data_dir={where}` (or pass '
      '--config.data_dir=<data_dir>; fracq builds it from the manual '
      'directory on first use).'
    )
  else:
    how = (
      f'Prepare it where a network is available with `tfds build {name} '
      f'--data_dir={where}` and copy the directory here, or pass '
      '--config.data_dir pointing at a prepared TFDS directory.'
    )
  return (
    f'Dataset {name!r} is not available in {where}: {err}. {how} For a '
    'run without any download, use configs/digits_*.py (embedded '
    'data).'
  )


class DatasetError(ValueError):
  """A TFDS dataset is missing or cannot be read."""


def _load(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds

  where = data_dir or '~/tensorflow_datasets'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    if name == 'imagenet2012' and data_dir:
      manual = os.path.join(data_dir, 'downloads', 'manual')
      if os.path.isdir(manual) and not os.path.isdir(builder.data_dir):
        builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual)
        )
    split = tfds.split_for_jax_process(split, drop_remainder=False)
    return builder.as_dataset(
      split=split,
      shuffle_files=False,
      read_config=tfds.ReadConfig(shuffle_seed=0, interleave_cycle_length=1),
    )
  except Exception as e:  # pylint: disable=broad-except
    if 'mock' in type(e).__module__:
      raise
    if isinstance(e, AssertionError) and 'could not find data' in str(e):
      # Only a dataset that is genuinely not there gets the download advice.
      raise DatasetError(_missing_message(name, data_dir, e)) from e
    # The dataset is there (or being built) but failed: report the cause.
    raise DatasetError(
      f'Reading dataset {name!r} from {where} failed: {type(e).__name__}: {e}'
    ) from e


def _imagenet_train(image, image_size):
  import tensorflow as tf

  shape = tf.shape(image)
  bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
  begin, size, _ = tf.image.sample_distorted_bounding_box(
    shape,
    bounding_boxes=bbox,
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  crop = tf.slice(image, begin, size)
  crop = tf.image.resize(crop, (image_size, image_size), 'bicubic')
  return tf.image.random_flip_left_right(crop)


def _imagenet_eval(image, image_size):
  import tensorflow as tf

  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  resize = image_size / 0.875
  scale = resize / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new, 'bicubic')
  off = (new - image_size) // 2
  return tf.slice(image, [off[0], off[1], 0], [image_size, image_size, 3])


def _preprocess(name, train, image_size):
  import tensorflow as tf

  mean, std = (
    (IMAGENET_MEAN, IMAGENET_STD)
    if name == 'imagenet2012'
    else (CIFAR_MEAN, CIFAR_STD)
  )

  def fn(ex):
    image = tf.cast(ex['image'], tf.float32)
    if name == 'imagenet2012':
      image = (
        _imagenet_train(image, image_size)
        if train
        else _imagenet_eval(image, image_size)
      )
    elif train:
      image = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode='REFLECT')
      image = tf.image.random_crop(image, (32, 32, 3))
      image = tf.image.random_flip_left_right(image)
    image = (image / 255.0 - mean) / std
    return {
      'image': tf.cast(image, tf.float32),
      'label': tf.cast(ex['label'], tf.int32),
    }

  return fn


def train_iterator(
  name: str,
  *,
  batch_size: int,
  seed: int,
  start_step: int = 0,
  data_dir: str | None = None,
  image_size: int = 224,
):
  """Yields local training batches; resumes at ``start_step``."""
  import tensorflow as tf

  n_proc = jax.process_count()
  if batch_size % n_proc:
    raise ValueError(
      f'global batch {batch_size} must divide by the {n_proc} processes.'
    )
  local = batch_size // n_proc
  ds = _load(name, 'train', data_dir)
  opts = tf.data.Options()
  opts.deterministic = True
  ds = ds.with_options(opts).repeat()
  ds = ds.shuffle(
    16 * local, seed=seed + jax.process_index(), reshuffle_each_iteration=True
  )
  ds = ds.map(
    _preprocess(name, True, image_size),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  ds = ds.batch(local, drop_remainder=True)
  if start_step:
    ds = ds.skip(start_step)
  ds = ds.prefetch(2)
  for b in ds.as_numpy_iterator():
    yield b


def eval_batches(
  name: str,
  *,
  batch_size: int,
  data_dir: str | None = None,
  image_size: int = 224,
):
  """The whole eval split once (this host's part), padded and masked."""
  import tensorflow as tf

  local = batch_size // jax.process_count()
  ds = _load(name, EVAL_SPLIT[name], data_dir)
  ds = ds.map(
    _preprocess(name, False, image_size),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  ds = ds.batch(local, drop_remainder=False)
  for b in ds.as_numpy_iterator():
    n = len(b['label'])
    pad = local - n
    mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    if pad:
      b = {
        k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
        for k, v in b.items()
      }
    yield {**b, 'mask': mask}
