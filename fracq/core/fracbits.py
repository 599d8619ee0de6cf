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

The 0-bit (pruned) branch: ``Q_0(x) = 0``, the zero point of the symmetric
and unsigned branches here, i.e. the tensor (or channel) is pruned. The
smallest non-zero integer bit-width ``m`` depends on the grid:

* signed symmetric grids (weights): ``m = 2``. A signed symmetric 1-bit grid
  has ``2^0 - 1 = 0`` non-zero levels, i.e. it is identically zero, so the
  integer bit-widths are ``{0, 2, 3, ...}``;
* unsigned grids (activations after a ReLU): ``m = 1``; ``Q_1`` is the real
  grid ``{0, r}``. The DoReFa weight branch also has ``m = 1`` (its 1-bit
  grid is ``{-1, 1}``).

Below ``m`` the quantizer interpolates between the pruned branch and
``Q_m``::

    Q_b(x) = (b / m) * Q_m(x)        for 0 <= b < m

(for ``m = 1`` this is the formula above with ``floor(b) = 0``). Its bit
gradient is ``sum(dL/dQ * Q_m(x)) / m``, non-zero all the way down to 0, and
the cost, linear in ``b``, counts exactly the mix the quantizer runs: a
signed tensor at ``b = 1`` is half of a ternary tensor. The pruned branch is
reachable when ``b_min < m`` and must be asked for (``allow_zero_bit``).
Rounding to integers (:func:`round_bits`, used by hard mode, hard assignment
and the cost model) never lands in ``(0, m)``: below ``m`` a bit-width goes
to 0 when ``b < m / 2`` and to ``m`` otherwise (for ``m = 1``, plain
rounding).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from fracq.core import learned
from fracq.core import uniform


def _check_bounds(b_min, b_max):
  if not 0 <= b_min <= b_max <= 16:
    raise ValueError(
      f'bit bounds [{b_min}, {b_max}] must satisfy 0 <= b_min <= b_max <= 16.'
    )


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


def _check_zero_branch(b_min, min_nonzero_bits, allow_zero_bit):
  if min_nonzero_bits not in (1, 2):
    raise ValueError(
      f'min_nonzero_bits must be 1 (unsigned or DoReFa grids) '
      f'or 2 (signed symmetric grids), got {min_nonzero_bits}.'
    )
  if b_min < min_nonzero_bits and not allow_zero_bit:
    raise ValueError(
      f'b_min={b_min} < {min_nonzero_bits} reaches the 0-bit (pruned) branch '
      f'(the smallest non-zero grid of this quantizer has {min_nonzero_bits} '
      f'bit(s)); pass allow_zero_bit=True to allow pruning, or raise b_min '
      f'to {min_nonzero_bits}.'
    )


def _bracket(b, min_nonzero_bits: int, zero_reachable: bool):
  """The two integer branches around ``b`` and the weight of the upper one.

  Returns ``(k_lo, k_hi, frac, pruned)``: ``Q_b = Q_lo + frac (Q_hi - Q_lo)``
  with ``Q_lo = 0`` where ``pruned``. ``k_lo`` is never below
  ``min_nonzero_bits`` (where pruned it is a placeholder that keeps the branch
  quantizer finite), and ``frac`` carries the gradient to ``b``.
  """
  m = float(min_nonzero_bits)
  fl = jax.lax.stop_gradient(jnp.floor(b))
  if not zero_reachable:
    return fl, fl + 1.0, b - fl, None
  pruned = jax.lax.stop_gradient(b < m)
  k_lo = jnp.where(pruned, m, fl)
  k_hi = jnp.where(pruned, m, fl + 1.0)
  frac = jnp.where(pruned, b / m, b - fl)
  return k_lo, k_hi, frac, pruned


