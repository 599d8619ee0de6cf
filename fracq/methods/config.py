"""From an ``ml_collections`` config to a quantized model wrapper.

``config.quant`` describes quantization with plain fields a person can
override from the command line (``--config.quant.weight_bits=3``); this
module turns them into rules, a budget and a penalty, and builds the
:class:`~fracq.methods.qat.QATModel` the training loop drives.

Methods:

* ``'none'``: the float model (handled by the training loop).
* ``'uniform'``: every tensor at fixed integer bits.
* ``'fracbits'``: learned fractional bits under a budget, hard assignment at
  ``hard_assign_fraction`` of training, then fine-tuning at integer bits.
* ``'hawq'``: integer bits per layer from Hessian sensitivity and an ILP
  under the same budget (from the float model in ``config.init_from``), then
  uniform QAT at those bits.
"""

from __future__ import annotations

import logging
import math
import re

import ml_collections
from ml_collections import config_dict

from fracq.interception import Rule
from fracq.interception import TensorSpec
from fracq.methods import cost as cost_lib
from fracq.methods.fracbits import penalty as penalty_lib

METHODS = ('none', 'uniform', 'fracbits', 'hawq', 'f8net')


def default_quant_config(method: str = 'none') -> ml_collections.ConfigDict:
  """The ``config.quant`` block, with every field and its default."""
  c = ml_collections.ConfigDict()
  c.method = method
  # Bits: fixed integer bits (uniform) or initial bits (FracBits, when
  # init_bits is '').
  c.weight_bits = 8.0
  c.act_bits = 8.0
  # FracBits initial bits of every learned tensor: '' takes weight_bits /
  # act_bits as given; 'budget+D' starts at the budget's uniform-equivalent
  # bits plus D (the authors' recipe is 'budget+0.5'), found from the cost
  # model once the model is wrapped and clipped to the bit bounds.
  c.init_bits = ''
  c.quantize_acts = True
  # Range methods: 'lsq', 'lsq_plus', 'minmax', 'ema_minmax', 'percentile',
  # 'dorefa' (weights), 'pact' (activations).
  c.weight_range = 'lsq'
  c.act_range = 'lsq'
  c.weight_granularity = 'channel'
  c.act_granularity = 'tensor'
  # FracBits: which bit-widths are learned, and their bounds.
  c.learn_weight_bits = True
  c.learn_act_bits = False
  c.weight_bit_bounds = (2.0, 8.0)
  c.act_bit_bounds = (2.0, 8.0)
  c.bits_per_channel = False
  # Layers kept at fixed bits (first conv and classifier); regex, '' = none.
  c.fixed_layers = ''
  c.fixed_bits = 8
  c.fixed_act_bits = 8
  # Layers left float; regex, '' = none.
  c.keep_float = ''
  # Budget: kind 'size' or 'bitops', stated in exactly one form.
  c.budget_kind = 'size'
  c.budget_uniform_bits = config_dict.placeholder(float)
  c.budget_compression = config_dict.placeholder(float)
  c.budget_absolute = config_dict.placeholder(float)
  # Penalty: 'abs' (authors), 'nncf', 'hinge', 'l2'.
  c.penalty = 'abs'
  c.penalty_weight = 1.0
  c.penalty_unit = config_dict.placeholder(float)
  c.penalty_power = 1
  c.penalty_warmup_steps = 0
  c.penalty_schedule_steps = 0
  # Hard assignment: at this fraction of the run (or an explicit step >= 0).
  c.hard_assign_fraction = 0.8
  c.hard_assign_step = -1
  c.hard_assign_tolerance = 0.01
  c.on_unused = 'error'
  # HAWQ baseline: candidate bits, Hutchinson probes per batch, batches.
  c.hawq_candidates = '2,3,4,5,6,8'
  c.hawq_probes = 32
  c.hawq_batches = 2
  # F8Net (method 'f8net'): FL rule for weights / activations ('std' =
  # floor(log2(C/std)), 'grid' = RMS search), weight FL per 'layer' or
  # 'channel', activation-FL EMA momentum, weight FL range, BN folding.
  c.f8_weight_format = 'std'
  c.f8_act_format = 'std'
  c.f8_weight_granularity = 'layer'
  c.f8_momentum = 0.1
  c.f8_weight_fl_range = (0, 15)
  c.f8_fold_bn = True
  # Fixed-point PACT: learned clips folded into the producing layer (conv ->
  # [BN] -> ReLU -> conv links), initial clip f8_pact_init.
  c.f8_pact = False
  c.f8_pact_init = 4.0
  # Sparsity/cluster preservation (any method, 'none' included): '' (off),
  # 'prune' (PQAT: fixed mask), 'cluster' (CQAT: trainable centroids) or
  # 'prune_cluster' (PCQAT: both, the zero centroid pinned). sparsity >= 0
  # prunes the kernels one-shot by magnitude at calibration (init_from);
  # -1 keeps the starting model's zeros. clusters counts the zero for PCQAT.
  # preserve_layers: regex of the layers (others untouched); '' = all.
  # cluster_min_bits: learned (FracBits) bits never below log2(clusters).
  # prune_schedule 'polynomial' (preserve='prune' only): gradual magnitude
  # pruning from prune_initial_sparsity to sparsity between prune_begin_step
  # and prune_end_step (-1: 2/3 of training), mask updated every
  # prune_frequency steps; 'oneshot' prunes once at calibration.
  c.preserve = ''
  c.preserve_layers = ''
  c.sparsity = -1.0
  c.prune_structure = 'unstructured'
  c.prune_schedule = 'oneshot'
  c.prune_initial_sparsity = 0.0
  c.prune_begin_step = 0
  c.prune_end_step = -1
  c.prune_frequency = 10
  c.clusters = 16
  c.cluster_grad = 'sum'
  c.cluster_init = 'kmeans++'
  c.cluster_per_channel = False
  c.cluster_min_bits = True
  return c


