"""Layer 1: pure-JAX quantization math (no Flax)."""

from fracq.core.fracbits import clamp_bits
from fracq.core.fracbits import dorefa_branch
from fracq.core.fracbits import fractional_quantize
from fracq.core.fracbits import fractional_range_quantize
from fracq.core.fracbits import hard_quantize
from fracq.core.fracbits import round_bits_with_offset
from fracq.core.fracbits import symmetric_range_branch
from fracq.core.fracbits import unsigned_range_branch
from fracq.core.learned import dorefa_normalize
from fracq.core.learned import dorefa_quantize_weight
from fracq.core.learned import lsq_grad_scale
from fracq.core.learned import lsq_init_step
from fracq.core.learned import lsq_plus_quantize
from fracq.core.learned import lsq_quantize
from fracq.core.learned import pact_quantize
from fracq.core.learned import round_ste
from fracq.core.observers import MinMaxState
from fracq.core.observers import minmax_update
from fracq.core.observers import moving_average_update
from fracq.core.observers import observer_init
from fracq.core.observers import percentile_range
from fracq.core.recompute import Deferred
from fracq.core.recompute import requantizing_op
from fracq.core.uniform import fake_quant
from fracq.core.uniform import fake_quant_grouped
from fracq.core.uniform import group_columns
from fracq.core.uniform import int_range
from fracq.core.uniform import minmax_to_qparams
from fracq.core.uniform import quantize_to_int
from fracq.core.uniform import top_code
from fracq.core.uniform import ungroup_columns

__all__ = [
  'Deferred',
  'MinMaxState',
  'clamp_bits',
  'dorefa_branch',
  'dorefa_normalize',
  'dorefa_quantize_weight',
  'fake_quant',
  'fake_quant_grouped',
  'fractional_quantize',
  'fractional_range_quantize',
  'group_columns',
  'hard_quantize',
  'int_range',
  'lsq_grad_scale',
  'lsq_init_step',
  'lsq_plus_quantize',
  'lsq_quantize',
  'minmax_to_qparams',
  'minmax_update',
  'moving_average_update',
  'observer_init',
  'pact_quantize',
  'percentile_range',
  'quantize_to_int',
  'requantizing_op',
  'round_bits_with_offset',
  'round_ste',
  'symmetric_range_branch',
  'top_code',
  'ungroup_columns',
  'unsigned_range_branch',
]
