"""The factory of HAWQ (``config.quant.method='hawq'``).

Its keyword arguments after ``context`` are the fields of
``config.quant.hawq``; the training layer's adapter
(:mod:`fracq.train.quant_config`) passes the block in.
"""

from __future__ import annotations

import dataclasses

from fracq.methods import context as context_lib
from fracq.methods.context import Context
from fracq.methods.fracbits.spec import FracBitsSpec
from fracq.methods.hawq.search import rules_for_bits
from fracq.methods.hawq.search import search
from fracq.methods.qat import QATModel

__all__ = ['candidate_bits', 'hawq']


def candidate_bits(candidates: str) -> list[int]:
  """The sorted integer bits of ``candidates`` ('2,3,4,8').

  Raises:
    ValueError: an entry is not an integer.
  """
  try:
    return sorted({int(b) for b in str(candidates).split(',')})
  except ValueError as e:
    raise ValueError(
      f'config.quant.hawq.candidates={candidates!r} must be comma-separated '
      "integer bits, e.g. '2,3,4,8'."
    ) from e


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
) -> QATModel:
  """HAWQ: integer weight bits per layer from Hessian traces and an ILP
  under ``context.budget``, searched on ``context.float_model``; returns a
  uniform-QAT wrapper at those bits (``search_info`` holds the search).

  Args:
    module: the Flax module.
    sample_x: an input batch (or its shape) to trace the module with.
    context: fixed / float layers, the budget and the float model.
    act_bits: input bits.
    quantize_acts: quantize the inputs of the layers at all.
    weight_range: kernel range method (see
      :func:`fracq.methods.uniform.factory.uniform`).
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
  bits = candidate_bits(candidates)
  bounds = (float(bits[0]), float(bits[-1]))
  # The searched kernels are those whose bits are a variable under the
  # budget, as FracBits' learned bits are; where they start does not
  # matter to the search.
  weight = FracBitsSpec(
    bits=sum(bounds) / 2,
    bit_bounds=bounds,
    range_method=weight_range,
    granularity=weight_granularity,
    group_size=weight_group_size,
  )
  act = context_lib.fixed_act_spec(
    quantize_acts, act_bits, 'hawq', act_range, act_granularity
  )
  rules = context_lib.standard_rules(context, weight, act)
  probe = context_lib.qat_model(
    module, rules, sample_x, context, budget=context.budget
  )
  float_variables, float_batches = context.float_model(int(batches))
  choice, info = search(
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
  qm = context_lib.qat_model(
    module,
    rules_for_bits(probe.rules, choice),
    sample_x,
    dataclasses.replace(context, on_unused='error'),
  )
  qm.target = probe.target
  qm.search_info = info
  return qm
