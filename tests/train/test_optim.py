"""Optimizer parameter groups by regex: weight-decay mask, lr multipliers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fracq.train import optim

TREE = {'params': {'conv1': {'kernel': jnp.ones((2,))},
                   'bn1': {'scale': jnp.ones((2,)), 'bias': jnp.ones((2,))},
                   'fc': {'kernel': jnp.ones((2,)), 'bias': jnp.ones((2,))}},
        'quant': {'conv1': {'kernel_bits': jnp.ones(())}}}


def _one_update(**fields):
  c = common.base_config()
  c.update(fields)
  tx, _ = optim.make_optimizer(c, TREE, total_steps=10, steps_per_epoch=5)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, TREE)
  upd, _ = tx.update(zeros, tx.init(TREE), TREE)
  return upd


def test_weight_decay_only_on_kernels():
  upd = _one_update(optimizer='sgd', momentum=0.0, learning_rate=1.0,
                    lr_schedule='constant', weight_decay=0.5)
  # Zero gradient: only decayed leaves move, by -lr * wd * w.
  assert float(upd['params']['conv1']['kernel'][0]) == -0.5
  assert float(upd['params']['fc']['kernel'][0]) == -0.5
  for leaf in (upd['params']['bn1']['scale'], upd['params']['bn1']['bias'],
               upd['params']['fc']['bias'], upd['quant']['conv1']['kernel_bits']):
    np.testing.assert_array_equal(leaf, 0.0)


def test_lr_multipliers_first_match_wins():
  c = common.base_config()
  c.update(dict(optimizer='sgd', momentum=0.0, learning_rate=1.0,
                lr_schedule='constant', weight_decay=0.0,
                lr_multipliers=((r'^quant/', 10.0), (r'kernel', 0.5))))
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
  c.update(dict(optimizer='adamw', learning_rate=0.1, warmup_epochs=1.0,
                weight_decay=0.1))
  sched = optim.make_schedule(c, total_steps=20, steps_per_epoch=5)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.1)
  assert float(sched(20)) == pytest.approx(0.0, abs=1e-7)
  upd = _one_update(optimizer='adamw', learning_rate=1.0,
                    lr_schedule='constant', weight_decay=0.5)
  # Zero gradient: Adam's step is 0, decay is applied after it (decoupled).
  assert float(upd['params']['conv1']['kernel'][0]) == -0.5
