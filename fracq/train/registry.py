"""Quantization methods by name: one factory each, plain keyword arguments.

``METHODS`` maps ``config.quant.method`` to a :class:`Method`; its factory
builds the model wrapper the training loop drives. A factory's keyword-only
parameters after ``context`` are the fields of the method's config block
(``config.quant.<method>``) and their defaults are the block's defaults
(:func:`block_defaults`); what several methods share (fixed and float
layers, the budget, a sparsity/cluster transform, the training length)
comes in a :class:`Context`.

Methods:

* ``'none'``: the float model (or float pruning / clustering with
  ``config.quant.preserve``).
* ``'uniform'``: every tensor at fixed integer bits.
* ``'fracbits'``: learned fractional bits under a budget, hard assignment at
  ``hard_assign_fraction`` of training, then fine-tuning at integer bits.
* ``'hawq'``: integer bits per layer from Hessian sensitivity and an ILP
  under the same budget (on a trained float model), then uniform QAT at
  those bits.
* ``'f8net'``: 8-bit fixed point (power-of-two scales), BatchNorm folded.

``preserve_transform`` is the factory of ``config.quant.preserve``
(pruning / clustering kept through training), which applies on top of any
method but F8Net.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
import typing
from typing import Any, Callable

from ml_collections import config_dict
import numpy as np

from fracq.core import sparsity as sparsity_lib
from fracq.interception import Rule
from fracq.interception import TensorSpec
from fracq.methods import cost as cost_lib
from fracq.methods import hawq as hawq_lib
from fracq.methods.fracbits import penalty as penalty_lib
from fracq.methods import preserve as preserve_lib
from fracq.methods.f8net import F8NetModel
from fracq.methods.f8net import F8NetOptions
from fracq.methods.qat import QATModel
from fracq.train.model_wrapper import PlainModel


@dataclasses.dataclass(frozen=True)
class Context:
  """What every method's factory gets besides its own config block.

  Attributes:
    fixed_layers: regex of layers kept at fixed bits ('' = none).
    fixed_bits: their weight bits.
    fixed_act_bits: their input bits.
    embed_layers: regex of the ``nn.Embed`` tables quantized (weight-only,
      one scale per row) at ``embed_bits`` ('' = embeddings stay float;
      language models: ``'^embed$'``, the byte table, also the tied output
      head).
    embed_bits: their bits.
    keep_float: regex of layers left float ('' = none).
    on_unused: what a rule matching no layer does (``'error'``, ``'warn'``).
    budget_kind: ``'size'`` or ``'bitops'``: the cost the model reports.
    budget: the budget (FracBits, HAWQ), or ``None``.
    kernel_transform: pruning / clustering kept through training, or None.
    min_weight_bits: learned weight bits never go below this (the bits a
      cluster count needs), 0 for no bound.
    total_steps: training steps (places FracBits' hard assignment).
    float_model: ``num_batches -> (float variables, training batches)``,
      the trained float model HAWQ searches on; ``None`` when there is
      none.
  """

  fixed_layers: str = ''
  fixed_bits: int = 8
  fixed_act_bits: int = 8
  embed_layers: str = ''
  embed_bits: int = 8
  keep_float: str = ''
  on_unused: str = 'error'
  budget_kind: str = 'size'
  budget: cost_lib.Budget | None = None
  kernel_transform: Any = None
  min_weight_bits: float = 0.0
  total_steps: int | None = None
  float_model: Callable[[int], tuple[dict, list]] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A quantization method.

  Attributes:
    factory: ``factory(module, sample_x, *, context, **block)`` -> the model
      wrapper.
    uses_budget: the method needs ``config.quant.budget``.
    quantized: the model it builds is quantized (else float, possibly
      pruned / clustered).
    preserve: it accepts ``config.quant.preserve``.
  """

  factory: Callable[..., Any]
  uses_budget: bool = False
  quantized: bool = True
  preserve: bool = True


# -- rules shared by the QAT methods -------------------------------------------


def _float_rules(context: Context) -> list[Rule]:
  if not context.keep_float:
    return []
  return [
    Rule(module_path=context.keep_float, keep_float=True, name='keep_float')
  ]


def _fixed_act(
  quantize_acts: bool, act_bits, method: str, act_range: str, granularity: str
) -> TensorSpec | None:
  """The input spec of a method with fixed integer input bits (``None``
  when inputs stay float)."""
  if not quantize_acts:
    return None
  return TensorSpec(
    bits=_int_bits(act_bits, method, 'act'),
    range_method=act_range,
    granularity=granularity,
  )


def _rules(
  context: Context, weight: TensorSpec, act: TensorSpec | None
) -> list[Rule]:
  """The float layers, the embedding tables (weight-only at
  ``context.embed_bits``, per row), the fixed layers (at their fixed bits,
  with the range methods of ``weight`` / ``act``; per channel where
  ``weight`` is group-wise), then every other layer at ``weight`` /
  ``act``."""
  rules = _float_rules(context)
  if context.embed_layers:
    rules.append(
      Rule(
        module_path=context.embed_layers,
        layer_types=('Embed',),
        name='embed',
        weight=TensorSpec(
          bits=int(context.embed_bits),
          range_method=weight.range_method,
          granularity='channel',
        ),
      )
    )
  if context.fixed_layers:
    fixed_act = None
    if act is not None:
      fixed_act = TensorSpec(
        bits=int(context.fixed_act_bits),
        range_method=act.range_method,
        granularity=act.granularity,
      )
    # Group-wise scales are for the low-bit layers; the 8-bit first and last
    # layers keep one scale per output channel.
    fixed_weight = TensorSpec(
      bits=int(context.fixed_bits),
      range_method=weight.range_method,
      granularity=(
        'channel' if weight.granularity == 'group' else weight.granularity
      ),
    )
    rules.append(
      Rule(
        module_path=context.fixed_layers,
        name='fixed',
        weight=fixed_weight,
        act=fixed_act,
      )
    )
  rules.append(Rule(module_path='.*', weight=weight, act=act, name='default'))
  return rules


def _int_bits(bits, method: str, what: str) -> int:
  if float(bits) != int(bits):
    raise ValueError(
      f'config.quant.{method}.{what}_bits={bits} must be an integer for '
      f"method={method!r} (fractional bits need method='fracbits')."
    )
  return int(bits)


def _clip(bits: float, bounds) -> float:
  return min(max(bits, bounds[0]), bounds[1])


def _qat_model(module, rules, sample_x, context: Context, **kwargs):
  return QATModel(
    module,
    rules,
    sample_x,
    cost_kind=context.budget_kind,
    call_kwargs={'train': False},
    on_unused=context.on_unused,
    kernel_transform=context.kernel_transform,
    **kwargs,
  )


# -- factories -----------------------------------------------------------------


def float_run(module, sample_x, *, context: Context):
  """The float model; with a kernel transform, float pruning / clustering
  (every layer seen, nothing quantized)."""
  if context.kernel_transform is None:
    return PlainModel(module)
  rules = _float_rules(context) + [Rule(module_path='.*', name='preserve')]
  return _qat_model(module, rules, sample_x, context)


def uniform(
  module,
  sample_x,
  *,
  context: Context,
  weight_bits: float = 8.0,
  act_bits: float = 8.0,
  quantize_acts: bool = True,
  weight_range: str = 'lsq',
  act_range: str = 'lsq',
  weight_granularity: str = 'channel',
  weight_group_size: int | None = None,
  act_granularity: str = 'tensor',
):
  """Uniform QAT: every tensor at fixed integer bits.

  Args:
    module: the Flax module.
    sample_x: an input batch (or its shape) to trace the module with.
    context: the layers kept fixed / float and the kernel transform.
    weight_bits: kernel bits.
    act_bits: input bits.
    quantize_acts: quantize the inputs of the layers at all.
    weight_range: kernel range method ('lsq', 'lsq_plus', 'minmax',
      'ema_minmax', 'percentile', 'dorefa').
    act_range: input range method (same, 'pact' instead of 'dorefa').
    weight_granularity: 'channel', 'tensor' or 'group' (one scale per
      ``weight_group_size`` consecutive input features per output
      channel).
    weight_group_size: the group size of ``weight_granularity='group'``.
    act_granularity: 'tensor' or 'channel'.
  """
  weight = TensorSpec(
    bits=_int_bits(weight_bits, 'uniform', 'weight'),
    range_method=weight_range,
    granularity=weight_granularity,
    group_size=weight_group_size,
  )
  act = _fixed_act(
    quantize_acts, act_bits, 'uniform', act_range, act_granularity
  )
  return _qat_model(module, _rules(context, weight, act), sample_x, context)


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
):
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
    weight_range: kernel range method (see :func:`uniform`).
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
  w_learn, a_learn = bool(learn_weight_bits), bool(learn_act_bits)
  w_bounds = tuple(weight_bit_bounds)
  a_bounds = tuple(act_bit_bounds)
  if w_learn and context.min_weight_bits > w_bounds[0]:
    w_bounds = (float(context.min_weight_bits), w_bounds[1])
    if w_bounds[0] > w_bounds[1]:
      raise ValueError(
        f'config.quant.preserve.clusters needs at least {w_bounds[0]:g} '
        f'bits but config.quant.fracbits.weight_bit_bounds='
        f'{tuple(weight_bit_bounds)}; lower clusters, raise the upper bound '
        'or set config.quant.preserve.cluster_min_bits=False.'
      )

  def rules_at(start: float | None) -> list[Rule]:
    w_start = weight_bits if start is None else _clip(start, w_bounds)
    weight = TensorSpec(
      bits=w_start if w_learn else _int_bits(weight_bits, 'fracbits', 'weight'),
      learn_bits=w_learn,
      bit_bounds=w_bounds,
      bits_per_channel=bool(bits_per_channel) and w_learn,
      range_method=weight_range,
      granularity=weight_granularity,
      group_size=weight_group_size,
    )
    act = None
    if quantize_acts:
      a_start = act_bits if start is None else _clip(start, a_bounds)
      act = TensorSpec(
        bits=a_start if a_learn else _int_bits(act_bits, 'fracbits', 'act'),
        learn_bits=a_learn,
        bit_bounds=a_bounds,
        range_method=act_range,
        granularity=act_granularity,
      )
    return _rules(context, weight, act)

  kwargs = dict(
    penalty=penalty_lib.Penalty(
      form=penalty,
      weight=penalty_weight,
      unit=penalty_unit,
      power=penalty_power,
      warmup_steps=penalty_warmup_steps,
      schedule_steps=penalty_schedule_steps,
    ),
    hard_assign_step=hard_assign_step_for(
      hard_assign_fraction, hard_assign_step, context.total_steps
    ),
    hard_assign_tolerance=hard_assign_tolerance,
  )
  # Where the bits start does not matter for the first wrap; clipping them
  # to the bounds keeps an unused weight_bits from failing validation.
  probe_bits = None if offset is None else float(weight_bits)
  qm = _qat_model(
    module,
    rules_at(probe_bits),
    sample_x,
    context,
    budget=context.budget,
    **kwargs,
  )
  if offset is None or not qm.learns_bits:
    return qm
  equivalent = qm.cost_model.uniform_equivalent_bits(qm.target)
  start = equivalent + offset
  # The cost model depends on which tensors learn bits and on their bounds,
  # not on where they start, so the re-wrapped model reuses its analysis.
  qm = _qat_model(
    module,
    rules_at(start),
    None,
    context,
    _shared=(qm.facts, qm.cost_model, qm.target, qm.budget, qm.signs),
    **kwargs,
  )
  qm.init_bits_info = {
    'uniform_equivalent_bits': equivalent,
    'init_bits': start,
  }
  logging.info(
    'FracBits budget: %s target %.6g = uniform-equivalent %.4f '
    'bits; learned bits start at %.4f (init_bits=%r).',
    context.budget_kind,
    qm.target,
    equivalent,
    start,
    init_bits,
  )
  return qm


