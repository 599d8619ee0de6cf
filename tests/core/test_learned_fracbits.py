"""Learned ranges (LSQ, LSQ+, PACT, DoReFa), observers and FracBits:
values and gradients against hand-derived formulas and finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import core

X = jnp.array([-2.3, -0.6, -0.1, 0.0, 0.26, 0.74, 1.1, 3.0])


def test_lsq_values_and_paper_gradients():
  s, qn, qp = 0.5, -4, 3
  out = core.lsq_quantize(X, s, qn, qp)
  v = np.clip(np.asarray(X) / s, qn, qp)
  np.testing.assert_array_equal(out, np.round(v) * s)
  g = 0.3
  gx, gs = jax.grad(
    lambda x, s: jnp.sum(core.lsq_quantize(x, s, qn, qp, grad_scale=g)),
    argnums=(0, 1),
  )(X, s)
  xs = np.asarray(X) / s
  inside = (xs >= qn) & (xs <= qp)
  np.testing.assert_array_equal(gx, inside.astype(np.float32))
  per = np.where(xs < qn, qn, np.where(xs > qp, qp, np.round(xs) - xs))
  np.testing.assert_allclose(gs, g * per.sum(), rtol=1e-5)


def test_lsq_init_and_grad_scale():
  w = jnp.array([[1.0, -3.0], [2.0, 2.0]])
  np.testing.assert_allclose(core.lsq_init_step(w, 7), 2 * 2.0 / math.sqrt(7))
  np.testing.assert_allclose(
    core.lsq_init_step(w, 7, axis=1),
    [2 * 1.5 / math.sqrt(7), 2 * 2.5 / math.sqrt(7)],
  )
  assert core.lsq_grad_scale(w, 7) == pytest.approx(1 / math.sqrt(4 * 7))


def test_lsq_plus_offset_gradient():
  s, b = 0.5, 0.2
  gb = jax.grad(
    lambda b: jnp.sum(core.lsq_plus_quantize(X, s, b, 0, 7)),
  )(b)
  v = (np.asarray(X) - b) / s
  clipped = (v < 0) | (v > 7)
  assert float(gb) == pytest.approx(float(clipped.sum()))


def test_pact_values_and_alpha_gradient():
  a = 1.0
  out = core.pact_quantize(X, a, 2)  # levels 3 on [0, 1]: step 1/3
  y = np.clip(np.asarray(X), 0, a)
  np.testing.assert_allclose(out, np.round(y * 3) / 3, rtol=1e-6)
  ga, gx = jax.grad(
    lambda a, x: jnp.sum(core.pact_quantize(x, a, 2)), argnums=(0, 1)
  )(a, X)
  assert float(ga) == float((np.asarray(X) >= a).sum())
  np.testing.assert_array_equal(
    gx, ((np.asarray(X) >= 0) & (np.asarray(X) < a)).astype(np.float32)
  )


def test_dorefa():
  w = jnp.array([-1.0, -0.2, 0.0, 0.3, 2.0])
  out = core.dorefa_quantize_weight(w, 2)
  t = np.tanh(np.asarray(w))
  v = t / (2 * np.abs(t).max()) + 0.5
  np.testing.assert_allclose(out, 2 * np.round(v * 3) / 3 - 1, rtol=1e-6)
  assert set(np.round(np.asarray(out) * 3).astype(int)) <= {-3, -1, 1, 3}


def test_observers_pure_updates():
  st = core.observer_init()
  st = core.minmax_update(st, jnp.array([1.0, -2.0]))
  st = core.minmax_update(st, jnp.array([0.5, 3.0]))
  assert (float(st.min), float(st.max)) == (-2.0, 3.0)
  ema = core.observer_init()
  ema = core.moving_average_update(ema, jnp.array([-1.0, 1.0]), c=0.01)
  ema = core.moving_average_update(ema, jnp.array([-3.0, 5.0]), c=0.01)
  assert float(ema.min) == pytest.approx(0.99 * -1 + 0.01 * -3)
  assert float(ema.max) == pytest.approx(0.99 * 1 + 0.01 * 5)
  lo, hi = core.percentile_range(jnp.arange(101.0), 99.0)
  assert (float(lo), float(hi)) == (1.0, 99.0)


def _branch(r):
  return lambda x, k: core.symmetric_range_branch(x, r, k)


def test_fracbits_interpolates_neighbour_branches():
  w = jax.random.normal(jax.random.key(0), (64,))
  r = 2.0
  for b in (3.0, 3.25, 3.9, 4.0):
    out = core.fractional_quantize(w, b, _branch(r), b_min=2, b_max=8)
    lo, hi = math.floor(b), math.floor(b) + 1
    ref = (b - lo) * core.symmetric_range_branch(w, r, float(hi)) + (
      1 + lo - b
    ) * core.symmetric_range_branch(w, r, float(lo))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
  # At an integer it is exactly the integer quantizer (= hard mode).
  np.testing.assert_array_equal(
    core.fractional_quantize(w, 4.0, _branch(r)),
    core.hard_quantize(w, 4.0, _branch(r)),
  )


@pytest.mark.parametrize('b', [3.0, 3.3, 5.7, 2.0, 8.0])
def test_fracbits_bit_gradient(b):
  w = jax.random.normal(jax.random.key(1), (200,))
  t = jax.random.normal(jax.random.key(2), (200,))
  r = 2.5
  loss = lambda b: jnp.sum(t * core.fractional_quantize(w, b, _branch(r)))
  g = float(jax.grad(loss)(b))
  # dL/db = sum(dL/dQ * (Q_{floor(b)+1} - Q_{floor(b)})) -- also at integer b
  # (floor(b)+1, not ceil(b): nonzero at integers).
  fl = math.floor(min(b, 8.0))
  hand = float(
    jnp.sum(
      t
      * (
        core.symmetric_range_branch(w, r, fl + 1.0)
        - core.symmetric_range_branch(w, r, float(fl))
      )
    )
  )
  assert g == pytest.approx(hand, rel=1e-5)
  assert abs(g) > 0
  # Finite differences inside a unit interval (the interpolation is linear).
  if b not in (8.0,):
    eps = 1e-3
    bb = b + 0.5 if b == int(b) else b
    fd = (float(loss(bb + eps)) - float(loss(bb - eps))) / (2 * eps)
    assert float(jax.grad(loss)(bb)) == pytest.approx(fd, rel=2e-2)


def test_fracbits_range_gradient_finite_differences():
  w = jax.random.normal(jax.random.key(3), (300,))
  t = jax.random.normal(jax.random.key(4), (300,))
  f = lambda r: jnp.sum(t * core.fractional_quantize(w, 3.4, _branch(r)))
  g = float(jax.grad(f)(2.0))

  # The exact gradient through both branches (LSQ-style): recompute by hand.
  def branch_grad(k):
    qp = 2.0 ** (k - 1) - 1
    v = np.asarray(w) / (2.0 / qp)
    inside = np.abs(v) <= qp
    d = np.where(inside, (np.round(v) - v) / qp, np.sign(v))
    return float(np.sum(np.asarray(t) * d))

  hand = 0.4 * branch_grad(4) + 0.6 * branch_grad(3)
  assert g == pytest.approx(hand, rel=1e-4)


def test_clamp_bits_gradient_at_and_beyond_bounds():
  grad = lambda b, up: jax.grad(lambda b: up * core.clamp_bits(b, 2.0, 8.0))(b)
  assert float(grad(5.0, 1.0)) == 1.0
  assert float(grad(8.0, 1.0)) == 1.0  # at the bound: passes
  assert float(grad(9.0, 1.0)) == 1.0  # above, descent goes down: ok
  assert float(grad(9.0, -1.0)) == 0.0  # above, would go further up
  assert float(grad(1.0, -1.0)) == 1.0 * -1.0  # below, descent goes up: ok
  assert float(grad(1.0, 1.0)) == 0.0
  out = core.fractional_quantize(X, 11.0, _branch(3.0), b_max=8)
  np.testing.assert_array_equal(out, core.hard_quantize(X, 8.0, _branch(3.0)))


def test_zero_bit_branch_prunes():
  w = jnp.linspace(-1, 1, 9)
  # Signed symmetric grids: the smallest non-zero one is ternary (2 bits),
  # so 0.25 bits is 0.25 / 2 of it.
  out = core.fractional_quantize(
    w, 0.25, _branch(1.0), b_min=0.0, allow_zero_bit=True, min_nonzero_bits=2
  )
  np.testing.assert_allclose(
    out, 0.125 * core.symmetric_range_branch(w, 1.0, 2.0), atol=1e-7
  )
  assert float(jnp.max(jnp.abs(out))) == 0.125
  np.testing.assert_array_equal(
    core.hard_quantize(w, 0.0, _branch(1.0), min_nonzero_bits=2), 0
  )
  with pytest.raises(ValueError, match='allow_zero_bit'):
    core.fractional_quantize(w, 0.5, _branch(1.0), b_min=0.0)


def test_per_channel_bits_and_unsigned_branch():
  x = jnp.abs(jax.random.normal(jax.random.key(5), (4, 3)))
  b = jnp.array([2.0, 3.5, 6.0])
  out = core.fractional_quantize(
    x, b[None, :], lambda v, k: core.unsigned_range_branch(v, 1.5, k)
  )
  for c in range(3):
    ref = core.fractional_quantize(
      x[:, c], b[c], lambda v, k: core.unsigned_range_branch(v, 1.5, k)
    )
    np.testing.assert_allclose(out[:, c], ref, rtol=1e-6)


def test_round_bits_with_offset():
  b = jnp.array([2.4, 3.6, 7.9, 1.0])
  np.testing.assert_array_equal(
    core.round_bits_with_offset(b, 0.0, 2.0, 8.0), [2, 4, 8, 2]
  )
  np.testing.assert_array_equal(
    core.round_bits_with_offset(b, -0.5, 2.0, 8.0), [2, 3, 7, 2]
  )
  with pytest.raises(ValueError, match='bit bounds'):
    core.round_bits_with_offset(b, 0.0, 5.0, 3.0)


def test_fracbits_under_jit_vmap_bf16():
  w = jax.random.normal(jax.random.key(6), (8, 16))
  f = jax.jit(lambda w, b: core.fractional_quantize(w, b, _branch(2.0)))
  # jit may fuse the interpolation differently: equal up to one float ulp.
  np.testing.assert_allclose(
    f(w, 3.3), core.fractional_quantize(w, 3.3, _branch(2.0)), rtol=1e-6
  )
  rows = jax.vmap(lambda w, b: core.fractional_quantize(w, b, _branch(2.0)))(
    w, jnp.linspace(2, 8, 8)
  )
  np.testing.assert_allclose(
    rows[3],
    core.fractional_quantize(
      w[3], float(jnp.linspace(2, 8, 8)[3]), _branch(2.0)
    ),
    rtol=1e-6,
  )
  out = core.fractional_quantize(w.astype(jnp.bfloat16), 3.3, _branch(2.0))
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize(
  'signed,b_min,bits',
  [
    (True, 2.0, 3.4),
    (True, 2.0, jnp.array([2.0, 3.5, 7.99, 9.0])),
    (False, 1.0, 2.7),
    (False, 0.0, jnp.array([0.3, 1.0, 4.2, 8.0])),
  ],
)
def test_fused_range_quantizer_equals_generic(signed, b_min, bits):
  x = jax.random.normal(jax.random.key(7), (5, 4)) * 2
  r = jnp.array([[0.5, 1.0, 2.0, 3.0]]) if jnp.ndim(bits) else jnp.float32(1.5)
  bits = jnp.reshape(bits, (1, 4)) if jnp.ndim(bits) else bits
  branch = core.symmetric_range_branch if signed else core.unsigned_range_branch
  kw = dict(b_min=b_min, b_max=8.0, allow_zero_bit=b_min < 1)
  t = jax.random.normal(jax.random.key(8), x.shape)

  def generic(x, r, b):
    return jnp.sum(
      t * core.fractional_quantize(x, b, lambda v, k: branch(v, r, k), **kw)
    )

  def fused(x, r, b):
    return jnp.sum(
      t * core.fractional_range_quantize(x, r, b, signed=signed, **kw)
    )

  np.testing.assert_allclose(fused(x, r, bits), generic(x, r, bits), rtol=1e-5)
  gg = jax.grad(generic, argnums=(0, 1, 2))(x, r, jnp.asarray(bits))
  gf = jax.grad(fused, argnums=(0, 1, 2))(x, r, jnp.asarray(bits))
  for a, b in zip(gf, gg):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
