"""A Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16
Words: Transformers for Image Recognition at Scale").

Input: images ``(batch, height, width, channels)``, sides divisible by
``patch_size``. Output: float32 logits ``(batch, num_classes)``. Layers
(module names in brackets, as quantization rules see them)::

    [patch_embed] conv, kernel = stride = patch_size, to d_model
    [cls] class token prepended (pool='cls'), + [pos_embed] positions
    num_layers x [block_<i>] pre-LN transformer block (no mask; see
        fracq.models.transformer)
    [ln_final] -> class token (pool='cls') or mean over patches
        (pool='mean') -> [head] dense to num_classes

Registry names: vit_tiny (tests, 8x8 input, patch 4), vit_digits (8x8
digits, patch 2, 4x64, 0.14M parameters), vit_s16 (ViT-S/16 at 224, 12x384,
22.05M parameters).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fracq.models.transformer import INIT_STD
from fracq.models.transformer import TransformerBlock

FIRST_LAYER_PATTERN = r'^patch_embed$'
CLASSIFIER_PATTERN = r'^head$'


class ViT(nn.Module):
  """A pre-LN Vision Transformer; ``__call__(images, train)``."""

  num_classes: int = 1000
  patch_size: int = 16
  num_layers: int = 12
  num_heads: int = 6
  d_model: int = 384
  mlp_ratio: int = 4
  pool: str = 'cls'  # 'cls' (class token) or 'mean' (mean over patches)
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  # Unused (no BatchNorm); accepted so every zoo model builds alike.
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.pool not in ('cls', 'mean'):
      raise ValueError(f"ViT pool={self.pool!r}; choose 'cls' or 'mean'.")
    height, width = x.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
        f'Image {height}x{width} does not divide into {self.patch_size}x'
        f'{self.patch_size} patches; choose a patch_size that divides both.'
      )
    init = nn.initializers.normal(INIT_STD)
    x = nn.Conv(
      self.d_model,
      (self.patch_size, self.patch_size),
      strides=self.patch_size,
      padding='VALID',
      dtype=self.dtype,
      name='patch_embed',
    )(x.astype(self.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.d_model)
    if self.pool == 'cls':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.d_model))
      cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.d_model))
      x = jnp.concatenate([cls, x], axis=1)
    positions = self.param('pos_embed', init, (1,) + x.shape[1:])
    x = x + positions.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for index in range(self.num_layers):
      x = TransformerBlock(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_ratio * self.d_model,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name=f'block_{index}',
      )(x, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name='ln_final')(x)
    x = x[:, 0] if self.pool == 'cls' else jnp.mean(x, axis=1)
    x = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      kernel_init=nn.initializers.zeros,
      name='head',
    )(x)
    return x.astype(jnp.float32)


ViTTiny = functools.partial(
  ViT, num_classes=10, patch_size=4, num_layers=1, num_heads=2, d_model=16
)
ViTDigits = functools.partial(
  ViT,
  num_classes=10,
  patch_size=2,
  num_layers=4,
  num_heads=4,
  d_model=64,
  mlp_ratio=2,
)
ViTS16 = functools.partial(
  ViT, patch_size=16, num_layers=12, num_heads=6, d_model=384
)