def fractional_quantize(
  x,
  bits,
  quantize_k: Callable,
  *,
  b_min: float = 2.0,
  b_max: float = 8.0,
  allow_zero_bit: bool = False,
  min_nonzero_bits: int = 1,
):
  """FracBits quantization of ``x`` at real bit-width ``bits``.

  Args:
    x: the tensor.
    bits: real bit-width, a scalar or an array broadcastable to ``x`` (e.g.
      one per output channel).
    quantize_k: ``quantize_k(x, k)`` computes ``Q_k(x)`` for an integer-valued
      float array ``k`` broadcastable to ``x`` (``k >= min_nonzero_bits``);
      both branches call it, so it must close over the shared range.
    b_min: lower bound of the bit-width.
    b_max: upper bound.
    allow_zero_bit: with ``b_min < min_nonzero_bits``, bit-widths below
      ``min_nonzero_bits`` interpolate with the pruned branch ``Q_0 = 0``.
    min_nonzero_bits: the smallest integer bit-width whose grid is not
      identically zero: 2 for signed symmetric grids
      (:func:`symmetric_range_branch`), 1 for unsigned and DoReFa grids.

  Returns:
    ``Q_b(x)`` in ``x``'s dtype.
  """
  _check_bounds(b_min, b_max)
  _check_zero_branch(b_min, min_nonzero_bits, allow_zero_bit)
  dtype = x.dtype
  b = clamp_bits(
    jnp.asarray(bits, jnp.float32), jnp.float32(b_min), jnp.float32(b_max)
  )
  k_lo, k_hi, frac, pruned = _bracket(
    b, min_nonzero_bits, b_min < min_nonzero_bits
  )
  xf = x.astype(jnp.float32)
  hi = quantize_k(xf, k_hi)
  lo = quantize_k(xf, k_lo)
  if pruned is not None:
    lo = jnp.where(pruned, 0.0, lo)
  return (lo + frac * (hi - lo)).astype(dtype)


def round_bits(bits, min_nonzero_bits: int = 1):
  """Rounds bit-widths to the integers a grid has: ``{0, m, m+1, ...}``.

  ``round(b)`` from ``m = min_nonzero_bits`` up; below ``m``, 0 when
  ``b < m / 2`` and ``m`` otherwise (a signed bit-width in ``[1, 2)`` goes
  to 2, never to the all-zero signed 1-bit grid).
  """
  b = jnp.asarray(bits, jnp.float32)
  k = jnp.round(b)
  if min_nonzero_bits > 1:
    m = float(min_nonzero_bits)
    k = jnp.where(b < m, jnp.where(b < 0.5 * m, 0.0, m), k)
  return k


def integer_bit_bounds(
  b_min: float, b_max: float, min_nonzero_bits: int = 1
) -> tuple[float, float]:
  """The smallest and largest integer bit-widths within ``[b_min, b_max]``
  that a grid with ``min_nonzero_bits`` has (``{0, m, m+1, ...}``)."""
  _check_bounds(b_min, b_max)
  m = float(min_nonzero_bits)
  lo, hi = float(math.ceil(b_min)), float(math.floor(b_max))
  if 0 < lo < m:
    lo = m
  if 0 < hi < m:
    hi = 0.0
  if lo > hi:
    raise ValueError(
      f'bit bounds [{b_min}, {b_max}] hold no integer bit-width of a grid '
      f'whose smallest non-zero width is {min_nonzero_bits} bits; widen '
      'them.'
    )
  return lo, hi


def hard_quantize(x, bits, quantize_k: Callable, *, min_nonzero_bits: int = 1):
  """The integer mode: ``Q_k(x)`` at integer bits ``k`` (no bit gradient).

  ``bits`` are rounded by :func:`round_bits`; ``k == 0`` gives the pruned
  branch (zeros).
  """
  dtype = x.dtype
  m = float(min_nonzero_bits)
  k = jax.lax.stop_gradient(round_bits(bits, min_nonzero_bits))
  xf = x.astype(jnp.float32)
  out = jnp.where(k >= m, quantize_k(xf, jnp.maximum(k, m)), 0.0)
  return out.astype(dtype)


def round_bits_with_offset(
  bits, delta, b_min: float, b_max: float, *, min_nonzero_bits: int = 1
):
  """Hard-assignment rounding: :func:`round_bits` of ``clip(b) + delta``
  within the integer bounds of :func:`integer_bit_bounds`."""
  lo, hi = integer_bit_bounds(b_min, b_max, min_nonzero_bits)
  b = jnp.clip(jnp.asarray(bits, jnp.float32), b_min, b_max)
  return jnp.clip(round_bits(b + delta, min_nonzero_bits), lo, hi)


# -- branch quantizers sharing one range -------------------------------------