def hawq(
  module,
  sample_x,
  *,
  context: Context,
  act_bits: float = 8.0,
  quantize_acts: bool = True,
  weight_range: str = 'lsq',
  act_range: str = 'lsq',
  weight_granularity: str = 'channel',
  weight_group_size: int | None = None,
  act_granularity: str = 'tensor',
  candidates: str = '2,3,4,5,6,8',
  probes: int = 32,
  batches: int = 2,
):
  """HAWQ: integer weight bits per layer from Hessian traces and an ILP
  under ``context.budget``, searched on ``context.float_model``; returns a
  uniform-QAT wrapper at those bits (``search_info`` holds the search).

  Args:
    module: the Flax module.
    sample_x: an input batch (or its shape) to trace the module with.
    context: fixed / float layers, the budget and the float model.
    act_bits: input bits.
    quantize_acts: quantize the inputs of the layers at all.
    weight_range: kernel range method (see :func:`uniform`).
    act_range: input range method.
    weight_granularity: 'channel', 'tensor' or 'group' (one scale per
      ``weight_group_size`` consecutive input features per output
      channel).
    weight_group_size: the group size of ``weight_granularity='group'``.
    act_granularity: 'tensor' or 'channel'.
    candidates: comma-separated candidate integer weight bits.
    probes: Hutchinson probes per batch.
    batches: training batches the traces average over.
  """
  if context.budget is None:
    raise ValueError(
      "method='hawq' needs a budget: set exactly one of "
      'config.quant.budget.uniform_bits, .compression, .absolute.'
    )
  if context.float_model is None:
    raise ValueError(
      "method='hawq' searches bits on a trained float model: set "
      '--config.init_from=<float workdir>.'
    )
  try:
    bits = sorted({int(b) for b in str(candidates).split(',')})
  except ValueError as e:
    raise ValueError(
      f'config.quant.hawq.candidates={candidates!r} must be comma-separated '
      "integer bits, e.g. '2,3,4,8'."
    ) from e
  bounds = (float(bits[0]), float(bits[-1]))
  # The searched kernels are marked by learn_bits; where they start does
  # not matter to the search.
  weight = TensorSpec(
    bits=sum(bounds) / 2,
    learn_bits=True,
    bit_bounds=bounds,
    range_method=weight_range,
    granularity=weight_granularity,
    group_size=weight_group_size,
  )
  act = _fixed_act(quantize_acts, act_bits, 'hawq', act_range, act_granularity)
  rules = _rules(context, weight, act)
  probe = _qat_model(module, rules, sample_x, context, budget=context.budget)
  float_variables, float_batches = context.float_model(int(batches))
  choice, info = hawq_lib.search(
    module,
    float_variables,
    probe.facts,
    probe.rules,
    probe.target,
    context.budget_kind,
    float_batches,
    candidates=bits,
    num_probes=int(probes),
  )
  qm = _qat_model(
    module,
    hawq_lib.rules_for_bits(probe.rules, choice),
    sample_x,
    dataclasses.replace(context, on_unused='error'),
  )
  qm.target = probe.target
  qm.search_info = info
  return qm


