"""ResNets: ImageNet v1.5 (as torchvision) and CIFAR (He et al. 2016).

Module naming (what quantization rules match):

    conv_init, bn_init                      the stem (7x7/2 + maxpool on
                                            ImageNet, 3x3 on CIFAR)
    stage{i}_block{j}/conv1, bn1, conv2, bn2[, conv3, bn3]
    stage{i}_block{j}/downsample_conv, downsample_bn   projection shortcut
    fc                                      the classifier

ImageNet v1.5: bias-free convs, BN after each conv, the stride of a
bottleneck on its 3x3 conv, 1x1 projection shortcuts when the shape changes
(torchvision's layout and parameter counts). CIFAR ResNet-20/56: three
stages of 16/32/64 channels with 1x1 projection shortcuts (option B).

References: He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, arXiv 1512.03385.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fracq.models._common import batch_norm

FIRST_LAYER_PATTERN = r'^conv_init$'
CLASSIFIER_PATTERN = r'^fc$'


class _Block(nn.Module):
  features: int
  strides: int
  bottleneck: bool
  norm: Any
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    residual = x
    out_features = self.features * (4 if self.bottleneck else 1)
    if self.bottleneck:
      y = conv(self.features, (1, 1), name='conv1')(x)
      y = nn.relu(self.norm(name='bn1')(y))
      y = conv(
        self.features,
        (3, 3),
        strides=self.strides,
        padding=((1, 1), (1, 1)),
        name='conv2',
      )(y)
      y = nn.relu(self.norm(name='bn2')(y))
      y = conv(out_features, (1, 1), name='conv3')(y)
      y = self.norm(name='bn3')(y)
    else:
      y = conv(
        self.features,
        (3, 3),
        strides=self.strides,
        padding=((1, 1), (1, 1)),
        name='conv1',
      )(x)
      y = nn.relu(self.norm(name='bn1')(y))
      y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(y)
      y = self.norm(name='bn2')(y)
    if residual.shape != y.shape:
      residual = conv(
        out_features, (1, 1), strides=self.strides, name='downsample_conv'
      )(residual)
      residual = self.norm(name='downsample_bn')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet for ImageNet (``cifar_stem=False``) or CIFAR (``True``)."""

  stage_sizes: Sequence[int]
  num_classes: int = 1000
  bottleneck: bool = False
  widths: Sequence[int] = (64, 128, 256, 512)
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = batch_norm(
      train, self.bn_axis_name, self.bn_momentum, self.bn_epsilon, self.dtype
    )
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = nn.Conv(
        self.widths[0],
        (3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        dtype=self.dtype,
        name='conv_init',
      )(x)
      x = nn.relu(norm(name='bn_init')(x))
    else:
      x = nn.Conv(
        self.widths[0],
        (7, 7),
        strides=2,
        padding=((3, 3), (3, 3)),
        use_bias=False,
        dtype=self.dtype,
        name='conv_init',
      )(x)
      x = nn.relu(norm(name='bn_init')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if (i > 0 and j == 0) else 1
        x = _Block(
          self.widths[i],
          strides,
          self.bottleneck,
          norm,
          self.dtype,
          name=f'stage{i + 1}_block{j}',
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True)
ResNet20 = functools.partial(
  ResNet,
  stage_sizes=(3, 3, 3),
  num_classes=10,
  widths=(16, 32, 64),
  cifar_stem=True,
)
ResNet56 = functools.partial(
  ResNet,
  stage_sizes=(9, 9, 9),
  num_classes=10,
  widths=(16, 32, 64),
  cifar_stem=True,
)
# A tiny variant for tests: every block type, few channels.
ResNetTiny = functools.partial(
  ResNet, stage_sizes=(1, 1), num_classes=10, widths=(8, 16), cifar_stem=True
)
ResNetTinyBottleneck = functools.partial(
  ResNet, stage_sizes=(1, 1), num_classes=10, widths=(4, 8), bottleneck=True
)
