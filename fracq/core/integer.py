"""Integer-arithmetic primitives of fracq's integer-only runtime.

References:
  Jacob et al., "Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference", CVPR 2018, arXiv 1712.05877 (the
  ``M = M0 2^-n`` multiplier, as in gemmlowp / TFLite).
  Jin et al., "F8Net", ICLR 2022, arXiv 2202.05239 (power-of-two scales: the
  requantization is a rounding right shift; average pooling as sum + shift).

Everything runs with ``jax_enable_x64`` off, in int32 / uint32 only:

* :func:`rounding_right_shift` rounds half to even, the rounding of
  ``jnp.round`` in the fixed-point fake quantizer, so an F8Net integer model
  reproduces its fake-quantized twin bit for bit.
* :func:`requantize` computes ``clamp(round(acc * M0 * 2^(shift - 31)) + zp)``
  *exactly*: the 62-bit product ``acc * M0`` is formed from 16-bit limbs in
  uint32 and shifted as a (hi, lo) word pair, so the only approximation is
  ``M0``'s 31-bit mantissa of the real multiplier (relative error <= 2^-31).
  ``rounding='half_even'`` rounds once; ``rounding='tflite'`` reproduces
  gemmlowp's two roundings (``SaturatingRoundingDoublingHighMul``, half up,
  then ``RoundingDivideByPOT``, half away from zero) bit for bit.
* :func:`assert_integer_only` checks a traced function's jaxpr against an
  allow-list: integer and boolean values through integer primitives only
  (optionally plus the two boundary steps, quantizing the float input at
  entry and dequantizing the output at exit).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from fracq.core import fixed_point

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
FLOAT_MULTIPLY_PRIMITIVES = ('mul', 'dot_general', 'conv_general_dilated')


def _check_int(x, name):
  if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
    raise ValueError(
      f'{name} must have an integer dtype, got '
      f'{jnp.asarray(x).dtype}; quantize it first.'
    )


def _static_check(v, lo, hi, name):
  if isinstance(v, (int, np.integer, np.ndarray)):
    a = np.asarray(v)
    if np.any(a < lo) or np.any(a > hi):
      raise ValueError(f'{name}={v} is outside [{lo}, {hi}].')


def _u32(x):
  return lax.bitcast_convert_type(jnp.asarray(x, jnp.int32), jnp.uint32)


def _i32(x):
  return lax.bitcast_convert_type(x, jnp.int32)


def rounding_right_shift(x, shift, *, axis: int | None = -1):
  """``round(x / 2^shift)``, ties to even, in int32.

  Args:
    x: integer array (computed as int32).
    shift: non-negative int or int array (per channel along ``axis`` if 1-D).
      0 returns ``x``; shifts >= 32 return 0 (``|x| / 2^32 <= 1/2``).
  Returns:
    int32; exact for all int32 inputs, negatives included (floor shift plus
    a non-negative remainder, so no intermediate overflows).
  """
  _check_int(x, 'x')
  _static_check(shift, 0, np.inf, 'shift')
  x = jnp.asarray(x, jnp.int32)
  s = fixed_point.broadcast_param(
    jnp.asarray(shift, jnp.int32), x.ndim, axis, 'shift'
  )
  return _rounding_right_shift(x, s)


@jax.jit
def _rounding_right_shift(x, s):
  sc = jnp.clip(s, 0, 31)
  q = x >> sc  # arithmetic: floor(x / 2^s)
  mask = (jnp.uint32(1) << _u32(sc)) - jnp.uint32(1)
  rem = _u32(x) & mask  # x - q 2^s, in [0, 2^s)
  half = (mask >> 1) + jnp.uint32(1)  # 2^(s-1); unused when s == 0
  up = (sc > 0) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
  return jnp.where(s >= 32, 0, q + up.astype(jnp.int32))


def shift_fraclen(x, shift, *, axis: int | None = -1):
  """Moves a fixed-point tensor to ``FL_out = FL_in - shift``.

  ``shift > 0``: :func:`rounding_right_shift`; ``shift < 0``: left shift,
  saturated to int32 (aligns FLs before a residual add).
  """
  _check_int(x, 'x')
  x = jnp.asarray(x, jnp.int32)
  s = fixed_point.broadcast_param(
    jnp.asarray(shift, jnp.int32), x.ndim, axis, 'shift'
  )
  return _shift_fraclen(x, s)


@jax.jit
def _shift_fraclen(x, s):
  left = jnp.clip(-s, 0, 31)
  lim = INT32_MAX >> left  # |x| <= lim shifts without overflow
  up = jnp.where(
    x > lim, INT32_MAX, jnp.where(x < -lim - 1, INT32_MIN, x << left)
  )
  return jnp.where(s >= 0, _rounding_right_shift(x, jnp.maximum(s, 0)), up)


def quantize_multiplier(real_multiplier):
  """``real = M0 * 2^(shift - 31)`` with ``M0`` in ``[2^30, 2^31)`` (TFLite).

  Host-side (numpy float64). ``M0 = round(m 2^31)`` with ``m`` the ``frexp``
  mantissa, ties away from zero like ``std::round``; a carry to ``2^31``
  halves ``M0`` and bumps ``shift``; values below ``2^-32`` become
  ``(0, 0)``.

  Args:
    real_multiplier: non-negative float or array (per channel).
  Returns:
    ``(M0, shift)``: Python ints for a scalar, int32 numpy arrays otherwise.
  """
  r = np.asarray(real_multiplier, np.float64)
  if not np.all(np.isfinite(r)) or np.any(r < 0):
    raise ValueError(
      f'real_multiplier={real_multiplier} must be finite and '
      '>= 0; fold a negative sign into the weights.'
    )
  mant, exp = np.frexp(r)
  m0 = np.floor(mant * 2.0**31 + 0.5)
  carry = m0 == 2.0**31
  m0 = np.where(carry, m0 / 2, m0)
  exp = exp + carry
  tiny = exp < -31
  m0, exp = np.where(tiny, 0, m0), np.where(tiny, 0, exp)
  if np.any(exp > 30):
    raise ValueError(
      f'real_multiplier={real_multiplier} is >= 2^30; '
      'requantize cannot represent it.'
    )
  m0, exp = m0.astype(np.int32), exp.astype(np.int32)
  if r.ndim == 0:
    return int(m0), int(exp)
  return m0, exp


def _mul_wide(a, b):
  """Exact ``a * b`` of uint32 arrays as a ``(hi, lo)`` uint32 pair."""
  m16 = jnp.uint32(0xFFFF)
  a0, a1, b0, b1 = a & m16, a >> 16, b & m16, b >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1  # each < 2^32
  mid = (p00 >> 16) + (p01 & m16) + (p10 & m16)  # < 3 * 2^16
  lo = (p00 & m16) | (mid << 16)
  hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
  return hi, lo


def _shift_right_wide(hi, lo, n, tie_up):
  """``round((hi 2^32 + lo) / 2^n)`` for unsigned pairs, ``n`` in [0, 63].

  Rounds up when the dropped bits exceed one half, and at exactly one half
  where ``tie_up`` (an array or a function of the truncated low word).
  Returns ``(hi, lo)``.
  """
  one, zero = jnp.uint32(1), jnp.uint32(0)
  n = _u32(n)
  small = n < 32
  s = n & jnp.uint32(31)
  carry_in = jnp.where(s == 0, zero, hi << ((jnp.uint32(32) - s) & 31))
  q_lo = jnp.where(small, (lo >> s) | carry_in, hi >> s)
  q_hi = jnp.where(small, hi >> s, zero)
  # Round bit (bit n - 1) and sticky bits (below it).
  k = n - one  # wraps for n == 0; masked by n > 0 below
  k_small = k < 32
  ks = k & jnp.uint32(31)
  below = (one << ks) - one
  rbit = jnp.where(k_small, (lo >> ks) & one, (hi >> ks) & one) == one
  sticky = jnp.where(
    k_small, (lo & below) != 0, (lo != 0) | ((hi & below) != 0)
  )
  tie = tie_up(q_lo) if callable(tie_up) else tie_up
  up = (n > 0) & rbit & (sticky | tie)
  new_lo = q_lo + up.astype(jnp.uint32)
  new_hi = q_hi + (up & (new_lo == 0)).astype(jnp.uint32)
  return new_hi, new_lo


def _signed_from_magnitude(neg, hi, lo):
  """``±(hi, lo)`` saturated to int32."""
  over_pos = (hi != 0) | (lo > jnp.uint32(INT32_MAX))
  over_neg = (hi != 0) | (lo > jnp.uint32(2**31))
  pos = jnp.where(over_pos, INT32_MAX, _i32(lo))
  negv = jnp.where(over_neg, INT32_MIN, _i32(~lo + jnp.uint32(1)))
  return jnp.where(neg, negv, pos)


def _abs_u32(x):
  return jnp.where(x < 0, ~_u32(x) + jnp.uint32(1), _u32(x))


def requantize(
  acc,
  multiplier,
  shift,
  zero_point=0,
  qmin=-128,
  qmax=127,
  *,
  axis: int | None = -1,
  rounding: str = 'half_even',
  dtype=jnp.int32,
):
  """``clamp(round(acc * M0 * 2^(shift - 31)) + zero_point, qmin, qmax)``.

  Args:
    acc: int32 accumulator.
    multiplier: ``M0`` from :func:`quantize_multiplier`, in ``[0, 2^31)``;
      scalar, same-rank, or 1-D per channel along ``axis``.
    shift: its exponent (``<= 31``), same shapes.
    zero_point: output zero point (int, broadcastable like ``multiplier``).
    qmin: smallest output code.
    qmax: largest output code.
    axis: channel axis of 1-D parameters.
    rounding: ``'half_even'``: one exact rounding of the product, ties to
      even; ``'tflite'``: gemmlowp / TFLite ``MultiplyByQuantizedMultiplier``
      bit for bit (its left shift for ``shift > 0`` wraps on overflow).
    dtype: output integer dtype.
  Returns:
    The requantized codes. Before adding ``zero_point`` the value saturates
    to int32 (only reachable with multipliers above 1).
  """
  _check_int(acc, 'acc')
  _static_check(multiplier, 0, INT32_MAX, 'multiplier')
  _static_check(shift, -np.inf, 31, 'shift')
  ints = (int, np.integer)
  if isinstance(qmin, ints) and isinstance(qmax, ints) and qmin > qmax:
    raise ValueError(f'qmin={qmin} > qmax={qmax}: the output range is empty.')
  acc = jnp.asarray(acc, jnp.int32)
  bp = lambda v, n: fixed_point.broadcast_param(
    jnp.asarray(v, jnp.int32), acc.ndim, axis, n
  )
  m, sh, zp = (
    bp(multiplier, 'multiplier'),
    bp(shift, 'shift'),
    bp(zero_point, 'zero_point'),
  )
  if rounding not in ('half_even', 'tflite'):
    raise ValueError(f"rounding={rounding!r}: use 'half_even' or 'tflite'.")
  qmin, qmax = jnp.asarray(qmin, jnp.int32), jnp.asarray(qmax, jnp.int32)
  return _requantize(acc, m, sh, zp, qmin, qmax, rounding).astype(dtype)


@functools.partial(jax.jit, static_argnums=(6,))
def _requantize(acc, m, sh, zp, qmin, qmax, rounding):
  if rounding == 'half_even':
    neg = acc < 0
    hi, lo = _mul_wide(_abs_u32(acc), _u32(m))
    # Ties to even is symmetric, so round the magnitude and restore the sign.
    n = jnp.clip(31 - sh, 0, 63)
    hi, lo = _shift_right_wide(hi, lo, n, lambda q: (q & 1) == 1)
    val = _signed_from_magnitude(neg, hi, lo)
  elif rounding == 'tflite':
    x = acc << jnp.clip(sh, 0, 31)  # wraps, like the C++ reference
    neg = x < 0
    hi, lo = _mul_wide(_abs_u32(x), _u32(m))
    # Half up (towards +inf) = ties away from zero for x >= 0, towards zero
    # for x < 0, on the magnitude.
    hi, lo = _shift_right_wide(hi, lo, 31, ~neg)
    high = _signed_from_magnitude(neg, hi, lo)  # |high| < 2^31: no saturation
    right = jnp.clip(-sh, 0, 31)
    # RoundingDivideByPOT: ties away from zero, symmetric.
    zeros = jnp.zeros(high.shape, jnp.uint32)
    _, lo = _shift_right_wide(zeros, _abs_u32(high), right, True)
    val = _signed_from_magnitude(high < 0, zeros, lo)
  # clamp(v + zp) == clamp(v, qmin - zp, qmax - zp) + zp, without overflow.
  return jnp.clip(val, qmin - zp, qmax - zp) + zp


def _common_int(x, w):
  _check_int(x, 'x')
  _check_int(w, 'w')
  x, w = jnp.asarray(x), jnp.asarray(w)
  if x.dtype != w.dtype:  # e.g. uint8 activations x int8 weights -> int16
    t = jnp.promote_types(x.dtype, w.dtype)
    x, w = x.astype(t), w.astype(t)
  return x, w


def int_dense(x, w):
  """``x @ w`` with int32 accumulation; ``w`` is a Dense kernel (in, out)."""
  _check_int(x, 'x')
  _check_int(w, 'w')
  x, w = jnp.asarray(x), jnp.asarray(w)
  if w.ndim != 2 or x.shape[-1] != w.shape[0]:
    raise ValueError(
      f'int_dense: x {x.shape} and kernel {w.shape} do not '
      'match; the kernel is (in_features, out_features).'
    )
  return lax.dot_general(
    x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )


def int_conv(
  x,
  w,
  strides=None,
  padding='VALID',
  feature_group_count=1,
  *,
  lhs_dilation=None,
  rhs_dilation=None,
):
  """Channel-last convolution (``NHWC`` x ``HWIO``) with int32 accumulation.

  ``padding`` pads with integer zeros: an asymmetric input must have its zero
  point subtracted (or be padded with it) first. Mixed dtypes (``uint8`` x
  ``int8``) are promoted to a common integer type, exactly.
  """
  x, w = _common_int(x, w)
  nsp = x.ndim - 2
  if nsp < 1 or w.ndim != x.ndim:
    raise ValueError(
      f'int_conv: input {x.shape} and kernel {w.shape} must be '
      '(N, *spatial, C) and (*window, C_in/groups, C_out).'
    )
  sp = 'DHW'[-nsp:] if nsp <= 3 else None
  if sp is None:
    raise ValueError('int_conv supports 1 to 3 spatial dimensions.')
  dn = ('N' + sp + 'C', sp + 'IO', 'N' + sp + 'C')
  strides = (1,) * nsp if strides is None else tuple(strides)
  return lax.conv_general_dilated(
    x,
    w,
    strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dn,
    feature_group_count=feature_group_count,
    preferred_element_type=jnp.int32,
  )


def int_avg_pool_as_sum_and_shift(
  x, window_shape=None, strides=None, padding='VALID'
):
  """Average pooling as an int32 window sum and a power-of-two shift (F8Net).

  With ``k`` elements per window, ``shift = round(log2(k))`` and
  ``correction = 2^shift / k``: ``avg = sum * 2^-shift * correction``. Read
  the sum as a fixed-point tensor at ``FL_in + shift`` and multiply the next
  linear layer's float weights by ``correction`` before quantizing them
  (F8Net's 7x7 pool: ``k = 49``, shift 6, correction 64/49).

  Args:
    x: integer ``(N, *spatial, C)`` codes.
    window_shape: spatial window; None pools globally to ``(N, C)``.
    strides: window strides (default: the window, i.e. non-overlapping).
    padding: ``'VALID'`` / ``'SAME'`` or pairs (``'SAME'`` divides edge
      windows by the full ``k``, like ``count_include_pad``).
  Returns:
    ``(sums_int32, shift, correction)``; ``shift`` an int, ``correction`` a
    Python float.
  """
  _check_int(x, 'x')
  x = jnp.asarray(x).astype(jnp.int32)
  spatial = tuple(range(1, x.ndim - 1))
  if window_shape is None:
    k = math.prod(x.shape[a] for a in spatial)
    sums = jnp.sum(x, axis=spatial, dtype=jnp.int32)
  else:
    window_shape = tuple(int(v) for v in window_shape)
    if len(window_shape) != len(spatial):
      raise ValueError(
        f'window_shape={window_shape} needs {len(spatial)} '
        f'entries for input {x.shape}.'
      )
    strides = window_shape if strides is None else tuple(strides)
    k = math.prod(window_shape)
    sums = lax.reduce_window(
      x,
      jnp.int32(0),
      lax.add,
      (1,) + window_shape + (1,),
      (1,) + strides + (1,),
      padding,
    )
  shift = int(round(math.log2(k)))
  return sums, shift, 2.0**shift / k


def _sub_jaxprs(value):
  """Jaxprs held in an equation parameter (ClosedJaxpr, Jaxpr, sequences)."""
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def float_multiplies(jaxpr, primitives=FLOAT_MULTIPLY_PRIMITIVES):
  """Descriptions of float-typed ``primitives`` anywhere in ``jaxpr``.

  An equation counts when any operand or result has a floating (or complex)
  dtype; sub-jaxprs (``pjit``, ``custom_jvp_call``, ``cond``, ``scan``, ...)
  are searched recursively. Pass e.g. ``primitives + ('div',)`` to also
  forbid float divisions.
  """
  return _walk(jaxpr, tuple(primitives), '')


def _walk(jaxpr, primitives, path):
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  found = []
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    avals = [getattr(v, 'aval', None) for v in (*eqn.invars, *eqn.outvars)]
    dtypes = [a.dtype for a in avals if hasattr(a, 'dtype')]
    if name in primitives and any(
      jnp.issubdtype(d, jnp.inexact) for d in dtypes
    ):
      shapes = ', '.join(
        f'{a.dtype}{list(a.shape)}' for a in avals if hasattr(a, 'shape')
      )
      found.append(f'{path}{name}({shapes})')
    for p, value in eqn.params.items():
      for sub in _sub_jaxprs(value):
        found += _walk(sub, primitives, f'{path}{name}.{p} > ')
  return found


# Primitives an integer-only program may apply to integer (and boolean)
# values: integer arithmetic, shifts and bit logic, comparisons and selects,
# integer matmul / conv / pooling, and layout ops.
INTEGER_PRIMITIVES = frozenset(
  (
    'add',
    'sub',
    'mul',
    'neg',
    'abs',
    'sign',
    'max',
    'min',
    'clamp',
    'div',
    'rem',
    'integer_pow',
    'square',
    'shift_left',
    'shift_right_arithmetic',
    'shift_right_logical',
    'and',
    'or',
    'xor',
    'not',
    'population_count',
    'clz',
    'eq',
    'ne',
    'lt',
    'le',
    'gt',
    'ge',
    'select_n',
    'convert_element_type',
    'bitcast_convert_type',
    'dot_general',
    'conv_general_dilated',
    'reduce_sum',
    'reduce_max',
    'reduce_min',
    'reduce_and',
    'reduce_or',
    'argmax',
    'argmin',
    'reduce_window_sum',
    'reduce_window_max',
    'reduce_window_min',
    'reduce_window',
    'cumsum',
    'reshape',
    'broadcast_in_dim',
    'transpose',
    'squeeze',
    'expand_dims',
    'slice',
    'dynamic_slice',
    'dynamic_update_slice',
    'concatenate',
    'pad',
    'rev',
    'gather',
    'scatter',
    'iota',
    'copy',
    'copy_p',
    'stop_gradient',
    'pjit',
    'jit',
    'closed_call',
    'core_call',
    'custom_jvp_call',
    'custom_vjp_call',
    'custom_vjp_call_jaxpr',
    'remat',
    'checkpoint',
    'cond',
    'while',
    'scan',
  )
)

# Layout and call primitives, allowed at both boundaries.
_LAYOUT_PRIMITIVES = frozenset(
  (
    'reshape',
    'broadcast_in_dim',
    'transpose',
    'squeeze',
    'expand_dims',
    'copy',
    'copy_p',
    'pjit',
    'jit',
  )
)

# Float steps allowed at the boundary (``boundary=True``): quantizing the
# float input (scale, round, clip, cast to integers) ...
_ENTRY_PRIMITIVES = (
  frozenset(
    (
      'div',
      'mul',
      'add',
      'sub',
      'neg',
      'round',
      'floor',
      'ceil',
      'max',
      'min',
      'clamp',
      'convert_element_type',
    )
  )
  | _LAYOUT_PRIMITIVES
)
# ... and dequantizing the integer output (cast to float, times a scale,
# plus an offset); nothing computed from the integer result may go back
# into integers.
_EXIT_PRIMITIVES = (
  frozenset(
    (
      'convert_element_type',
      'mul',
      'add',
      'sub',
    )
  )
  | _LAYOUT_PRIMITIVES
)

_READABLE = {
  'mul': 'float multiply',
  'dot_general': 'float dot',
  'conv_general_dilated': 'float conv',
  'div': 'float divide',
}


def _is_float(aval) -> bool:
  return hasattr(aval, 'dtype') and jnp.issubdtype(aval.dtype, jnp.inexact)


def _eqn_text(eqn) -> str:
  avals = [getattr(v, 'aval', None) for v in (*eqn.invars, *eqn.outvars)]
  return (
    f'{eqn.primitive.name}('
    + ', '.join(
      f'{a.dtype}{list(a.shape)}' for a in avals if hasattr(a, 'shape')
    )
    + ')'
  )


def _call_jaxprs(eqn):
  """``[(sub_jaxpr, operands)]`` of a call-like equation whose sub-jaxpr
  reads (a suffix of) the equation's operands; ``None`` if it has none."""
  subs = []
  for name, value in eqn.params.items():
    if name in (
      'jvp_jaxpr_fun',
      'jvp_jaxpr_thunk',
      'fwd_jaxpr_thunk',
      'bwd',
      'fwd',
    ):
      continue  # differentiation rules: never run by the forward program
    for sub in _sub_jaxprs(value):
      n = len(sub.invars)
      subs.append(
        (
          sub,
          list(eqn.invars)[len(eqn.invars) - n :]
          if n <= len(eqn.invars)
          else None,
        )
      )
  return subs or None


def _check_allowed(jaxpr, classes, boundary, path, bad):
  """Walks ``jaxpr`` with each value classed ``'const'`` (literals, constants
  and what is computed from them alone), ``'int'`` (an integer or boolean
  value of the computation), ``'entry'`` (float, computed from the float
  inputs) or ``'exit'`` (float, computed from an integer value); appends
  violations to ``bad`` and returns the classes of the outputs."""
  env = dict(zip(jaxpr.invars, classes))
  for v in jaxpr.constvars:
    env[v] = 'const'

  def cls(v):
    if hasattr(v, 'val'):  # a literal
      return 'const'
    return env.get(v, 'const')

  known = INTEGER_PRIMITIVES | _ENTRY_PRIMITIVES | _EXIT_PRIMITIVES
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [cls(v) for v in eqn.invars]
    outs_float = [_is_float(v.aval) for v in eqn.outvars]
    where = f'{path}{_eqn_text(eqn)}'
    subs = _call_jaxprs(eqn)
    if subs is not None:
      if name not in INTEGER_PRIMITIVES:
        bad.append(f'{where}: {name} is not on the integer allow-list')
      sub_out = None
      for sub, operands in subs:
        sub_cls = (
          [cls(v) for v in operands]
          if operands is not None
          else ['exit' if _is_float(v.aval) else 'int' for v in sub.invars]
        )
        got = _check_allowed(sub, sub_cls, boundary, f'{path}{name} > ', bad)
        if len(got) == len(eqn.outvars):
          sub_out = got
      for i, v in enumerate(eqn.outvars):
        env[v] = (
          sub_out[i]
          if sub_out is not None
          else (
            'const'
            if set(ins) <= {'const'}
            else 'int'
            if not outs_float[i]
            else 'entry'
            if set(ins) <= {'const', 'entry'}
            else 'exit'
          )
        )
      continue
    if set(ins) <= {'const'}:
      # Constant folding (e.g. a scale computed from literals).
      if name not in known:
        bad.append(f'{where}: {name} is not on the integer allow-list')
      for v in eqn.outvars:
        env[v] = 'const'
      continue
    if not any(outs_float) and set(ins) <= {'const', 'int'}:
      if name not in INTEGER_PRIMITIVES:
        bad.append(f'{where}: integer {name} is not on the integer allow-list')
      for v in eqn.outvars:
        env[v] = 'int'
      continue
    # A float value of the computation is involved.
    from_int = 'int' in ins or 'exit' in ins
    if not boundary:
      bad.append(f'{where}: {_READABLE.get(name, "float " + name)}')
    elif not from_int:  # entry: quantizing the float input
      if name not in _ENTRY_PRIMITIVES:
        bad.append(f'{where}: float {name} is not an input-quantization step')
      for v, f in zip(eqn.outvars, outs_float):
        env[v] = 'entry' if f else 'int'
      continue
    elif not all(outs_float):  # exit: dequantizing an integer result
      bad.append(
        f'{where}: a float computed from integer values goes back '
        'into integers (a float step inside the program)'
      )
    elif name not in _EXIT_PRIMITIVES:
      bad.append(
        f'{where}: {_READABLE.get(name, "float " + name)} of an '
        'integer result is not an output-dequantization step'
      )
    elif (
      name in ('mul', 'add', 'sub') and ins.count('exit') + ins.count('int') > 1
    ):
      bad.append(
        f'{where}: {_READABLE.get(name, "float " + name)} of two '
        'integer-derived values is not a dequantization by a scale'
      )
    for v, f in zip(eqn.outvars, outs_float):
      env[v] = ('exit' if from_int else 'entry') if f else 'int'
  return [cls(v) for v in jaxpr.outvars]


def assert_integer_only(fn, *args, boundary: bool = False, **kwargs):
  """Traces ``fn(*args, **kwargs)`` and raises unless it is integer-only.

  An allow-list, not a deny-list: every equation (nested sub-jaxprs of
  ``jit``, ``custom_jvp``, ``cond``, ``scan``, ... included) must compute
  integer or boolean values with a primitive of
  :data:`INTEGER_PRIMITIVES`. With ``boundary=True`` two float steps are
  also allowed: quantizing the float inputs (scale, round, clip, cast to
  integers: e.g. :meth:`IntegerProgram.quantize_input`) and dequantizing the
  result (cast to float, times a scale, plus an offset), provided nothing
  derived from an integer value is turned back into integers or goes through
  any other float op (a divide, ``exp``, ``sqrt``, ...).

  Returns:
    The ``ClosedJaxpr`` that was checked.
  Raises:
    AssertionError: listing each offending equation (its path, primitive,
    operand/result types and why it is not allowed).
  """
  closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
  jaxpr = closed.jaxpr
  classes = ['entry' if _is_float(v.aval) else 'int' for v in jaxpr.invars]
  bad = []
  _check_allowed(jaxpr, classes, boundary, '', bad)
  if bad:
    raise AssertionError(
      f'{len(bad)} op(s) outside the integer-only allow-list (float '
      'multiply, divide, transcendental, or integer values through float '
      'math):\n  ' + '\n  '.join(bad)
    )
  return closed