def f8net(
  module,
  sample_x,
  *,
  context: Context,
  weight_format: str = 'std',
  act_format: str = 'std',
  weight_granularity: str = 'layer',
  momentum: float = 0.1,
  weight_fl_range: tuple[int, int] = (0, 15),
  fold_bn: bool = True,
  pact: bool = False,
  pact_init: float = 4.0,
):
  """F8Net: 8-bit fixed point with power-of-two scales.

  Args:
    module: the Flax module.
    sample_x: an input batch (or its shape) to trace the module with.
    context: the layers kept float.
    weight_format: 'std' (FL = floor(log2(C/std))) or 'grid' (RMS search).
    act_format: the same for activations.
    weight_granularity: one weight FL per 'layer' or per 'channel'.
    momentum: EMA momentum of the activation FL.
    weight_fl_range: allowed weight FLs.
    fold_bn: fold Conv/Dense -> BatchNorm pairs.
    pact: fixed-point PACT (learned clips folded into the producing layer).
    pact_init: initial clip.
  """
  options = F8NetOptions(
    weight_format=weight_format,
    act_format=act_format,
    weight_granularity=weight_granularity,
    momentum=momentum,
    weight_fl_range=tuple(int(v) for v in weight_fl_range),
    keep_float=context.keep_float,
    fold_bn=fold_bn,
    pact=bool(pact),
    pact_init=float(pact_init),
    axis_name=getattr(module, 'bn_axis_name', None),
  )
  return F8NetModel(
    module, sample_x, options=options, call_kwargs={'train': False}
  )


