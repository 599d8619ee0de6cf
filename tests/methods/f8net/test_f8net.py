"""F8Net transform: folding equals the float model, formats follow the rule."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import export
from fracq import models
from fracq.data import digits
from fracq.methods.f8net import F8NetModel, F8NetOptions
from fracq.methods.f8net.options import f8net_rules
from tests import helpers


@pytest.fixture(scope='module')
def data():
  xtr, _, xte, _ = digits.load_digits_split()
  return jnp.asarray(xtr[:64]), jnp.asarray(xte[:48])


def test_folded_float_model_equals_unfolded(data):
  x, xe = data
  m = models.get_model('digits_cnn')
  v = helpers.warm_batch_stats(m, x)
  f8 = F8NetModel(m, x, options=F8NetOptions(simulate=False))
  assert set(f8.pairs) == {'conv_init', 'conv1', 'conv2', 'conv3', 'conv4'}
  assert f8.unfolded == {}
  vf = {
    **f8.init(jax.random.key(1), x),
    'params': v['params'],
    'batch_stats': v['batch_stats'],
  }
  # Eval: running statistics folded into the kernels.
  np.testing.assert_allclose(
    f8.apply(vf, xe, train=False),
    m.apply(v, xe, train=False),
    rtol=2e-4,
    atol=2e-4,
  )
  # Training: batch statistics folded; running averages updated identically.
  out_f, upd_f = f8.apply(
    vf, x, train=True, mutable=['batch_stats', 'quant_stats']
  )
  out_m, upd_m = m.apply(v, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(out_f, out_m, rtol=2e-4, atol=2e-4)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    upd_f['batch_stats'],
    upd_m['batch_stats'],
  )


def test_weight_formats_follow_the_rule_on_the_folded_kernel(data):
  """Second implementation in numpy: fold, FL = floor(log2(40 / std)), codes."""
  x, xe = data
  m = models.get_model('digits_cnn')
  v = helpers.warm_batch_stats(m, x)
  f8 = F8NetModel(m, x)
  v = {
    **f8.init(jax.random.key(1), x),
    'params': v['params'],
    'batch_stats': v['batch_stats'],
  }
  v = f8.calibrate(v, xe)
  recs = {r.path: r for r in f8.capture(v, xe[:4])}
  for conv, bn in f8.pairs.items():
    w = np.asarray(v['params'][conv]['kernel'], np.float64)
    p, s = v['params'][bn], v['batch_stats'][bn]
    g = np.asarray(p['scale'], np.float64) / np.sqrt(
      np.asarray(s['var'], np.float64) + 1e-5
    )
    wf = w * g
    fl = min(max(math.floor(math.log2(40.0 / wf.std())), 0), 15)
    assert int(recs[conv].weight_fl) == fl, conv
    codes = np.clip(np.round(wf * 2.0**fl), -127, 127)
    mism = np.mean(codes != recs[conv].kernel_codes)
    assert mism < 1e-3, (conv, mism)  # float32 vs float64 ties only
    bias = np.asarray(p['bias']) - np.asarray(s['mean']) * g
    S = recs[conv].input_fl + fl
    bcodes = np.round(bias * 2.0**S)
    assert np.max(np.abs(bcodes - recs[conv].bias_codes)) <= 1


def test_activation_fl_ema_and_eval_rounding(data):
  x, _ = data
  m = models.get_model('digits_cnn')
  f8 = F8NetModel(m, x)
  v = f8.init(jax.random.key(0), x)
  ema0 = float(v['quant_stats']['conv1']['input_fl_ema'])
  _, upd = f8.apply(
    v, x * 3.0, train=True, mutable=['batch_stats', 'quant_stats']
  )
  ema1 = float(upd['quant_stats']['conv1']['input_fl_ema'])
  assert ema1 != ema0
  # ema1 = 0.9 ema0 + 0.1 batch_fl with an integer batch FL in the FL range.
  batch_fl = (ema1 - 0.9 * ema0) / 0.1
  assert abs(batch_fl - round(batch_fl)) < 1e-4 and 0 <= round(batch_fl) <= 8
  # Eval uses round(ema): the captured input FL.
  v2 = {**v, **upd}
  rec = {r.path: r for r in f8.capture(v2, x[:2])}
  assert rec['conv1'].input_fl == int(np.clip(np.round(ema1), 0, 8))
  assert rec['conv_init'].signed_input  # normalised images are signed
  assert not rec['conv1'].signed_input  # post-ReLU inputs are unsigned


class _PreAct(nn.Module):
  """A BN after a residual add (pre-activation style): not foldable."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), name='conv0')(x)
    x = x + nn.Conv(8, (3, 3), name='conv1')(nn.relu(x))
    y = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn')(x))
    return nn.Dense(10, name='head')(jnp.mean(y, axis=(1, 2)))


