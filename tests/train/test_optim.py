"""Optimizer parameter groups by regex: weight-decay mask, lr multipliers,
the bit-widths' own optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from fracq.methods import cost as cost_lib
from fracq.methods.fracbits import penalty as penalty_lib
from fracq.train import optim

TREE = {
  'params': {
    'conv1': {'kernel': jnp.ones((2,))},
    'bn1': {'scale': jnp.ones((2,)), 'bias': jnp.ones((2,))},
    'fc': {'kernel': jnp.ones((2,)), 'bias': jnp.ones((2,))},
  },
  'quant': {'conv1': {'kernel_bits': jnp.ones(())}},
}


def _one_update(**fields):
  c = common.base_config()
  c.update(fields)
  tx, _ = optim.make_optimizer(c, TREE, total_steps=10, steps_per_epoch=5)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, TREE)
  upd, _ = tx.update(zeros, tx.init(TREE), TREE)
  return upd


def test_weight_decay_only_on_kernels():
  upd = _one_update(
    optimizer='sgd',
    momentum=0.0,
    learning_rate=1.0,
    lr_schedule='constant',
    weight_decay=0.5,
  )
  # Zero gradient: only decayed leaves move, by -lr * wd * w.
  assert float(upd['params']['conv1']['kernel'][0]) == -0.5
  assert float(upd['params']['fc']['kernel'][0]) == -0.5
  for leaf in (
    upd['params']['bn1']['scale'],
    upd['params']['bn1']['bias'],
    upd['params']['fc']['bias'],
    upd['quant']['conv1']['kernel_bits'],
  ):
    np.testing.assert_array_equal(leaf, 0.0)


def test_lr_multipliers_first_match_wins():
  c = common.base_config()
  c.update(
    dict(
      optimizer='sgd',
      momentum=0.0,
      learning_rate=1.0,
      lr_schedule='constant',
      weight_decay=0.0,
      lr_multipliers=((r'^quant/', 10.0), (r'kernel', 0.5)),
    )
  )
  tx, _ = optim.make_optimizer(c, TREE, 10, 5)
  ones = jax.tree_util.tree_map(jnp.ones_like, TREE)
  upd, _ = tx.update(ones, tx.init(TREE), TREE)
  assert float(upd['quant']['conv1']['kernel_bits']) == -10.0
  assert float(upd['params']['conv1']['kernel'][0]) == -0.5
  assert float(upd['params']['bn1']['scale'][0]) == -1.0


def test_unmatched_regex_and_bad_names_fail():
  c = common.base_config()
  c.lr_multipliers = (('^nothing_here', 2.0),)
  with pytest.raises(ValueError, match="'\\^nothing_here' matches no"):
    optim.make_optimizer(c, TREE, 10, 5)
  c = common.base_config()
  c.decay_pattern = 'nope'
  with pytest.raises(ValueError, match='decay_pattern'):
    optim.make_optimizer(c, TREE, 10, 5)
  c = common.base_config()
  c.optimizer = 'rmsprop'
  with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
    optim.make_optimizer(c, TREE, 10, 5)


def test_adamw_decoupled_decay_and_warmup_cosine():
  c = common.base_config()
  c.update(
    dict(
      optimizer='adamw', learning_rate=0.1, warmup_epochs=1.0, weight_decay=0.1
    )
  )
  sched = optim.make_schedule(c, total_steps=20, steps_per_epoch=5)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.1)
  assert float(sched(20)) == pytest.approx(0.0, abs=1e-7)
  upd = _one_update(
    optimizer='adamw',
    learning_rate=1.0,
    lr_schedule='constant',
    weight_decay=0.5,
  )
  # Zero gradient: Adam's step is 0, decay is applied after it (decoupled).
  assert float(upd['params']['conv1']['kernel'][0]) == -0.5


# Two layers, the second with 4x the weights of the first, both learning
# their weight bits under a model-size budget (3 bits uniform-equivalent).
_SMALL, _BIG = 100, 400
_COST = cost_lib.CostModel(
  [
    cost_lib.LayerCost(
      'small',
      _SMALL,
      0,
      1,
      cost_lib.TensorBits(),
      cost_lib.TensorBits(fixed=8.0, bounds=(8.0, 8.0)),
    ),
    cost_lib.LayerCost(
      'big',
      _BIG,
      0,
      1,
      cost_lib.TensorBits(),
      cost_lib.TensorBits(fixed=8.0, bounds=(8.0, 8.0)),
    ),
  ],
  'size',
)
_TARGET = 3.0 * (_SMALL + _BIG)


def _two_layer_tree():
  return {
    'params': {
      'small': {'kernel': jnp.ones((2,))},
      'big': {'kernel': jnp.ones((2,))},
    },
    'quant': {
      'small': {'kernel_bits': jnp.asarray(5.0)},
      'big': {'kernel_bits': jnp.asarray(5.0)},
    },
  }


def _penalty_only_drops(steps=5, **fields):
  """Bits lost per layer after ``steps`` of penalty-only gradients."""
  c = common.base_config()
  c.update(dict(lr_schedule='constant', **fields))
  tree = _two_layer_tree()
  tx, _ = optim.make_optimizer(c, tree, total_steps=100, steps_per_epoch=10)
  penalty = penalty_lib.Penalty()  # kappa * |cost - target| / target
  loss = lambda t: penalty(_COST.cost(t['quant']), _TARGET)
  state = tx.init(tree)
  for _ in range(steps):
    upd, state = tx.update(jax.grad(loss)(tree), state, tree)
    tree = optax.apply_updates(tree, upd)
  return {
    k: 5.0 - float(tree['quant'][k]['kernel_bits']) for k in ('small', 'big')
  }, tree


def _nesterov_sum(momentum, steps):
  """Sum of optax's Nesterov-momentum updates for a constant gradient 1."""
  trace, total = 0.0, 0.0
  for _ in range(steps):
    trace = 1.0 + momentum * trace
    total += 1.0 + momentum * trace
  return total