METHODS: dict[str, Method] = {
  'none': Method(float_run, quantized=False),
  'uniform': Method(uniform),
  'fracbits': Method(fracbits, uses_budget=True),
  'hawq': Method(hawq, uses_budget=True, preserve=False),
  'f8net': Method(f8net, preserve=False),
}


def get(name: str) -> Method:
  """The method called ``name``; a clear error listing the valid ones."""
  if name not in METHODS:
    raise ValueError(
      f'config.quant.method={name!r} is unknown; choose one of '
      f'{", ".join(repr(m) for m in METHODS)}.'
    )
  return METHODS[name]


def _keyword_fields(factory) -> dict[str, inspect.Parameter]:
  params = inspect.signature(factory).parameters
  return {
    name: p
    for name, p in params.items()
    if p.kind is p.KEYWORD_ONLY and name not in ('context', 'total_steps')
  }


def block_defaults(factory) -> dict[str, Any]:
  """The config block of ``factory``: its keyword fields and defaults
  (``None`` defaults become typed placeholders, so that command-line
  overrides of them parse)."""
  hints = typing.get_type_hints(factory)
  out = {}
  for name, param in _keyword_fields(factory).items():
    value = param.default
    if value is None:
      kinds = [t for t in typing.get_args(hints[name]) if t is not type(None)]
      value = config_dict.placeholder(kinds[0])
    out[name] = value
  return out


