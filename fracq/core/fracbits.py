"""The FracBits fractional-bit quantizer.

Reference: Yang & Jin, "FracBits: Mixed Precision Quantization via Fractional
Bit-Widths", AAAI 2021, arXiv 2007.02017, section 3.1.

A tensor with a real bit-width ``b`` is quantized as the interpolation of its
two neighbouring integer-bit quantizations, which share one range::

    Q_b(x) = (b - floor(b)) * Q_{floor(b)+1}(x) + (1 + floor(b) - b) * Q_{floor(b)}(x)

Gradients: to ``x`` the straight-through estimators of both branches, mixed
with the same weights; to the range parameter through both branches; to
``b``, ``sum(dL/dQ * (Q_{floor(b)+1}(x) - Q_{floor(b)}(x)))``.

The high branch uses ``floor(b) + 1``, as NNCF's port does. The authors' code
uses ``ceil(b)``, which equals ``floor(b)`` at exact integers: both branches
then coincide and the task gradient to ``b`` vanishes exactly where hard
assignment leaves the bits, so a bit-width that lands on an integer can only
be moved by the resource penalty.

Bits are clamped to ``[b_min, b_max]`` by :func:`clamp_bits`, whose gradient
passes inside the bounds and, outside them, only in the direction that leads
back inside: a bit-width pushed past a bound is never stranded there.

``b_min < 1`` enables the 0-bit branch: ``Q_0(x)`` is the zero point (0 for
the symmetric and unsigned branches here), i.e. the tensor (or channel) is
pruned.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fracq.core import learned


def _check_bounds(b_min, b_max):
  if not 0 <= b_min <= b_max <= 16:
    raise ValueError(f'bit bounds [{b_min}, {b_max}] must satisfy 0 <= b_min '
                     '<= b_max <= 16.')


@jax.custom_vjp
def clamp_bits(b, b_min, b_max):
  """``clip(b, b_min, b_max)`` with a gradient that can always come back."""
  return jnp.clip(b, b_min, b_max)


def _clamp_fwd(b, b_min, b_max):
  return jnp.clip(b, b_min, b_max), (b, b_min, b_max)


def _clamp_bwd(res, g):
  b, lo, hi = res
  # Gradient descent moves b by -g: let it through when that leads inward.
  inside = (b >= lo) & (b <= hi)
  back_down = (b > hi) & (g > 0)
  back_up = (b < lo) & (g < 0)
  keep = inside | back_down | back_up
  return jnp.where(keep, g, 0.0), jnp.zeros_like(lo), jnp.zeros_like(hi)


clamp_bits.defvjp(_clamp_fwd, _clamp_bwd)


def fractional_quantize(x, bits, quantize_k: Callable, *, b_min: float = 2.0,
                        b_max: float = 8.0, allow_zero_bit: bool = False):
  """FracBits quantization of ``x`` at real bit-width ``bits``.

  Args:
    x: the tensor.
    bits: real bit-width, a scalar or an array broadcastable to ``x`` (e.g.
      one per output channel).
    quantize_k: ``quantize_k(x, k)`` computes ``Q_k(x)`` for an integer-valued
      float array ``k`` broadcastable to ``x`` (``k >= 1``); both branches
      call it, so it must close over the shared range.
    b_min: lower bound of the bit-width.
    b_max: upper bound.
    allow_zero_bit: with ``b_min < 1``, ``floor(b) = 0`` selects the pruned
      branch ``Q_0 = 0``.

  Returns:
    ``Q_b(x)`` in ``x``'s dtype.
  """
  _check_bounds(b_min, b_max)
  if b_min < 1 and not allow_zero_bit:
    raise ValueError(f'b_min={b_min} < 1 reaches the 0-bit branch; pass '
                     'allow_zero_bit=True to allow pruning, or raise b_min.')
  dtype = x.dtype
  b = clamp_bits(jnp.asarray(bits, jnp.float32), jnp.float32(b_min),
                 jnp.float32(b_max))
  lo_k = jax.lax.stop_gradient(jnp.floor(b))
  frac = b - lo_k
  xf = x.astype(jnp.float32)
  hi = quantize_k(xf, lo_k + 1.0)
  if b_min < 1:
    lo = jnp.where(lo_k >= 1, quantize_k(xf, jnp.maximum(lo_k, 1.0)), 0.0)
  else:
    lo = quantize_k(xf, lo_k)
  return (lo + frac * (hi - lo)).astype(dtype)


def hard_quantize(x, bits, quantize_k: Callable):
  """The integer mode: ``Q_k(x)`` at integer bits ``k`` (no bit gradient).

  ``bits == 0`` gives the pruned branch (zeros).
  """
  dtype = x.dtype
  k = jax.lax.stop_gradient(jnp.round(jnp.asarray(bits, jnp.float32)))
  xf = x.astype(jnp.float32)
  out = jnp.where(k >= 1, quantize_k(xf, jnp.maximum(k, 1.0)), 0.0)
  return out.astype(dtype)


def round_bits_with_offset(bits, delta, b_min: float, b_max: float):
  """Hard-assignment rounding: ``round(clip(b) + delta)`` within the integer
  bounds ``[ceil(b_min), floor(b_max)]``."""
  _check_bounds(b_min, b_max)
  b = jnp.clip(jnp.asarray(bits, jnp.float32), b_min, b_max)
  return jnp.clip(jnp.round(b + delta), jnp.ceil(b_min), jnp.floor(b_max))


# -- branch quantizers sharing one range -------------------------------------


def symmetric_range_branch(x, r, k):
  """Signed symmetric ``Q_k`` on ``[-r, r]``: step ``r / (2^(k-1) - 1)``.

  ``k >= 2`` (a signed symmetric 1-bit grid has no non-zero level). The
  range ``r`` gets LSQ-style gradients through the step.
  """
  qp = 2.0 ** (k - 1.0) - 1.0
  step = jnp.abs(r) / jnp.maximum(qp, 1.0)
  v = jnp.clip(x / step, -qp, qp)
  return learned.round_ste(v) * step


def unsigned_range_branch(x, r, k):
  """Unsigned ``Q_k`` on ``[0, r]`` (PACT-like clip): step ``r / (2^k - 1)``.

  Gradient to ``r``: 1 where ``x >= r`` and LSQ-style inside.
  """
  qp = 2.0 ** k - 1.0
  step = jnp.abs(r) / qp
  v = jnp.clip(x / step, 0.0, qp)
  return learned.round_ste(v) * step


def dorefa_branch(w, k):
  """The authors' DoReFa weight branch (tanh normalisation, range [-1, 1])."""
  return learned.dorefa_quantize_weight(w, k)