def test_unfoldable_batchnorm_is_explained(data):
  x, _ = data
  f8 = F8NetModel(_PreAct(), x)
  assert f8.pairs == {}
  assert 'not the direct output' in f8.unfolded['bn']
  assert 'unfolded bn' in f8.report({}, None, 0)
  v = f8.init(jax.random.key(0), x)
  out = f8.apply(v, x, train=False)
  assert out.shape == (x.shape[0], 10) and bool(jnp.all(jnp.isfinite(out)))
  with pytest.raises(ValueError, match='folded'):
    export.lower_f8net(f8, v, x)


def test_bad_options_are_clear():
  with pytest.raises(ValueError, match="'std'"):
    F8NetOptions(weight_format='minmax')
  with pytest.raises(ValueError, match='momentum'):
    F8NetOptions(momentum=0.0)
  with pytest.raises(ValueError, match='no nn.Conv'):
    F8NetModel(
      models.get_model('digits_cnn'),
      jnp.zeros((1, 8, 8, 1)),
      options=F8NetOptions(keep_float='.*'),
    )
  with pytest.raises(ValueError, match='not a valid regular'):
    F8NetOptions(keep_float='(')


def test_keep_float_rule_is_honoured(data):
  """Layers come from Rules, as for every method; the old option is the
  same keep_float rule."""
  x, _ = data
  m = models.get_model('digits_cnn')
  rules = [fracq.keep_float(r'^conv2$'), fracq.Rule(module_path='.*')]
  f8 = F8NetModel(m, x[:4], rules=rules)
  assert f8.order == ['conv_init', 'conv1', 'conv3', 'conv4', 'head']
  assert 'conv2' not in f8.pairs and 'not the direct output' in str(f8.unfolded)
  v = f8.init(jax.random.key(0), x[:4])
  assert 'conv2' not in v['quant_stats'] and 'conv3' in v['quant_stats']
  # The option's spelling is the same rule, placed first.
  legacy = f8net_rules(None, F8NetOptions(keep_float=r'^conv2$'))
  assert [(r.module_path, r.keep_float) for r in legacy] == [
    (r'^conv2$', True),
    ('.*', False),
  ]
  # Rules restricted by layer type: only the head (Dense) is quantized.
  head = F8NetModel(m, x[:4], rules=[fracq.Rule(layer_types=('Dense',))])
  assert head.order == ['head'] and head.pairs == {}


def test_bad_rules_are_clear(data):
  x, _ = data
  m = models.get_model('digits_cnn')
  with pytest.raises(
    ValueError, match=r"matched no layer: #0 module_path='nope"
  ):
    F8NetModel(m, x[:4], rules=[fracq.keep_float('nope'), fracq.Rule()])
  with pytest.warns(UserWarning, match='matched no layer'):
    F8NetModel(
      m,
      x[:4],
      rules=[fracq.keep_float('nope'), fracq.Rule()],
      on_unused='warn',
    )
  with pytest.raises(ValueError, match='no weight/act TensorSpec'):
    F8NetModel(m, x[:4], rules=[fracq.Rule(weight=fracq.TensorSpec(bits=4))])
  with pytest.raises(ValueError, match='Einsum'):
    F8NetModel(m, x[:4], rules=[fracq.Rule(layer_types=('Conv', 'Einsum'))])


@pytest.mark.parametrize('fmt', ['std', 'grid'])
def test_activation_format_uses_the_global_batch(fmt):
  """Under data parallelism every replica picks the global batch's FL."""
  from jax.sharding import Mesh, PartitionSpec as P
  from fracq.methods.f8net import provider as f8provider

  n = jax.device_count()
  rng = np.random.RandomState(0)
  # Shard i has scale 2^i: local FLs all differ, the global one is unique.
  x = np.concatenate([rng.randn(4, 16) * 2.0**i for i in range(n)])
  x = jnp.asarray(x, jnp.float32)
  want = f8provider.fl_of(x, True, fmt, (0, 7))
  mesh = Mesh(np.array(jax.devices()), ('batch',))
  fn = jax.jit(
    jax.shard_map(
      lambda a: f8provider.fl_of(a, True, fmt, (0, 7), axis_name='batch')[None],
      mesh=mesh,
      in_specs=P('batch'),
      out_specs=P('batch'),
      check_vma=False,
    )
  )
  got = np.asarray(fn(x))
  local = [
    int(f8provider.fl_of(x[4 * i : 4 * i + 4], True, fmt, (0, 7)))
    for i in range(n)
  ]
  assert len(set(local)) > 1  # the test would catch per-replica formats
  np.testing.assert_array_equal(got, np.full(n, int(want)))
