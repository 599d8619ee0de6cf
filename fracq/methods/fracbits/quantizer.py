"""FracBits' quantizer: learned fractional bits on one shared range.

Variables on the layer's scope (``t`` = ``kernel`` or ``input``):
``quant/{t}_bits`` (the learned fractional bit-width, per tensor or per
output channel), ``quant/{t}_range`` (the shared range of both neighbouring
integer grids; DoReFa kernels have none) and ``quant_stats/{t}_hard_bits``
(the integer bits frozen by hard assignment, ``-1`` until then).

:func:`quantize` is the training forward (fractional bits, or the frozen
integer bits in hard mode); :func:`freeze` the export of a hard-assigned
tensor.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fracq import core
from fracq.methods.common import STATE
from fracq.methods.common import TRAINABLE
from fracq.methods.common import Frozen
from fracq.methods.common import QuantTensor
from fracq.methods.common import bcast
from fracq.methods.common import kernel_codes
from fracq.methods.uniform.ranges import lsq_step_init


def _min_nonzero_bits(signed: bool) -> int:
  # A signed symmetric 1-bit grid has no non-zero level.
  return 2 if signed else 1


def _bits_axes(tensor: QuantTensor, x):
  """``(shape, axis)`` of the learned bits: per output channel for kernels
  with ``bits_per_channel``, else one per tensor."""
  if tensor.is_kernel and tensor.spec.bits_per_channel:
    return (x.shape[tensor.channel_axis],), tensor.channel_axis
  return (), tensor.axis


def _levels(tensor: QuantTensor, bits: float) -> float:
  """``Qp`` of the integer grid at ``floor(bits)`` (from the spec's grid
  convention); 1 below the smallest grid of that sign."""
  k = int(math.floor(bits))
  if k < _min_nonzero_bits(tensor.signed):
    return 1.0
  return float(tensor.grid(k)[1])


def quantize(tensor: QuantTensor, x):
  """Fake-quantizes ``x`` (float32) at the learned (or, in hard mode, the
  frozen integer) bits."""
  return pure_quantizer(tensor)(x, state(tensor, x))


def defer(tensor: QuantTensor, x):
  """``(fn, params)``: :func:`pure_quantizer` and :func:`state` for ``x``
  (float32), for a layer that re-quantizes ``x`` in its backward pass; None
  (nothing declared) for DoReFa kernels, whose quantizer has no
  hand-written gradient."""
  if tensor.spec.range_method == 'dorefa':
    return None
  return pure_quantizer(tensor), state(tensor, x)


def state(tensor: QuantTensor, x):
  """Declares the tensor's variables (calibrating them where asked) and
  returns what :func:`pure_quantizer` reads: ``{'bits': b}`` (the learned
  bits, or the frozen ones in hard mode, per tensor or per channel) and,
  but for DoReFa, ``'range'``: the shared range (per tensor or per channel)
  with LSQ's gradient scale applied."""
  spec = tensor.spec
  signed = tensor.signed
  bshape, _ = _bits_axes(tensor, x)
  bits = tensor.variable(
    TRAINABLE,
    'bits',
    lambda: jnp.full(bshape, float(spec.bits), jnp.float32),
    calibratable=False,
  )
  hard = tensor.variable(
    STATE,
    'hard_bits',
    lambda: jnp.full(bshape, -1.0, jnp.float32),
    calibratable=False,
  )
  bits_now = jax.lax.stop_gradient(hard.value) if tensor.hard else bits.value
  if spec.range_method == 'dorefa':
    return {'bits': bits_now}
  # One shared range r for both branches, set and trained like uniform LSQ's
  # step s at the same integer bits through r = s * Qp: initial value LSQ's
  # at the initial bits, LSQ's gradient scale at the bits in use. A model
  # frozen at k bits then computes what uniform k-bit QAT computes from the
  # same weights and data, with dL/dr = dL/ds / Qp. (Below 2 signed / 1
  # unsigned bits the initial grid mixes in the pruned branch; the range is
  # then the smallest grid's.)
  qmax0 = _levels(tensor, float(spec.bits))
  method = spec.range_method
  axis = tensor.axis
  pshape = tensor.param_shape(x, axis)

  def range_init():
    xs = tensor.batch(x)
    if method == 'pact' or (not signed and method != 'lsq'):
      amax = jnp.max(jnp.abs(xs), axis=tensor.reduce_axes(xs, axis))
      return jnp.reshape(jnp.maximum(amax, 1e-4), pshape)
    step = lsq_step_init(xs, qmax0, axis, tensor.is_kernel)
    return jnp.reshape(step * qmax0, pshape)

  shared = tensor.variable(TRAINABLE, 'range', range_init)
  r = core.learned.scale_grad(
    shared.value,
    _range_grad_scale(tensor, x, bits_now, shared.value.shape),
  )
  return {'bits': bits_now, 'range': r}


def pure_quantizer(tensor: QuantTensor):
  """``fn(x, params) -> x_hat``: the fake quantization of ``x`` (float32)
  under :func:`state`'s ``params``, a pure function (it touches no
  variable), so a layer can recompute it in its backward pass."""
  spec = tensor.spec
  signed = tensor.signed
  lo_b, hi_b = spec.bit_bounds

  def fn(x, params):
    _, baxis = _bits_axes(tensor, x)
    b = bcast(params['bits'], x, baxis)
    if spec.range_method == 'dorefa':
      if tensor.hard:
        return core.hard_quantize(x, b, core.dorefa_branch)
      return core.fractional_quantize(
        x,
        b,
        core.dorefa_branch,
        b_min=lo_b,
        b_max=hi_b,
        allow_zero_bit=lo_b < 1,
      )
    r = bcast(params['range'], x, tensor.axis)
    if tensor.hard:
      return core.hard_quantize(
        x,
        b,
        lambda xx, k: _lsq_at_bits(xx, r, k, signed),
        min_nonzero_bits=_min_nonzero_bits(signed),
      )
    return core.fractional_range_quantize(
      x, r, b, signed=signed, b_min=lo_b, b_max=hi_b, allow_zero_bit=lo_b < 1
    )

  return fn


