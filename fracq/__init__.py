"""fracq: quantization-aware training for JAX/Flax, centred on FracBits.

The public API is this short list; everything else is private to its
subpackage (``core`` math, ``interception`` mechanism, ``methods``,
``models``, ``data``, ``train``).
"""

from fracq.interception import LayerFacts
from fracq.interception import QuantizedModule
from fracq.interception import Rule
from fracq.interception import keep_float
from fracq.methods.cost import Budget
from fracq.methods.cost import CostModel
from fracq.methods.fracbits import FracBitsSpec
from fracq.methods.fracbits import Penalty
from fracq.methods.fracbits import hard_assign
from fracq.methods.qat import QATModel
from fracq.methods.qat import quantize
from fracq.methods.uniform import TensorSpec
from fracq.methods.uniform import fixed_bits

__all__ = [
  'Budget',
  'CostModel',
  'FracBitsSpec',
  'LayerFacts',
  'Penalty',
  'QATModel',
  'QuantizedModule',
  'Rule',
  'TensorSpec',
  'fixed_bits',
  'hard_assign',
  'keep_float',
  'quantize',
]

__version__ = '0.1.0'
