"""The small CNN of the embedded digits quickstart.

Input: scikit-learn's 8x8 handwritten digits, normalised, shape (N, 8, 8, 1).
Layers (module names in brackets, as quantization rules see them):

    [conv_init] 3x3, 32     -> [bn_init] -> relu            8x8
    [conv1]     3x3, 64     -> [bn1]     -> relu            8x8
    [conv2]     3x3, 64, s2 -> [bn2]     -> relu            4x4
    [conv3]     3x3, 128    -> [bn3]     -> relu            4x4
    [conv4]     1x1, 128    -> [bn4]     -> relu            4x4
    global average pool -> [head] dense, num_classes

About 130k parameters, with layers of clearly different sizes (the
FracBits testbed): the first conv and the classifier are small, the middle
3x3 convs hold most of the weights.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fracq.models._common import batch_norm

FIRST_LAYER_PATTERN = r'^conv_init$'
CLASSIFIER_PATTERN = r'^head$'


class DigitsCNN(nn.Module):
  """A five-conv CNN for 8x8 digits."""

  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 64, 128, 128)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = batch_norm(
      train, self.bn_axis_name, self.bn_momentum, self.bn_epsilon, self.dtype
    )

    w = self.widths
    specs = [
      ('conv_init', 'bn_init', w[0], (3, 3), 1),
      ('conv1', 'bn1', w[1], (3, 3), 1),
      ('conv2', 'bn2', w[2], (3, 3), 2),
      ('conv3', 'bn3', w[3], (3, 3), 1),
      ('conv4', 'bn4', w[4], (1, 1), 1),
    ]
    x = x.astype(self.dtype)
    for conv_name, bn_name, feats, ksize, stride in specs:
      x = nn.Conv(
        feats,
        ksize,
        strides=stride,
        padding='SAME',
        use_bias=False,
        dtype=self.dtype,
        name=conv_name,
      )(x)
      x = nn.relu(norm(name=bn_name)(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)
