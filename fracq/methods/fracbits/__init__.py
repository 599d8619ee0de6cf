"""FracBits (Yang & Jin, AAAI 2021): learned fractional bit-widths.

Its rule spec (``spec``: :class:`FracBitsSpec`, learned bits and their
bounds), its quantizer and freeze (``quantizer``), the resource penalties and hard
assignment (``penalty``) and the hard-bits bookkeeping (``hard_bits``). The
cost model and budgets it shares with HAWQ are in
:mod:`fracq.methods.cost`.
"""

from fracq.methods.fracbits.hard_bits import hard_bits_view
from fracq.methods.fracbits.hard_bits import needs_hard_assignment
from fracq.methods.fracbits.hard_bits import write_hard_bits
from fracq.methods.fracbits.penalty import FORMS
from fracq.methods.fracbits.penalty import HardAssignment
from fracq.methods.fracbits.penalty import Penalty
from fracq.methods.fracbits.penalty import hard_assign
from fracq.methods.fracbits.quantizer import freeze
from fracq.methods.fracbits.quantizer import quantize
from fracq.methods.fracbits.spec import FracBitsSpec

__all__ = [
  'FORMS',
  'FracBitsSpec',
  'HardAssignment',
  'Penalty',
  'freeze',
  'hard_assign',
  'hard_bits_view',
  'needs_hard_assignment',
  'quantize',
  'write_hard_bits',
]
