"""A GPT-style byte-level decoder (Radford et al., 2019, "Language Models
are Unsupervised Multitask Learners": pre-LN blocks, learned positions).

Input: int32 tokens ``(batch, length)`` (bytes, ``vocab_size=256``), length
at most ``max_len``. Output: float32 next-token logits ``(batch, length,
vocab_size)``; position ``i`` sees tokens ``0..i`` only (causal mask).
Layers (module names in brackets, as quantization rules see them)::

    [embed] token embedding (vocab_size x d_model) + [pos_embed] positions
    num_layers x [block_<i>] pre-LN transformer block
        ([ln1], [attn] with [query] [key] [value] [out], [ln2],
         [mlp_up] -> gelu -> [mlp_down]); see fracq.models.transformer
    [ln_final] -> [head] dense to vocab_size (untied), or the embedding
    table transposed (``tie_embeddings=True``, no [head] module)

Sizes (``gpt_*`` registry names; parameters with tied embeddings and the
given ``max_len``): gpt_tiny 2x32, 36k (tests); gpt_small 4x128, 0.86M
(the byte-level LM on the standard-library corpus); gpt_base 6x256, 4.9M;
gpt_medium 8x512, 25.9M.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from fracq.models.transformer import INIT_STD
from fracq.models.transformer import TransformerBlock

FIRST_LAYER_PATTERN = r'^embed$'
CLASSIFIER_PATTERN = r'^head$'


class GPT(nn.Module):
  """A decoder-only transformer over bytes; ``__call__(tokens, train)``."""

  vocab_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  d_model: int = 128
  mlp_ratio: int = 4
  max_len: int = 256
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  # Unused (no BatchNorm); accepted so every zoo model builds alike.
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
        f'GPT takes int tokens of shape (batch, length); got {tokens.dtype} '
        f'{tokens.shape}.'
      )
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(
        f'Sequence length {length} exceeds max_len={self.max_len}; build the '
        'model with a larger max_len (model_kwargs.max_len) or shorten the '
        'sequences (config.seq_len).'
      )
    init = nn.initializers.normal(INIT_STD)
    embed = nn.Embed(
      self.vocab_size,
      self.d_model,
      embedding_init=init,
      dtype=self.dtype,
      name='embed',
    )
    positions = self.param('pos_embed', init, (self.max_len, self.d_model))
    x = embed(tokens) + positions[None, :length].astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    mask = nn.make_causal_mask(tokens)
    for index in range(self.num_layers):
      x = TransformerBlock(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_ratio * self.d_model,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        name=f'block_{index}',
      )(x, mask, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name='ln_final')(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(
        self.vocab_size, dtype=self.dtype, kernel_init=init, name='head'
      )(x)
    return logits.astype(jnp.float32)


GPTTiny = functools.partial(
  GPT, num_layers=2, num_heads=2, d_model=32, max_len=64
)
GPTSmall = functools.partial(
  GPT, num_layers=4, num_heads=4, d_model=128, max_len=256
)
GPTBase = functools.partial(
  GPT, num_layers=6, num_heads=8, d_model=256, max_len=512
)
GPTMedium = functools.partial(
  GPT, num_layers=8, num_heads=8, d_model=512, max_len=1024
)
