"""Inception-V3 (299x299), torchvision's layout, with an optional aux head.

Module names follow torchvision (``Conv2d_1a_3x3/conv``,
``Mixed_5b/branch1x1/conv``, ``AuxLogits/fc``, ``fc``) so its weights map
one-to-one. Every convolution is bias-free and followed by BatchNorm
(eps 0.001) and ReLU. With ``aux_logits`` the model returns ``(logits,
aux_logits)`` in training mode.

Reference: Szegedy et al., "Rethinking the Inception Architecture",
CVPR 2016, arXiv 1512.00567.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fracq.models._common import batch_norm

FIRST_LAYER_PATTERN = r'^Conv2d_1a_3x3/conv$'
CLASSIFIER_PATTERN = r'^fc$'


class BasicConv(nn.Module):
  features: int
  kernel: tuple[int, int]
  norm: Any
  dtype: Any
  strides: int = 1
  padding: Any = 'VALID'

  @nn.compact
  def __call__(self, x):
    pad = self.padding
    if isinstance(pad, tuple):
      pad = ((pad[0], pad[0]), (pad[1], pad[1]))
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=pad,
      use_bias=False,
      dtype=self.dtype,
      name='conv',
    )(x)
    return nn.relu(self.norm(name='bn')(x))


def _avg3(x):
  return nn.avg_pool(
    x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True
  )


def _max3s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  pool_features: int
  c: Any

  @nn.compact
  def __call__(self, x):
    c = self.c
    b1 = c(64, (1, 1), name='branch1x1')(x)
    b5 = c(48, (1, 1), name='branch5x5_1')(x)
    b5 = c(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = c(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = c(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = c(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = c(self.pool_features, (1, 1), name='branch_pool')(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  c: Any

  @nn.compact
  def __call__(self, x):
    c = self.c
    b3 = c(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = c(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = c(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = c(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
  c7: int
  c: Any

  @nn.compact
  def __call__(self, x):
    c, c7 = self.c, self.c7
    b1 = c(192, (1, 1), name='branch1x1')(x)
    b7 = c(c7, (1, 1), name='branch7x7_1')(x)
    b7 = c(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = c(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = c(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = c(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = c(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = c(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = c(192, (1, 1), name='branch_pool')(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  c: Any

  @nn.compact
  def __call__(self, x):
    c = self.c
    b3 = c(192, (1, 1), name='branch3x3_1')(x)
    b3 = c(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = c(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = c(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = c(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
  c: Any

  @nn.compact
  def __call__(self, x):
    c = self.c
    b1 = c(320, (1, 1), name='branch1x1')(x)
    b3 = c(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate(
      [
        c(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        c(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
      ],
      axis=-1,
    )
    bd = c(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = c(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate(
      [
        c(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        c(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
      ],
      axis=-1,
    )
    bp = c(192, (1, 1), name='branch_pool')(_avg3(x))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionAux(nn.Module):
  num_classes: int
  c: Any
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(x, (5, 5), strides=(3, 3))
    x = self.c(128, (1, 1), name='conv0')(x)
    x = self.c(768, (5, 5), name='conv1')(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


class InceptionV3(nn.Module):
  """Inception-V3 for 299x299 inputs."""

  num_classes: int = 1000
  aux_logits: bool = True
  dropout: float = 0.5
  width: float = 1.0
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = batch_norm(
      train, self.bn_axis_name, self.bn_momentum, self.bn_epsilon, self.dtype
    )
    c = functools.partial(BasicConv, norm=norm, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = c(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = c(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = c(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max3s2(x)
    x = c(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = c(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max3s2(x)
    x = InceptionA(32, c, name='Mixed_5b')(x)
    x = InceptionA(64, c, name='Mixed_5c')(x)
    x = InceptionA(64, c, name='Mixed_5d')(x)
    x = InceptionB(c, name='Mixed_6a')(x)
    x = InceptionC(128, c, name='Mixed_6b')(x)
    x = InceptionC(160, c, name='Mixed_6c')(x)
    x = InceptionC(160, c, name='Mixed_6d')(x)
    x = InceptionC(192, c, name='Mixed_6e')(x)
    aux = None
    if self.aux_logits and (train or self.is_initializing()):
      aux = InceptionAux(self.num_classes, c, self.dtype, name='AuxLogits')(x)
    x = InceptionD(c, name='Mixed_7a')(x)
    x = InceptionE(c, name='Mixed_7b')(x)
    x = InceptionE(c, name='Mixed_7c')(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    x = x.astype(jnp.float32)
    if aux is not None and train:
      return x, aux.astype(jnp.float32)
    return x
