"""The packed artifact holds exactly the kernels the trained model uses, for
every kernel range method, granularity and grid (narrow or full)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fracq
from fracq import export


class _TinyNet(nn.Module):
  """A conv (4-D kernel, channel axis 3) and a dense (channel axis 1)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
    return nn.Dense(3, name='head')(x.reshape((x.shape[0], -1)))


def _data(seed=0):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(8, 5, 5, 2), jnp.float32)
  y = jnp.asarray(rng.randn(8, 3), jnp.float32)
  return x, y


def _train(qm, variables, x, y, steps=3):
  """A few Adam steps on random targets: the learned steps, clips and
  offsets move and the observers see new kernels."""
  train = {c: variables[c] for c in ('params', 'quant') if c in variables}
  rest = {c: v for c, v in variables.items() if c not in train}
  opt = optax.adam(0.05)
  state = opt.init(train)

  def loss(t, r):
    out, upd = qm.apply({**t, **r}, x, train=True, mutable=['quant_stats'])
    return jnp.mean((out - y) ** 2), upd

  for _ in range(steps):
    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(train, rest)
    u, state = opt.update(g, state, train)
    train = optax.apply_updates(train, u)
    rest = {**rest, **upd}
  return {**train, **rest}


def _check_artifact(qm, v, x, tmp_path, tol_ulps):
  path = str(tmp_path / 'model.fracq.safetensors')
  export.export_model(qm, v, path)
  codes, floats, manifest = export.read_artifact(path)
  deq = export.dequantized_kernels(codes, floats, manifest)
  fq = export.fake_quant_kernels(qm, v, x)
  assert set(deq) == set(fq) == {'conv', 'head'}
  for layer in fq:
    # Symmetric grids are exact; affine maps (offset, DoReFa's 2q/n - 1)
    # may differ by float32 rounding of the map.
    atol = tol_ulps * np.finfo(np.float32).eps * np.max(np.abs(fq[layer]))
    np.testing.assert_allclose(
      deq[layer], fq[layer], rtol=0, atol=atol, err_msg=layer
    )
  return codes, manifest


_METHODS = [
  ('lsq', True),
  ('lsq_plus', False),
  ('minmax', True),
  ('minmax', False),
  ('ema_minmax', True),
  ('ema_minmax', False),
  ('percentile', True),
  ('percentile', False),
  ('dorefa', True),
]


@pytest.mark.parametrize('narrow', [False, True])
@pytest.mark.parametrize('granularity', ['tensor', 'channel'])
@pytest.mark.parametrize('method,symmetric', _METHODS)
def test_artifact_equals_fake_quant_kernels(
  method, symmetric, granularity, narrow, tmp_path
):
  if method == 'dorefa' and (granularity == 'channel' or narrow):
    pytest.skip(
      'DoReFa normalises the whole tensor onto its own [0, 2^k-1] '
      'grid: granularity and narrow_range do not apply.'
    )
  bits = 3
  spec = fracq.TensorSpec(
    bits=bits,
    range_method=method,
    symmetric=symmetric,
    granularity=granularity,
    narrow_range=narrow,
    percentile=90.0,
  )
  x, y = _data()
  qm = fracq.quantize(
    _TinyNet(), [fracq.Rule(weight=spec)], x[:1], call_kwargs={'train': False}
  )
  v = qm.calibrate(qm.init(jax.random.key(0), x), x)
  v = _train(qm, v, x, y)
  if method in ('lsq', 'lsq_plus'):
    # Small steps, so both ends of the grid clip (where a full-range clip
    # of a narrow grid would show).
    v['quant'] = jax.tree_util.tree_map(lambda s: s, v['quant'])
    for layer in ('conv', 'head'):
      v['quant'][layer]['kernel_step'] = 0.3 * v['quant'][layer]['kernel_step']
  codes, manifest = _check_artifact(qm, v, x, tmp_path, tol_ulps=4)
  for layer in ('conv', 'head'):
    c = codes[f'{layer}/kernel.packed']
    entry = manifest['tensors'][f'{layer}/kernel.packed']
    assert entry['bits'] == bits
    if method == 'dorefa':
      # q = round(v n) in [0, n], n = 2^3 - 1, stored unsigned at 3 bits.
      assert not entry['signed'] and c.min() >= 0 and c.max() <= 7
      continue
    lo = -3 if narrow else -4
    assert entry['signed'] and c.min() >= lo and c.max() <= 3
    if method == 'lsq':
      # The clip is active: the grid's ends are used.
      assert c.min() == lo and c.max() == 3


