"""Fixed-point PACT in F8Net: clips folded into the producing layer.

The reference is a second implementation of PACT's semantics on the plain
model: an interceptor that clips each reader layer's input at its producer's
alpha, ``min(x, alpha)`` (the input is a ReLU output, so this is
``clip(x, 0, alpha)``). F8Net never applies alpha; it divides the producer's
kernel and bias by it and multiplies the reader's kernel by it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fracq import export
from fracq import models
from fracq.data import digits
from fracq.methods.f8net import F8NetModel, F8NetOptions
from tests import helpers

DIGITS_LINKS = {
  'conv1': 'conv_init',
  'conv2': 'conv1',
  'conv3': 'conv2',
  'conv4': 'conv3',
  'head': 'conv4',
}
# resnet_tiny: stem -> identity block -> projection block -> pool -> fc. The
# stem's output, the identity block's input and its add's output share one
# clip (owned by the stem); the projection block's add output has its own
# (owned by its first branch conv); each block's inner conv1 -> conv2 link
# has one.
TINY_READERS = {
  'stage1_block0/conv1': 'conv_init',
  'stage1_block0/conv2': 'stage1_block0/conv1',
  'stage2_block0/conv1': 'conv_init',
  'stage2_block0/downsample_conv': 'conv_init',
  'stage2_block0/conv2': 'stage2_block0/conv1',
  'fc': 'stage2_block0/conv2',
}
TINY_PRODUCERS = {
  'conv_init': 'conv_init',
  'stage1_block0/conv2': 'conv_init',
  'stage1_block0/conv1': 'stage1_block0/conv1',
  'stage2_block0/conv1': 'stage2_block0/conv1',
  'stage2_block0/conv2': 'stage2_block0/conv2',
  'stage2_block0/downsample_conv': 'stage2_block0/conv2',
}
TINY_ENTRIES = {'stage1_block0': 'conv_init', 'stage2_block0': 'conv_init'}


@pytest.fixture(scope='module')
def data():
  xtr, ytr, xte, yte = digits.load_digits_split()
  return (
    jnp.asarray(xtr[:128]),
    jnp.asarray(ytr[:128]),
    jnp.asarray(xte),
    np.asarray(yte),
  )


def _clips(quant):
  """{owner path: alpha} of a ``quant`` collection."""
  flat = jax.tree_util.tree_leaves_with_path(quant)
  return {
    '/'.join(k.key for k in kp[:-1]): a
    for kp, a in flat
    if kp[-1].key == 'pact_alpha'
  }


def _nest(clips):
  """The ``quant`` collection holding ``clips`` ({owner path: alpha})."""
  out = {}
  for path, a in clips.items():
    node = out
    for p in path.split('/'):
      node = node.setdefault(p, {})
    node['pact_alpha'] = jnp.float32(a)
  return out


def _reference(module, v, x, alphas, links, train=False):
  """The plain model with the input of every module in ``links`` (reader
  layers, residual blocks) clipped at its group's alpha."""

  def icpt(next_fun, args, kwargs, context):
    path = '/'.join(context.module.path)
    if context.method_name == '__call__' and path in links:
      args = (jnp.minimum(args[0], alphas[links[path]]),) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(icpt):
    if train:
      return module.apply(v, x, train=True, mutable=['batch_stats'])[0]
    return module.apply(v, x, train=False)


def test_links_and_unclipped_model_equals_the_original(data):
  x, _, xe, _ = data
  m = models.get_model('digits_cnn')
  v = helpers.warm_batch_stats(m, x)
  f8 = F8NetModel(
    m, x, options=F8NetOptions(simulate=False, pact=True, pact_init=1e4)
  )
  assert f8.pact_src == DIGITS_LINKS
  init = f8.init(jax.random.key(1), x)
  # The clips are trainable, outside 'params' (a float checkpoint's params
  # and BN statistics initialise the rest).
  assert f8.trainable_collections == ('params', 'quant')
  assert sorted(init['quant']) == sorted(DIGITS_LINKS.values())
  assert set(init['params']) == set(v['params'])
  vf = {**init, 'params': v['params'], 'batch_stats': v['batch_stats']}
  # A clip far above every activation: the folded model is the float one.
  f8_eval = jax.jit(lambda v_, x_: f8.apply(v_, x_, train=False))
  np.testing.assert_allclose(
    f8_eval(vf, xe), m.apply(v, xe, train=False), rtol=2e-4, atol=2e-4
  )