def test_bits_sgd_keeps_size_weighting_under_adamw():
  # AdamW for the weights (with decay matching every path), default SGD for
  # the bits: each layer's bits fall by lr * kappa * numel / target per
  # step (times the momentum sum), so the 4x layer falls 4x faster.
  drops, tree = _penalty_only_drops(
    optimizer='adamw', learning_rate=0.1, weight_decay=0.1, decay_pattern='.*'
  )
  factor = 0.1 * _nesterov_sum(0.9, 5)
  assert drops['small'] == pytest.approx(factor * _SMALL / _TARGET, rel=1e-5)
  assert drops['big'] == pytest.approx(factor * _BIG / _TARGET, rel=1e-5)
  assert drops['big'] / drops['small'] == pytest.approx(4.0, rel=1e-5)
  # The weights did go through AdamW's decoupled decay: 5 x lr x wd x w.
  np.testing.assert_allclose(
    tree['params']['big']['kernel'], (1 - 0.1 * 0.1) ** 5, rtol=1e-6
  )


def test_bits_adamw_erases_size_weighting():
  # The problem the default avoids: Adam normalises each bit-width's
  # gradient, so both layers fall by ~lr per step whatever their size.
  drops, _ = _penalty_only_drops(
    optimizer='adamw', learning_rate=0.1, bits_optimizer='adamw'
  )
  assert drops['small'] == pytest.approx(5 * 0.1, rel=1e-4)
  assert drops['big'] / drops['small'] == pytest.approx(1.0, rel=1e-4)


def test_bits_learning_rate_momentum_and_clipping():
  # Own lr and momentum for the bits; the weights keep theirs.
  c = common.base_config()
  c.update(
    dict(
      optimizer='sgd',
      momentum=0.9,
      learning_rate=0.1,
      lr_schedule='constant',
      weight_decay=0.0,
      bits_learning_rate=0.5,
      bits_momentum=0.0,
    )
  )
  tree = _two_layer_tree()
  tx, _ = optim.make_optimizer(c, tree, 100, 10)
  grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 2.0), tree)
  upd, _ = tx.update(grads, tx.init(tree), tree)
  assert float(upd['quant']['big']['kernel_bits']) == pytest.approx(-1.0)
  # Nesterov first step: -lr * (g + m * g).
  assert float(upd['params']['big']['kernel'][0]) == pytest.approx(
    -0.1 * 2.0 * 1.9
  )
  # Clipping by the global norm covers the bit-widths too.
  c.grad_clip_norm = 1e-2
  tx, _ = optim.make_optimizer(c, tree, 100, 10)
  upd, _ = tx.update(grads, tx.init(tree), tree)
  norm = float(optim.global_norm(grads))
  assert float(upd['quant']['big']['kernel_bits']) == pytest.approx(
    -0.5 * 2.0 * 1e-2 / norm, rel=1e-5
  )
  c.bits_optimizer = 'lion'
  with pytest.raises(ValueError, match="bits_optimizer='lion'"):
    optim.make_optimizer(c, tree, 100, 10)


def test_default_bits_optimizer_under_sgd_matches_the_weights_optimizer():
  # With optimizer='sgd' and the bits keys unset, bit-widths follow exactly
  # the weights' SGD (Nesterov 0.9, cosine lr), as when they shared it.
  c = common.digits_config()
  tree = _two_layer_tree()
  tx, schedule = optim.make_optimizer(
    c, tree, total_steps=20, steps_per_epoch=10
  )
  ref = optax.chain(
    optax.trace(decay=0.9, nesterov=True),
    optax.scale_by_schedule(lambda s: -schedule(s)),
  )
  bits = tree['quant']
  state, ref_state = tx.init(tree), ref.init(bits)
  for step in range(3):
    grads = jax.tree_util.tree_map(
      lambda x: jax.random.normal(jax.random.key(step), x.shape), tree
    )
    upd, state = tx.update(grads, state, tree)
    ref_upd, ref_state = ref.update(grads['quant'], ref_state, bits)
    for name in ('small', 'big'):
      assert float(upd['quant'][name]['kernel_bits']) == pytest.approx(
        float(ref_upd[name]['kernel_bits']), rel=1e-6
      )