# -- sparsity / cluster preservation (config.quant.preserve) -------------------

PRESERVE_MODES = ('', 'prune', 'cluster', 'prune_cluster')
PRUNE_SCHEDULES = ('oneshot', 'polynomial')


def min_bits_for(clusters: int) -> float:
  """Bits needed to give ``clusters`` values distinct codes."""
  return float(max(1, int(np.ceil(np.log2(max(int(clusters), 2))))))


def check_preserve(
  *,
  mode: str,
  sparsity: float,
  prune_structure: str,
  prune_schedule: str,
  clusters: int,
  **unused,
) -> None:
  """Clear errors for bad ``config.quant.preserve`` fields (every field of
  the block is accepted; those not checked here are ignored)."""
  del unused
  if mode not in PRESERVE_MODES:
    raise ValueError(
      f'config.quant.preserve.mode={mode!r} is unknown; choose one of '
      f"{PRESERVE_MODES} ('prune' = PQAT, 'cluster' = CQAT, "
      "'prune_cluster' = PCQAT)."
    )
  if not mode:
    return
  s = float(sparsity)
  if s != -1.0 and not 0.0 <= s < 1.0:
    raise ValueError(
      f'config.quant.preserve.sparsity={s} is outside [0, 1) (use -1 '
      "to keep the starting model's zeros)."
    )
  if 'cluster' in mode:
    need = 2 if 'prune' in mode else 1
    if int(clusters) < need:
      raise ValueError(
        f'config.quant.preserve.clusters={clusters}: need at least {need}'
        + (' (the pinned zero is one of them)' if need == 2 else '')
        + '.'
      )
  if prune_structure not in sparsity_lib.STRUCTURES:
    raise ValueError(
      f'config.quant.preserve.prune_structure={prune_structure!r} is '
      f'unknown; choose one of {sparsity_lib.STRUCTURES}.'
    )
  if prune_schedule not in PRUNE_SCHEDULES:
    raise ValueError(
      f'config.quant.preserve.prune_schedule={prune_schedule!r} is '
      f'unknown; choose one of {PRUNE_SCHEDULES}.'
    )
  if prune_schedule == 'polynomial':
    if mode != 'prune':
      raise ValueError(
        "config.quant.preserve.prune_schedule='polynomial' (gradual "
        f"pruning) goes with mode='prune' only, not {mode!r}: prune "
        'gradually first, then cluster / PCQAT from that workdir '
        '(--config.init_from) with sparsity=-1.'
      )
    if not 0.0 < s < 1.0:
      raise ValueError(
        f'config.quant.preserve.sparsity={s}: gradual pruning needs a '
        'final sparsity in (0, 1).'
      )


