"""Range observers as pure state updates (state in, state out).

``MinMaxState`` holds a running minimum and maximum, per tensor or per
channel. Updates never mutate: each returns a new state, so they compose with
``jit``/``vmap`` and live in a Flax variable collection.

* :func:`minmax_update` — running min/max (PyTorch ``MinMaxObserver``).
* :func:`moving_average_update` — ``m <- (1 - c) m + c min(X)`` (and the same
  for the max), ``c = 0.01`` by default; the first update takes the batch
  values (PyTorch ``MovingAverageMinMaxObserver``).
* :func:`percentile_range` — a robust range from percentiles of one batch.

The ``minmax``, ``ema_minmax`` and ``percentile`` range estimators of
uniform QAT (``fracq.methods.uniform``) are these updates.

Data parallelism: inside ``shard_map`` each device sees only its slice of the
batch. The ``global_*`` helpers turn a per-device statistic into the one of
the whole (global) batch when the named mesh axis is bound, and are the
identity otherwise, so one code path serves init, calibration and the
data-parallel step: extremes through ``pmin``/``pmax`` (the mean of the
per-device extremes is not an extreme), means through ``pmean`` (exact for
equal per-device shards), order statistics on the ``all_gather``-ed batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MinMaxState(NamedTuple):
  min: jnp.ndarray
  max: jnp.ndarray
  count: jnp.ndarray  # number of updates seen


def _axes(x, axis):
  if axis is None:
    return tuple(range(x.ndim))
  if not -x.ndim <= axis < x.ndim:
    raise ValueError(f'axis={axis} does not exist for a {x.ndim}-d tensor.')
  axis = axis % x.ndim
  return tuple(a for a in range(x.ndim) if a != axis)


def bound_axis_size(axis_name: str | None) -> int | None:
  """Devices along ``axis_name`` if it is bound here (inside ``shard_map``
  / ``pmap`` over it), else ``None`` (plain ``jit``, init, eager)."""
  if axis_name is None:
    return None
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError:  # not inside a map over that axis
    return None


def global_min(v, axis_name: str | None):
  """Minimum over the devices of ``axis_name`` (identity when unbound).

  A statistic, not differentiated (``pmin`` has no derivative rule, and the
  observers sit inside the train step's gradient).
  """
  if bound_axis_size(axis_name) is None:
    return v
  return jax.lax.pmin(jax.lax.stop_gradient(v), axis_name)


def global_max(v, axis_name: str | None):
  """Maximum over the devices of ``axis_name`` (identity when unbound); not
  differentiated, as :func:`global_min`."""
  if bound_axis_size(axis_name) is None:
    return v
  return jax.lax.pmax(jax.lax.stop_gradient(v), axis_name)


def global_batch(x, axis_name: str | None):
  """The global batch (leading axis concatenated over the devices of
  ``axis_name``, in device order); ``x`` itself when unbound."""
  if bound_axis_size(axis_name) is None:
    return x
  return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def observer_init(shape=()) -> MinMaxState:
  """An empty observer (``+inf`` / ``-inf``), per tensor or per channel."""
  return MinMaxState(
    jnp.full(shape, jnp.inf, jnp.float32),
    jnp.full(shape, -jnp.inf, jnp.float32),
    jnp.zeros((), jnp.int32),
  )


def minmax_update(
  state: MinMaxState, x, *, axis=None, axis_name: str | None = None
) -> MinMaxState:
  """Running min/max over everything seen so far (of the global batch when
  ``axis_name`` is bound)."""
  red = _axes(x, axis)
  xf = x.astype(jnp.float32)
  bmin = global_min(jnp.min(xf, axis=red), axis_name)
  bmax = global_max(jnp.max(xf, axis=red), axis_name)
  return MinMaxState(
    jnp.minimum(state.min, bmin),
    jnp.maximum(state.max, bmax),
    state.count + 1,
  )


def moving_average_update(
  state: MinMaxState,
  x,
  *,
  c: float = 0.01,
  axis=None,
  axis_name: str | None = None,
) -> MinMaxState:
  """Moving-average min/max; the first update copies the batch range (the
  global batch's when ``axis_name`` is bound)."""
  if not 0 < c <= 1:
    raise ValueError(
      f'averaging constant c={c} must be in (0, 1] (e.g. 0.01, the weight '
      'of each new batch).'
    )
  red = _axes(x, axis)
  xf = x.astype(jnp.float32)
  bmin = global_min(jnp.min(xf, axis=red), axis_name)
  bmax = global_max(jnp.max(xf, axis=red), axis_name)
  first = state.count == 0
  new_min = jnp.where(first, bmin, (1 - c) * state.min + c * bmin)
  new_max = jnp.where(first, bmax, (1 - c) * state.max + c * bmax)
  return MinMaxState(new_min, new_max, state.count + 1)


def percentile_range(
  x, percentile: float = 99.99, *, axis=None, axis_name: str | None = None
):
  """``(lo, hi)`` at the ``100 - p`` and ``p`` percentiles of one batch (the
  gathered global batch when ``axis_name`` is bound: exactly the one-device
  value)."""
  if not 50 < percentile <= 100:
    raise ValueError(
      f'percentile={percentile} must be in (50, 100]: it is the upper '
      'percentile of the range (e.g. 99.99 clips the 0.01% extremes).'
    )
  xf = global_batch(x, axis_name).astype(jnp.float32)
  red = _axes(xf, axis)
  return (
    jnp.percentile(xf, 100 - percentile, axis=red),
    jnp.percentile(xf, percentile, axis=red),
  )
