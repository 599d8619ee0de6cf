"""MobileNet-V1 and MobileNet-V2 (ImageNet 224, and a CIFAR 32x32 variant).

Module naming:

    V2: stem_conv, stem_bn; block{i}/expand_conv, expand_bn, dw_conv, dw_bn,
        project_conv, project_bn; head_conv, head_bn; classifier
    V1: stem_conv, stem_bn; block{i}/dw_conv, dw_bn, pw_conv, pw_bn; fc

MobileNet-V2 follows torchvision's layout exactly (channel rounding to
multiples of 8, ReLU6, BN eps 1e-5, dropout 0.2 before the classifier), so
torchvision weights import one-to-one (``fracq.models.import_weights``). The
CIFAR variant (``mobilenet_v2_cifar``) keeps the same blocks but uses a
stride-1 stem and a stride-1 second stage, the usual 32x32 adaptation.

References: Howard et al. 2017 (arXiv 1704.04861); Sandler et al., CVPR 2018
(arXiv 1801.04381).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from fracq.models._common import batch_norm

FIRST_LAYER_PATTERN = r'^stem_conv$'
CLASSIFIER_PATTERN = r'^(classifier|fc)$'

V2_SETTINGS = (
  (1, 16, 1, 1),
  (6, 24, 2, 2),
  (6, 32, 3, 2),
  (6, 64, 4, 2),
  (6, 96, 3, 1),
  (6, 160, 3, 2),
  (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new < 0.9 * v:
    new += divisor
  return new


class _InvertedResidual(nn.Module):
  in_ch: int
  out_ch: int
  stride: int
  expand: int
  norm: Any
  dtype: Any

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    hidden = int(round(self.in_ch * self.expand))
    y = x
    if self.expand != 1:
      y = conv(hidden, (1, 1), name='expand_conv')(y)
      y = nn.relu6(self.norm(name='expand_bn')(y))
    y = conv(
      hidden,
      (3, 3),
      strides=self.stride,
      padding=((1, 1), (1, 1)),
      feature_group_count=hidden,
      name='dw_conv',
    )(y)
    y = nn.relu6(self.norm(name='dw_bn')(y))
    y = conv(self.out_ch, (1, 1), name='project_conv')(y)
    y = self.norm(name='project_bn')(y)
    if self.stride == 1 and self.in_ch == self.out_ch:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNet-V2 (torchvision layout)."""

  num_classes: int = 1000
  width_mult: float = 1.0
  settings: Sequence[tuple[int, int, int, int]] = V2_SETTINGS
  cifar: bool = False
  dropout: float = 0.2
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
    ch = make_divisible(32 * self.width_mult)
    last = make_divisible(1280 * max(1.0, self.width_mult))
    x = nn.Conv(
      ch,
      (3, 3),
      strides=1 if self.cifar else 2,
      padding=((1, 1), (1, 1)),
      use_bias=False,
      dtype=self.dtype,
      name='stem_conv',
    )(x)
    x = nn.relu6(norm(name='stem_bn')(x))
    i = 0
    for stage, (t, c, n, s) in enumerate(self.settings):
      out = make_divisible(c * self.width_mult)
      if self.cifar and stage == 1:
        s = 1
      for j in range(n):
        x = _InvertedResidual(
          ch, out, s if j == 0 else 1, t, norm, self.dtype, name=f'block{i}'
        )(x)
        ch = out
        i += 1
    x = nn.Conv(
      last, (1, 1), use_bias=False, dtype=self.dtype, name='head_conv'
    )(x)
    x = nn.relu6(norm(name='head_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    return x.astype(jnp.float32)


class MobileNetV1(nn.Module):
  """MobileNet-V1 (1.0, 224): a 3x3 stem and 13 depthwise-separable blocks."""

  num_classes: int = 1000
  width_mult: float = 1.0
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  blocks: Sequence[tuple[int, int]] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
  )

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = batch_norm(
      train, self.bn_axis_name, self.bn_momentum, self.bn_epsilon, self.dtype
    )
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    x = x.astype(self.dtype)
    ch = int(32 * self.width_mult)
    x = conv(ch, (3, 3), strides=2, padding=((1, 1), (1, 1)), name='stem_conv')(
      x
    )
    x = nn.relu(norm(name='stem_bn')(x))
    for i, (c, s) in enumerate(self.blocks):
      out = int(c * self.width_mult)
      x = _DepthwiseSeparable(ch, out, s, norm, conv, name=f'block{i}')(x)
      ch = out
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


class _DepthwiseSeparable(nn.Module):
  in_ch: int
  out_ch: int
  stride: int
  norm: Any
  conv: Any

  @nn.compact
  def __call__(self, x):
    x = self.conv(
      self.in_ch,
      (3, 3),
      strides=self.stride,
      padding=((1, 1), (1, 1)),
      feature_group_count=self.in_ch,
      name='dw_conv',
    )(x)
    x = nn.relu(self.norm(name='dw_bn')(x))
    x = self.conv(self.out_ch, (1, 1), name='pw_conv')(x)
    return nn.relu(self.norm(name='pw_bn')(x))


MobileNetV2Cifar = functools.partial(MobileNetV2, cifar=True, num_classes=100)
MobileNetV2Tiny = functools.partial(
  MobileNetV2,
  num_classes=10,
  width_mult=0.25,
  settings=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2)),
  cifar=True,
)
MobileNetV1Tiny = functools.partial(
  MobileNetV1,
  num_classes=10,
  width_mult=0.25,
  blocks=((64, 1), (128, 2), (128, 1)),
)
