"""Sparsity- and cluster-preserving QAT (fracq.methods.preserve)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import core
from fracq.core import sparsity as sp
from fracq.export.freeze import fake_quant_kernels
from fracq.methods import preserve as pv
from fracq.methods.qat import QATModel


class Net(nn.Module):
  """Dense, Conv, grouped Conv and depthwise Conv (TFMOT skips the last)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(8, (3, 3), name='conv')(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2, name='gconv')(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8, name='dwconv')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(4, name='fc')(x)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(16, name='fc1')(x))
    return nn.Dense(4, name='fc2')(x)


XI = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
YI = jnp.arange(4) % 4
XM = jax.random.normal(jax.random.key(0), (8, 6))
YM = jnp.arange(8) % 4
LAYERS = ('conv', 'gconv', 'dwconv', 'fc')


def _rules(granularity='tensor', range_method='lsq', **w):
  return [
    fracq.Rule(
      module_path='.*',
      weight=fracq.TensorSpec(
        bits=4, granularity=granularity, range_method=range_method, **w
      ),
      act=fracq.TensorSpec(bits=8),
    )
  ]


def _train(qm, v, x, y, steps=20, lr=0.05):
  """Plain SGD on params and quant (centroids included)."""
  train = {c: v[c] for c in qm.trainable_collections if c in v}
  state = {c: v[c] for c in v if c not in train}

  def loss(tr, st):
    out, upd = qm.apply({**tr, **st}, x, mutable=['quant_stats'])
    return jnp.mean((out - jax.nn.one_hot(y, 4)) ** 2), upd

  @jax.jit
  def step(tr, st):
    (loss_value, upd), g = jax.value_and_grad(loss, has_aux=True)(tr, st)
    tr = jax.tree_util.tree_map(lambda a, b: a - lr * b, tr, g)
    return tr, {**st, **upd}, loss_value

  losses = []
  for _ in range(steps):
    train, state, loss_value = step(train, state)
    losses.append(float(loss_value))
  return {**train, **state}, losses


# -- the quantizers keep zeros at zero ------------------------------------------
def test_kernel_quantizers_map_zero_to_zero():
  w = np.asarray(sp.prune(jax.random.normal(jax.random.key(1), (32, 8)), 0.5))
  zero = w == 0
  s = core.lsq_init_step(jnp.asarray(w), 7)
  assert np.all(np.asarray(core.lsq_quantize(w, s, -8, 7))[zero] == 0)
  for lo, hi in ((w.min(), w.max()), (-0.3, 2.0)):
    sc, zp = core.minmax_to_qparams(
      jnp.float32(lo), jnp.float32(hi), -8, 7, symmetric=True
    )
    assert float(zp) == 0
    assert np.all(np.asarray(core.fake_quant(w, sc, zp, -8, 7))[zero] == 0)
  r = jnp.float32(np.abs(w).max())
  for bits in (2.0, 3.4, 5.7):
    out = core.fractional_range_quantize(
      jnp.asarray(w), r, jnp.float32(bits), signed=True
    )
    assert np.all(np.asarray(out)[zero] == 0)
  out = core.hard_quantize(
    jnp.asarray(w), 3.0, lambda x, k: core.symmetric_range_branch(x, r, k)
  )
  assert np.all(np.asarray(out)[zero] == 0)


# -- the key property: PCQAT on Dense, Conv, grouped and depthwise Conv -------
def _pcqat_start(granularity='tensor', k=8, **kw):
  tr = pv.PreserveTransform(prune=True, cluster=True, clusters=k, **kw)
  qm = QATModel(Net(), _rules(granularity), XI, kernel_transform=tr)
  v = qm.init(jax.random.key(1), XI)
  # The starting model: pruned to 50% and clustered to k values (zero incl.).
  p = pv.cluster_params(pv.prune_params(v['params'], 0.5), k)
  v = jax.jit(qm.calibrate)({**v, 'params': p}, XI)
  return qm, v, p


