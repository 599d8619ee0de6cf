"""Magnitude pruning: sparsity schedules and masks (pure, jit-able jnp).

* :func:`polynomial_decay_sparsity` — the polynomial-decay schedule
  ``s_t = s_f + (s_i - s_f) (1 - p)^power`` with
  ``p = clip((t - begin) / (end - begin), 0, 1)``, evaluated at the last
  update step (``begin + j * frequency``) at or before ``t``; ``end_step``
  always gets the final value.
* :func:`magnitude_mask` — which weights to keep: unstructured (exact count
  of zeros, ties broken deterministically), N:M along the input axis, or
  whole output channels by L2 norm.
* :func:`sparsity_of` — the fraction of exact zeros.

Masks are boolean arrays of the kernel's shape (``True`` = keep); prune with
``jnp.where(mask, w, 0)`` or ``w * mask``.

Kernel layout: Flax kernels put the input features on axis ``-2`` and the
output features on axis ``-1`` (``(in, out)`` for Dense, ``HWIO`` for Conv;
for grouped/depthwise convs axis ``-2`` holds ``in / groups``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STRUCTURES = ('unstructured', 'n:m', 'channel')


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_sparsity(sparsity, what='sparsity'):
  if _is_concrete(sparsity):
    s = np.asarray(sparsity)
    if s.ndim != 0:
      raise ValueError(f'{what} must be a scalar, got shape {s.shape}.')
    s = float(s)
    if not 0.0 <= s < 1.0:
      raise ValueError(
        f'{what}={s} is outside [0, 1): it is the fraction of weights set '
        'to zero, e.g. 0.5 for 50% sparsity (1.0 would remove every '
        'weight).'
      )


def polynomial_decay_sparsity(
  step,
  initial: float,
  final: float,
  begin_step: int,
  end_step: int,
  power: float = 3,
  frequency: int = 1,
):
  """The polynomial-decay sparsity schedule (a float32 scalar).

  Args:
    step: the training step (int or traced scalar).
    initial: sparsity at ``begin_step`` (and before it).
    final: sparsity from ``end_step`` on.
    begin_step, end_step: the pruning window, ``begin_step < end_step``.
    power: the polynomial exponent (3 in Zhu & Gupta, 2017).
    frequency: the mask is updated every ``frequency`` steps; between
      updates the schedule holds its value.
  """
  _check_sparsity(initial, 'initial sparsity')
  _check_sparsity(final, 'final sparsity')
  if int(begin_step) < 0 or int(end_step) <= int(begin_step):
    raise ValueError(
      f'begin_step={begin_step}, end_step={end_step}: need '
      '0 <= begin_step < end_step (the pruning window).'
    )
  if int(frequency) < 1:
    raise ValueError(
      f'frequency={frequency} must be >= 1 (update the mask '
      'every `frequency` steps).'
    )
  if power <= 0:
    raise ValueError(f'power={power} must be > 0 (3 is the usual choice).')
  b, e, f = float(begin_step), float(end_step), float(frequency)
  t = jnp.clip(jnp.asarray(step, jnp.float32), b, e)
  t = jnp.where(t >= e, e, b + jnp.floor((t - b) / f) * f)
  p = (t - b) / (e - b)
  s = final + (initial - final) * (1.0 - p) ** power
  return s.astype(jnp.float32)


def pruning_step_due(step, begin_step: int, end_step: int, frequency: int = 1):
  """True where the mask should be (re)computed at ``step``: inside the
  window, on the update grid, or exactly at ``end_step``."""
  step = jnp.asarray(step, jnp.int32)
  inside = (step >= begin_step) & (step <= end_step)
  on_grid = ((step - begin_step) % int(frequency)) == 0
  return inside & (on_grid | (step == end_step))


def _ranks_ascending(v, axis=-1):
  """Rank of each element along ``axis`` by value (stable: equal values are
  ranked by position, so ties are broken deterministically)."""
  order = jnp.argsort(v, axis=axis, stable=True)
  return jnp.argsort(order, axis=axis, stable=True)


def magnitude_mask(
  w,
  sparsity=None,
  *,
  structure: str = 'unstructured',
  n: int = 2,
  m: int = 4,
  channel_axis: int = -1,
):
  """Keep-mask (bool, shape of ``w``) of the largest-magnitude weights.

  Args:
    w: the kernel.
    sparsity: fraction of zeros in ``[0, 1)`` (may be traced, e.g. from a
      schedule). ``'unstructured'``: exactly ``round(sparsity * w.size)``
      weights are dropped, smallest ``|w|`` first; equal magnitudes are
      dropped in flat-index order. ``'channel'``: ``round(sparsity * C)``
      output channels with the smallest L2 norm are dropped. ``'n:m'``: the
      pattern fixes the sparsity at ``1 - n/m``; pass ``None`` (or that value,
      or 0 for "not yet") .
    structure: ``'unstructured'``, ``'n:m'`` or ``'channel'``.
    n, m: keep ``n`` of every ``m`` consecutive weights along the input axis
      (axis ``-2``), e.g. 2:4.
    channel_axis: output-channel axis for ``'channel'``.
  """
  w = jnp.asarray(w)
  if structure not in STRUCTURES:
    raise ValueError(
      f'structure={structure!r} is unknown; choose one of {STRUCTURES}.'
    )
  a = jnp.abs(w.astype(jnp.float32))
  if structure == 'n:m':
    return _nm_mask(a, sparsity, n, m)
  if sparsity is None:
    raise ValueError(
      f'structure={structure!r} needs a sparsity in [0, 1), e.g. sparsity=0.5.'
    )
  _check_sparsity(sparsity)
  s = jnp.asarray(sparsity, jnp.float32)
  if structure == 'unstructured':
    if w.size == 0:
      return jnp.ones(w.shape, bool)
    drop = jnp.round(s * w.size).astype(jnp.int32)
    ranks = _ranks_ascending(a.reshape(-1)).reshape(w.shape)
    return ranks >= drop
  # channel
  if w.ndim < 1:
    raise ValueError("structure='channel' needs a kernel with a channel axis.")
  ax = channel_axis % w.ndim
  c = w.shape[ax]
  red = tuple(i for i in range(w.ndim) if i != ax)
  norms = jnp.sqrt(jnp.sum(a * a, axis=red))
  drop = jnp.round(s * c).astype(jnp.int32)
  keep_c = _ranks_ascending(norms) >= drop
  shape = [1] * w.ndim
  shape[ax] = c
  return jnp.broadcast_to(keep_c.reshape(shape), w.shape)


def _nm_mask(a, sparsity, n, m):
  n, m = int(n), int(m)
  if m < 2 or not 1 <= n < m:
    raise ValueError(
      f'N:M sparsity needs 1 <= n < m and m >= 2, got n={n}, m={m} '
      '(e.g. n=2, m=4 keeps 2 of every 4 weights).'
    )
  if a.ndim < 2:
    raise ValueError(
      f'N:M sparsity groups weights along the input axis (-2); a kernel of '
      f'shape {a.shape} has none. Use structure="unstructured".'
    )
  k_in = a.shape[-2]
  if k_in % m:
    raise ValueError(
      f'N:M sparsity: m={m} does not divide the input axis (-2) of size '
      f'{k_in} (kernel shape {a.shape}; depthwise convs have 1 input per '
      'group). Pick an m that divides it, or use structure="unstructured" '
      "or 'channel' for this layer."
    )
  if sparsity is not None and _is_concrete(sparsity):
    s = float(np.asarray(sparsity))
    if s != 0.0 and not np.isclose(s, 1.0 - n / m):
      raise ValueError(
        f'N:M sparsity {n}:{m} fixes the sparsity at {1 - n / m:g}; got '
        f'sparsity={s}. Pass sparsity=None or change n and m.'
      )
    if s == 0.0:
      return jnp.ones(a.shape, bool)
  t = jnp.moveaxis(a, -2, -1)  # (..., out, in)
  g = t.reshape(t.shape[:-1] + (k_in // m, m))
  keep = _ranks_ascending(g) >= (m - n)  # the n largest per group
  keep = keep.reshape(t.shape)
  return jnp.moveaxis(keep, -1, -2)


def sparsity_of(w):
  """Fraction of exact zeros in ``w`` (float32 scalar)."""
  w = jnp.asarray(w)
  if w.size == 0:
    return jnp.zeros((), jnp.float32)
  return jnp.mean((w == 0).astype(jnp.float32))


def prune(w, sparsity=None, **kwargs):
  """``w`` with the weights :func:`magnitude_mask` drops set to exactly 0."""
  mask = magnitude_mask(w, sparsity, **kwargs)
  return jnp.where(mask, w, jnp.zeros((), w.dtype))