@pytest.mark.parametrize(
  'name,train',
  [
    ('digits_cnn', False),
    ('digits_cnn', True),
    ('resnet_tiny', False),
    ('resnet_tiny', True),
  ],
)
def test_clipped_model_and_alpha_gradient_equal_pact(data, name, train):
  x, y, _, _ = data
  m = models.get_model(name, num_classes=10)
  v = helpers.warm_batch_stats(m, x)
  f8 = F8NetModel(m, x, options=F8NetOptions(simulate=False, pact=True))
  if name == 'digits_cnn':
    assert f8.pact_src == DIGITS_LINKS and not f8.pact_entry
  else:
    assert f8.pact_src == TINY_READERS and f8.pact_out == TINY_PRODUCERS
    assert f8.pact_entry == TINY_ENTRIES
  links = {**f8.pact_src, **f8.pact_entry}
  init = f8.init(jax.random.key(1), x)
  # Clips at half of each group's largest input: many entries clipped.
  seen = {}

  def icpt(next_fun, args, kwargs, context):
    path = '/'.join(context.module.path)
    if context.method_name == '__call__' and path in links:
      g = links[path]
      seen[g] = max(seen.get(g, 0.0), float(jnp.max(args[0])))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(icpt):
    m.apply(v, x, train=False)
  alphas = {p: 0.5 * mx for p, mx in seen.items()}
  assert sorted(alphas) == sorted(_clips(init['quant']))
  assert min(alphas.values()) > 0
  quant = _nest(alphas)
  rest = {k: val for k, val in init.items() if k not in ('params', 'quant')}
  rest['batch_stats'] = v['batch_stats']

  def f8_loss(q):
    out = f8.apply(
      {'params': v['params'], 'quant': q, **rest},
      x,
      train=train,
      mutable=['batch_stats', 'quant_stats'] if train else False,
    )
    out = out[0] if train else out
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  def ref_loss(al):
    out = _reference(m, v, x, al, links, train=train)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

  al = {p: jnp.float32(a) for p, a in alphas.items()}
  f8_vg, ref_vg = (jax.jit(jax.value_and_grad(f)) for f in (f8_loss, ref_loss))
  (l8, g), (lr, g_ref) = f8_vg(quant), ref_vg(al)
  np.testing.assert_allclose(l8, lr, rtol=1e-4)
  g = _clips(g)
  for p in alphas:
    assert abs(float(g_ref[p])) > 1e-5, p  # the clips are active
    np.testing.assert_allclose(g[p], g_ref[p], rtol=2e-3, atol=1e-6)
  # The reference is really clipping: without the clips the loss differs.
  plain = optax.softmax_cross_entropy_with_integer_labels(
    m.apply(v, x, train=False), y
  ).mean()
  assert abs(float(lr) - float(plain)) > 1e-4


