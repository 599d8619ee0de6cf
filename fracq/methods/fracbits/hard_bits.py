"""Hard-assignment bookkeeping of FracBits' variables (used by QATModel).

Learned bits live in ``quant/.../*_bits``; hard assignment writes their
integer values once into ``quant_stats/.../*_hard_bits`` (``-1`` until
then), which the hard-mode model runs with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEARNED = '_bits'
FROZEN = '_hard_bits'


def _walk(tree, fn, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      _walk(value, fn, prefix + (key,))
    else:
      fn(prefix, key, value)


def needs_hard_assignment(stats) -> bool:
  """True while any ``*_hard_bits`` is still unassigned (negative)."""
  found = []
  _walk(
    stats,
    lambda prefix, key, value: (
      found.append(bool(jnp.any(value < 0))) if key.endswith(FROZEN) else None
    ),
  )
  return any(found)


def frozen_bits_leaves(stats) -> list:
  """Every ``*_hard_bits`` leaf of ``stats``."""
  return [
    value
    for path, value in jax.tree_util.tree_leaves_with_path(stats)
    if str(getattr(path[-1], 'key', path[-1])).endswith(FROZEN)
  ]


def _copy_renamed(target, source, old: str, new: str):
  """``target`` (copied) with every ``*{old}`` leaf of ``source`` written
  under the name ``*{new}`` at the same module path."""
  out = jax.tree_util.tree_map(lambda value: value, target)

  def put(prefix, key, value):
    if not key.endswith(old):
      return
    node = out
    for part in prefix:
      node = node[part]
    node[key[: -len(old)] + new] = value.astype(jnp.float32)

  _walk(source, put)
  return out


def write_hard_bits(stats, rounded_quant):
  """Copies rounded ``*_bits`` from ``quant`` into ``quant_stats``."""
  return _copy_renamed(stats, rounded_quant, LEARNED, FROZEN)


def hard_bits_view(quant, stats):
  """``quant`` with every ``*_bits`` replaced by its frozen integer value."""
  return _copy_renamed(quant, stats, FROZEN, LEARNED)