def rules_from_config(c, init_bits: float | None = None) -> list[Rule]:
  """Rules from the flat fields of ``config.quant``.

  Args:
    c: the ``config.quant`` block.
    init_bits: when given, the initial bits of every learned tensor (clipped
      to its bounds) instead of ``weight_bits`` / ``act_bits``.
  """
  if c.method not in METHODS:
    raise ValueError(
      f'config.quant.method={c.method!r} is unknown; choose one of {METHODS}.'
    )
  learn = c.method in ('fracbits', 'hawq')
  from fracq.methods import preserve as preserve_lib

  preserve_lib.check_config(c)
  rules = []
  if c.keep_float:
    rules.append(
      Rule(module_path=c.keep_float, keep_float=True, name='keep_float')
    )
  if c.method == 'none':
    # Float pruning/clustering only: every layer seen, nothing quantized.
    rules.append(Rule(module_path='.*', name='preserve'))
    return rules
  if c.fixed_layers:
    rules.append(
      Rule(
        module_path=c.fixed_layers,
        name='fixed',
        weight=TensorSpec(
          bits=int(c.fixed_bits),
          range_method=c.weight_range,
          granularity=c.weight_granularity,
        ),
        act=(
          TensorSpec(
            bits=int(c.fixed_act_bits),
            range_method=c.act_range,
            granularity=c.act_granularity,
          )
          if c.quantize_acts
          else None
        ),
      )
    )
  w_learn = learn and c.learn_weight_bits
  a_learn = learn and c.learn_act_bits
  w_bounds = tuple(c.weight_bit_bounds)
  if w_learn and 'cluster' in c.preserve and c.cluster_min_bits:
    w_bounds = (
      max(w_bounds[0], preserve_lib.min_bits_for(c.clusters)),
      w_bounds[1],
    )
    if w_bounds[0] > w_bounds[1]:
      raise ValueError(
        f'config.quant.clusters={c.clusters} needs at least '
        f'{w_bounds[0]:g} bits but weight_bit_bounds={c.weight_bit_bounds};'
        ' lower clusters, raise the upper bound or set '
        'cluster_min_bits=False.'
      )
  w_start = (
    c.weight_bits
    if init_bits is None
    else min(max(init_bits, w_bounds[0]), w_bounds[1])
  )
  weight = TensorSpec(
    bits=w_start if w_learn else _int_bits(c.weight_bits, 'weight'),
    learn_bits=w_learn,
    bit_bounds=w_bounds,
    bits_per_channel=bool(c.bits_per_channel) and w_learn,
    range_method=c.weight_range,
    granularity=c.weight_granularity,
  )
  act = None
  if c.quantize_acts:
    a_bounds = tuple(c.act_bit_bounds)
    a_start = (
      c.act_bits
      if init_bits is None
      else min(max(init_bits, a_bounds[0]), a_bounds[1])
    )
    act = TensorSpec(
      bits=a_start if a_learn else _int_bits(c.act_bits, 'act'),
      learn_bits=a_learn,
      bit_bounds=a_bounds,
      range_method=c.act_range,
      granularity=c.act_granularity,
    )
  rules.append(Rule(module_path='.*', weight=weight, act=act, name='default'))
  return rules


def _int_bits(b, what) -> int:
  if float(b) != int(b):
    raise ValueError(
      f'config.quant.{what}_bits={b} must be an integer for '
      "method='uniform' (fractional bits need "
      "method='fracbits')."
    )
  return int(b)


def budget_from_config(c) -> cost_lib.Budget | None:
  if c.method not in ('fracbits', 'hawq'):
    return None
  forms = {
    'uniform_bits': c.budget_uniform_bits,
    'compression': c.budget_compression,
    'absolute': c.budget_absolute,
  }
  given = {k: v for k, v in forms.items() if v is not None}
  if len(given) != 1:
    raise ValueError(
      'config.quant needs exactly one of budget_uniform_bits, '
      f'budget_compression, budget_absolute for FracBits (got {given}).'
    )
  return cost_lib.Budget(kind=c.budget_kind, **given)


def penalty_from_config(c) -> penalty_lib.Penalty:
  return penalty_lib.Penalty(
    form=c.penalty,
    weight=c.penalty_weight,
    unit=c.penalty_unit,
    power=c.penalty_power,
    warmup_steps=c.penalty_warmup_steps,
    schedule_steps=c.penalty_schedule_steps,
  )