def test_pact_integer_program_is_bit_exact_on_digits(data, tmp_path):
  x, y, xe, _ = data
  opts = F8NetOptions(pact=True, pact_init=1.5)
  w, v, g = helpers.train_f8(models.get_model('digits_cnn'), x, y, opts)
  # alpha trains (PACT's gradient from the clipped entries).
  assert any(
    abs(float(g['quant'][p]['pact_alpha'])) > 0 for p in DIGITS_LINKS.values()
  )
  assert any(
    float(v['quant'][p]['pact_alpha']) != 1.5 for p in DIGITS_LINKS.values()
  )
  prog = export.lower_f8net(w, v, xe)  # verify=True: raises unless bit-exact
  np.testing.assert_array_equal(
    np.asarray(prog.logits(xe)), np.asarray(w.apply(v, xe, train=False))
  )
  # The clip is the requantization clamp min(255, 2^FL) of the producer.
  recs = {r.path: r for r in w.capture(v, xe[:1])}
  for layer in prog.layers[:-1]:
    reader = [r for r, p in DIGITS_LINKS.items() if p == layer.path][0]
    assert layer.out_range == (0, min(255, 2 ** recs[reader].input_fl))
  assert any(layer.out_range[1] < 255 for layer in prog.layers[:-1])
  # ... and the program round-trips through its artifact.
  path = str(tmp_path / 'pact.int.safetensors')
  export.save_program(prog, path)
  np.testing.assert_array_equal(
    np.asarray(export.load_program(path).logits(xe)),
    np.asarray(prog.logits(xe)),
  )
  assert 'clip' in w.report(v, None, 0).splitlines()[0]


def test_pact_in_residual_blocks_is_bit_exact(data):
  """resnet_tiny: clips on the block links and on the residual trunk (block
  inputs, shortcuts and adds) lower to shifts and clamps, bit for bit."""
  x, y, xe, _ = data
  opts = F8NetOptions(pact=True, pact_init=2.0)
  w, v, _ = helpers.train_f8(
    models.get_model('resnet_tiny', num_classes=10), x, y, opts, steps=4
  )
  assert w.pact_src == TINY_READERS and w.pact_entry == TINY_ENTRIES
  prog = export.lower_f8net(w, v, xe)
  assert export.is_graph(prog)
  np.testing.assert_array_equal(
    np.asarray(prog.logits(xe)), np.asarray(w.apply(v, xe, train=False))
  )
  # The adds requantize to the trunk's clipped range too.
  adds = [op for op in prog.layers if isinstance(op, export.IntAdd)]
  assert any(op.out_range[1] < 255 for op in adds + prog.layers[:1])


def test_pact_errors_are_clear(data):
  x = data[0]
  with pytest.raises(ValueError, match='pact_init'):
    F8NetOptions(pact=True, pact_init=0.0)

  class OneDense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      del train
      return nn.Dense(10)(x.reshape((x.shape[0], -1)))

  with pytest.raises(ValueError, match='nothing to clip'):
    F8NetModel(OneDense(), x, options=F8NetOptions(pact=True))
  # ReLU6 links cannot take a folded clip: refused, not silently wrong.
  x3 = jnp.tile(x[:4], (1, 4, 4, 3))
  with pytest.raises(ValueError, match='ReLU6'):
    F8NetModel(
      models.get_model('mobilenet_v2_tiny', num_classes=10),
      x3,
      options=F8NetOptions(pact=True),
    )


def test_pact_finetunes_from_a_float_checkpoint(tmp_path):
  """The clips live in the trainable ``quant`` collection: a float run's
  ``params`` and ``batch_stats`` initialise the model (init_from), the clips
  start at pact_init and train."""
  import importlib
  from fracq.train import checkpoint as ckpt_lib
  from fracq.train import train as tr

  get = lambda n, a: importlib.import_module(f'configs.{n}').get_config(a)
  fl = get('digits_float', 'smoke')
  tr.train_and_evaluate(fl, str(tmp_path / 'float'))
  c = get('digits_f8net', 'smoke,pact=True')
  c.init_from = str(tmp_path / 'float')
  m = tr.train_and_evaluate(c, str(tmp_path / 'f8'))
  assert np.isfinite(m['eval_loss'])
  raw = ckpt_lib.restore_raw(str(tmp_path / 'f8'))
  clips = {
    p: float(n['pact_alpha']) for p, n in raw['trainable']['quant'].items()
  }
  assert sorted(clips) == sorted(DIGITS_LINKS.values())
  assert any(a != c.quant.f8net.pact_init for a in clips.values())