# -- fused range quantizer ---------------------------------------------------


def _levels(k, signed):
  return 2.0 ** (k - 1.0) - 1.0 if signed else 2.0 ** k - 1.0


def _fused_parts(x, r, b, signed, zero_branch):
  ra = jnp.abs(r)
  u = x / ra
  lo_k = jnp.floor(b)
  f = b - lo_k
  if signed:
    uc = jnp.clip(u, -1.0, 1.0)
    inside = jnp.abs(u) <= 1.0
  else:
    uc = jnp.clip(u, 0.0, 1.0)
    inside = (u >= 0.0) & (u <= 1.0)
  q_lo = _levels(jnp.maximum(lo_k, 1.0), signed)
  q_hi = _levels(lo_k + 1.0, signed)
  c_hi = jnp.round(uc * q_hi) / q_hi
  c_lo = jnp.round(uc * q_lo) / q_lo
  if zero_branch:
    c_lo = jnp.where(lo_k >= 1.0, c_lo, 0.0)
  return ra, u, f, inside, c_lo, c_hi


def _make_fused(signed: bool, zero_branch: bool):
  @jax.custom_vjp
  def fused(x, r, b):
    ra, _, f, _, c_lo, c_hi = _fused_parts(x, r, b, signed, zero_branch)
    return ra * (c_lo + f * (c_hi - c_lo))

  def fwd(x, r, b):
    ra, _, f, _, c_lo, c_hi = _fused_parts(x, r, b, signed, zero_branch)
    # Only the inputs are kept: the backward pass recomputes the cheap
    # elementwise parts instead of holding four tensors per quantizer.
    return ra * (c_lo + f * (c_hi - c_lo)), (x, r, b)

  def bwd(res, g):
    x, r, b = res
    ra, u, f, inside, c_lo, c_hi = _fused_parts(x, r, b, signed, zero_branch)
    gx = jnp.where(inside, g, 0.0)
    if signed:
      out_val = jnp.sign(u)
    else:
      out_val = jnp.where(u > 1.0, 1.0, 0.0)
    # d y_k / d r: c_k - u inside (straight-through rounding), the clipped
    # value outside; mixed with the interpolation weights.
    g_lo = jnp.where(inside, c_lo - u, out_val)
    g_hi = jnp.where(inside, c_hi - u, out_val)
    if zero_branch:
      g_lo = jnp.where(jnp.floor(b) >= 1.0, g_lo, 0.0)
    gr = g * ((1.0 - f) * g_lo + f * g_hi) * jnp.sign(r)
    gb = g * ra * (c_hi - c_lo)
    return gx, learned.sum_to(gr, jnp.shape(r)), learned.sum_to(gb, jnp.shape(b))

  fused.defvjp(fwd, bwd)
  return fused


_FUSED = {(s, z): _make_fused(s, z) for s in (True, False)
          for z in (True, False)}


def fractional_range_quantize(x, r, bits, *, signed: bool, b_min: float = 2.0,
                              b_max: float = 8.0,
                              allow_zero_bit: bool = False):
  """FracBits with the shared-range branches of this module, fused.

  Same values and gradients as ``fractional_quantize(x, bits,
  symmetric_range_branch / unsigned_range_branch)`` but both branches share
  one normalisation ``x / r`` and one clipping mask (their clipping ranges
  coincide: ``[-r, r]`` or ``[0, r]``), with a hand-written backward pass.

  Args:
    x: the tensor.
    r: the shared range (clip value), broadcastable to ``x``.
    bits: real bit-width, broadcastable to ``x``.
    signed: symmetric signed branches (weights) or unsigned (activations).
    b_min: lower bound of the bits (``< 1`` needs ``allow_zero_bit``).
    b_max: upper bound.
    allow_zero_bit: enable the pruned 0-bit branch.
  """
  _check_bounds(b_min, b_max)
  if b_min < 1 and not allow_zero_bit:
    raise ValueError(f'b_min={b_min} < 1 reaches the 0-bit branch; pass '
                     'allow_zero_bit=True to allow pruning, or raise b_min.')
  if signed and b_min < 2 and not allow_zero_bit:
    raise ValueError(f'b_min={b_min}: a signed symmetric grid needs at least '
                     '2 bits.')
  dtype = x.dtype
  b = clamp_bits(jnp.asarray(bits, jnp.float32), jnp.float32(b_min),
                 jnp.float32(b_max))
  fn = _FUSED[(signed, b_min < 1)]
  return fn(x.astype(jnp.float32), jnp.asarray(r, jnp.float32),
            b).astype(dtype)
