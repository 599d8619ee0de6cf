"""The registry of tensor quantizers: which method quantizes and freezes a
tensor.

A quantizer is a method's pair of functions over a
:class:`~fracq.methods.common.QuantTensor`: ``quantize(tensor, x)`` (the
training forward, declaring the method's variables) and ``freeze(tensor,
kernel=None) -> Frozen`` (the export contract). The provider
(:mod:`fracq.methods.providers`) and the exporter (:mod:`fracq.export.freeze`)
both dispatch through :func:`for_spec`, so a method's variables are read
only by its own code.
"""

from __future__ import annotations

from typing import NamedTuple

from fracq.interception import TensorSpec
from fracq.methods import fracbits
from fracq.methods import uniform
from fracq.methods.common import FreezeFn
from fracq.methods.common import QuantizeFn


class Quantizer(NamedTuple):
  name: str
  quantize: QuantizeFn
  freeze: FreezeFn


QUANTIZERS: dict[str, Quantizer] = {
  'uniform': Quantizer('uniform', uniform.quantize, uniform.freeze),
  'fracbits': Quantizer('fracbits', fracbits.quantize, fracbits.freeze),
}


def method_of(spec: TensorSpec) -> str:
  """The quantizer a spec selects: ``'fracbits'`` for learned bits,
  ``'uniform'`` for fixed bits."""
  return 'fracbits' if spec.learn_bits else 'uniform'


def for_spec(spec: TensorSpec) -> Quantizer:
  """The registered quantizer of ``spec``."""
  return QUANTIZERS[method_of(spec)]