def _range_grad_scale(tensor: QuantTensor, x, bits, range_shape):
  """LSQ's gradient scale for a shared range, at the level count of the
  integer bits in use (hard mode) or of the lower branch (fractional bits),
  one per range entry."""
  lo_b, hi_b = tensor.spec.bit_bounds
  k = jnp.floor(jnp.clip(bits, lo_b, hi_b))
  qp = jax.lax.stop_gradient(core.top_code(k, signed=tensor.signed))
  if qp.ndim and qp.shape != tuple(range_shape):
    qp = jnp.mean(qp)  # per-channel bits sharing a per-tensor range
  return tensor.lsq_grad_scale(x, qp, tensor.axis)


def _lsq_at_bits(x, r, k, signed: bool):
  """``Q_k`` on the shared range ``r`` as LSQ's quantizer with step ``r /
  Qp`` (``k`` may be traced). Same values as the shared-range branches of
  ``fracq.core.fracbits``, and LSQ's straight-through mask for ``x``, which
  passes the gradient at the grid's ends too (e.g. ReLU zeros), so a frozen
  model trains as uniform LSQ does. LSQ's gradient scale is already on
  ``r``."""
  qp = core.top_code(k, signed=signed)
  qmin = -qp if signed else jnp.zeros_like(qp)
  return core.lsq_quantize(x, jnp.abs(r) / jnp.maximum(qp, 1.0), qmin, qp)


# -- freeze --------------------------------------------------------------------
def _assigned_bits(tensor: QuantTensor) -> np.ndarray:
  if not tensor.hard:
    raise ValueError(
      'Freeze a FracBits model after hard assignment (its bits must be '
      'integers): use qmodel.for_step(...) and prepare(variables) first.'
    )
  bits = np.asarray(tensor.read(STATE, 'hard_bits'))
  if np.any(bits < 0):
    raise ValueError(
      f'{tensor.path}: the {tensor.name} bits are learned but not assigned '
      'yet; freeze after hard assignment (qmodel.for_step(...), '
      'prepare(variables)).'
    )
  return np.round(bits).astype(np.int32)


def _top_code(tensor: QuantTensor, k: int, signed: bool) -> int:
  """The top code of the shared-range grid at ``k`` integer bits (the
  symmetric ``[-qmax, qmax]`` grid when signed); 1 below its smallest grid
  (a pruned tensor)."""
  if k < _min_nonzero_bits(signed):
    return 1
  return max(tensor.grid(k, signed=signed)[1], 1)


def freeze(tensor: QuantTensor, kernel=None) -> Frozen:
  """A hard-assigned kernel (``kernel`` given: codes per layer or per
  channel, 0 bits a pruned channel) or input (its grid and scale)."""
  bits = _assigned_bits(tensor)
  if kernel is None:
    return _freeze_input(tensor, bits)
  x = jnp.asarray(kernel, jnp.float32)
  baxis = tensor.channel_axis if bits.ndim else None
  b = bcast(bits.astype(np.float32), x, baxis)
  per = np.atleast_1d(bits)
  if tensor.spec.range_method == 'dorefa':
    fake_quant = core.hard_quantize(x, b, core.dorefa_branch)
    top = np.array(
      [tensor.grid(k, signed=False)[1] if k >= 1 else 0 for k in per],
      np.float32,
    )
    live = top > 0
    scale = np.where(live, np.float32(2.0) / np.maximum(top, 1), 0)
    offset = np.where(live, np.float32(-1.0), 0).astype(np.float32)
    if bits.ndim == 0:
      scale, offset = scale[0], offset[0]
    return kernel_codes(
      tensor, fake_quant, scale=scale, bits=bits, signed=False, offset=offset
    )
  signed = tensor.signed
  r = jnp.asarray(tensor.read(TRAINABLE, 'range'), jnp.float32)
  rb = bcast(r, x, tensor.axis)
  branch = core.symmetric_range_branch if signed else core.unsigned_range_branch
  fake_quant = core.hard_quantize(x, b, lambda xx, k: branch(xx, rb, k))
  levels = np.array([_top_code(tensor, k, signed) for k in per], np.float32)
  levels = levels if bits.ndim else levels[0]
  step = jnp.abs(r) / jnp.maximum(jnp.asarray(levels), 1.0)
  return kernel_codes(tensor, fake_quant, scale=step, bits=bits, signed=signed)


def _freeze_input(tensor: QuantTensor, bits: np.ndarray) -> Frozen:
  signed = tensor.signed
  k = int(bits.reshape(-1)[0])
  r = np.abs(np.asarray(tensor.read(TRAINABLE, 'range'), np.float32))
  levels = _top_code(tensor, k, signed)
  qmin, qmax = (-levels, levels) if signed else (0, levels)
  if k == 0:
    qmin = qmax = 0
  zero = np.zeros(1, np.float32)
  return Frozen(
    codes=None,
    scale=r / np.float32(levels),
    bits=np.asarray(k, np.int32),
    axis=tensor.axis,
    signed=signed,
    zero_point=zero,
    offset=zero,
    qmin=qmin,
    qmax=qmax,
    extras={'range': r},
  )
