"""Shared pieces of the NNX tests: linen/NNX model pairs with the same
layer names, and NNX states in linen's variable layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fracq.nnx as fnnx

VOCAB, WIDTH = 32, 16


class LinenBlock(nn.Module):
  """A small transformer-style block: embedding, LayerNorm, MLP, a
  DenseGeneral projection, an Einsum and the tied output head."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    embed = nn.Embed(VOCAB, WIDTH, name='embed')
    x = embed(tokens)
    h = nn.LayerNorm(name='norm')(x)
    h = nn.gelu(nn.Dense(2 * WIDTH, name='fc1')(h))
    x = x + nn.Dense(WIDTH, name='fc2')(h)
    heads = nn.DenseGeneral((2, WIDTH // 2), name='proj')(x)
    mixed = nn.Einsum((2, WIDTH // 2, WIDTH), 'bthd,hdf->btf', name='mix')(
      heads
    )
    return embed.attend(x + mixed)


class NNXBlock(nnx.Module):
  """:class:`LinenBlock` in NNX, with the same layer names."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.fc1 = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.fc2 = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)
    self.proj = nnx.LinearGeneral(WIDTH, (2, WIDTH // 2), rngs=rngs)
    self.mix = nnx.Einsum(
      'bthd,hdf->btf', (2, WIDTH // 2, WIDTH), (WIDTH,), rngs=rngs
    )

  def __call__(self, tokens):
    x = self.embed(tokens)
    h = nnx.gelu(self.fc1(self.norm(x)))
    x = x + self.fc2(h)
    mixed = self.mix(self.proj(x))
    return self.embed.attend(x + mixed)


def linen_layout(state: nnx.State) -> dict:
  """An NNX state (or gradient) of a ``QATModule`` in linen's layout:
  ``{'params' | 'quant' | 'quant_stats' | 'batch_stats': {path: ...}}``
  (the ``model`` root and the wrappers' ``layer`` part dropped)."""
  out: dict = {}
  kinds = (
    (fnnx.QuantParam, 'quant'),
    (fnnx.QuantStat, 'quant_stats'),
    (nnx.BatchStat, 'batch_stats'),
    (nnx.Param, 'params'),
  )
  for path, var in nnx.to_flat_state(state):
    collection = next((c for t, c in kinds if isinstance(var, t)), None)
    if collection is None:
      continue
    parts = [str(p) for p in path[1:] if p != 'layer']
    node = out.setdefault(collection, {})
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = var.get_value()
  return out


def assert_trees_close(actual, expected, atol=1e-6, rtol=1e-5):
  """Same structure and values (to float rounding)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected), (
    jax.tree.structure(actual),
    jax.tree.structure(expected),
  )
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(e, np.float32), atol=atol, rtol=rtol
    )


def tokens():
  return jax.random.randint(jax.random.key(3), (2, 6), 0, VOCAB, jnp.int32)
