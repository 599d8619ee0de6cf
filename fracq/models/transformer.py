"""The pre-LN transformer block shared by the GPT decoder and the ViT.

Layers (module names in brackets, as quantization rules see them)::

    x + [attn]( [ln1](x) )                 multi-head self-attention
    x + [mlp_down]( gelu( [mlp_up]( [ln2](x) ) ) )

``attn`` is ``nn.MultiHeadDotProductAttention`` (its ``query``, ``key``,
``value`` and ``out`` projections are ``DenseGeneral`` layers); the mask
(causal for the decoder, none for the ViT) comes from the caller.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# GPT-2's initialisation: N(0, 0.02) for every kernel and embedding.
INIT_STD = 0.02


class TransformerBlock(nn.Module):
  """One pre-LN block: self-attention then a GELU MLP, both residual."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, *, train: bool = False):
    init = nn.initializers.normal(INIT_STD)
    h = nn.LayerNorm(dtype=self.dtype, name='ln1')(x)
    h = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      kernel_init=init,
      dropout_rate=self.dropout_rate,
      deterministic=not train,
      name='attn',
    )(h, mask=mask)
    x = x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    h = nn.LayerNorm(dtype=self.dtype, name='ln2')(x)
    h = nn.Dense(
      self.mlp_dim, dtype=self.dtype, kernel_init=init, name='mlp_up'
    )(h)
    h = nn.gelu(h)
    h = nn.Dense(
      x.shape[-1], dtype=self.dtype, kernel_init=init, name='mlp_down'
    )(h)
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)
