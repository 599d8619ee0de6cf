"""Uniform QAT: a tensor at fixed integer bits on a range estimator's grid.

:func:`quantize` (training) and :func:`freeze` (export) both run the range
estimator that the spec's ``range_method`` names (:mod:`.ranges`); this
module only moves the estimator's state between it and the layer's
variables.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fracq.methods.common import Frozen
from fracq.methods.common import QuantTensor
from fracq.methods.common import kernel_codes
from fracq.methods.uniform import ranges


def _check_signed_bits(tensor: QuantTensor) -> None:
  spec = tensor.spec
  if (
    tensor.signed
    and spec.symmetric
    and int(spec.bits) < 2
    and spec.range_method != 'dorefa'
  ):
    # Kernels are refused when the rules are validated; an input's sign is
    # only known from the sample input, so it is checked here.
    raise ValueError(
      f'{tensor.path}: {tensor.name} is signed at 1 bit, a grid with no '
      'symmetric non-zero level; use 2 bits or TensorSpec(signed=False).'
    )


def state(tensor: QuantTensor, x):
  """The range estimator's state for ``x`` (float32): declares,
  calibrates and updates its variables on the layer's scope."""
  _check_signed_bits(tensor)
  estimator = ranges.get(tensor.spec.range_method)
  initial = {}

  def init_field(field):
    if 'state' not in initial:
      initial['state'] = estimator.init(tensor, x)
    return getattr(initial['state'], field)

  variables = {
    field: tensor.variable(
      estimator.collection, field, lambda field=field: init_field(field)
    )
    for field in estimator.state._fields
  }
  current = estimator.state(**{f: v.value for f, v in variables.items()})
  if estimator.update is not None and tensor.updating(estimator.collection):
    current = estimator.update(tensor, x, current)
    for field, var in variables.items():
      var.value = getattr(current, field)
  return current


def quantize(tensor: QuantTensor, x):
  """Fake-quantizes ``x`` (float32) with the spec's range estimator,
  declaring, calibrating and updating its state on the layer's scope."""
  estimator = ranges.get(tensor.spec.range_method)
  return estimator.quantize(tensor, x, state(tensor, x))


def pure_quantizer(tensor: QuantTensor):
  """``fn(x, state) -> x_hat``: the estimator's fake quantization of ``x``
  (float32) under ``state`` (:func:`state`), a pure function (it touches no
  variable), so a layer can recompute it in its backward pass."""
  estimator = ranges.get(tensor.spec.range_method)

  def fn(x, current):
    return estimator.quantize(tensor, x, current)

  return fn


def defer(tensor: QuantTensor, x):
  """``(fn, state)``: :func:`pure_quantizer` and the estimator's
  :func:`state` for ``x`` (float32), for a layer that re-quantizes ``x`` in
  its backward pass; None (nothing declared) where the estimator has no
  hand-written gradient (``RangeEstimator.recompute``)."""
  if not ranges.get(tensor.spec.range_method).recompute:
    return None
  return pure_quantizer(tensor), state(tensor, x)


def _stored_state(tensor: QuantTensor, estimator: ranges.RangeEstimator):
  return estimator.state(
    **{
      field: np.asarray(tensor.read(estimator.collection, field), np.float32)
      for field in estimator.state._fields
    }
  )


def freeze(tensor: QuantTensor, kernel=None) -> Frozen:
  """The frozen kernel (``kernel`` given: its codes, computed with the
  estimator's own quantizer, so they are the model's kernel bit for bit) or
  input (its grid and affine map)."""
  estimator = ranges.get(tensor.spec.range_method)
  state = _stored_state(tensor, estimator)
  params = estimator.qparams(tensor, state)
  bits = np.asarray(int(tensor.spec.bits), np.int32)
  extras = {
    key: np.asarray(value, np.float32)
    for key, value in (params.extras or {}).items()
  }
  if kernel is not None:
    x = jnp.asarray(kernel, jnp.float32)
    fake_quant = estimator.quantize(tensor, x, state)
    return kernel_codes(
      tensor,
      fake_quant,
      scale=params.scale,
      bits=bits,
      signed=params.signed,
      zero_point=params.zero_point,
      offset=params.offset,
    )._replace(extras=extras)
  return Frozen(
    codes=None,
    scale=np.abs(np.asarray(params.scale, np.float32)),
    bits=bits,
    axis=tensor.axis,
    signed=params.signed,
    zero_point=np.asarray(params.zero_point, np.float32),
    offset=np.asarray(params.offset, np.float32),
    qmin=int(params.qmin),
    qmax=int(params.qmax),
    extras=extras,
  )