def symmetric_range_branch(x, r, k):
  """Signed symmetric ``Q_k`` on ``[-r, r]``: step ``r / (2^(k-1) - 1)``.

  ``k >= 2`` (a signed symmetric 1-bit grid has no non-zero level: use it
  with ``min_nonzero_bits=2``). The range ``r`` gets LSQ-style gradients
  through the step.
  """
  qp = uniform.top_code(k, signed=True)
  step = jnp.abs(r) / jnp.maximum(qp, 1.0)
  v = jnp.clip(x / step, -qp, qp)
  return learned.round_ste(v) * step


def unsigned_range_branch(x, r, k):
  """Unsigned ``Q_k`` on ``[0, r]`` (PACT-like clip): step ``r / (2^k - 1)``.

  Gradient to ``r``: 1 where ``x >= r`` and LSQ-style inside.
  """
  qp = uniform.top_code(k, signed=False)
  step = jnp.abs(r) / qp
  v = jnp.clip(x / step, 0.0, qp)
  return learned.round_ste(v) * step


def dorefa_branch(w, k):
  """The authors' DoReFa weight branch (tanh normalisation, range [-1, 1])."""
  return learned.dorefa_quantize_weight(w, k)


# -- fused range quantizer ---------------------------------------------------


def _grid_parts(r, b, signed, zero_branch):
  """The per-range and per-bit-width parts of the fused quantizer (shaped
  like ``r`` and ``b``, not like ``x``): ``(|r|, frac, q_lo, q_hi,
  pruned)``."""
  k_lo, k_hi, f, pruned = _bracket(b, 2 if signed else 1, zero_branch)
  # k_lo is never below the smallest non-zero grid, so both level counts are
  # positive (a signed 1-bit grid would have none).
  q_lo = uniform.top_code(k_lo, signed=signed)
  q_hi = uniform.top_code(k_hi, signed=signed)
  return jnp.abs(r), f, q_lo, q_hi, pruned


def _element_parts(x, ra, q_lo, q_hi, pruned, signed):
  """The elementwise parts: ``(u, inside, c_lo, c_hi)`` with ``u = x / |r|``
  and ``c_k`` the normalised ``k``-bit codes."""
  u = x / ra
  if signed:
    uc = jnp.clip(u, -1.0, 1.0)
    inside = jnp.abs(u) <= 1.0
  else:
    uc = jnp.clip(u, 0.0, 1.0)
    inside = (u >= 0.0) & (u <= 1.0)
  if learned.is_recomputing():
    # In a layer's backward pass (fracq.core.requantizing_op), which needs
    # the codes only for gradients: scaled by 1 / q, within a float32
    # rounding of dividing by q. Divisions would each become a full-size
    # buffer that the convolution's weight gradient then transposes (with
    # them, a ResNet-20 step with FracBits activations took 1.2x uniform
    # QAT's). The forward pass divides, so that the quantized values, which
    # the next quantizer rounds, do not depend on how the compiler fuses
    # the program (on the device count, say).
    c_hi = jnp.round(uc * q_hi) * (1.0 / q_hi)
    c_lo = jnp.round(uc * q_lo) * (1.0 / q_lo)
  else:
    c_hi = jnp.round(uc * q_hi) / q_hi
    c_lo = jnp.round(uc * q_lo) / q_lo
  if pruned is not None:
    c_lo = jnp.where(pruned, 0.0, c_lo)
  return u, inside, c_lo, c_hi


def _fused_value(x, r, b, signed, zero_branch):
  ra, f, q_lo, q_hi, pruned = _grid_parts(r, b, signed, zero_branch)
  _, _, c_lo, c_hi = _element_parts(x, ra, q_lo, q_hi, pruned, signed)
  return ra * (c_lo + f * (c_hi - c_lo))


