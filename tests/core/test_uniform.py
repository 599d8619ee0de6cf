"""Uniform fake quantization: PyTorch FakeQuantize semantics, exact values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import core


def test_int_range():
  assert core.int_range(4, signed=True) == (-8, 7)
  assert core.int_range(4, signed=True, narrow_range=True) == (-7, 7)
  assert core.int_range(4, signed=False) == (0, 15)
  assert core.int_range(1, signed=False) == (0, 1)
  assert core.int_range(16, signed=True) == (-32768, 32767)
  for bad in (0, 17, 3.5):
    with pytest.raises(ValueError, match='bits'):
      core.int_range(bad, signed=True)


def test_hand_values_per_tensor_with_ties():
  # scale 0.5, zero point 1, range [0, 7]: q = clamp(round(2x) + 1, 0, 7)
  x = jnp.array([-1.0, -0.75, -0.25, 0.25, 0.75, 1.25, 2.9, 3.5])
  # 2x = -2, -1.5, -0.5, 0.5, 1.5, 2.5, 5.8, 7 -> round-half-even:
  #      -2, -2, -0, 0, 2, 2, 6, 7 ; +1 -> -1, -1, 1, 1, 3, 3, 7, 8
  # clamp -> 0, 0, 1, 1, 3, 3, 7, 7 ; (q - 1) * 0.5
  expect = np.array([-0.5, -0.5, 0.0, 0.0, 1.0, 1.0, 3.0, 3.0])
  np.testing.assert_array_equal(core.fake_quant(x, 0.5, 1, 0, 7), expect)


def test_gradient_mask_is_pytorch_mask():
  x = jnp.array([-1.0, -0.75, -0.25, 0.25, 3.0, 3.5])
  g = jax.grad(lambda v: jnp.sum(core.fake_quant(v, 0.5, 1, 0, 7)))(x)
  # q before clamp: -1, -1, 1, 1, 7, 8 -> inside [0, 7]?
  np.testing.assert_array_equal(g, [0, 0, 1, 1, 1, 0])


def test_per_channel_any_axis():
  x = jnp.arange(12.0).reshape(3, 4) / 3.0
  scale = jnp.array([0.25, 0.5, 1.0])[:, None]
  zp = jnp.array([0.0, 2.0, -1.0])[:, None]
  out = core.fake_quant(x, scale, zp, -4, 3)
  ref = np.zeros((3, 4))
  for c in range(3):
    s, z = float(scale[c, 0]), float(zp[c, 0])
    q = np.clip(np.round(np.asarray(x[c]) * (1 / s)) + z, -4, 3)
    ref[c] = (q - z) * s
  np.testing.assert_array_equal(out, ref)


def test_grouped():
  x = jnp.linspace(-1, 1, 8).reshape(1, 8)
  out = core.fake_quant_grouped(
    x, jnp.array([0.1, 0.5]), jnp.zeros(2), -8, 7, axis=1, group_size=4
  )
  ref = np.concatenate(
    [
      np.clip(np.round(np.asarray(x[0, :4]) / 0.1), -8, 7) * 0.1,
      np.clip(np.round(np.asarray(x[0, 4:]) / 0.5), -8, 7) * 0.5,
    ]
  )
  np.testing.assert_allclose(out[0], ref, rtol=1e-6)
  with pytest.raises(ValueError, match='does not divide'):
    core.fake_quant_grouped(
      x, jnp.ones(3), jnp.zeros(3), -8, 7, axis=1, group_size=3
    )


def test_minmax_qparams_pytorch_observer():
  # Affine uint8 on [-1, 3]: scale = 4/255, zp = 0 - round(-1/scale) = 64.
  s, z = core.minmax_to_qparams(-1.0, 3.0, 0, 255, symmetric=False)
  assert float(s) == pytest.approx(4 / 255)
  assert float(z) == 64.0
  # Symmetric int8 on [-1, 3]: scale = 3 / 127.5, zp 0.
  s, z = core.minmax_to_qparams(-1.0, 3.0, -128, 127, symmetric=True)
  assert float(s) == pytest.approx(3 / 127.5) and float(z) == 0.0
  # Symmetric unsigned: the midpoint zero point (PyTorch quint8: 128).
  _, z = core.minmax_to_qparams(0.0, 1.0, 0, 255, symmetric=True)
  assert float(z) == 128.0
  # Range widened to contain 0; zero-point rounding.
  s, z = core.minmax_to_qparams(0.5, 2.0, 0, 15, symmetric=False)
  assert float(s) == pytest.approx(2 / 15) and float(z) == 0.0
  s, z = core.minmax_to_qparams(-0.3, 1.0, 0, 15, symmetric=False)
  assert float(z) == float(np.round(0.3 / (1.3 / 15)))


@pytest.mark.parametrize('val', [0.0, 2.5, -7.0])
def test_degenerate_ranges(val):
  x = jnp.full((5,), val)
  s, z = core.minmax_to_qparams(jnp.min(x), jnp.max(x), -8, 7, symmetric=False)
  assert float(s) > 0 and np.isfinite(float(s))
  out = core.fake_quant(x, s, z, -8, 7)
  assert np.all(np.isfinite(out))
  if val == 0.0:
    np.testing.assert_array_equal(out, 0.0)
  else:
    np.testing.assert_allclose(out, val, rtol=1e-6)


def test_codes_match_fake_quant():
  x = jax.random.normal(jax.random.key(0), (1000,))
  s, z = core.minmax_to_qparams(jnp.min(x), jnp.max(x), 0, 15, symmetric=False)
  q = core.quantize_to_int(x, s, z, 0, 15)
  np.testing.assert_array_equal((q - z) * s, core.fake_quant(x, s, z, 0, 15))


def test_bad_arguments():
  x = jnp.ones(3)
  with pytest.raises(ValueError, match='qmin=5 > qmax=2'):
    core.fake_quant(x, 1.0, 0, 5, 2)
  with pytest.raises(ValueError, match='scale must be positive'):
    core.fake_quant(x, 0.0, 0, 0, 7)
  with pytest.raises(ValueError, match='scale must be positive'):
    core.fake_quant(x, -1.0, 0, 0, 7)
  with pytest.raises(ValueError, match='axis=2 does not exist'):
    core.minmax_update(core.observer_init((3,)), jnp.ones((3, 3)), axis=2)


def test_jit_vmap_bf16():
  x = jax.random.normal(jax.random.key(1), (4, 16))
  f = jax.jit(lambda v, s: core.fake_quant(v, s, 0, -8, 7))
  np.testing.assert_array_equal(f(x, 0.25), core.fake_quant(x, 0.25, 0, -8, 7))
  per_row = jax.vmap(lambda v, s: core.fake_quant(v, s, 0, -8, 7))(
    x, jnp.array([0.1, 0.2, 0.3, 0.4])
  )
  np.testing.assert_array_equal(
    per_row[2], core.fake_quant(x[2], 0.3, 0, -8, 7)
  )
  xb = x.astype(jnp.bfloat16)
  out = core.fake_quant(xb, 0.25, 0, -8, 7)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    out.astype(jnp.float32),
    core.fake_quant(xb.astype(jnp.float32), 0.25, 0, -8, 7),
  )


torch = pytest.importorskip('torch')


def test_matches_torch_fake_quantize():
  rng = np.random.RandomState(0)
  x = (rng.randn(6, 50) * 3).astype(np.float32)
  # Exact ties on the grid, too.
  x[0, :10] = np.arange(-5, 5) * 0.25 + 0.125
  for scale, zp, qmin, qmax in [
    (0.25, 0, -128, 127),
    (0.1, 3, 0, 15),
    (0.037, -2, -8, 7),
    (1.0, 0, -1, 0),
  ]:
    ref = torch.fake_quantize_per_tensor_affine(
      torch.tensor(x), scale, zp, qmin, qmax
    ).numpy()
    np.testing.assert_array_equal(
      core.fake_quant(jnp.asarray(x), scale, zp, qmin, qmax), ref
    )
  scales = rng.uniform(0.05, 0.5, size=6).astype(np.float32)
  zps = rng.randint(-3, 4, size=6).astype(np.int32)
  ref = torch.fake_quantize_per_channel_affine(
    torch.tensor(x), torch.tensor(scales), torch.tensor(zps), 0, -8, 7
  ).numpy()
  out = core.fake_quant(
    jnp.asarray(x),
    jnp.asarray(scales)[:, None],
    jnp.asarray(zps, jnp.float32)[:, None],
    -8,
    7,
  )
  np.testing.assert_array_equal(out, ref)
  # Gradient mask equals torch's.
  xt = torch.tensor(x, requires_grad=True)
  torch.fake_quantize_per_tensor_affine(xt, 0.1, 3, 0, 15).sum().backward()
  g = jax.grad(lambda v: jnp.sum(core.fake_quant(v, 0.1, 3, 0, 15)))(
    jnp.asarray(x)
  )
  np.testing.assert_array_equal(g, xt.grad.numpy())
