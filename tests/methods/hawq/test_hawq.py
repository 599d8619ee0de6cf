"""HAWQ baseline: Hutchinson traces vs dense Hessians, the ILP vs brute
force, and the digits search + QAT path."""

import importlib
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fracq.core import hessian
from fracq.methods.hawq import bit_allocation as ba
from fracq.train import train as tr


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(12, name='fc1')(x))
    x = nn.tanh(nn.Dense(8, name='fc2')(x))
    return nn.Dense(3, name='fc3')(x)


def _setup():
  x = jax.random.normal(jax.random.key(0), (64, 5))
  y = jax.random.randint(jax.random.key(1), (64,), 0, 3)
  m = Tiny()
  p = m.init(jax.random.key(2), x)['params']

  def loss(p, batch=None):
    return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(
        m.apply({'params': p}, x), y
      )
    )

  groups = {}
  for kp, _ in jax.tree_util.tree_leaves_with_path(p):
    name = str(kp[0].key)
    groups.setdefault(name, []).append(kp)
  return loss, p, groups


def test_hvp_matches_dense_hessian():
  loss, p, _ = _setup()
  flat, unravel = jax.flatten_util.ravel_pytree(p)
  h = jax.hessian(lambda f: loss(unravel(f)))(flat)
  v = jax.random.normal(jax.random.key(3), flat.shape)
  hv = jax.flatten_util.ravel_pytree(
    hessian.hvp(lambda q, b: loss(q), p, unravel(v), None)
  )[0]
  np.testing.assert_allclose(hv, h @ v, rtol=1e-4, atol=1e-6)


def test_hutchinson_within_5_percent_of_exact_trace():
  loss, p, groups = _setup()
  exact = hessian.exact_hessian_trace(lambda q, b: loss(q), p, groups=groups)
  est = hessian.hutchinson_traces(
    lambda q, b: loss(q),
    p,
    jax.random.key(4),
    groups=groups,
    num_probes=10000,
    chunk=2500,
  )
  for g in groups:
    assert est[g]['trace'] == pytest.approx(exact[g], rel=0.05), g
    assert est[g]['n'] == sum(x.size for x in jax.tree_util.tree_leaves(p[g]))


def _brute(layers, cands, budget, kind, fixed_cost):
  best = None
  for combo in itertools.product(cands, repeat=len(layers)):
    cost = fixed_cost + sum(
      layer.cost(b, kind) for layer, b in zip(layers, combo)
    )
    if cost > budget:
      continue
    s = sum(layer.sensitivity[b] for layer, b in zip(layers, combo))
    if best is None or s < best[0]:
      best = (s, combo)
  return best


@pytest.mark.parametrize('kind', ['size', 'bitops'])
def test_ilp_is_optimal_and_within_budget(kind):
  rng = np.random.RandomState(0)
  cands = [2, 4, 8]
  layers = [
    ba.LayerChoice(
      name=f'l{i}',
      params=int(n),
      macs=int(n) * 7,
      sensitivity={b: float(rng.uniform(0.5, 2) * n * 4.0**-b) for b in cands},
      act_bits=a,
    )
    for i, (n, a) in enumerate([(100, 8), (300, 4), (50, 8), (400, 6)])
  ]
  fixed = 1000.0
  for frac in (0.3, 0.5, 0.8):
    hi = fixed + sum(layer.cost(8, kind) for layer in layers)
    lo = fixed + sum(layer.cost(2, kind) for layer in layers)
    budget = lo + frac * (hi - lo)
    choice = ba.allocate_bits_ilp(
      layers, cands, budget, kind=kind, fixed_cost=fixed
    )
    cost = fixed + sum(layer.cost(choice[layer.name], kind) for layer in layers)
    assert cost <= budget
    s = sum(layer.sensitivity[choice[layer.name]] for layer in layers)
    best = _brute(layers, cands, budget, kind, fixed)
    assert s == pytest.approx(best[0])
  with pytest.raises(ValueError, match='minimum reachable cost'):
    ba.allocate_bits_ilp(layers, cands, lo - 1, kind=kind, fixed_cost=fixed)


def test_hand_checkable_case():
  # Two layers of 100 weights, budget 600 bits: (2, 4) or (4, 2). The first
  # layer is far more sensitive, so it must get the 4 bits.
  layers = [
    ba.LayerChoice('a', 100, 0, {2: 10.0, 4: 1.0}),
    ba.LayerChoice('b', 100, 0, {2: 2.0, 4: 1.0}),
  ]
  assert ba.allocate_bits_ilp(layers, [2, 4], 600) == {'a': 4, 'b': 2}


def test_manual_bit_map():
  names = ['conv_init', 'conv1', 'conv2', 'head']
  m = ba.manual_bit_map(names, [(r'^conv_init$|^head$', 8), ('conv', 3)])
  assert m == {'conv_init': 8, 'conv1': 3, 'conv2': 3, 'head': 8}
  with pytest.raises(ValueError, match="matches layer 'head'"):
    ba.manual_bit_map(names, [('conv', 4)])
  with pytest.raises(ValueError, match='matched no layer'):
    ba.manual_bit_map(names, [('.*', 4), ('never', 2)])


def test_digits_hawq_search_and_qat(tmp_path):
  f = importlib.import_module('configs.digits_float').get_config('smoke')
  tr.train_and_evaluate(f, str(tmp_path / 'float'))
  c = importlib.import_module('configs.digits_hawq').get_config('smoke')
  c.init_from = str(tmp_path / 'float')
  m = tr.train_and_evaluate(c, str(tmp_path / 'hawq'))
  assert m['cost_integer'] <= m['cost_target']
  assert m['eval_examples'] == 360
  with pytest.raises(ValueError, match='init_from'):
    c2 = importlib.import_module('configs.digits_hawq').get_config('smoke')
    tr.train_and_evaluate(c2, str(tmp_path / 'h2'))
