"""The embedded dataset: scikit-learn's bundled handwritten digits.

Real data that needs no download: 1,797 grey 8x8 images of the digits 0-9
(the UCI "optdigits" test set, shipped inside scikit-learn).

Fixed split (documented, reproducible): a stratified split with
``random_state=0`` holding out 20% -> 1,437 train / 360 test images. Pixels
(0..16) are divided by 16, then standardised with the *train* set's mean and
standard deviation. Shape ``(N, 8, 8, 1)`` float32, labels int32.

Training batches come from a per-epoch permutation seeded by ``(seed,
epoch)``, so batch ``t`` is a pure function of ``(seed, t)``: a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def load_digits_split():
  """``(x_train, y_train, x_test, y_test)`` as numpy arrays."""
  from sklearn import datasets
  from sklearn import model_selection

  d = datasets.load_digits()
  x = d.images.astype(np.float32) / 16.0
  y = d.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
    x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
  )
  mean, std = x_tr.mean(), x_tr.std()
  norm = lambda a: ((a - mean) / std)[..., None].astype(np.float32)
  return norm(x_tr), y_tr, norm(x_te), y_te


def train_batch(step: int, batch_size: int, seed: int):
  """The training batch of global step ``step`` (deterministic)."""
  x, y, _, _ = load_digits_split()
  n = len(x)
  per_epoch = n // batch_size
  if per_epoch == 0:
    raise ValueError(
      f'batch_size={batch_size} exceeds the {n} digits '
      'training images; lower config.batch_size.'
    )
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  idx = perm[i * batch_size : (i + 1) * batch_size]
  return {'image': x[idx], 'label': y[idx]}


def steps_per_epoch(batch_size: int) -> int:
  return len(load_digits_split()[0]) // batch_size


def eval_batches(batch_size: int, split: str = 'test'):
  """The whole split once, last batch padded; ``mask`` marks real rows."""
  x_tr, y_tr, x_te, y_te = load_digits_split()
  x, y = (x_te, y_te) if split == 'test' else (x_tr, y_tr)
  for start in range(0, len(x), batch_size):
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
    pad = batch_size - len(xb)
    mask = np.concatenate([np.ones(len(xb), bool), np.zeros(pad, bool)])
    if pad:
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
    yield {'image': xb, 'label': yb, 'mask': mask}
