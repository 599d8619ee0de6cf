"""Lowering trained quantized models to integer programs, per method.

:func:`lower` dispatches through the registry
(:mod:`fracq.export.lowering.registry`) on the model wrapper's class; the
checks and helpers every lowering shares are in
:mod:`fracq.export.lowering.common`. Each method's lowering lives in its
own package and registers itself when imported; this package imports the
built-in ones, so importing :mod:`fracq.export` registers them:

* ``'qat'`` (``lower_qat``): uniform QAT and hard-assigned FracBits
  ``QATModel`` chains and graphs (residual adds, ReLU6, depthwise convs,
  concatenations, max / average / global pools), real multipliers
  (:mod:`fracq.methods.uniform.lowering`).
* ``'f8net'`` (``lower_f8net``): F8Net chains and residual graphs,
  power-of-two shifts, bit-exact (:mod:`fracq.methods.f8net.lowering`).

``lower_qat`` / ``lower_f8net`` are the registered functions, looked up by
name (a method's lowering imports this package, so it cannot be imported
from here by name while it is the module being loaded).
"""

from fracq.export.lowering.common import Verification
from fracq.export.lowering.registry import Lowering
from fracq.export.lowering.registry import lower
from fracq.export.lowering.registry import lowering_for
from fracq.export.lowering.registry import register_lowering
from fracq.export.lowering.registry import registered_lowerings

# The built-in methods' lowerings, registered on import (plain imports: each
# imports this package back).
import fracq.methods.f8net.lowering  # noqa: E402, F401
import fracq.methods.uniform.lowering  # noqa: E402, F401

__all__ = [
  'Lowering',
  'Verification',
  'lower',
  'lower_f8net',
  'lower_qat',
  'lowering_for',
  'register_lowering',
  'registered_lowerings',
]

# Public names of the built-in lowerings -> the method they are registered
# under.
BUILTIN_LOWERINGS = {'lower_qat': 'qat', 'lower_f8net': 'f8net'}


def __getattr__(name: str):
  if name in BUILTIN_LOWERINGS:
    return registered_lowerings()[BUILTIN_LOWERINGS[name]].lower
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
