"""Uniform fake quantization with PyTorch FakeQuantize semantics.

For a scale ``s``, integer zero point ``z`` and integer range ``[qmin,
qmax]``::

    q     = clamp(round(x * (1 / s)) + z, qmin, qmax)
    x_hat = (q - z) * s

``round`` is round-half-to-even (``std::nearbyint`` in PyTorch), and the
input is multiplied by the reciprocal of the scale, not divided by it, as
``torch.fake_quantize_per_tensor_affine`` / ``per_channel_affine`` do, so
forward values match PyTorch bit for bit. The gradient is the straight-through
estimator masked outside the clipping range: ``dx_hat/dx = 1`` where
``qmin <= round(x / s) + z <= qmax`` and 0 elsewhere (PyTorch's mask).

Scale, zero point and range may be Python numbers (validated eagerly) or
arrays broadcastable against ``x`` (per channel on any axis, per group via
:func:`fake_quant_grouped`); traced values cannot be validated.

Scale and zero point from a min/max range follow PyTorch's *unfused* observer
(``MinMaxObserver.calculate_qparams``): the range is widened to contain 0,
symmetric scales are ``max(-min, max) / ((qmax - qmin) / 2)``, affine scales
``(max - min) / (qmax - qmin)``, both floored at float32 epsilon, and the
zero point is ``qmin - round(min / scale)`` clamped to the range (symmetric:
0 for signed ranges, the midpoint for unsigned ones). The fused
``FakeQuantize`` module differs slightly (``max(|min|/|qmin|, max/qmax)`` for
symmetric scales); fracq follows the unfused observer on purpose because its
formula is the one every reference derives.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)


def _is_static(v) -> bool:
  return isinstance(v, numbers.Number) or (
    isinstance(v, np.ndarray) and v.dtype != object
  )


def int_range(
  bits: int, *, signed: bool, narrow_range: bool = False
) -> tuple[int, int]:
  """The integer range ``(qmin, qmax)`` of ``bits``-bit codes.

  Examples: 4-bit signed ``(-8, 7)``, narrow ``(-7, 7)``, unsigned
  ``(0, 15)``.
  """
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
    if isinstance(bits, float) and bits.is_integer():
      bits = int(bits)
    else:
      raise ValueError(f'bits must be an integer, got {bits!r}.')
  if not 1 <= bits <= 16:
    raise ValueError(
      f'bits={bits} is out of range: fracq supports 1 to 16 bits.'
    )
  if signed:
    qmax = int(top_code(bits, signed=True))
    qmin = -qmax - 1
    if narrow_range:
      if bits == 1:
        raise ValueError('A 1-bit signed narrow range is empty ([0, 0]).')
      qmin += 1
  else:
    qmin, qmax = 0, int(top_code(bits, signed=False))
    if narrow_range:
      qmin = 1
  return qmin, qmax


def top_code(bits, *, signed: bool):
  """The top code of the symmetric ``bits``-bit grid, ``2^(bits-1) - 1``
  signed (``[-top, top]``) and ``2^bits - 1`` unsigned (``[0, top]``), for
  bit-widths that may be fractional or traced (learned bits, DoReFa and PACT
  levels). Integer grids with their conventions: :func:`int_range`."""
  return 2.0 ** (bits - 1.0) - 1.0 if signed else 2.0**bits - 1.0


def check_qparams(scale, qmin, qmax) -> None:
  """Eager validation of static quantization parameters (``scale=None``:
  the scale is a learned parameter whose sign is free, not checked)."""
  if _is_static(qmin) and _is_static(qmax):
    if np.any(np.asarray(qmin) > np.asarray(qmax)):
      raise ValueError(
        f'qmin={qmin} > qmax={qmax}: the integer range is empty; swap them.'
      )
  if scale is not None and _is_static(scale) and np.any(np.asarray(scale) <= 0):
    raise ValueError(f'scale must be positive, got {scale}.')


def channel_shape(x_ndim: int, axis: int, size: int) -> tuple[int, ...]:
  """Shape that broadcasts a per-channel vector along ``axis``."""
  if not -x_ndim <= axis < x_ndim:
    raise ValueError(f'axis={axis} does not exist for a {x_ndim}-d tensor.')
  shape = [1] * x_ndim
  shape[axis % x_ndim] = size
  return tuple(shape)


@jax.custom_vjp
def _fq(x, inv_scale, scale, zero_point, qmin, qmax):
  q = jnp.round(x * inv_scale) + zero_point
  return (jnp.clip(q, qmin, qmax) - zero_point) * scale


def _fq_fwd(x, inv_scale, scale, zero_point, qmin, qmax):
  q = jnp.round(x * inv_scale) + zero_point
  mask = (q >= qmin) & (q <= qmax)
  out = (jnp.clip(q, qmin, qmax) - zero_point) * scale
  return out, (mask, inv_scale, scale, zero_point, qmin, qmax)


def _fq_bwd(res, g):
  mask, *rest = res
  zeros = [jnp.zeros_like(r) if hasattr(r, 'shape') else None for r in rest]
  return (jnp.where(mask, g, 0.0),) + tuple(zeros)


_fq.defvjp(_fq_fwd, _fq_bwd)


def fake_quant(x, scale, zero_point, qmin, qmax):
  """Fake-quantizes ``x`` (PyTorch FakeQuantize forward, STE backward).

  Args:
    x: input array (f32 or bf16; computed in f32, returned in x's dtype).
    scale: positive scale, scalar or broadcastable to ``x`` (per channel).
    zero_point: integer zero point (as a number or float array of integer
      values), broadcastable to ``x``.
    qmin: smallest integer code.
    qmax: largest integer code.

  Returns:
    ``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) *
    scale``. Only ``x`` receives a gradient (straight-through, masked).
  """
  check_qparams(scale, qmin, qmax)
  dtype = x.dtype
  f = lambda v: jnp.asarray(v, jnp.float32)
  scale = f(scale)
  out = _fq(
    x.astype(jnp.float32), 1.0 / scale, scale, f(zero_point), f(qmin), f(qmax)
  )
  return out.astype(dtype)


def quantize_to_int(x, scale, zero_point, qmin, qmax, dtype=jnp.int32):
  """The integer codes of :func:`fake_quant`: ``x_hat = (q - z) * scale``."""
  check_qparams(scale, qmin, qmax)
  scale = jnp.asarray(scale, jnp.float32)
  q = jnp.round(x.astype(jnp.float32) * (1.0 / scale)) + jnp.asarray(
    zero_point, jnp.float32
  )
  return jnp.clip(q, qmin, qmax).astype(dtype)


def fake_quant_grouped(
  x, scale, zero_point, qmin, qmax, *, axis: int, group_size: int
):
  """Per-group fake quantization: one scale per ``group_size`` run of ``axis``.

  ``scale`` and ``zero_point`` have shape ``x.shape[axis] // group_size``.
  """
  n = x.shape[axis]
  if group_size <= 0 or n % group_size:
    raise ValueError(
      f'group_size={group_size} does not divide axis {axis} of length {n}.'
    )
  axis = axis % x.ndim
  groups = n // group_size
  xs = x.reshape(x.shape[:axis] + (groups, group_size) + x.shape[axis + 1 :])
  bshape = channel_shape(xs.ndim, axis, groups)
  s = jnp.reshape(jnp.asarray(scale, jnp.float32), bshape)
  z = jnp.reshape(jnp.asarray(zero_point, jnp.float32), bshape)
  return fake_quant(xs, s, z, qmin, qmax).reshape(x.shape)


def group_columns(x, out_axes, group_size: int):
  """A kernel as per-group columns: ``(group_size, groups * out_channels)``.

  The kernel's contraction axes (every axis not in ``out_axes``) are
  flattened in memory order into ``K`` input features and its output axes
  into ``N`` output channels; each output channel's ``K`` features are cut
  into ``K / group_size`` groups of ``group_size`` consecutive features, and
  every (group, output channel) pair becomes one column (group-major), so
  per-channel quantization along the last axis of the result is per-group
  quantization of the kernel. :func:`ungroup_columns` is the inverse.

  Raises:
    ValueError: ``group_size`` does not divide ``K``.
  """
  shape = tuple(x.shape)
  out_axes = tuple(a % len(shape) for a in out_axes)
  contract = tuple(a for a in range(len(shape)) if a not in out_axes)
  k = int(np.prod([shape[a] for a in contract], dtype=np.int64))
  n = int(np.prod([shape[a] for a in out_axes], dtype=np.int64))
  if group_size <= 0 or k % group_size:
    raise ValueError(
      f'group_size={group_size} does not divide the {k} input features '
      f'(contraction length) of a kernel of shape {shape}.'
    )
  groups = k // group_size
  xp = x.transpose(contract + out_axes).reshape(groups, group_size, n)
  return xp.transpose(1, 0, 2).reshape(group_size, groups * n)


def ungroup_columns(columns, shape, out_axes, group_size: int):
  """The kernel of shape ``shape`` whose :func:`group_columns` is
  ``columns``."""
  shape = tuple(shape)
  out_axes = tuple(a % len(shape) for a in out_axes)
  contract = tuple(a for a in range(len(shape)) if a not in out_axes)
  n = int(np.prod([shape[a] for a in out_axes], dtype=np.int64))
  groups = columns.shape[1] // n
  perm = contract + out_axes
  xp = columns.reshape(group_size, groups, n).transpose(1, 0, 2)
  xp = xp.reshape(tuple(shape[a] for a in perm))
  return xp.transpose(tuple(np.argsort(perm)))


def minmax_to_qparams(min_val, max_val, qmin, qmax, *, symmetric: bool):
  """Scale and zero point from a range (PyTorch unfused observer semantics).

  Args:
    min_val: observed minimum (scalar or per-channel array).
    max_val: observed maximum.
    qmin: smallest integer code.
    qmax: largest integer code.
    symmetric: zero point fixed at 0 (signed) or the midpoint (unsigned).

  Returns:
    ``(scale, zero_point)`` as float32 arrays; the zero point holds integers.
  """
  check_qparams(1.0, qmin, qmax)
  lo = jnp.minimum(jnp.asarray(min_val, jnp.float32), 0.0)
  hi = jnp.maximum(jnp.asarray(max_val, jnp.float32), 0.0)
  qmin_f, qmax_f = float(qmin), float(qmax)
  if symmetric:
    amax = jnp.maximum(-lo, hi)
    scale = jnp.maximum(amax / ((qmax_f - qmin_f) / 2.0), F32_EPS)
    if qmin < 0:
      zp = jnp.zeros_like(scale)
    else:
      zp = jnp.full_like(scale, float(np.floor((qmin + qmax + 1) / 2)))
  else:
    scale = jnp.maximum((hi - lo) / (qmax_f - qmin_f), F32_EPS)
    zp = jnp.clip(qmin_f - jnp.round(lo / scale), qmin_f, qmax_f)
  return scale, zp
