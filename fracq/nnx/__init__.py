"""Flax NNX front end: quantize ``nnx.Module`` models with fracq's rules.

The same rules, methods (uniform QAT with every range method, FracBits with
budgets, penalty and hard assignment) and core math as the linen front end,
driven through the same providers; see :mod:`fracq.nnx.qat`.
"""

from fracq.nnx.layers import SUPPORTED_LAYERS
from fracq.nnx.layers import QuantizedLayer
from fracq.nnx.layers import layer_type_of
from fracq.nnx.qat import QATModule
from fracq.nnx.qat import quantize
from fracq.nnx.variables import VARIABLE_TYPES
from fracq.nnx.variables import QuantParam
from fracq.nnx.variables import QuantStat

__all__ = [
  'SUPPORTED_LAYERS',
  'VARIABLE_TYPES',
  'QATModule',
  'QuantParam',
  'QuantStat',
  'QuantizedLayer',
  'layer_type_of',
  'quantize',
]
