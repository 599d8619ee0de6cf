"""Tests of the interception mechanism with a tiny test-only provider."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import fracq
from fracq import interception as fi


class RoundProvider:
  """Test provider: kernel -> s * round(kernel / s) with a learned ``s``.

  Straight-through rounding so gradients flow; inputs are scaled by a
  non-trainable statistic to exercise a second collection.
  """

  def quantize_kernel(self, site, kernel):
    s = site.variable('quant', 'kernel_step', lambda: jnp.full((), 0.05))
    k = kernel / s.value
    return (k + jax.lax.stop_gradient(jnp.round(k) - k)) * s.value

  def quantize_input(self, site, x):
    calls = site.variable('quant_stats', 'calls', lambda: jnp.zeros(()))
    if site.is_mutable('quant_stats') and not site.is_initializing:
      calls.value = calls.value + 1
    return x


class ExamplesCNN(nn.Module):
  """Written like the flax examples' CNN: auto-named layers, no train flag."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=8, kernel_size=(3, 3))(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=16, kernel_size=(3, 3), feature_group_count=8)(x)
    x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(features=32)(x)
    x = nn.relu(x)
    return nn.Dense(features=10)(x)


class Zoo(nn.Module):
  """Every supported layer type, nested, shared and wrapped."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name='conv')(x)
    x = nn.Conv(4, (3, 3), feature_group_count=4, name='depthwise')(x)
    x = nn.ConvTranspose(6, (2, 2), strides=(2, 2), name='deconv')(x)
    x = nn.remat(nn.Conv)(6, (1, 1), name='remat_conv')(x)
    x = x.reshape((x.shape[0], -1, 6))
    x = nn.DenseGeneral((2, 3), name='dense_general')(x)
    x = nn.Einsum((2, 3, 5), 'btij,ijk->btk', name='einsum')(x)
    shared = nn.Dense(5, name='shared')
    x = shared(shared(x))
    return x.mean(axis=1)


X = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3), jnp.float32)
ALL = fi.Rule(
  module_path='.*',
  weight=fracq.TensorSpec(bits=4),
  act=fracq.TensorSpec(bits=8),
)


def test_keep_float_is_bit_identical_outputs_and_grads():
  model = Zoo()
  plain_vars = model.init(jax.random.key(0), X)
  qm = fi.QuantizedModule(model, [fi.keep_float('.*')], RoundProvider())
  q_vars = qm.init(jax.random.key(0), X)
  chex.assert_trees_all_equal(plain_vars, q_vars)

  def loss(p, apply):
    return jnp.sum(apply({'params': p}, X) ** 2)

  out_p = model.apply(plain_vars, X)
  out_q = qm.apply(q_vars, X)
  np.testing.assert_array_equal(out_p, out_q)
  g_p = jax.grad(loss)(plain_vars['params'], model.apply)
  g_q = jax.grad(loss)(q_vars['params'], qm.apply)
  chex.assert_trees_all_equal(g_p, g_q)


def test_params_tree_unchanged_and_quant_collections_created():
  model = Zoo()
  plain = model.init(jax.random.key(0), X)
  qm = fi.QuantizedModule(model, [ALL], RoundProvider())
  v = qm.init(jax.random.key(0), X)
  chex.assert_trees_all_equal(plain['params'], v['params'])
  assert set(v) == {'params', 'quant', 'quant_stats'}
  quantized = {
    'conv',
    'depthwise',
    'deconv',
    'remat_conv',
    'dense_general',
    'einsum',
    'shared',
  }
  assert set(v['quant']) == quantized
  assert all(set(d) == {'kernel_step'} for d in v['quant'].values())


def test_quantization_changes_outputs_as_expected():
  """Dense: the result equals the plain layer applied to a rounded kernel."""
  model = nn.Dense(3)
  x = jnp.arange(8.0).reshape(2, 4) / 7
  qm = fi.QuantizedModule(
    model, [fi.Rule(weight=fracq.TensorSpec(bits=4))], RoundProvider()
  )
  v = qm.init(jax.random.key(1), x)
  k = v['params']['kernel']
  expected = x @ (jnp.round(k / 0.05) * 0.05) + v['params']['bias'][None]
  np.testing.assert_allclose(qm.apply(v, x), expected, rtol=1e-6)
  assert not np.allclose(model.apply(v, x), expected)


def test_foreign_model_matched_layers_and_facts():
  """A model we did not write, with its own (auto) naming."""
  model = ExamplesCNN()
  rules = [
    fi.keep_float(r'^Conv_0$'),
    fracq.fixed_bits(r'Dense_1'),
    fi.Rule(module_path=r'Conv|Dense', weight=fracq.TensorSpec(bits=4)),
  ]
  qm = fi.QuantizedModule(model, rules, RoundProvider())
  facts = qm.layer_facts(X)
  assert list(facts) == ['Conv_0', 'Conv_1', 'Dense_0', 'Dense_1']
  assert (
    facts['Conv_0'].rule_index == 0 and not facts['Conv_0'].weight_quantized
  )
  assert facts['Dense_1'].rule_index == 1 and facts['Dense_1'].act_quantized
  assert facts['Conv_1'].rule_index == 2 and not facts['Conv_1'].act_quantized
  # Hand-counted MACs per example (SAME padding keeps spatial size).
  assert facts['Conv_0'].macs == 8 * 8 * 8 * (3 * 3 * 3)
  assert facts['Conv_0'].numel == 3 * 3 * 3 * 8
  # Grouped: 16 outputs, each sees 3*3*(8/8) inputs, on a 4x4 map.
  assert facts['Conv_1'].kernel_shape == (3, 3, 1, 16)
  assert facts['Conv_1'].macs == 4 * 4 * 16 * 9
  assert facts['Dense_0'].macs == 256 * 32
  assert facts['Dense_1'].macs == 32 * 10
  assert facts['Conv_1'].in_shape == (2, 4, 4, 8)
  assert facts['Conv_1'].out_shape == (2, 4, 4, 16)
  table = qm.summary(X)
  assert 'Conv_1' in table and '4 layers' in table


def test_facts_for_every_layer_type():
  qm = fi.QuantizedModule(Zoo(), [ALL], RoundProvider())
  f = qm.layer_facts(X)
  assert f['deconv'].macs == 8 * 8 * 4 * (2 * 2 * 6)
  assert f['remat_conv'].macs == 16 * 16 * 6 * 6
  # DenseGeneral over 256 tokens: 6 -> (2, 3).
  assert f['dense_general'].out_axes == (1, 2)
  assert f['dense_general'].macs == 256 * 6 * 6
  assert f['einsum'].out_axes == (2,)
  assert f['einsum'].macs == 256 * 5 * 6
  # The shared Dense runs twice: its weight counts once, its MACs twice.
  assert f['shared'].calls == 2 and f['shared'].macs == 2 * 256 * 25
  assert f['shared'].numel == 25


def test_unused_rule_error_and_warning():
  rules = [
    ALL,
    fi.Rule(module_path='no_such_layer', weight=fracq.TensorSpec(bits=4)),
  ]
  with pytest.raises(ValueError, match=r"#1 module_path='no_such_layer'"):
    fi.QuantizedModule(Zoo(), rules, RoundProvider()).init(jax.random.key(0), X)
  # A rule shadowed by an earlier one is unused too.
  with pytest.raises(ValueError, match='first match wins'):
    fi.QuantizedModule(
      Zoo(), [ALL, fi.keep_float('conv')], RoundProvider()
    ).init(jax.random.key(0), X)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    fi.QuantizedModule(Zoo(), rules, RoundProvider(), on_unused='warn').init(
      jax.random.key(0), X
    )
  assert any('matched no layer' in str(x.message) for x in w)


@pytest.mark.parametrize(
  'rule, msg',
  [
    (
      fi.Rule(module_path='(', weight=fracq.TensorSpec()),
      'not a valid regular',
    ),
    (
      fi.Rule(layer_types=('Conv2D',), weight=fracq.TensorSpec()),
      "unknown layer_types \\['Conv2D'\\]",
    ),
    (fi.Rule(layer_types='Conv', weight=fracq.TensorSpec()), 'tuple of names'),
    (fi.Rule(weight=fracq.TensorSpec(bits=3.5)), 'use fracq.FracBitsSpec'),
    (
      fi.Rule(weight=fracq.FracBitsSpec(bits=9)),
      'outside bit_bounds',
    ),
    (fi.Rule(weight=fracq.TensorSpec(range_method='pact')), 'PACT clips'),
    (
      fi.Rule(act=fracq.TensorSpec(range_method='lsq_pluss')),
      "unknown range_method='lsq_pluss'",
    ),
    (
      fi.Rule(act=fracq.FracBitsSpec(bits_per_channel=True)),
      'only supported for',
    ),
    (
      fi.Rule(act=fracq.TensorSpec(granularity='group', group_size=4)),
      "granularity='group' is for weights",
    ),
    (
      fi.Rule(weight=fracq.TensorSpec(granularity='group')),
      'needs group_size',
    ),
    (
      fi.Rule(weight=fracq.TensorSpec(group_size=4)),
      "only used with granularity='group'",
    ),
    (
      fi.Rule(layer_types=('Embed',), act=fracq.TensorSpec()),
      'an act spec on Embed layers',
    ),
    (
      fi.Rule(weight=fracq.TensorSpec(granularity='grp')),
      'unknown granularity',
    ),
    (fi.Rule(keep_float=True, weight=fracq.TensorSpec()), 'contradictory'),
  ],
)
def test_invalid_rules(rule, msg):
  with pytest.raises(ValueError, match=msg):
    fi.QuantizedModule(Zoo(), [rule], RoundProvider())


def test_not_a_rule_and_empty():
  with pytest.raises(ValueError, match='not a fracq.Rule'):
    fi.validate_rules([{'module_path': '.*'}])
  with pytest.raises(ValueError, match='Empty rule list'):
    fi.validate_rules([])


def test_jit_grad_and_stats_collection():
  qm = fi.QuantizedModule(Zoo(), [ALL], RoundProvider())
  v = qm.init(jax.random.key(0), X)

  @jax.jit
  def step(params, quant, stats):
    def loss(p, q):
      out, upd = qm.apply(
        {'params': p, 'quant': q, 'quant_stats': stats},
        X,
        mutable=['quant_stats'],
      )
      return jnp.mean(out**2), upd

    (loss_value, upd), g = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True
    )(params, quant)
    return loss_value, g, upd['quant_stats']

  loss_value, (gp, gq), stats = step(v['params'], v['quant'], v['quant_stats'])
  assert np.isfinite(loss_value)
  # Learned steps receive gradients through the straight-through rounding.
  assert all(np.abs(x['kernel_step']) > 0 for x in gq.values())
  # The shared layer's input was seen twice, the others once.
  assert float(stats['shared']['calls']) == 2
  assert float(stats['conv']['calls']) == 1


def test_shard_map_matches_single_device():
  qm = fi.QuantizedModule(ExamplesCNN(), [ALL], RoundProvider())
  x = jnp.asarray(np.random.RandomState(1).randn(8, 8, 8, 3), jnp.float32)
  v = qm.init(jax.random.key(0), x)
  devices = np.array(jax.devices()[:4])
  mesh = Mesh(devices, ('batch',))

  def per_device(v, xb):
    g = jax.grad(lambda p: jnp.sum(qm.apply({**v, 'params': p}, xb) ** 2))(
      v['params']
    )
    return jax.lax.psum(g, 'batch')

  # Classic pmap semantics (no automatic psum of replicated-input grads).
  f = jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P('batch')),
      out_specs=P(),
      check_vma=False,
    )
  )
  g_sharded = f(v, x)
  g_single = jax.grad(lambda p: jnp.sum(qm.apply({**v, 'params': p}, x) ** 2))(
    v['params']
  )
  chex.assert_trees_all_close(g_sharded, g_single, rtol=1e-5, atol=1e-6)


class ScanStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, c, _):
        return nn.relu(nn.Dense(4, name='fc')(c)), None

    Stack = nn.scan(
      Block,
      variable_axes={'params': 0, 'quant': 0},
      split_rngs={'params': True},
      length=3,
    )
    x, _ = Stack(name='stack')(x, None)
    return x


def test_scan_wrapped_layers():
  x = jnp.ones((2, 4))
  qm = fi.QuantizedModule(
    ScanStack(), [fi.Rule(weight=fracq.TensorSpec())], RoundProvider()
  )
  v = qm.init(jax.random.key(0), x)
  assert v['quant']['stack']['fc']['kernel_step'].shape == (3,)
  assert v['params']['stack']['fc']['kernel'].shape == (3, 4, 4)
  out = qm.apply(v, x)
  ref_vars = jax.tree_util.tree_map(lambda k: k, {'params': v['params']})
  # Reference: round the stacked kernels by hand and run the plain model.
  ref_vars['params']['stack']['fc']['kernel'] = (
    jnp.round(v['params']['stack']['fc']['kernel'] / 0.05) * 0.05
  )
  np.testing.assert_allclose(out, ScanStack().apply(ref_vars, x), rtol=1e-6)


def test_nesting_with_foreign_interceptor():
  calls = []

  def spy(next_fun, args, kwargs, context):
    calls.append(context.module.name)
    return next_fun(*args, **kwargs)

  qm = fi.QuantizedModule(ExamplesCNN(), [ALL], RoundProvider())
  v = qm.init(jax.random.key(0), X)
  with nn.intercept_methods(spy):
    out = qm.apply(v, X)
  assert 'Dense_1' in calls
  np.testing.assert_array_equal(out, qm.apply(v, X))
  # Outside the transform's scope nothing is intercepted.
  plain = ExamplesCNN().apply({'params': v['params']}, X)
  assert not np.array_equal(plain, out)


def test_threads_each_see_only_their_own_transform():
  """Interception is thread-local: two threads quantizing the same model
  with different providers concurrently get their own results."""
  import threading

  class Scale:
    def __init__(self, f):
      self.f = f

    def quantize_kernel(self, site, k):
      return k * self.f

    def quantize_input(self, site, x):
      return x

  model = ExamplesCNN()
  v = model.init(jax.random.key(0), X)
  qa = fi.QuantizedModule(
    model, [fi.Rule(weight=fracq.TensorSpec())], Scale(2.0)
  )
  qb = fi.QuantizedModule(
    model, [fi.Rule(weight=fracq.TensorSpec())], Scale(0.0)
  )
  want_a, want_b = qa.apply(v, X), qb.apply(v, X)
  got, errors = {}, []
  barrier = threading.Barrier(2)

  def run(name, qm):
    try:
      barrier.wait()
      for _ in range(5):
        got.setdefault(name, []).append(np.asarray(qm.apply(v, X)))
    except Exception as e:  # pragma: no cover
      errors.append(e)

  ts = [
    threading.Thread(target=run, args=(n, q)) for n, q in (('a', qa), ('b', qb))
  ]
  for t in ts:
    t.start()
  for t in ts:
    t.join()
  assert not errors
  for out in got['a']:
    np.testing.assert_array_equal(out, want_a)
  for out in got['b']:
    np.testing.assert_array_equal(out, want_b)


class ScaleTwiceProvider:
  """Test provider with the optional hooks: runs each Dense twice (a float
  pass, then one with a doubled kernel and no bias), logs module calls."""

  layer_types = ('Dense',)

  def __init__(self):
    self.modules = []

  def call_module(self, call):
    self.modules.append((call.path, call.kind))
    return call.proceed(*call.args, **call.kwargs)

  def call_layer(self, call):
    first = call.run()
    second = call.run(lambda x, k, b: (x, 2.0 * k, None))
    return first + second


class DenseBN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name='conv')(x).reshape((x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=True, name='bn')(x)
    return nn.Dense(3, name='fc')(x)


def test_optional_provider_hooks():
  model = DenseBN()
  provider = ScaleTwiceProvider()
  qm = fi.QuantizedModule(model, [fi.Rule()], provider)
  v = qm.init(jax.random.key(0), X)
  assert v['params'].keys() == {'conv', 'bn', 'fc'}
  assert ('bn', 'BatchNorm') in provider.modules
  assert ('', 'module') in provider.modules  # the model itself
  out = qm.apply(v, X)
  # fc runs twice: x W + b, then x (2W) without bias; conv (not in
  # layer_types) runs float.
  p = v['params']
  h = nn.Conv(4, (3, 3)).apply({'params': p['conv']}, X).reshape((2, -1))
  h = nn.BatchNorm(use_running_average=True).apply(
    {'params': p['bn'], 'batch_stats': v['batch_stats']['bn']}, h
  )
  want = h @ (3 * p['fc']['kernel']) + p['fc']['bias'][None]
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  facts = qm.layer_facts(X)
  assert facts['fc'].kernel_shape == p['fc']['kernel'].shape