def hard_assign_step_from_config(c, total_steps: int | None) -> int | None:
  if c.method != 'fracbits':
    return None
  if c.hard_assign_step >= 0:
    return int(c.hard_assign_step)
  if total_steps is None:
    raise ValueError(
      'Cannot place hard assignment: total steps unknown; set '
      'config.quant.hard_assign_step.'
    )
  if not 0 < c.hard_assign_fraction <= 1:
    raise ValueError(
      'config.quant.hard_assign_fraction must be in (0, 1], '
      f'got {c.hard_assign_fraction}.'
    )
  return int(math.floor(c.hard_assign_fraction * total_steps))


def build_hawq(quant_cfg, module, sample_x, float_variables, batches):
  """HAWQ: search integer bits on the float model, return a uniform-QAT
  wrapper with those bits (``search_seconds`` in its ``info``)."""
  from fracq.methods import hawq
  from fracq.methods.qat import QATModel

  rules = rules_from_config(quant_cfg)
  budget = budget_from_config(quant_cfg)
  probe = QATModel(
    module,
    rules,
    sample_x,
    budget=budget,
    cost_kind=quant_cfg.budget_kind,
    call_kwargs={'train': False},
    on_unused=quant_cfg.on_unused,
  )
  cands = [int(b) for b in str(quant_cfg.hawq_candidates).split(',')]
  choice, info = hawq.search(
    module,
    float_variables,
    probe.facts,
    probe.rules,
    probe.target,
    quant_cfg.budget_kind,
    batches,
    candidates=cands,
    num_probes=quant_cfg.hawq_probes,
  )
  qm = QATModel(
    module,
    hawq.rules_for_bits(probe.rules, choice),
    sample_x,
    cost_kind=quant_cfg.budget_kind,
    call_kwargs={'train': False},
    on_unused='error',
  )
  qm.target = probe.target
  qm.search_info = info
  return qm


def init_bits_offset(c) -> float | None:
  """The offset of ``config.quant.init_bits = 'budget+D'`` (``None`` for '').

  Raises:
    ValueError: if ``init_bits`` is neither '' nor ``'budget'`` plus an
      optional signed number.
  """
  text = str(c.init_bits or '').replace(' ', '')
  if not text:
    return None
  match = re.fullmatch(r'budget(?:([+-](?:\d+\.?\d*|\.\d+)))?', text)
  if match is None:
    raise ValueError(
      f'config.quant.init_bits={c.init_bits!r} is not understood; use '
      "'' (start at weight_bits/act_bits) or 'budget+D' (the budget's "
      "uniform-equivalent bits plus D, e.g. 'budget+0.5')."
    )
  return float(match.group(1) or 0.0)


def build(quant_cfg, module, sample_x, config=None, total_steps=None):
  """The ``ModelWrapper`` for ``config.quant`` (uniform QAT or FracBits).

  With ``quant_cfg.init_bits = 'budget+D'`` (FracBits) the model is wrapped
  once to measure its cost model, then the learned tensors start at the
  budget's uniform-equivalent bits plus ``D``; the wrapper records both in
  ``init_bits_info``.
  """
  from fracq.methods import preserve as preserve_lib
  from fracq.methods.qat import QATModel

  if quant_cfg.method == 'hawq' or (
    quant_cfg.method == 'none' and not quant_cfg.preserve
  ):
    raise ValueError(
      'build() is for uniform/FracBits (and float pruning or '
      "clustering); method='none' is the plain float model and "
      "'hawq' needs build_hawq()."
    )
  offset = init_bits_offset(quant_cfg)
  if quant_cfg.method != 'fracbits':
    offset = None
  kwargs = dict(
    cost_kind=quant_cfg.budget_kind,
    penalty=penalty_from_config(quant_cfg),
    hard_assign_step=hard_assign_step_from_config(quant_cfg, total_steps),
    hard_assign_tolerance=quant_cfg.hard_assign_tolerance,
    call_kwargs={'train': False},
    on_unused=quant_cfg.on_unused,
    kernel_transform=preserve_lib.transform_from_config(quant_cfg, total_steps),
  )
  # Where the bits start does not matter for the first wrap; clipping them
  # to the bounds keeps an unused weight_bits from failing validation.
  probe_bits = None if offset is None else float(quant_cfg.weight_bits)
  qm = QATModel(
    module,
    rules_from_config(quant_cfg, init_bits=probe_bits),
    sample_x,
    budget=budget_from_config(quant_cfg),
    **kwargs,
  )
  if offset is None or not qm.learns_bits:
    return qm
  equivalent = qm.cost_model.uniform_equivalent_bits(qm.target)
  start = equivalent + offset
  # The cost model depends on which tensors learn bits and on their bounds,
  # not on where they start, so the re-wrapped model reuses its analysis.
  qm = QATModel(
    module,
    rules_from_config(quant_cfg, init_bits=start),
    None,
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
    quant_cfg.budget_kind,
    qm.target,
    equivalent,
    start,
    quant_cfg.init_bits,
  )
  return qm
