"""fracq.graph: the sign probe and the structure probe follow the rules."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

import fracq
from fracq import graph


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name='conv0')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn0')(x)
    x = nn.relu(x)
    shared = nn.Conv(4, (3, 3), name='shared')
    x = shared(shared(x) - 10.0)  # second call: a negative input
    x = nn.Conv(4, (3, 3), name='conv1')(nn.relu(x))
    return nn.Dense(3, name='head')(jnp.mean(x, axis=(1, 2)))


X = jnp.asarray(np.random.RandomState(0).randn(2, 6, 6, 3), jnp.float32)


def test_probe_signs_follows_rules_and_shared_layers():
  rules = [fracq.keep_float('^head$'), fracq.Rule(module_path='.*')]
  signs = graph.probe_signs(Net(), rules, X)
  # The shared conv is signed: its second call reads a negative tensor.
  assert signs == {'conv0': True, 'shared': True, 'conv1': False}
  # No concrete sample: nothing known (every input signed).
  assert graph.probe_signs(Net(), rules, None) == {}


def test_structure_uses_the_rules_and_the_sign_probe():
  full = graph.probe_structure(Net(), None, X)
  assert full.order == ['conv0', 'shared', 'shared', 'conv1', 'head']
  assert full.pairs == {'conv0': 'bn0'}
  assert full.signs == {
    'conv0': True,
    'shared': True,
    'conv1': False,
    'head': True,
  }
  part = graph.probe_structure(
    Net(), None, X, rules=[fracq.keep_float('conv1|head'), fracq.Rule()]
  )
  assert part.order == ['conv0', 'shared', 'shared']
  assert part.facts['head'].rule_index == 0  # float, matched by keep_float
