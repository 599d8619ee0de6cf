"""FracBits below the smallest non-zero grid: the pruned (0-bit) branch.

Signed symmetric grids have integer bit-widths {0, 2, 3, ...} (a signed 1-bit
grid is identically zero), unsigned grids {0, 1, 2, ...}. Values and the
three gradients are checked against numbers computed by hand on a 5-element
tensor with range r = 1.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import core
from fracq.core import fracbits

X = jnp.array([-0.9, -0.2, 0.1, 0.4, 1.3])
T = jnp.array([1.0, -2.0, 3.0, 0.5, -1.5])  # upstream gradient dL/dQ
R = 1.0

# Integer grids at r = 1, by hand.
# Signed k=2: levels {-1, 0, 1}; k=3: step 1/3, levels -3..3.
Q = {
  ('s', 2): np.array([-1.0, 0.0, 0.0, 0.0, 1.0]),
  ('s', 3): np.array([-1.0, -1 / 3, 0.0, 1 / 3, 1.0]),
  # Unsigned k=1: levels {0, 1}; k=2: step 1/3, levels 0..3.
  ('u', 1): np.array([0.0, 0.0, 0.0, 0.0, 1.0]),
  ('u', 2): np.array([0.0, 0.0, 0.0, 1 / 3, 1.0]),
}
# dQ_k/dr: (rounded - x/r) inside the range (straight-through rounding), the
# clipped level (+-1 or 0) outside.
DQ_DR = {
  ('s', 2): np.array([-0.1, 0.2, -0.1, -0.4, 1.0]),
  ('s', 3): np.array([-0.1, 0.2 - 1 / 3, -0.1, 1 / 3 - 0.4, 1.0]),
  ('u', 1): np.array([0.0, 0.0, -0.1, -0.4, 1.0]),
  ('u', 2): np.array([0.0, 0.0, -0.1, 1 / 3 - 0.4, 1.0]),
}
INSIDE = {
  's': np.array([1.0, 1.0, 1.0, 1.0, 0.0]),
  'u': np.array([0.0, 0.0, 1.0, 1.0, 0.0]),
}

# b -> (k_lo, k_hi, weight of k_hi, d weight / db); k_lo = 0 is pruned (Q=0).
SIGNED = {
  0.3: (0, 2, 0.15, 0.5),
  0.5: (0, 2, 0.25, 0.5),
  1.0: (0, 2, 0.5, 0.5),
  1.5: (0, 2, 0.75, 0.5),
  1.99: (0, 2, 0.995, 0.5),
  2.25: (2, 3, 0.25, 1.0),
}
UNSIGNED = {
  0.3: (0, 1, 0.3, 1.0),
  0.5: (0, 1, 0.5, 1.0),
  1.0: (1, 2, 0.0, 1.0),
  1.5: (1, 2, 0.5, 1.0),
  1.99: (1, 2, 0.99, 1.0),
}
CASES = [('s', b) for b in SIGNED] + [('u', b) for b in UNSIGNED]


def _expected(kind, b):
  k_lo, k_hi, w, dw = (SIGNED if kind == 's' else UNSIGNED)[b]
  zero = np.zeros(5)
  q_lo = Q[(kind, k_lo)] if k_lo else zero
  dlo = DQ_DR[(kind, k_lo)] if k_lo else zero
  in_lo = INSIDE[kind] if k_lo else zero
  q_hi, dhi = Q[(kind, k_hi)], DQ_DR[(kind, k_hi)]
  t = np.asarray(T)
  value = (1 - w) * q_lo + w * q_hi
  gx = t * ((1 - w) * in_lo + w * INSIDE[kind])
  gr = np.sum(t * ((1 - w) * dlo + w * dhi))
  gb = dw * np.sum(t * (q_hi - q_lo))
  return value, gx, gr, gb


def _fused(kind):
  def f(x, r, b):
    return core.fractional_range_quantize(
      x, r, b, signed=kind == 's', b_min=0.0, b_max=8.0, allow_zero_bit=True
    )

  return f


def _generic(kind):
  branch = (
    core.symmetric_range_branch if kind == 's' else core.unsigned_range_branch
  )

  def f(x, r, b):
    return core.fractional_quantize(
      x,
      b,
      lambda v, k: branch(v, r, k),
      b_min=0.0,
      b_max=8.0,
      allow_zero_bit=True,
      min_nonzero_bits=2 if kind == 's' else 1,
    )

  return f


@pytest.mark.parametrize('path', ['fused', 'generic'])
@pytest.mark.parametrize('kind,b', CASES)
def test_values_and_gradients_by_hand(kind, b, path):
  fn = (_fused if path == 'fused' else _generic)(kind)
  value, gx, gr, gb = _expected(kind, b)
  out = fn(X, R, b)
  np.testing.assert_allclose(out, value, rtol=1e-6, atol=1e-7)
  grads = jax.grad(lambda x, r, b: jnp.sum(T * fn(x, r, b)), argnums=(0, 1, 2))(
    X, jnp.float32(R), jnp.float32(b)
  )
  for g in grads:
    assert np.all(np.isfinite(g))
  np.testing.assert_allclose(grads[0], gx, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(grads[1], gr, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads[2], gb, rtol=1e-5, atol=1e-6)


# Hard mode rounds with the grid's rule: a signed width never lands on 1.
HARD_SIGNED = {0.3: 0, 0.5: 0, 1.0: 2, 1.5: 2, 1.99: 2, 2.25: 2}
HARD_UNSIGNED = {0.3: 0, 0.5: 0, 1.0: 1, 1.5: 2, 1.99: 2}


@pytest.mark.parametrize('kind,b', CASES)
def test_hard_quantize_rounds_with_the_grid_rule(kind, b):
  k = (HARD_SIGNED if kind == 's' else HARD_UNSIGNED)[b]
  branch = (
    core.symmetric_range_branch if kind == 's' else core.unsigned_range_branch
  )
  m = 2 if kind == 's' else 1
  fn = lambda x, r, b: core.hard_quantize(
    x, b, lambda v, kk: branch(v, r, kk), min_nonzero_bits=m
  )
  out = fn(X, R, b)
  zero = np.zeros(5)
  np.testing.assert_allclose(out, Q[(kind, k)] if k else zero, atol=1e-7)
  gx, gr, gb = jax.grad(
    lambda x, r, b: jnp.sum(T * fn(x, r, b)), argnums=(0, 1, 2)
  )(X, jnp.float32(R), jnp.float32(b))
  t = np.asarray(T)
  np.testing.assert_allclose(gx, t * INSIDE[kind] if k else zero, atol=1e-7)
  np.testing.assert_allclose(
    gr, np.sum(t * DQ_DR[(kind, k)]) if k else 0.0, rtol=1e-5, atol=1e-6
  )
  assert float(gb) == 0.0
  assert float(fracbits.round_bits(b, m)) == k


def test_fused_equals_generic_per_channel_signed_zero_branch():
  x = jax.random.normal(jax.random.key(0), (6, 5)) * 1.5
  r = jnp.array([[0.5, 1.0, 1.5, 2.0, 3.0]])
  bits = jnp.array([[0.2, 0.9, 1.0, 1.7, 5.5]])
  t = jax.random.normal(jax.random.key(1), x.shape)

  def loss(fn):
    return lambda x, r, b: jnp.sum(t * fn(x, r, b))

  fused, generic = loss(_fused('s')), loss(_generic('s'))
  np.testing.assert_allclose(fused(x, r, bits), generic(x, r, bits), rtol=1e-5)
  gf = jax.grad(fused, argnums=(0, 1, 2))(x, r, bits)
  gg = jax.grad(generic, argnums=(0, 1, 2))(x, r, bits)
  for a, b in zip(gf, gg):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_signed_zero_branch_needs_to_be_asked_for():
  with pytest.raises(ValueError, match='allow_zero_bit'):
    core.fractional_range_quantize(X, R, 1.5, signed=True, b_min=1.0)
  with pytest.raises(ValueError, match='allow_zero_bit'):
    core.fractional_quantize(
      X, 1.5, lambda v, k: v, b_min=1.0, min_nonzero_bits=2
    )
  # DoReFa's 1-bit grid is real: b_min = 1 needs no pruned branch.
  out = core.fractional_quantize(X, 1.5, core.dorefa_branch, b_min=1.0)
  assert np.all(np.isfinite(out))


def test_round_bits_with_offset_signed_rule():
  b = jnp.array([0.4, 0.9, 1.0, 1.6, 2.4, 7.9])
  np.testing.assert_array_equal(
    core.round_bits_with_offset(b, 0.0, 0.0, 8.0, min_nonzero_bits=2),
    [0, 0, 2, 2, 2, 8],
  )
  np.testing.assert_array_equal(
    core.round_bits_with_offset(b, 0.0, 0.0, 8.0), [0, 1, 1, 2, 2, 8]
  )
  # An offset is applied before the rule; bounds are the grid's integers.
  np.testing.assert_array_equal(
    core.round_bits_with_offset(b, -0.6, 0.5, 8.0, min_nonzero_bits=2),
    [2, 2, 2, 2, 2, 7],
  )
  assert fracbits.integer_bit_bounds(0.5, 1.5, 1) == (1.0, 1.0)
  with pytest.raises(ValueError, match='no integer bit-width'):
    fracbits.integer_bit_bounds(1.2, 1.8, 2)


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3, name='fc')(x)


def test_quantized_dense_with_signed_zero_branch_is_finite():
  # A learned-bits kernel at 1.5 bits with the pruned branch allowed: the
  # fused quantizer used to divide by the zero level count of a signed 1-bit
  # grid and output NaN.
  x = jax.random.normal(jax.random.key(0), (4, 5))
  rules = [
    fracq.Rule(weight=fracq.FracBitsSpec(bits=1.5, bit_bounds=(0.0, 8.0)))
  ]
  qm = fracq.quantize(
    _Dense(), rules, x, budget=fracq.Budget(kind='size', uniform_bits=1.0)
  )
  v = qm.init(jax.random.key(1), x)
  out = qm.apply(v, x)
  assert np.all(np.isfinite(out))
  kernel = v['params']['fc']['kernel']
  r = v['quant']['fc']['kernel_range']
  # The shared range starts at LSQ's for one level: min(2 mean|w|, max|w|).
  k_abs = np.abs(np.asarray(kernel))
  np.testing.assert_allclose(r, min(2 * k_abs.mean(), k_abs.max()), rtol=1e-6)
  # 1.5 bits = 0.75 of the ternary grid on [-r, r].
  ternary = np.clip(np.round(np.asarray(kernel) / np.asarray(r)), -1, 1) * r
  ref = x @ (0.75 * ternary) + v['params']['fc']['bias'][None, :]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)

  def loss(params, quant):
    y = qm.apply({**v, 'params': params, 'quant': quant}, x)
    return jnp.sum(y**2) + qm.penalty({**v, 'quant': quant}, 0)[0]

  gp, gq = jax.grad(loss, argnums=(0, 1))(v['params'], v['quant'])
  for g in jax.tree_util.tree_leaves((gp, gq)):
    assert np.all(np.isfinite(g))
  assert float(gq['fc']['kernel_bits']) != 0.0
