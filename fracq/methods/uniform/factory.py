"""The factory of uniform QAT (``config.quant.method='uniform'``).

Its keyword arguments after ``context`` are the fields of
``config.quant.uniform``; the training layer's adapter
(:mod:`fracq.train.quant_config`) passes the block in.
"""

from __future__ import annotations

from fracq.methods import context as context_lib
from fracq.methods.context import Context
from fracq.methods.qat import QATModel
from fracq.methods.uniform.spec import TensorSpec

__all__ = ['uniform']


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
) -> QATModel:
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
    bits=context_lib.int_bits(weight_bits, 'uniform', 'weight'),
    range_method=weight_range,
    granularity=weight_granularity,
    group_size=weight_group_size,
  )
  act = context_lib.fixed_act_spec(
    quantize_acts, act_bits, 'uniform', act_range, act_granularity
  )
  rules = context_lib.standard_rules(context, weight, act)
  return context_lib.qat_model(module, rules, sample_x, context)
