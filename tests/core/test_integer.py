"""Tests for fracq.core.integer against independent numpy int64 references."""

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from fracq.core import fixed_point as fp
from fracq.core import integer

I32_MIN, I32_MAX = -(2**31), 2**31 - 1
EXTREMES = np.array(
  [
    I32_MIN,
    I32_MIN + 1,
    -(2**30),
    -65537,
    -65536,
    -3,
    -2,
    -1,
    0,
    1,
    2,
    3,
    65535,
    65536,
    2**30,
    I32_MAX - 1,
    I32_MAX,
  ],
  np.int64,
)


def _acc_values(seed, n=4000):
  """Random int32 values (wide and small magnitudes) plus the extremes."""
  rng = np.random.default_rng(seed)
  wide = rng.integers(I32_MIN, I32_MAX, n, endpoint=True)
  small = rng.integers(-300, 300, n)
  return np.concatenate([EXTREMES, wide, small]).astype(np.int64)


# ---------------------------------------------------------------- references


def _ref_round_shift(x, n):
  """round(x / 2^n), ties to even, via floor division (numpy int64)."""
  x = np.asarray(x, np.int64)
  n = np.broadcast_to(np.asarray(n, np.int64), x.shape)
  out = np.zeros_like(x)
  for k in np.unique(n):
    sel = n == k
    if k == 0:
      out[sel] = x[sel]
      continue
    d = np.int64(2) ** np.int64(k)
    q = np.floor_divide(x[sel], d)
    r = x[sel] - q * d  # in [0, d)
    half = d // 2
    up = (r > half) | ((r == half) & (q % 2 != 0))
    out[sel] = q + up
  return out


def _ref_requantize(acc, m0, shift, zp, qmin, qmax):
  """clamp(round_half_even(acc * m0 / 2^(31 - shift)) + zp) in int64."""
  prod = np.asarray(acc, np.int64) * np.asarray(m0, np.int64)  # |.| < 2^62
  v = _ref_round_shift(prod, 31 - np.asarray(shift, np.int64))
  v = np.clip(v, I32_MIN, I32_MAX)
  return np.clip(v + zp, qmin, qmax)


def _wrap32(v):
  return (np.asarray(v, np.int64) + 2**31) % 2**32 - 2**31


