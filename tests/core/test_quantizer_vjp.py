"""The hand-written backward passes of the fake quantizers against automatic
differentiation of the same formulas, on random inputs, under ``jit`` (where
the compiler rewrites the recomputation they do)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import core
from fracq.core import fracbits
from fracq.core import learned

__all__ = []


def _autodiff_lsq(x, s, qmin, qmax, grad_scale):
  """LSQ written with straight-through rounding, differentiated by JAX."""
  s = learned.scale_grad(s, grad_scale)
  v = x / s
  clipped = jnp.where(v < qmin, qmin, jnp.where(v > qmax, qmax, v))
  return learned.round_ste(clipped) * s


def _random(shape, seed, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _assert_close(a, b):
  for left, right in zip(a, b):
    np.testing.assert_allclose(left, right, rtol=1e-6, atol=1e-6)


def test_distinct_copy_is_bit_exact():
  v = jnp.array([1.5, -2.25, 0.0, -0.0, jnp.inf, -jnp.inf, 3e-38], jnp.float32)
  out = jax.jit(learned.distinct_copy)(v)
  np.testing.assert_array_equal(
    np.asarray(out).view(np.uint32), np.asarray(v).view(np.uint32)
  )


def _autodiff_lsq_plus(x, s, b, qmin, qmax, grad_scale):
  """LSQ+ written with straight-through rounding, differentiated by JAX."""
  s = learned.scale_grad(s, grad_scale)
  b = learned.scale_grad(b, grad_scale)
  v = jnp.clip((x - b) / s, qmin, qmax)
  return learned.round_ste(v) * s + b


@pytest.mark.parametrize('per_channel', [False, True])
def test_lsq_plus_vjp_matches_autodiff(per_channel):
  x = _random((4, 5, 6), 10, 3.0)
  # Exact ties with both bounds (a ReLU's zeros on an unsigned grid):
  # automatic differentiation gives them half the gradient.
  x = x.at[0, 0].set(0.0).at[1, 1].set(7.0 * 0.5 + 0.25)
  if per_channel:
    step = jnp.abs(_random((1, 1, 6), 11)) + 0.2
    offset = 0.1 * _random((1, 1, 6), 12)
  else:
    step, offset = jnp.float32(0.5), jnp.float32(0.25)
  x = x.at[2, 2].set(offset[0, 0] if per_channel else 0.25)
  cot = _random(x.shape, 13)
  qmin, qmax, grad_scale = 0.0, 7.0, 0.3

  def run(fn):
    out, vjp = jax.vjp(
      lambda x, s, b: fn(x, s, b, qmin, qmax, grad_scale), x, step, offset
    )
    return (out, *vjp(cot))

  custom = jax.jit(
    lambda: run(lambda *a: core.lsq_plus_quantize(*a[:5], grad_scale=a[5]))
  )()
  _assert_close(custom, jax.jit(lambda: run(_autodiff_lsq_plus))())


@pytest.mark.parametrize('per_channel', [False, True])
def test_lsq_vjp_matches_autodiff(per_channel):
  x = _random((4, 5, 6), 0, 3.0)
  step = (
    jnp.abs(_random((1, 1, 6), 1)) + 0.2 if per_channel else jnp.float32(0.4)
  )
  cot = _random(x.shape, 2)
  qmin, qmax, grad_scale = -8.0, 7.0, 0.3

  def run(fn):
    out, vjp = jax.vjp(lambda x, s: fn(x, s, qmin, qmax, grad_scale), x, step)
    return (out, *vjp(cot))

  custom = jax.jit(
    lambda: run(lambda *a: core.lsq_quantize(*a[:4], grad_scale=a[4]))
  )()
  _assert_close(custom, jax.jit(lambda: run(_autodiff_lsq))())


@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('b_min', [2.0, 0.0])
def test_fused_fracbits_vjp_matches_autodiff(signed, b_min):
  x = _random((4, 5, 6), 3, 2.0)
  r = jnp.abs(_random((1, 1, 6), 4)) + 1.0
  # Per-channel bits across several brackets (and the pruned one for
  # b_min = 0).
  bits = jnp.linspace(max(b_min, 0.3), 6.7, 6).reshape(1, 1, 6)
  cot = _random(x.shape, 5)
  branch = (
    fracbits.symmetric_range_branch
    if signed
    else fracbits.unsigned_range_branch
  )

  def generic(x, r, b):
    return fracbits.fractional_quantize(
      x,
      b,
      lambda xx, k: branch(xx, r, k),
      b_min=b_min,
      allow_zero_bit=b_min < 1,
      min_nonzero_bits=2 if signed else 1,
    )

  def fused(x, r, b):
    return fracbits.fractional_range_quantize(
      x, r, b, signed=signed, b_min=b_min, allow_zero_bit=b_min < 1
    )

  def run(fn):
    out, vjp = jax.vjp(fn, x, r, bits)
    return (out, *vjp(cot))

  _assert_close(jax.jit(lambda: run(fused))(), jax.jit(lambda: run(generic))())


def test_fake_quant_vjp_matches_autodiff():
  x = _random((8, 6), 6, 2.0)
  scale = jnp.abs(_random((1, 6), 7)) * 0.1 + 0.05
  zero_point = jnp.round(jnp.abs(_random((1, 6), 8)) * 3.0)
  cot = _random(x.shape, 9)
  qmin, qmax = 0.0, 15.0

  def autodiff(x):
    q = learned.round_ste(x * (1.0 / scale)) + zero_point
    kept = (q >= qmin) & (q <= qmax)
    clipped = jnp.where(kept, q, jax.lax.stop_gradient(jnp.clip(q, qmin, qmax)))
    return (clipped - zero_point) * scale

  def run(fn):
    out, vjp = jax.vjp(fn, x)
    return (out, *vjp(cot))

  custom = jax.jit(
    lambda: run(lambda x: core.fake_quant(x, scale, zero_point, qmin, qmax))
  )()
  _assert_close(custom, jax.jit(lambda: run(autodiff))())