def _make_fused(signed: bool, zero_branch: bool):
  m = 2.0 if signed else 1.0

  @jax.custom_vjp
  def fused(x, r, b):
    return _fused_value(x, r, b, signed, zero_branch)

  def fwd(x, r, b):
    # Only the inputs are kept: the backward pass recomputes the cheap
    # elementwise parts instead of holding four tensors per quantizer.
    return _fused_value(x, r, b, signed, zero_branch), (x, r, b)

  def bwd(res, g):
    x, r, b = res
    # The forward pass's intermediates must not be kept alive until here:
    # the recomputation starts from distinct copies of r and b (see
    # learned.distinct_copy), and the per-range parts are broadcast to x's
    # shape before they meet x, so that the compiler merges none of the
    # elementwise expressions below with the forward's. Same values.
    ra, f, q_lo, q_hi, pruned = _grid_parts(
      learned.distinct_copy(r), learned.distinct_copy(b), signed, zero_branch
    )
    if learned.is_recomputing():
      # Forward and backward both run in the backward pass (the layer
      # re-quantizes its operand, fracq.core.requantizing_op): sharing their
      # expressions (x / r above all) is what is wanted.
      full = lambda a: a
    else:
      full = lambda a: jnp.broadcast_to(a, x.shape)
    ra, f = full(ra), full(f)
    pruned = None if pruned is None else full(pruned)
    u, inside, c_lo, c_hi = _element_parts(
      x, ra, full(q_lo), full(q_hi), pruned, signed
    )
    if signed:
      out_val = jnp.sign(u)
    else:
      out_val = jnp.where(u > 1.0, 1.0, 0.0)
    # Straight-through to x: weight 1 from each non-pruned branch.
    w_x = jnp.ones_like(f)
    df_db = jnp.ones_like(f)
    if pruned is not None:
      # The pruned branch is the constant 0 (c_lo is 0 there): no gradient
      # to x or r, and the weight of the upper branch is b / m.
      w_x = jnp.where(pruned, f, 1.0)
      df_db = jnp.where(pruned, 1.0 / m, 1.0)
    gx = jnp.where(inside, g * w_x, 0.0)
    # Every full-size term below is a product with the cotangent g: the
    # compiler cannot compute it before the backward pass reaches this
    # layer. (Terms of forward values alone, such as the codes c_k, would be
    # scheduled early and kept alive through the whole backward pass.)
    gc_lo, gc_hi, gu = g * c_lo, g * c_hi, g * u
    # d y_k / d r: c_k - u inside (straight-through rounding), the clipped
    # value outside; mixed with the interpolation weights.
    lo_in, lo_out = gc_lo - gu, g * out_val
    if pruned is not None:
      lo_in = jnp.where(pruned, 0.0, lo_in)
      lo_out = jnp.where(pruned, 0.0, lo_out)
    gr = jnp.where(
      inside,
      (1.0 - f) * lo_in + f * (gc_hi - gu),
      (1.0 - f) * lo_out + f * (g * out_val),
    ) * jnp.sign(r)
    gb = ra * (gc_hi - gc_lo) * df_db
    return (
      gx,
      learned.sum_to(gr, jnp.shape(r)),
      learned.sum_to(gb, jnp.shape(b)),
    )

  fused.defvjp(fwd, bwd)
  return fused


_FUSED = {
  (s, z): _make_fused(s, z) for s in (True, False) for z in (True, False)
}


def fractional_range_quantize(
  x,
  r,
  bits,
  *,
  signed: bool,
  b_min: float = 2.0,
  b_max: float = 8.0,
  allow_zero_bit: bool = False,
):
  """FracBits with the shared-range branches of this module, fused.

  Same values and gradients as ``fractional_quantize(x, bits,
  symmetric_range_branch / unsigned_range_branch, min_nonzero_bits=2 / 1)``
  but both branches share
  one normalisation ``x / r`` and one clipping mask (their clipping ranges
  coincide: ``[-r, r]`` or ``[0, r]``), with a hand-written backward pass.

  Args:
    x: the tensor.
    r: the shared range (clip value), broadcastable to ``x``.
    bits: real bit-width, broadcastable to ``x``.
    signed: symmetric signed branches (weights; integer bit-widths
      ``{0, 2, 3, ...}``) or unsigned (activations; ``{0, 1, 2, ...}``).
    b_min: lower bound of the bits (below 2 signed, or 1 unsigned, it
      reaches the pruned branch and needs ``allow_zero_bit``).
    b_max: upper bound.
    allow_zero_bit: enable the pruned 0-bit branch.
  """
  _check_bounds(b_min, b_max)
  m = 2 if signed else 1
  _check_zero_branch(b_min, m, allow_zero_bit)
  dtype = x.dtype
  b = clamp_bits(
    jnp.asarray(bits, jnp.float32), jnp.float32(b_min), jnp.float32(b_max)
  )
  fn = _FUSED[(signed, b_min < m)]
  return fn(x.astype(jnp.float32), jnp.asarray(r, jnp.float32), b).astype(dtype)
