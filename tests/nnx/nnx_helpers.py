"""Shared pieces of the NNX tests: linen/NNX model pairs with the same
layer names, and NNX states in linen's variable layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import fracq.nnx as fnnx
from fracq.models import transformer as linen_transformer
from fracq.nnx import models as fnnx_models

VOCAB, WIDTH = 32, 16


class LinenBlock(nn.Module):
  """A small transformer: embedding, the zoo's pre-LN block (LayerNorm,
  multi-head self-attention, GELU MLP), a DenseGeneral projection, an
  Einsum and the tied output head."""

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    embed = nn.Embed(VOCAB, WIDTH, name='embed')
    x = embed(tokens)
    x = linen_transformer.TransformerBlock(
      num_heads=2, mlp_dim=2 * WIDTH, name='block'
    )(x, train=train)
    heads = nn.DenseGeneral((2, WIDTH // 2), name='proj')(x)
    mixed = nn.Einsum((2, WIDTH // 2, WIDTH), 'bthd,hdf->btf', name='mix')(
      heads
    )
    return embed.attend(x + mixed)


class NNXBlock(nnx.Module):
  """:class:`LinenBlock` in NNX, with the same layer names."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.block = fnnx_models.TransformerBlock(
      WIDTH, num_heads=2, mlp_dim=2 * WIDTH, rngs=rngs
    )
    self.proj = nnx.LinearGeneral(WIDTH, (2, WIDTH // 2), rngs=rngs)
    self.mix = nnx.Einsum(
      'bthd,hdf->btf', (2, WIDTH // 2, WIDTH), (WIDTH,), rngs=rngs
    )

  def __call__(self, tokens):
    x = self.block(self.embed(tokens))
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


class LinenConvs(nn.Module):
  """Grouped, depthwise and transposed convolutions."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name='stem')(x)
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2, name='grouped')(x))
    x = nn.Conv(8, (3, 3), feature_group_count=8, name='depthwise')(x)
    x = nn.ConvTranspose(4, (2, 2), strides=(2, 2), name='up')(x)
    return jnp.mean(x, axis=(1, 2))


class NNXConvs(nnx.Module):
  """:class:`LinenConvs` in NNX, with the same layer names."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
    self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
    self.up = nnx.ConvTranspose(8, 4, (2, 2), strides=(2, 2), rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    x = nnx.relu(self.grouped(x))
    x = self.up(self.depthwise(x))
    return jnp.mean(x, axis=(1, 2))


def images():
  return jax.random.normal(jax.random.key(4), (2, 6, 6, 3))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(16, name='fc1')(x))
    x = nn.relu(nn.Dense(16, name='fc2')(x))
    return nn.Dense(3, name='head')(x)


class NNXMLP(nnx.Module):
  """:class:`LinenMLP` in NNX, with the same layer names."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(4, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 16, rngs=rngs)
    self.head = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.head(x)