def test_pcqat_keeps_sparsity_and_clusters_through_training():
  k = 8
  qm, v, p = _pcqat_start(k=k)
  for name in LAYERS:
    w = np.asarray(p[name]['kernel'])
    assert np.mean(w == 0) == 0.5 and np.unique(w).size <= k
    np.testing.assert_array_equal(
      v['quant_stats'][name]['kernel_mask'], (w != 0).astype(np.float32)
    )
    c = np.asarray(v['quant'][name]['kernel_centroids'])
    assert c.shape == (k,) and c[0] == 0.0
    # k-means on an already clustered kernel recovers its values.
    np.testing.assert_allclose(np.sort(c[1:]), np.unique(w[w != 0]), rtol=1e-6)
  before = fake_quant_kernels(qm, v, XI)
  trained, losses = _train(qm, v, XI, YI, steps=20)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  after = fake_quant_kernels(qm, trained, XI)
  assert set(after) == set(LAYERS)
  for name in LAYERS:
    w0 = np.asarray(p[name]['kernel'])
    eff0, eff = before[name], after[name]
    # Exactly the starting sparsity, at exactly the starting positions.
    np.testing.assert_array_equal(eff == 0, w0 == 0)
    np.testing.assert_array_equal(eff0 == 0, w0 == 0)
    assert np.unique(eff).size <= k
    # Training did move the centroids and the underlying weights.
    assert not np.allclose(
      trained['quant'][name]['kernel_centroids'],
      v['quant'][name]['kernel_centroids'],
    )
    assert trained['quant'][name]['kernel_centroids'][0] == 0.0
  # strip: exact zeros and cluster values in params, runs as a plain model.
  plain = pv.strip(trained, qmodel=qm)
  assert set(plain) == {'params'}
  for name in LAYERS:
    w = np.asarray(plain['params'][name]['kernel'])
    w0 = np.asarray(p[name]['kernel'])
    np.testing.assert_array_equal(w == 0, w0 == 0)
    assert np.unique(w).size <= k
    cents = np.asarray(trained['quant'][name]['kernel_centroids'])
    assert np.all(np.isin(w, cents))
  out = Net().apply(plain, XI)
  assert out.shape == (4, 4) and np.isfinite(np.asarray(out)).all()
  # Stripped params through the same QAT model give the same kernels.
  again = fake_quant_kernels(qm, {**trained, 'params': plain['params']}, XI)
  for name in LAYERS:
    np.testing.assert_array_equal(again[name], after[name])


def test_pcqat_per_channel_clusters_and_channel_quant():
  k = 4
  qm, v, p = _pcqat_start(
    granularity='channel', k=k, cluster_per_channel=True, cluster_grad='mean'
  )
  assert v['quant']['conv']['kernel_centroids'].shape == (8, k)
  trained, _ = _train(qm, v, XI, YI, steps=10)
  after = fake_quant_kernels(qm, trained, XI)
  for name in LAYERS:
    w0 = np.asarray(p[name]['kernel'])
    eff = after[name]
    np.testing.assert_array_equal(eff == 0, w0 == 0)
    for ch in range(eff.shape[-1]):
      assert np.unique(eff[..., ch]).size <= k


