"""The registry of tensor quantizers: which method quantizes and freezes a
tensor.

A quantizer is a method's functions over a
:class:`~fracq.methods.common.QuantTensor`: ``quantize(tensor, x)`` (the
training forward, declaring the method's variables), ``freeze(tensor,
kernel=None) -> Frozen`` (the export contract) and, optionally, ``defer(tensor,
x) -> (fn, params) | None``: the same forward split into the variables'
declaration (``params``, returned) and a pure ``fn(x, params)``, which a
layer re-runs in its backward pass instead of keeping the quantized tensor
(None where the method's gradient cannot be re-run that way). The provider
(:mod:`fracq.methods.providers`) and the exporter (:mod:`fracq.export.freeze`)
both dispatch through :func:`for_spec`, so a method's variables are read
only by its own code.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from fracq.methods import common
from fracq.methods import fracbits
from fracq.methods import uniform
from fracq.methods.common import FreezeFn
from fracq.methods.common import Frozen
from fracq.methods.common import QuantizeFn
from fracq.methods.common import QuantTensor
from fracq.methods.fracbits import quantizer as fracbits_quantizer
from fracq.methods.uniform import TensorSpec
from fracq.methods.uniform import quantizer as uniform_quantizer

DeferFn = Callable[[QuantTensor, Any], Any]


class Quantizer(NamedTuple):
  name: str
  quantize: QuantizeFn
  freeze: FreezeFn
  defer: DeferFn | None = None


QUANTIZERS: dict[str, Quantizer] = {
  'uniform': Quantizer(
    'uniform', uniform.quantize, uniform.freeze, uniform_quantizer.defer
  ),
  'fracbits': Quantizer(
    'fracbits', fracbits.quantize, fracbits.freeze, fracbits_quantizer.defer
  ),
}


def method_of(spec: TensorSpec) -> str:
  """The quantizer a spec selects, named by its class: ``'uniform'`` for
  :class:`fracq.TensorSpec` (fixed bits), ``'fracbits'`` for
  :class:`fracq.FracBitsSpec` (learned bits)."""
  return spec.quantizer


def for_spec(spec: TensorSpec) -> Quantizer:
  """The registered quantizer of ``spec`` (for ``granularity='group'``, run
  on the kernel's group view: see :func:`grouped`)."""
  quantizer = QUANTIZERS[method_of(spec)]
  return grouped(quantizer) if spec.granularity == 'group' else quantizer


def grouped(quantizer: Quantizer) -> Quantizer:
  """``quantizer`` on group-wise kernels: it quantizes and freezes the
  kernel's :func:`~fracq.methods.common.group_view`, whose channels are the
  groups, so each method's per-channel ranges are per-group ranges."""

  def quantize(tensor: QuantTensor, x):
    view, columns = common.group_view(tensor, x)
    out = quantizer.quantize(view, columns)
    return common.from_group_view(tensor, out, x.shape)

  def freeze(tensor: QuantTensor, kernel=None) -> Frozen:
    if kernel is None:
      raise ValueError(
        f"{tensor.path}: granularity='group' is for kernels, not inputs."
      )
    view, columns = common.group_view(tensor, np.asarray(kernel, np.float32))
    frozen = quantizer.freeze(view, columns)
    return common.group_frozen(tensor, frozen, np.shape(kernel))

  return Quantizer(quantizer.name, quantize, freeze)