@pytest.mark.parametrize('range_method', ['lsq', 'dorefa'])
@pytest.mark.parametrize('per_channel', [False, True])
def test_fracbits_with_pruned_channel_exports_exactly(
  per_channel, range_method, tmp_path
):
  spec = fracq.FracBitsSpec(
    bits=3.0,
    bit_bounds=(0.0, 6.0),
    granularity='channel',
    bits_per_channel=per_channel,
    range_method=range_method,
  )
  x, y = _data(1)
  qm = fracq.quantize(
    _TinyNet(),
    [fracq.Rule(weight=spec)],
    x[:1],
    budget=fracq.Budget(kind='size', uniform_bits=3),
    hard_assign_step=0,
    call_kwargs={'train': False},
  )
  v = qm.calibrate(qm.init(jax.random.key(1), x), x)
  v = _train(qm, v, x, y)
  hard = qm.for_step(0)
  v = hard.prepare(v)
  # Chosen hard bits: the conv's channels at 0 (pruned), 2, 5 and 3 bits
  # (kernel-wise) or 4 bits (per layer); the head at 2 bits.
  conv_bits = [0.0, 2.0, 5.0, 3.0] if per_channel else 4.0
  head_bits = [2.0, 2.0, 2.0] if per_channel else 2.0
  stats = jax.tree_util.tree_map(lambda s: s, v['quant_stats'])
  stats['conv']['kernel_hard_bits'] = jnp.asarray(conv_bits, jnp.float32)
  stats['head']['kernel_hard_bits'] = jnp.asarray(head_bits, jnp.float32)
  v = {**v, 'quant_stats': stats}
  codes, manifest = _check_artifact(hard, v, x, tmp_path, tol_ulps=4)
  entry = manifest['tensors']['conv/kernel.packed']
  assert entry['bits'] == ([0, 2, 5, 3] if per_channel else 4)
  conv = codes['conv/kernel.packed']
  if per_channel:
    # The pruned channel is all zeros and the model's kernel there is 0.
    assert not conv[..., 0].any()
    fq = export.fake_quant_kernels(hard, v, x)['conv']
    assert not fq[..., 0].any() and fq[..., 1:].any()
    for ch, b in enumerate([0, 2, 5, 3]):
      if range_method == 'dorefa':
        assert 0 <= conv[..., ch].min() and conv[..., ch].max() <= 2**b - 1
      elif b:
        # The FracBits branch is symmetric: [-(2^(b-1) - 1), 2^(b-1) - 1].
        assert np.abs(conv[..., ch]).max() <= 2 ** (b - 1) - 1


@pytest.mark.parametrize('narrow', [None, False])
def test_negative_learned_step_exports_with_a_positive_scale(narrow, tmp_path):
  # A learned LSQ step can cross zero in training (seen on a pruned and
  # clustered digits kernel); the model then computes s * c with s < 0.
  spec = fracq.TensorSpec(bits=3, granularity='channel', narrow_range=narrow)
  x, _ = _data()
  qm = fracq.quantize(
    _TinyNet(), [fracq.Rule(weight=spec)], x[:1], call_kwargs={'train': False}
  )
  v = qm.calibrate(qm.init(jax.random.key(0), x), x)
  v['quant'] = jax.tree_util.tree_map(lambda s: s, v['quant'])
  # Small steps, so the grid's ends are used; channel 1's step negative.
  step = 0.3 * np.asarray(v['quant']['conv']['kernel_step'])
  step[1] = -step[1]
  v['quant']['conv']['kernel_step'] = jnp.asarray(step)
  # The model runs eagerly as under jit (no refusal of the negative step).
  eager = np.asarray(qm.apply(v, x))
  np.testing.assert_array_equal(eager, np.asarray(jax.jit(qm.apply)(v, x)))
  codes, _ = _check_artifact(qm, v, x, tmp_path, tol_ulps=0)
  conv = codes['conv/kernel.packed']
  scale = np.asarray(export.freeze(qm, v)['conv'].scale)
  if narrow is False:
    # Full range [-4, 3]: channel 1's clipped weights at code -4 would need
    # +4 once mirrored, so the artifact keeps the negative scale (exact).
    assert conv.min() >= -4 and conv.max() <= 3 and scale[1] < 0
    return
  assert np.all(scale > 0)
  np.testing.assert_allclose(scale, np.abs(step))
  assert conv.min() >= -3 and conv.max() <= 3