# -- PQAT and CQAT alone --------------------------------------------------------
def test_pqat_mask_retaken_on_calibrate_and_kept():
  tr = pv.PreserveTransform(prune=True)
  qm = QATModel(MLP(), _rules(), XM, kernel_transform=tr)
  v = qm.init(jax.random.key(1), XM)
  # At init the (random) kernels have no zeros: the mask keeps everything.
  assert float(jnp.min(v['quant_stats']['fc1']['kernel_mask'])) == 1.0
  assert 'quant' not in v or 'kernel_centroids' not in v['quant']['fc1']
  p = pv.prune_params(v['params'], 0.6)  # as if loaded (init_from)
  v = qm.calibrate({**v, 'params': p}, XM)
  for name in ('fc1', 'fc2'):
    np.testing.assert_array_equal(
      v['quant_stats'][name]['kernel_mask'],
      (np.asarray(p[name]['kernel']) != 0),
    )
  # Even if the raw weights drift away from zero, the effective kernel keeps
  # exactly the pattern (the mask is fixed).
  drift = jax.tree_util.tree_map(lambda a: a + 0.01, p)
  trained, losses = _train(qm, {**v, 'params': drift}, XM, YM, steps=20)
  eff = fake_quant_kernels(qm, trained, XM)
  for name in ('fc1', 'fc2'):
    w0 = np.asarray(p[name]['kernel'])
    np.testing.assert_array_equal(eff[name] == 0, w0 == 0)
    assert abs(np.mean(eff[name] == 0) - 0.6) < 0.01
  assert losses[-1] < losses[0]


def test_cqat_keeps_cluster_count():
  k = 5
  tr = pv.PreserveTransform(
    prune=False, cluster=True, clusters=k, cluster_init='linear'
  )
  qm = QATModel(MLP(), _rules(), XM, kernel_transform=tr)
  v = qm.init(jax.random.key(1), XM)
  v = qm.calibrate(v, XM)
  c = v['quant']['fc1']['kernel_centroids']
  assert c.shape == (k,) and np.all(np.diff(np.asarray(c)) > 0)
  trained, losses = _train(qm, v, XM, YM, steps=20, lr=0.1)
  eff = fake_quant_kernels(qm, trained, XM)
  for name in ('fc1', 'fc2'):
    assert np.unique(eff[name]).size <= k
  assert not np.allclose(
    trained['params']['fc1']['kernel'], v['params']['fc1']['kernel']
  )  # STE to weights


def test_rule_options_set_per_layer_clusters_and_opt_out():
  rules = [
    fracq.Rule(
      module_path='^fc2$',
      weight=fracq.TensorSpec(bits=4),
      options=(('clusters', 3),),
    ),
    fracq.Rule(
      module_path='^fc1$',
      weight=fracq.TensorSpec(bits=4),
      options=(('cluster', False),),
    ),
  ]
  tr = pv.PreserveTransform(prune=True, cluster=True, clusters=6)
  qm = QATModel(MLP(), rules, XM, kernel_transform=tr)
  v = qm.init(jax.random.key(1), XM)
  assert v['quant']['fc2']['kernel_centroids'].shape == (3,)
  assert 'kernel_centroids' not in v['quant']['fc1']
  assert 'kernel_mask' in v['quant_stats']['fc1']


def test_one_shot_sparsity_at_calibration():
  tr = pv.PreserveTransform(prune=True, cluster=True, clusters=4, sparsity=0.75)
  qm = QATModel(MLP(), _rules(), XM, kernel_transform=tr)
  v = qm.calibrate(qm.init(jax.random.key(1), XM), XM)
  eff = fake_quant_kernels(qm, v, XM)
  for name in ('fc1', 'fc2'):
    mask = np.asarray(v['quant_stats'][name]['kernel_mask'])
    assert mask.mean() == 0.25
    np.testing.assert_array_equal(eff[name] == 0, mask == 0)
    assert np.unique(eff[name]).size <= 4


# -- errors -------------------------------------------------------------------
def test_errors_are_clear():
  with pytest.raises(ValueError, match='does nothing'):
    pv.PreserveTransform(prune=False, cluster=False)
  with pytest.raises(ValueError, match='cluster_grad'):
    pv.PreserveTransform(cluster=True, cluster_grad='max')
  with pytest.raises(ValueError, match='at least 2'):
    pv.PreserveTransform(prune=True, cluster=True, clusters=1)
  # A quantizer with a zero point would move pruned zeros.
  tr = pv.PreserveTransform(prune=True)
  rules = _rules(range_method='lsq_plus', symmetric=False)
  with pytest.raises(ValueError, match='fc1.*symmetric kernel quantizer'):
    QATModel(MLP(), rules, XM, kernel_transform=tr).init(jax.random.key(0), XM)
  # More clusters than weights, named by layer.
  tr = pv.PreserveTransform(prune=False, cluster=True, clusters=65)
  with pytest.raises(ValueError, match=r'fc2 \(Dense.*only 64 weights'):
    QATModel(MLP(), _rules(), XM, kernel_transform=tr)