def _ref_tflite(acc, m0, shift, zp, qmin, qmax):
  """Literal port of gemmlowp's MultiplyByQuantizedMultiplier (int64)."""
  acc, m0 = np.asarray(acc, np.int64), np.asarray(m0, np.int64)
  shift = np.broadcast_to(np.asarray(shift, np.int64), acc.shape)
  left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
  a = _wrap32(acc * (np.int64(1) << left))
  ab = a * m0
  nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
  num = ab + nudge
  den = np.int64(1) << 31
  trunc = np.where((num < 0) & (num % den != 0), num // den + 1, num // den)
  high = trunc.astype(np.int64)  # C division truncates towards zero
  mask = (np.int64(1) << right) - 1
  rem = high & mask
  thr = (mask >> 1) + (high < 0)
  out = (high >> right) + (rem > thr)
  return np.clip(out + zp, qmin, qmax)


# ---------------------------------------------------------- shifts


def test_rounding_right_shift_hand_values():
  x = jnp.array([-7, -6, -5, -3, -1, 0, 1, 3, 5, 6, 7], jnp.int32)
  np.testing.assert_array_equal(
    integer.rounding_right_shift(x, 1), [-4, -3, -2, -2, 0, 0, 0, 2, 2, 3, 4]
  )
  np.testing.assert_array_equal(integer.rounding_right_shift(x, 0), x)
  ext = jnp.array([I32_MIN, I32_MAX], jnp.int32)
  np.testing.assert_array_equal(integer.rounding_right_shift(ext, 31), [-1, 1])
  np.testing.assert_array_equal(integer.rounding_right_shift(ext, 32), [0, 0])
  with pytest.raises(ValueError, match='shift'):
    integer.rounding_right_shift(x, -1)
  with pytest.raises(ValueError, match='integer'):
    integer.rounding_right_shift(jnp.ones(3), 1)


def test_rounding_right_shift_matches_numpy_reference():
  x = _acc_values(0)
  f = jax.jit(integer.rounding_right_shift)
  for s in range(0, 36):
    got = np.asarray(f(jnp.asarray(x, jnp.int32), s))
    np.testing.assert_array_equal(
      got, _ref_round_shift(x, min(s, 40)), err_msg=f'shift={s}'
    )
  # Per-channel shifts along the last axis (traced array).
  xs = x[: 17 * 30].reshape(-1, 30)
  shifts = np.arange(30) % 33
  got = f(jnp.asarray(xs, jnp.int32), jnp.asarray(shifts, jnp.int32))
  np.testing.assert_array_equal(got, _ref_round_shift(xs, shifts[None, :]))


def test_shift_fraclen_left_saturates():
  x = jnp.array([[3, -3, 2**29, -(2**29) - 1, 5]], jnp.int32)
  got = integer.shift_fraclen(x, jnp.array([-2, -2, -2, -2, 1]))
  np.testing.assert_array_equal(got, [[12, -12, I32_MAX, I32_MIN, 2]])


def test_fixed_point_fake_quant_equals_integer_pipeline():
  """Ties-to-even shifts reproduce the float fake-quantized layer exactly."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(0, 1, (64, 16)).astype(np.float32))
  w = jnp.asarray(rng.normal(0, 0.2, (16, 8)).astype(np.float32))
  fx, fw, fy = 5, 6, 4
  xq = fp.fixed_point_quantize(x, fx, signed=True)
  wq = fp.fixed_point_quantize(w, fw, signed=True)
  ref = fp.fixed_point_quantize(xq @ wq, fy, signed=True)  # float twin
  cx = fp.fixed_point_to_int(x, fx, signed=True, dtype=jnp.int8)
  cw = fp.fixed_point_to_int(w, fw, signed=True, dtype=jnp.int8)
  acc = integer.int_dense(cx, cw)  # at FL fx + fw
  y = jnp.clip(integer.rounding_right_shift(acc, fx + fw - fy), -127, 127)
  np.testing.assert_array_equal(y.astype(jnp.float32) / 2**fy, ref)
  # The general requantizer with a power-of-two multiplier agrees.
  m0, sh = integer.quantize_multiplier(2.0 ** -(fx + fw - fy))
  assert (m0, sh) == (2**30, 1 - (fx + fw - fy))
  np.testing.assert_array_equal(
    integer.requantize(acc, m0, sh, 0, -127, 127), y
  )


# --------------------------------------------------------- multipliers


def test_quantize_multiplier_values():
  assert integer.quantize_multiplier(0.5) == (2**30, 0)
  assert integer.quantize_multiplier(1.0) == (2**30, 1)
  assert integer.quantize_multiplier(0.3) == (1288490189, -1)  # 0.6 * 2^31
  assert integer.quantize_multiplier(0.0) == (0, 0)
  assert integer.quantize_multiplier(1e-12) == (0, 0)  # below 2^-32
  assert integer.quantize_multiplier(1 - 2.0**-40) == (2**30, 1)  # carry
  m, s = integer.quantize_multiplier(np.array([0.25, 3.0]))
  np.testing.assert_array_equal(m, [2**30, 3 * 2**29])
  np.testing.assert_array_equal(s, [-1, 2])
  assert m.dtype == np.int32
  rng = np.random.default_rng(2)
  r = np.exp2(rng.uniform(-30, 20, 2000))
  m, s = integer.quantize_multiplier(r)
  assert np.all((m >= 2**30) & (m < 2**31))
  rel = np.abs(m * np.exp2(s.astype(np.float64) - 31) / r - 1)
  assert rel.max() <= 2.0**-31
  with pytest.raises(ValueError, match='>= 0'):
    integer.quantize_multiplier(-0.1)
  with pytest.raises(ValueError, match='2\\^30'):
    integer.quantize_multiplier(2.0**31)


def _random_multipliers(seed, n):
  rng = np.random.default_rng(seed)
  r = np.exp2(rng.uniform(-31, 8, n))
  return integer.quantize_multiplier(r)


@pytest.mark.parametrize(
  'rounding,ref', [('half_even', _ref_requantize), ('tflite', _ref_tflite)]
)
def test_requantize_matches_numpy_reference(rounding, ref):
  acc = _acc_values(3, 3000)
  n = acc.shape[0]
  m0, sh = _random_multipliers(4, n)
  if rounding == 'tflite':
    sh = np.minimum(sh, 0)  # left shifts of wide values wrap in C; test apart
  f = jax.jit(
    lambda a, m, s, z: integer.requantize(
      a, m, s, z, -128, 127, rounding=rounding
    )
  )
  for zp in (0, -5, 37):
    got = f(jnp.asarray(acc, jnp.int32), jnp.asarray(m0), jnp.asarray(sh), zp)
    np.testing.assert_array_equal(got, ref(acc, m0, sh, zp, -128, 127))
  # Full int32 output range exercises the rounding of every bit pattern.
  g = jax.jit(
    lambda a, m, s: integer.requantize(
      a, m, s, 0, I32_MIN, I32_MAX, rounding=rounding
    )
  )
  got = g(jnp.asarray(acc, jnp.int32), jnp.asarray(m0), jnp.asarray(sh))
  np.testing.assert_array_equal(got, ref(acc, m0, sh, 0, I32_MIN, I32_MAX))
  # A multiplier of exactly 0.5 hits exact ties on every odd accumulator.
  got = g(jnp.asarray(acc, jnp.int32), 2**30, 0)
  np.testing.assert_array_equal(got, ref(acc, 2**30, 0, 0, I32_MIN, I32_MAX))


def test_requantize_saturation_and_small_shifts_tflite():
  acc = np.array([3, -3, 1000, -1000, 2**20, -(2**20)], np.int64)
  m0, sh = integer.quantize_multiplier(np.full(6, 3.7))  # shift 2
  got = integer.requantize(
    jnp.asarray(acc, jnp.int32), m0, sh, 0, I32_MIN, I32_MAX, rounding='tflite'
  )
  np.testing.assert_array_equal(
    got, _ref_tflite(acc, m0, sh, 0, I32_MIN, I32_MAX)
  )
  # Multipliers above 1 saturate at int32 in the exact mode.
  big = jnp.array([I32_MAX, I32_MIN, 5], jnp.int32)
  m, s = integer.quantize_multiplier(1000.0)
  np.testing.assert_array_equal(
    integer.requantize(big, m, s, 0, I32_MIN, I32_MAX), [I32_MAX, I32_MIN, 5000]
  )


def test_requantize_per_channel_and_float_sanity():
  rng = np.random.default_rng(5)
  acc = rng.integers(-(2**20), 2**20, (50, 4))
  real = np.array([1e-4, 3e-3, 0.02, 0.7])
  m0, sh = integer.quantize_multiplier(real)
  zp = np.array([0, 3, -3, 10])
  got = integer.requantize(
    jnp.asarray(acc, jnp.int32),
    m0,
    sh,
    jnp.asarray(zp),
    -128,
    127,
    dtype=jnp.int8,
  )
  assert got.dtype == jnp.int8
  want = _ref_requantize(acc, m0[None], sh[None], zp[None], -128, 127)
  np.testing.assert_array_equal(got, want)
  # The result is round(acc * real) up to the multiplier's 2^-31 error.
  exact = np.clip(np.round(acc * real[None]) + zp[None], -128, 127)
  assert np.max(np.abs(np.asarray(got, np.int64) - exact)) <= 1
  with pytest.raises(ValueError, match='rounding'):
    integer.requantize(
      jnp.asarray(acc, jnp.int32), m0, sh, 0, -128, 127, rounding='nearest'
    )


# ------------------------------------------------------- dense / conv / pool


def test_int_dense_accumulates_in_int32():
  rng = np.random.default_rng(6)
  x = rng.integers(-127, 128, (5, 64)).astype(np.int8)
  w = rng.integers(-127, 128, (64, 3)).astype(np.int8)
  x[0] = 127
  w[:, 0] = 127  # 64 * 127^2 overflows int16
  out = integer.int_dense(jnp.asarray(x), jnp.asarray(w))
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, x.astype(np.int64) @ w.astype(np.int64))
  xu = rng.integers(0, 256, (2, 7, 64)).astype(np.uint8)
  np.testing.assert_array_equal(
    integer.int_dense(jnp.asarray(xu), w),
    xu.astype(np.int64) @ w.astype(np.int64),
  )
  with pytest.raises(ValueError, match='in_features'):
    integer.int_dense(jnp.asarray(x), jnp.asarray(w.T))


def _float_conv(x, w, strides, padding, groups):
  # Exact in float32: every partial sum is below 2^24.
  return lax.conv_general_dilated(
    jnp.asarray(x, jnp.float32),
    jnp.asarray(w, jnp.float32),
    strides,
    padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )


@pytest.mark.parametrize(
  'strides,padding,groups,unsigned',
  [
    ((1, 1), 'SAME', 1, False),
    ((2, 2), 'VALID', 1, True),
    ((1, 1), ((1, 0), (0, 1)), 4, True),
  ],
)
def test_int_conv_matches_float_reference(strides, padding, groups, unsigned):
  rng = np.random.default_rng(7)
  x = (
    rng.integers(0, 256, (2, 7, 7, 4)).astype(np.uint8)
    if unsigned
    else rng.integers(-127, 128, (2, 7, 7, 4)).astype(np.int8)
  )
  w = rng.integers(-127, 128, (3, 3, 4 // groups, 8)).astype(np.int8)
  out = integer.int_conv(
    jnp.asarray(x), jnp.asarray(w), strides, padding, groups
  )
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(
    out, np.asarray(_float_conv(x, w, strides, padding, groups), np.int64)
  )


def test_int_avg_pool_as_sum_and_shift():
  rng = np.random.default_rng(8)
  x = rng.integers(0, 256, (2, 7, 7, 3)).astype(np.uint8)
  sums, shift, corr = integer.int_avg_pool_as_sum_and_shift(jnp.asarray(x))
  assert (shift, corr) == (6, 64 / 49)
  np.testing.assert_array_equal(sums, x.astype(np.int64).sum((1, 2)))
  # The average is the sum read at FL + shift times the correction.
  np.testing.assert_allclose(
    np.asarray(sums) / 2**shift * corr, x.mean((1, 2)), rtol=1e-12
  )
  x4 = x[:, :6, :6]
  sums, shift, corr = integer.int_avg_pool_as_sum_and_shift(
    jnp.asarray(x4), (2, 2)
  )
  assert (shift, corr) == (2, 1.0)
  want = x4.astype(np.int64).reshape(2, 3, 2, 3, 2, 3).sum((2, 4))
  np.testing.assert_array_equal(sums, want)
  _, shift, corr = integer.int_avg_pool_as_sum_and_shift(
    jnp.asarray(x), (3, 3), (1, 1)
  )
  assert (shift, corr) == (3, 8 / 9)


# ------------------------------------------------------------ the checker


def _int_pipeline(x, w1, w2):
  acc = integer.int_conv(x, w1, (1, 1), 'SAME')
  m, s = integer.quantize_multiplier(0.01)
  h = integer.requantize(acc, m, s, 0, 0, 255, dtype=jnp.uint8)
  pooled, shift, _ = integer.int_avg_pool_as_sum_and_shift(h)
  h2 = jnp.clip(integer.rounding_right_shift(pooled, shift), -127, 127)
  return integer.int_dense(h2.astype(jnp.int8), w2)


def _pipeline_args():
  rng = np.random.default_rng(9)
  return (
    jnp.asarray(rng.integers(-127, 128, (1, 4, 4, 2)), jnp.int8),
    jnp.asarray(rng.integers(-127, 128, (3, 3, 2, 3)), jnp.int8),
    jnp.asarray(rng.integers(-127, 128, (3, 2)), jnp.int8),
  )


def test_assert_integer_only_passes_integer_pipeline():
  args = _pipeline_args()
  closed = integer.assert_integer_only(_int_pipeline, *args)
  names = {e.primitive.name for e in closed.jaxpr.eqns}
  assert 'conv_general_dilated' in names and 'dot_general' in names
  # Nested under jit, with an integer custom_jvp (relu) and float ops that
  # are not multiplies (a final float cast and add).
  fn = jax.jit(
    lambda *a: jax.nn.relu(_int_pipeline(*a)).astype(jnp.float32) + 1.0
  )
  integer.assert_integer_only(fn, *args, boundary=True)


@pytest.mark.parametrize('where', ['top', 'jit', 'custom_jvp', 'cond', 'dot'])
def test_assert_integer_only_catches_float_multiply(where):
  args = _pipeline_args()

  def scale(v):
    return (v.astype(jnp.float32) * 0.5).astype(jnp.int32)

  @jax.custom_jvp
  def cj(v):
    return scale(v)

  cj.defjvp(lambda p, t: (cj(p[0]), t[0]))

  def fn(*a):
    y = _int_pipeline(*a)
    if where == 'top':
      return scale(y)
    if where == 'jit':
      return jax.jit(lambda v: jax.jit(scale)(v) + 1)(y)
    if where == 'custom_jvp':
      return cj(y)
    if where == 'cond':
      return lax.cond(y[0, 0] > 0, scale, lambda v: v, y)
    yf = y.astype(jnp.float32)
    return yf @ yf.T

  with pytest.raises(AssertionError, match='mul|dot_general'):
    integer.assert_integer_only(fn, *args)
  found = integer.float_multiplies(jax.make_jaxpr(fn)(*args))
  assert len(found) == 1 and 'float32' in found[0]
