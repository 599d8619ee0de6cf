"""The factory of FracBits (``config.quant.method='fracbits'``).

Its keyword arguments after ``context`` are the fields of
``config.quant.fracbits``; the training layer's adapter
(:mod:`fracq.train.quant_config`) passes the block in. The steps, each a
function: check the budget and the bit bounds (:func:`weight_bounds`), build
the specs (:class:`Specs`), the penalty (:func:`make_penalty`) and the
hard-assignment step (:func:`hard_assign_step_for`), wrap the model, and with ``init_bits =
'budget+D'`` wrap it again with the learned bits starting at the budget
(:func:`start_at_budget`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re

from fracq.interception import Rule
from fracq.methods import context as context_lib
from fracq.methods.context import Context
from fracq.methods.fracbits import penalty as penalty_lib
from fracq.methods.fracbits.spec import FracBitsSpec
from fracq.methods.qat import QATModel
from fracq.methods.uniform.spec import TensorSpec

__all__ = [
  'Specs',
  'fracbits',
  'hard_assign_step_for',
  'init_bits_offset',
  'make_penalty',
  'start_at_budget',
  'weight_bounds',
]


def init_bits_offset(init_bits: str) -> float | None:
  """The offset ``D`` of ``init_bits = 'budget+D'`` (``None`` for '').

  Raises:
    ValueError: if ``init_bits`` is neither '' nor ``'budget'`` plus an
      optional signed number.
  """
  text = str(init_bits or '').replace(' ', '')
  if not text:
    return None
  match = re.fullmatch(r'budget(?:([+-](?:\d+\.?\d*|\.\d+)))?', text)
  if match is None:
    raise ValueError(
      f'config.quant.fracbits.init_bits={init_bits!r} is not understood; '
      "use '' (start at weight_bits/act_bits) or 'budget+D' (the budget's "
      "uniform-equivalent bits plus D, e.g. 'budget+0.5')."
    )
  return float(match.group(1) or 0.0)


def hard_assign_step_for(
  hard_assign_fraction: float, hard_assign_step: int, total_steps: int | None
) -> int:
  """The step of FracBits' hard assignment: ``hard_assign_step`` when
  >= 0, else ``hard_assign_fraction`` of ``total_steps``."""
  if hard_assign_step >= 0:
    return int(hard_assign_step)
  if total_steps is None:
    raise ValueError(
      'Cannot place hard assignment: total steps unknown; set '
      'config.quant.fracbits.hard_assign_step.'
    )
  if not 0 < hard_assign_fraction <= 1:
    raise ValueError(
      'config.quant.fracbits.hard_assign_fraction must be in (0, 1], '
      f'got {hard_assign_fraction}.'
    )
  return int(math.floor(hard_assign_fraction * total_steps))


def weight_bounds(
  weight_bit_bounds, learn_weight_bits: bool, min_weight_bits: float
) -> tuple[float, float]:
  """The bounds of learned kernel bits, the lower one raised to
  ``min_weight_bits`` (the bits a cluster count needs).

  Raises:
    ValueError: ``min_weight_bits`` exceeds the upper bound.
  """
  bounds = tuple(weight_bit_bounds)
  if learn_weight_bits and min_weight_bits > bounds[0]:
    bounds = (float(min_weight_bits), bounds[1])
    if bounds[0] > bounds[1]:
      raise ValueError(
        f'config.quant.preserve.clusters needs at least {bounds[0]:g} '
        f'bits but config.quant.fracbits.weight_bit_bounds='
        f'{tuple(weight_bit_bounds)}; lower clusters, raise the upper bound '
        'or set config.quant.preserve.cluster_min_bits=False.'
      )
  return bounds


def _clip(bits: float, bounds) -> float:
  return min(max(bits, bounds[0]), bounds[1])


@dataclasses.dataclass(frozen=True)
class Specs:
  """The weight and input settings of ``config.quant.fracbits``; its
  :meth:`rules` are the model's rules with the learned bits starting at a
  given value."""

  weight_bits: float
  act_bits: float
  quantize_acts: bool
  weight_range: str
  act_range: str
  weight_granularity: str
  weight_group_size: int | None
  act_granularity: str
  learn_weight_bits: bool
  learn_act_bits: bool
  weight_bounds: tuple[float, float]
  act_bounds: tuple[float, float]
  bits_per_channel: bool

  def weight(self, start: float | None) -> TensorSpec:
    """The kernel spec; learned bits start at ``start`` (clipped to the
    bounds) or, for ``None``, at ``weight_bits``."""
    common = dict(
      range_method=self.weight_range,
      granularity=self.weight_granularity,
      group_size=self.weight_group_size,
    )
    if not self.learn_weight_bits:
      bits = context_lib.int_bits(self.weight_bits, 'fracbits', 'weight')
      return TensorSpec(bits=bits, **common)
    if start is not None:
      start = _clip(start, self.weight_bounds)
    return FracBitsSpec(
      bits=self.weight_bits if start is None else start,
      bit_bounds=self.weight_bounds,
      bits_per_channel=self.bits_per_channel,
      **common,
    )

  def act(self, start: float | None) -> TensorSpec | None:
    """The input spec (``None`` when inputs stay float)."""
    if not self.quantize_acts:
      return None
    common = dict(range_method=self.act_range, granularity=self.act_granularity)
    if not self.learn_act_bits:
      bits = context_lib.int_bits(self.act_bits, 'fracbits', 'act')
      return TensorSpec(bits=bits, **common)
    if start is not None:
      start = _clip(start, self.act_bounds)
    return FracBitsSpec(
      bits=self.act_bits if start is None else start,
      bit_bounds=self.act_bounds,
      **common,
    )

  def rules(self, context: Context, start: float | None) -> list[Rule]:
    """The float and fixed layers of ``context``, then every other layer
    at these specs."""
    return context_lib.standard_rules(
      context, self.weight(start), self.act(start)
    )


def make_penalty(
  *,
  penalty: str = 'abs',
  penalty_weight: float = 1.0,
  penalty_unit: float | None = None,
  penalty_power: int = 1,
  penalty_warmup_steps: int = 0,
  penalty_schedule_steps: int = 0,
  **unused,
) -> penalty_lib.Penalty:
  """The resource penalty of ``config.quant.fracbits``' ``penalty*`` fields
  (every field of the block is accepted; the others are ignored)."""
  del unused
  return penalty_lib.Penalty(
    form=penalty,
    weight=penalty_weight,
    unit=penalty_unit,
    power=penalty_power,
    warmup_steps=penalty_warmup_steps,
    schedule_steps=penalty_schedule_steps,
  )


def start_at_budget(
  module,
  probe: QATModel,
  specs: Specs,
  context: Context,
  offset: float,
  settings: dict,
) -> QATModel:
  """``probe`` (wrapped with ``settings``, the penalty and hard-assignment
  keyword arguments) re-wrapped with its learned bits starting at the budget's
  uniform-equivalent bits plus ``offset``; ``init_bits_info`` records
  both."""
  equivalent = probe.cost_model.uniform_equivalent_bits(probe.target)
  start = equivalent + offset
  # The cost model depends on which tensors learn bits and on their bounds,
  # not on where they start, so the re-wrapped model reuses its analysis.
  qm = context_lib.qat_model(
    module,
    specs.rules(context, start),
    None,
    context,
    _shared=(
      probe.facts,
      probe.cost_model,
      probe.target,
      probe.budget,
      probe.signs,
    ),
    **settings,
  )
  qm.init_bits_info = {
    'uniform_equivalent_bits': equivalent,
    'init_bits': start,
  }
  logging.info(
    'FracBits budget: %s target %.6g = uniform-equivalent %.4f '
    "bits; learned bits start at %.4f (init_bits='budget%+g').",
    context.budget_kind,
    qm.target,
    equivalent,
    start,
    offset,
  )
  return qm


def fracbits(
  module,
  sample_x,
  *,
  context: Context,
  weight_bits: float = 8.0,
  act_bits: float = 8.0,
  init_bits: str = '',
  quantize_acts: bool = True,
  weight_range: str = 'lsq',
  act_range: str = 'lsq',
  weight_granularity: str = 'channel',
  weight_group_size: int | None = None,
  act_granularity: str = 'tensor',
  learn_weight_bits: bool = True,
  learn_act_bits: bool = False,
  weight_bit_bounds: tuple[float, float] = (2.0, 8.0),
  act_bit_bounds: tuple[float, float] = (2.0, 8.0),
  bits_per_channel: bool = False,
  penalty: str = 'abs',
  penalty_weight: float = 1.0,
  penalty_unit: float | None = None,
  penalty_power: int = 1,
  penalty_warmup_steps: int = 0,
  penalty_schedule_steps: int = 0,
  hard_assign_fraction: float = 0.8,
  hard_assign_step: int = -1,
  hard_assign_tolerance: float = 0.01,
) -> QATModel:
  """FracBits: learned fractional bits under ``context.budget``.

  With ``init_bits = 'budget+D'`` the model is wrapped once to measure its
  cost model, then the learned tensors start at the budget's
  uniform-equivalent bits plus ``D`` (clipped to their bounds); the wrapper
  records both in ``init_bits_info``.

  Args:
    module: the Flax module.
    sample_x: an input batch (or its shape) to trace the module with.
    context: fixed / float layers, the budget, the kernel transform, the
      number of training steps.
    weight_bits: initial kernel bits (fixed bits when not learned), unused
      with ``init_bits='budget+D'``.
    act_bits: the same for inputs.
    init_bits: '' (start at ``weight_bits`` / ``act_bits``) or
      ``'budget+D'`` (the authors' recipe is ``'budget+0.5'``).
    quantize_acts: quantize the inputs of the layers at all.
    weight_range: kernel range method (see
      :func:`fracq.methods.uniform.factory.uniform`).
    act_range: input range method.
    weight_granularity: 'channel', 'tensor' or 'group' (one scale per
      ``weight_group_size`` consecutive input features per output
      channel).
    weight_group_size: the group size of ``weight_granularity='group'``.
    act_granularity: 'tensor' or 'channel'.
    learn_weight_bits: kernel bits are learned.
    learn_act_bits: input bits are learned (needs a BitOPs budget).
    weight_bit_bounds: bounds of learned kernel bits.
    act_bit_bounds: bounds of learned input bits.
    bits_per_channel: one learned bit-width per output channel.
    penalty: 'abs' (authors), 'nncf', 'hinge' or 'l2'.
    penalty_weight: kappa (alpha for 'nncf').
    penalty_unit: divisor of ``cost - target`` (``None``: the target).
    penalty_power: 1 or 2 ('nncf').
    penalty_warmup_steps: the weight ramps up over these steps.
    penalty_schedule_steps: the target moves to its value over these steps.
    hard_assign_fraction: hard assignment at this fraction of training...
    hard_assign_step: ...or at this step when >= 0.
    hard_assign_tolerance: how far below the budget still counts as met.
  """
  if context.budget is None:
    raise ValueError(
      "method='fracbits' needs a budget: set exactly one of "
      'config.quant.budget.uniform_bits, .compression, .absolute.'
    )
  offset = init_bits_offset(init_bits)
  learn_weights = bool(learn_weight_bits)
  specs = Specs(
    weight_bits=weight_bits,
    act_bits=act_bits,
    quantize_acts=quantize_acts,
    weight_range=weight_range,
    act_range=act_range,
    weight_granularity=weight_granularity,
    weight_group_size=weight_group_size,
    act_granularity=act_granularity,
    learn_weight_bits=learn_weights,
    learn_act_bits=bool(learn_act_bits),
    weight_bounds=weight_bounds(
      weight_bit_bounds, learn_weights, context.min_weight_bits
    ),
    act_bounds=tuple(act_bit_bounds),
    bits_per_channel=bool(bits_per_channel) and learn_weights,
  )
  settings = dict(
    penalty=make_penalty(
      penalty=penalty,
      penalty_weight=penalty_weight,
      penalty_unit=penalty_unit,
      penalty_power=penalty_power,
      penalty_warmup_steps=penalty_warmup_steps,
      penalty_schedule_steps=penalty_schedule_steps,
    ),
    hard_assign_step=hard_assign_step_for(
      hard_assign_fraction, hard_assign_step, context.total_steps
    ),
    hard_assign_tolerance=hard_assign_tolerance,
  )
  # Where the bits start does not matter for the first wrap; clipping them
  # to the bounds keeps an unused weight_bits from failing validation.
  probe_bits = None if offset is None else float(weight_bits)
  qm = context_lib.qat_model(
    module,
    specs.rules(context, probe_bits),
    sample_x,
    context,
    budget=context.budget,
    **settings,
  )
  if offset is None or not qm.learns_bits:
    return qm
  return start_at_budget(module, qm, specs, context, offset, settings)