def preserve_transform(
  *,
  total_steps: int | None = None,
  mode: str = '',
  layers: str = '',
  sparsity: float = -1.0,
  prune_structure: str = 'unstructured',
  prune_schedule: str = 'oneshot',
  prune_initial_sparsity: float = 0.0,
  prune_begin_step: int = 0,
  prune_end_step: int = -1,
  prune_frequency: int = 10,
  clusters: int = 16,
  cluster_grad: str = 'sum',
  cluster_init: str = 'kmeans++',
  cluster_per_channel: bool = False,
  cluster_min_bits: bool = True,
):
  """The kernel transform of ``config.quant.preserve`` (``None`` when
  ``mode`` is ''): a ``PruningTransform`` for gradual pruning
  (``prune_schedule='polynomial'``), else a ``PreserveTransform``.

  Args:
    total_steps: training steps (``prune_end_step < 0``: two thirds).
    mode: '' (off), 'prune' (PQAT: fixed mask), 'cluster' (CQAT: trainable
      centroids) or 'prune_cluster' (PCQAT: both, the zero centroid pinned).
    layers: regex of the layers it applies to ('' = all).
    sparsity: one-shot magnitude pruning at calibration to this sparsity
      (-1 keeps the starting model's zeros).
    prune_structure: 'unstructured', 'n:m' (e.g. '2:4') or 'channel'.
    prune_schedule: 'oneshot' or 'polynomial' (gradual, ``mode='prune'``).
    prune_initial_sparsity: gradual pruning starts here...
    prune_begin_step: ...at this step...
    prune_end_step: ...and reaches ``sparsity`` here (-1: 2/3 of training)...
    prune_frequency: ...updating the mask every this many steps.
    clusters: k (the zero counts for PCQAT).
    cluster_grad: 'sum' or 'mean' member gradients.
    cluster_init: 'kmeans++', 'linear' or 'density'.
    cluster_per_channel: clusters per output channel.
    cluster_min_bits: learned (FracBits) bits never below log2(clusters);
      read by the adapter, not here.
  """
  del cluster_min_bits  # a bound on FracBits' bits, not on the transform
  check_preserve(
    mode=mode,
    sparsity=sparsity,
    prune_structure=prune_structure,
    prune_schedule=prune_schedule,
    clusters=clusters,
  )
  if not mode:
    return None
  s = float(sparsity)
  if prune_schedule == 'polynomial':
    end = int(prune_end_step)
    if end < 0:
      if not total_steps:
        raise ValueError(
          'config.quant.preserve.prune_end_step=-1 needs the number of '
          'training steps; set prune_end_step explicitly.'
        )
      end = max(int(prune_begin_step) + 1, (2 * int(total_steps)) // 3)
    return preserve_lib.PruningTransform(
      s,
      initial_sparsity=float(prune_initial_sparsity),
      begin_step=int(prune_begin_step),
      end_step=end,
      frequency=int(prune_frequency),
      structure=prune_structure,
      layers=layers or None,
    )
  return preserve_lib.PreserveTransform(
    prune='prune' in mode,
    cluster='cluster' in mode,
    clusters=int(clusters),
    cluster_grad=cluster_grad,
    cluster_init=cluster_init,
    cluster_per_channel=bool(cluster_per_channel),
    sparsity=None if s < 0 else s,
    structure=prune_structure,
    layers=layers or None,
  )