# -- gradual pruning phase ------------------------------------------------------
def test_pruning_transform_follows_schedule_and_strips():
  tr = pv.PruningTransform(0.5, begin_step=0, end_step=4, frequency=1, power=1)
  rules = [fracq.Rule(module_path='.*')]  # float layers, pruned only
  qm = QATModel(MLP(), rules, XM, kernel_transform=tr)
  v = qm.init(jax.random.key(1), XM)
  assert int(v['quant_stats']['fc1']['prune_step']) == 0
  ref = MLP().apply({'params': v['params']}, XM)
  out, upd = qm.apply(v, XM, mutable=['quant_stats'])
  np.testing.assert_allclose(out, ref, rtol=1e-6)  # step 0: sparsity 0
  seen, masks = [], []
  apply = jax.jit(lambda v: qm.apply(v, XM, mutable=['quant_stats']))
  for t in range(6):
    _, upd = apply(v)
    v = {**v, **upd}
    m = np.asarray(v['quant_stats']['fc1']['kernel_mask'])
    seen.append(1 - m.mean())
    masks.append(m)
  np.testing.assert_allclose(seen, [0, 0.125, 0.25, 0.375, 0.5, 0.5], atol=1e-6)
  for a, b in zip(masks, masks[1:]):
    assert np.all(b <= a)  # pruned stays pruned
  assert int(v['quant_stats']['fc1']['prune_step']) == 6
  # Non-mutable apply (eval) uses the mask, does not advance the counter.
  w = np.asarray(v['params']['fc1']['kernel'])
  plain = pv.strip(v)
  w1 = np.asarray(plain['params']['fc1']['kernel'])
  assert np.mean(w1 == 0) == 0.5
  np.testing.assert_array_equal(w1, np.where(masks[-1] > 0, w, 0))
  np.testing.assert_allclose(
    qm.apply(v, XM), MLP().apply(plain, XM), rtol=1e-5, atol=1e-6
  )


def test_pruning_transform_n_m_on_grouped_conv():
  tr = pv.PruningTransform(
    0.5, structure='n:m', n=2, m=4, begin_step=1, end_step=2
  )
  rules = [fracq.Rule(module_path='^(gconv|fc)$')]  # conv: 3 inputs
  qm = QATModel(Net(), rules, XI, kernel_transform=tr, on_unused='warn')
  v = qm.init(jax.random.key(1), XI)
  for _ in range(3):
    _, upd = qm.apply(v, XI, mutable=['quant_stats'])
    v = {**v, **upd}
  plain = pv.strip(v)
  g = np.asarray(plain['params']['gconv']['kernel'])  # (3, 3, 4, 8)
  nz = (g != 0).reshape(3, 3, 1, 4, 8).sum(axis=3)
  np.testing.assert_array_equal(nz, 2)
  # The depthwise conv has no rule: untouched.
  assert 'dwconv' not in v['quant_stats']
  # N:M on a depthwise kernel fails naming the layer and the fix.
  tr2 = pv.PruningTransform(0.5, structure='n:m', begin_step=0, end_step=2)
  qm2 = QATModel(
    Net(),
    [fracq.Rule(module_path='dwconv')],
    XI,
    kernel_transform=tr2,
    on_unused='warn',
  )
  v2 = qm2.init(jax.random.key(1), XI)
  with pytest.raises(ValueError, match='dwconv.*unstructured'):
    qm2.apply(v2, XI, mutable=['quant_stats'])
