"""Lowering trained quantized models to integer programs, per method.

:func:`lower` dispatches through the registry
(:mod:`fracq.export.lowering.registry`) on the model wrapper's class; each
method's lowering lives in its own module and registers itself:

* ``'qat'`` (:func:`lower_qat`): uniform QAT and hard-assigned FracBits
  ``QATModel`` chains, real multipliers (:mod:`.qat`).
* ``'f8net'`` (:func:`lower_f8net`): F8Net chains and residual graphs,
  power-of-two shifts, bit-exact (:mod:`.f8net`).
"""

from fracq.export.lowering.f8net import lower_f8net
from fracq.export.lowering.qat import lower_qat
from fracq.export.lowering.registry import Lowering
from fracq.export.lowering.registry import lower
from fracq.export.lowering.registry import lowering_for
from fracq.export.lowering.registry import register_lowering
from fracq.export.lowering.registry import registered_lowerings

__all__ = [
  'Lowering',
  'lower',
  'lower_f8net',
  'lower_qat',
  'lowering_for',
  'register_lowering',
  'registered_lowerings',
]
