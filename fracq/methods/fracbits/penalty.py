"""Resource penalties and hard assignment for FracBits.

Penalties (``loss = task_loss + penalty``), all computed from the
differentiable cost of :mod:`fracq.methods.cost`:

* ``'abs'`` — the authors' ``kappa * |cost - target|``. The difference is
  divided by ``unit`` so that ``kappa`` is unit-free: by default the target
  itself (relative error); ``unit=8e6`` reads the cost in MB (size) and
  ``unit=1e9`` in GBitOPs, the units of the paper's ``kappa = 1``.
* ``'nncf'`` — NNCF's ratio form ``alpha * |cost_int8 / cost - rate|``
  (``alpha = 40`` in NNCF), with ``rate = cost_int8 / target``; ``power=2``
  gives its L2 variant.
* ``'hinge'`` — ``kappa * max(0, cost - target) / unit``: only pushes down.
* ``'l2'`` — ``kappa * ((cost - target) / unit)^2``.

Optional warm-up (the penalty weight ramps linearly from 0) and target
schedule (the target moves from the initial cost to the final target over
``schedule_steps``), both functions of the traced step.

Hard assignment (FracBits section 3.3): find a global offset ``delta`` by
bisection such that the cost of ``round(b + delta)`` does not exceed the
target and is as close below it as one offset can get (the authors accept
+-1%; here the budget is a hard limit, as in the HAWQ ILP), then freeze the
integer bits. Rounding follows the quantizer
(:func:`fracq.core.fracbits.round_bits_with_offset`): signed bit-widths
never round to 1.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
from fracq.core import fracbits
from fracq.methods import cost as cost_lib

FORMS = ('abs', 'nncf', 'hinge', 'l2')


@dataclasses.dataclass(frozen=True)
class Penalty:
  """How far from its budget a model may drift, and at what price.

  Attributes:
    form: one of ``FORMS``.
    weight: ``kappa`` (``'abs'``, ``'hinge'``, ``'l2'``) or ``alpha``
      (``'nncf'``).
    unit: divisor of ``cost - target``; ``None`` means the target (relative).
    power: 1 or 2 for ``'nncf'``.
    warmup_steps: the weight ramps linearly from 0 over these steps.
    schedule_steps: the target moves linearly from ``start_cost`` to the
      final target over these steps (0: fixed target from the start, as the
      authors do).
  """

  form: str = 'abs'
  weight: float = 1.0
  unit: float | None = None
  power: int = 1
  warmup_steps: int = 0
  schedule_steps: int = 0

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(
        f'penalty form must be one of {FORMS}, got {self.form!r}.'
      )
    if self.weight < 0:
      raise ValueError(f'penalty weight must be >= 0, got {self.weight}.')
    if self.power not in (1, 2):
      raise ValueError(f'penalty power must be 1 or 2, got {self.power}.')
    if self.unit is not None and not self.unit > 0:
      raise ValueError(f'penalty unit must be positive, got {self.unit}.')

  def target_at(self, step, target: float, start_cost: float):
    if self.schedule_steps <= 0:
      return jnp.asarray(target, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / self.schedule_steps, 0, 1)
    return start_cost + (target - start_cost) * t

  def weight_at(self, step):
    if self.warmup_steps <= 0:
      return jnp.asarray(self.weight, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / self.warmup_steps, 0, 1)
    return self.weight * t

  def __call__(
    self,
    cost,
    target,
    *,
    step=0,
    start_cost=None,
    int8_cost: float | None = None,
  ):
    """The penalty at ``step`` for a model whose cost is ``cost``."""
    start_cost = target if start_cost is None else start_cost
    tgt = self.target_at(step, target, start_cost)
    w = self.weight_at(step)
    unit = tgt if self.unit is None else self.unit
    if self.form == 'abs':
      return w * jnp.abs(cost - tgt) / unit
    if self.form == 'hinge':
      return w * jnp.maximum(cost - tgt, 0.0) / unit
    if self.form == 'l2':
      return w * ((cost - tgt) / unit) ** 2
    if int8_cost is None:
      raise ValueError("The 'nncf' penalty needs int8_cost.")
    rate = int8_cost / tgt
    return w * jnp.abs(int8_cost / cost - rate) ** self.power


def _rounded_bits(quant, model: cost_lib.CostModel, delta: float):
  """A copy of ``quant`` with every learned bit-width at round(b + delta)."""
  quant = jax.tree_util.tree_map(lambda x: x, quant)  # shallow copy of dicts
  for layer in model.layers:
    for name, tb in (('kernel_bits', layer.weight), ('input_bits', layer.act)):
      if not tb.learned:
        continue
      node = quant
      for part in layer.path.split('/'):
        node = node[part]
      lo, hi = tb.bounds
      node[name] = fracbits.round_bits_with_offset(
        node[name], delta, lo, hi, min_nonzero_bits=tb.min_nonzero_bits
      ).astype(node[name].dtype)
  return quant


@dataclasses.dataclass(frozen=True)
class HardAssignment:
  """Result of :func:`hard_assign`."""

  quant: Any
  delta: float
  cost: float
  target: float
  within_tolerance: bool
  message: str


def hard_assign(
  quant,
  model: cost_lib.CostModel,
  target: float,
  *,
  tolerance: float = 0.01,
  iterations: int = 30,
) -> HardAssignment:
  """Rounds learned bits with a global offset so the cost meets the target.

  The integer cost never exceeds ``target``. Bisects ``delta`` (the cost is
  non-decreasing in it) for the largest offset whose rounded cost is
  ``<= target``, i.e. the closest cost from below that one global offset
  reaches. Starting at ``delta = 0``: if plain rounding is already within
  ``[target * (1 - tolerance), target]`` it is kept (so a second call on
  rounded bits changes nothing). ``tolerance`` is only the "close enough
  from below" criterion: when the best offset stays further below the
  target — the rounding steps of the largest layers are coarser than the
  tolerance — the assignment is still returned, ``within_tolerance`` is
  False and the message says why.

  Raises:
    ValueError: if even every learned bit-width at its smallest integer
      bound costs more than ``target``.

  Returns:
    A :class:`HardAssignment` with the rounded ``quant`` collection.
  """
  target = float(target)

  def c(delta):
    return model.integer_cost(_rounded_bits(quant, model, delta))

  lo_t = target * (1 - tolerance)
  c0 = c(0.0)
  if lo_t <= c0 <= target:
    best = 0.0
  else:
    span = max(
      max(
        layer.weight.bounds[1] - layer.weight.bounds[0],
        layer.act.bounds[1] - layer.act.bounds[0],
      )
      for layer in model.layers
    )
    # At these offsets every learned bit-width sits at its smallest /
    # largest integer bound.
    lo, hi = -span - 1.0, span + 1.0
    c_min = c(lo)
    if c_min > target:
      unit = 'bits' if model.kind == 'size' else 'BitOPs'
      raise ValueError(
        f'Hard assignment cannot meet the target {target:,.0f} {unit}: with '
        'every learned bit-width at its smallest integer bound the cost is '
        f'already {c_min:,.0f} {unit}. Lower the bit bounds '
        '(FracBitsSpec.bit_bounds; a fractional lower bound rounds up) or '
        'raise the budget.'
      )
    if c(hi) <= target:
      lo = hi
    else:
      # Invariant: c(lo) <= target < c(hi).
      for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if c(mid) <= target:
          lo = mid
        else:
          hi = mid
    best = lo
    # Plain rounding wins ties (and keeps a repeated call a no-op).
    if c0 <= target and c0 >= c(best):
      best = 0.0
  final = _rounded_bits(quant, model, best)
  cost = model.integer_cost(final)
  ok = cost >= lo_t
  if ok:
    msg = (
      f'hard assignment: delta={best:+.3f}, integer cost {cost:,.0f} '
      f'is {100 * (cost / target - 1):+.2f}% from the target '
      f'{target:,.0f}.'
    )
  else:
    msg = (
      f'hard assignment could not land within {tolerance:.0%} below the '
      f'target {target:,.0f}: the closest integer cost not above it is '
      f'{cost:,.0f} ({100 * (cost / target - 1):+.2f}%), delta='
      f'{best:+.3f}. Rounding changes whole layers at once; a layer '
      'whose one-bit step is larger than the tolerance makes the '
      'target unreachable exactly. Kernel-wise bits (bits_per_channel) '
      'give finer steps.'
    )
    logging.warning(msg)
  return HardAssignment(
    quant=final,
    delta=best,
    cost=cost,
    target=target,
    within_tolerance=ok,
    message=msg,
  )
