"""Pruning schedules/masks and weight clustering (fracq.core.sparsity,
fracq.core.clustering)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq.core import clustering as cl
from fracq.core import sparsity as sp


# -- schedule -------------------------------------------------------------------
def _hand(step, si, sf, b, e, power=3):
  p = min(1.0, max(0.0, (step - b) / (e - b)))
  return sf + (si - sf) * (1 - p) ** power


@pytest.mark.parametrize('step', [0, 10, 11, 20, 25, 29, 30, 45])
def test_polynomial_decay_matches_hand(step):
  got = sp.polynomial_decay_sparsity(step, 0.1, 0.7, 10, 30, power=3)
  np.testing.assert_allclose(got, _hand(step, 0.1, 0.7, 10, 30), rtol=1e-6)


def test_polynomial_decay_values_frequency_and_jit():
  f = jax.jit(
    lambda t: sp.polynomial_decay_sparsity(
      t, 0.0, 0.8, 0, 100, power=2, frequency=10
    )
  )
  np.testing.assert_allclose(f(0), 0.0, atol=1e-7)
  np.testing.assert_allclose(f(50), 0.8 - 0.8 * 0.25, rtol=1e-6)  # 0.6
  np.testing.assert_allclose(f(57), f(50), rtol=0)  # held between updates
  np.testing.assert_allclose(f(100), 0.8, rtol=1e-6)
  np.testing.assert_allclose(f(1000), 0.8, rtol=1e-6)
  # end_step off the update grid still reaches the final value.
  g = sp.polynomial_decay_sparsity(35, 0.0, 0.5, 0, 35, frequency=10)
  np.testing.assert_allclose(g, 0.5, rtol=1e-6)
  due = [
    bool(sp.pruning_step_due(t, 5, 35, 10)) for t in (4, 5, 6, 15, 34, 35, 36)
  ]
  assert due == [False, True, False, True, False, True, False]


@pytest.mark.parametrize(
  'kw, msg',
  [
    (dict(initial=0.0, final=1.0), 'outside'),
    (dict(initial=-0.1, final=0.5), 'outside'),
    (dict(begin_step=10, end_step=10), 'begin_step < end_step'),
    (dict(frequency=0), 'frequency'),
  ],
)
def test_schedule_errors(kw, msg):
  args = dict(initial=0.0, final=0.5, begin_step=0, end_step=10)
  args.update(kw)
  with pytest.raises(ValueError, match=msg):
    sp.polynomial_decay_sparsity(0, **args)


# -- masks ----------------------------------------------------------------------
@pytest.mark.parametrize('s', [0.0, 0.1, 0.5, 0.73, 0.99])
def test_unstructured_exact_count_keeps_largest(s):
  w = jax.random.normal(jax.random.key(0), (3, 3, 5, 7))
  m = np.asarray(sp.magnitude_mask(w, s))
  assert m.dtype == bool and m.shape == w.shape
  drop = int(round(s * w.size))
  assert int((~m).sum()) == drop
  a = np.abs(np.asarray(w))
  if 0 < drop < w.size:
    assert a[m].min() >= a[~m].max()
  pruned = sp.prune(w, s)
  np.testing.assert_allclose(sp.sparsity_of(pruned), drop / w.size)


def test_unstructured_ties_are_deterministic():
  w = jnp.array([[1.0, -1.0, 1.0], [1.0, 2.0, -1.0]])  # five ties at |1|
  m = np.asarray(sp.magnitude_mask(w, 0.5))  # drop exactly 3
  assert int((~m).sum()) == 3
  # Equal magnitudes are dropped in flat-index order.
  np.testing.assert_array_equal(m, [[False, False, False], [True, True, True]])
  m2 = np.asarray(jax.jit(lambda s: sp.magnitude_mask(w, s))(0.5))
  np.testing.assert_array_equal(m, m2)


def test_n_m_pattern():
  w = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))  # HWIO
  m = np.asarray(sp.magnitude_mask(w, None, structure='n:m', n=2, m=4))
  a = np.abs(np.asarray(w))
  g = m.reshape(3, 3, 2, 4, 16)
  np.testing.assert_array_equal(g.sum(axis=3), 2)
  ag = a.reshape(3, 3, 2, 4, 16)
  kept_min = np.where(g, ag, np.inf).min(axis=3)
  dropped_max = np.where(~g, ag, -np.inf).max(axis=3)
  assert np.all(kept_min >= dropped_max)
  # Dense (in, out): groups along the input axis; sparsity = 1 - n/m.
  d = jax.random.normal(jax.random.key(2), (12, 5))
  md = np.asarray(sp.magnitude_mask(d, 0.75, structure='n:m', n=1, m=4))
  np.testing.assert_array_equal(md.reshape(3, 4, 5).sum(axis=1), 1)


def test_channel_mask():
  w = np.ones((3, 3, 4, 6), np.float32) * np.arange(1, 7, dtype=np.float32)
  w[..., 4] = 0.01  # smallest norm
  m = np.asarray(sp.magnitude_mask(w, 0.34, structure='channel'))
  # round(0.34 * 6) = 2 channels: the two smallest norms (4 and 0).
  dead = [c for c in range(6) if not m[..., c].any()]
  assert dead == [0, 4]
  assert all(m[..., c].all() for c in range(6) if c not in dead)
  m0 = np.asarray(
    sp.magnitude_mask(
      w.transpose(3, 0, 1, 2), 0.34, structure='channel', channel_axis=0
    )
  )
  assert [c for c in range(6) if not m0[c].any()] == [0, 4]


@pytest.mark.parametrize(
  'kw, msg',
  [
    (dict(sparsity=1.0), r'outside \[0, 1\)'),
    (dict(sparsity=-0.2), r'outside \[0, 1\)'),
    (dict(sparsity=0.5, structure='blocks'), 'unknown'),
    (dict(sparsity=None), 'needs a sparsity'),
    (dict(sparsity=None, structure='n:m', n=4, m=4), '1 <= n < m'),
    (dict(sparsity=0.3, structure='n:m', n=2, m=4), 'fixes the sparsity'),
  ],
)
def test_mask_errors(kw, msg):
  w = jnp.ones((4, 8))
  with pytest.raises(ValueError, match=msg):
    sp.magnitude_mask(w, **kw)


def test_n_m_not_dividing_says_how_to_fix():
  dw = jnp.ones((3, 3, 1, 8))  # depthwise: one input per group
  with pytest.raises(ValueError, match='does not divide.*unstructured'):
    sp.magnitude_mask(dw, None, structure='n:m')


def test_sparsity_of():
  assert float(sp.sparsity_of(jnp.array([0.0, 1.0, -0.0, 2.0]))) == 0.5


# -- k-means ------------------------------------------------------------------
def _separated(seed=0):
  rng = np.random.default_rng(seed)
  means = np.array([-5.0, 0.5, 7.0])
  lab = rng.integers(0, 3, size=300)
  lab[:3] = [0, 1, 2]
  x = means[lab] + 0.05 * rng.standard_normal(300)
  return x.astype(np.float32).reshape(20, 15), lab.reshape(20, 15), means


@pytest.mark.parametrize('init', ['kmeans++', 'linear', 'density'])
def test_kmeans_recovers_separated_clusters(init):
  x, lab, means = _separated()
  c, idx = cl.kmeans(jnp.asarray(x), 3, init=init, key=jax.random.key(3))
  c = np.asarray(c)
  np.testing.assert_allclose(c, means, atol=0.05)  # sorted ascending
  np.testing.assert_array_equal(np.asarray(idx), lab)
  np.testing.assert_array_equal(cl.assign(x, c), lab)


def test_kmeans_per_channel_and_jit():
  x, lab, means = _separated(1)
  w = np.stack([x, x + 100.0], axis=-1)  # (20, 15, 2): channel axis -1
  c, idx = jax.jit(lambda w: cl.kmeans(w, 3, per_channel_axis=-1))(w)
  assert c.shape == (2, 3) and idx.shape == w.shape
  np.testing.assert_allclose(c[0], means, atol=0.05)
  np.testing.assert_allclose(c[1], means + 100.0, atol=0.05)
  np.testing.assert_array_equal(idx[..., 1], lab)


def test_kmeans_preserve_zeros():
  w = sp.prune(jax.random.normal(jax.random.key(4), (6, 10)), 0.5)
  c, idx = cl.kmeans(w, 5, preserve_zeros=True)
  c, idx, w = np.asarray(c), np.asarray(idx), np.asarray(w)
  assert c[0] == 0.0 and np.all(c[1:] != 0)
  np.testing.assert_array_equal(idx == 0, w == 0)
  clustered = np.asarray(cl.cluster(jnp.asarray(w), 5, preserve_zeros=True))
  np.testing.assert_array_equal(clustered == 0, w == 0)
  assert np.unique(clustered).size <= 5


@pytest.mark.parametrize(
  'kw, msg',
  [
    (dict(k=0), 'k >= 1'),
    (dict(k=61), 'only 60 weights'),
    (dict(k=1, preserve_zeros=True), 'k >= 2'),
    (dict(k=8, preserve_zeros=True), 'only 5 are nonzero'),
    (dict(k=3, init='random'), 'unknown'),
  ],
)
def test_kmeans_errors(kw, msg):
  w = np.zeros((6, 10), np.float32)
  w[0, :5] = [1, 2, 3, 4, 5]
  with pytest.raises(ValueError, match=msg):
    cl.kmeans(jnp.asarray(w), **kw)


# -- clustered_weight gradients ----------------------------------------------
def _numpy_reference(w, c, grad, pinned, g):
  """Forward c[idx]; centroid grads = segment sum/mean; w grad = g."""
  w, c, g = np.asarray(w), np.asarray(c), np.asarray(g)
  cand = c[1:] if pinned else c
  idx = np.argmin(np.abs(w.reshape(-1, 1) - cand.reshape(1, -1)), axis=1)
  if pinned:
    idx = np.where(w.reshape(-1) != 0, idx + 1, 0)
  fwd = c[idx].reshape(w.shape)
  if pinned:
    fwd = np.where(idx.reshape(w.shape) == 0, 0.0, fwd)
  gc = np.zeros_like(c)
  np.add.at(gc, idx, g.reshape(-1))
  if grad == 'mean':
    cnt = np.bincount(idx, minlength=c.size)
    gc = gc / np.maximum(cnt, 1)
  if pinned:
    gc[0] = 0.0
  return fwd, gc


@pytest.mark.parametrize('grad', ['sum', 'mean'])
@pytest.mark.parametrize('pinned', [False, True])
def test_clustered_weight_gradients_match_numpy(grad, pinned):
  w = jax.random.normal(jax.random.key(5), (4, 3, 6))
  if pinned:
    w = sp.prune(w, 0.4)
  c = jnp.array([0.0, -1.2, -0.3, 0.4, 1.1, 9.0])  # 9.0: an empty cluster
  if pinned:
    c = c.at[0].set(0.05)  # the forward must still use exactly 0
  g = jax.random.normal(jax.random.key(6), w.shape)

  def f(w, c):
    return jnp.sum(cl.clustered_weight(w, c, grad=grad, zero_pinned=pinned) * g)

  gw, gc = jax.grad(f, argnums=(0, 1))(w, c)
  fwd_ref, gc_ref = _numpy_reference(w, np.asarray(c), grad, pinned, g)
  out = cl.clustered_weight(w, c, grad=grad, zero_pinned=pinned)
  np.testing.assert_array_equal(np.asarray(out), fwd_ref.astype(np.float32))
  np.testing.assert_allclose(gw, g, rtol=0, atol=0)  # straight-through
  np.testing.assert_allclose(gc, gc_ref, rtol=1e-5, atol=1e-6)
  assert float(gc[-1]) == 0.0
  if pinned:
    assert np.all((np.asarray(out) == 0) == (np.asarray(w) == 0))


def test_clustered_weight_per_channel_gradients():
  w = jax.random.normal(jax.random.key(7), (5, 4, 3))
  c, _ = cl.kmeans(w, 3, per_channel_axis=-1)
  g = jax.random.normal(jax.random.key(8), w.shape)
  gc = jax.grad(
    lambda c: jnp.sum(
      cl.clustered_weight(w, c, grad='mean', per_channel_axis=-1) * g
    )
  )(c)
  for ch in range(3):
    _, ref = _numpy_reference(
      w[..., ch], np.asarray(c[ch]), 'mean', False, g[..., ch]
    )
    np.testing.assert_allclose(gc[ch], ref, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='per_channel_axis'):
    cl.clustered_weight(w, c)
  with pytest.raises(ValueError, match='unknown'):
    cl.clustered_weight(w, c[0], grad='median')


def test_clustered_weight_keep_mask_overrides_zero_test():
  w = jnp.array([[0.0, 0.5], [-0.7, 0.0]])
  keep = jnp.array([[True, False], [True, False]])
  c = jnp.array([0.0, -0.6, 0.6])
  out = np.asarray(cl.clustered_weight(w, c, zero_pinned=True, keep=keep))
  # A kept weight that is exactly 0 maps to a nonzero centroid; a dropped
  # one is exactly 0 whatever its value.
  np.testing.assert_array_equal(
    out, np.array([[-0.6, 0.0], [-0.6, 0.0]], np.float32)
  )
