"""Quantized attention matmuls: ``Rule(attention=TensorSpec(...))`` fake-
quantizes both operands of ``q . k^T`` and ``probs . v`` inside
``nn.MultiHeadDotProductAttention``; checked against a numpy attention
written out by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common as configs_common
import fracq
from fracq import export
from fracq import models
from fracq.interception import ATTENTION
from fracq.methods import context as context_lib
from fracq.methods.uniform import factory as uniform_factory
from fracq.train import quant_config

HEADS, HEAD_DIM, WIDTH, LENGTH = 2, 4, 8, 5
OPERANDS = ('query', 'key', 'probs', 'value')


class Attention(nn.Module):
  """One causal self-attention module (``attn``) over ``(batch, length,
  width)``."""

  precision: jax.lax.Precision | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout
    return nn.MultiHeadDotProductAttention(
      num_heads=HEADS, precision=self.precision, name='attn'
    )(x, mask=nn.make_causal_mask(x[..., 0]))


def _inputs():
  rng = np.random.RandomState(0)
  x = rng.normal(size=(2, LENGTH, WIDTH)).astype(np.float32)
  causal = np.tril(np.ones((LENGTH, LENGTH), bool))[None, None]
  return x, np.broadcast_to(causal, (2, 1, LENGTH, LENGTH))


def _fake_quant(x, step, qmin, qmax):
  """LSQ's forward: the step times the clipped, rounded codes."""
  return np.clip(np.round(x / step), qmin, qmax) * step


def _reference(params, steps, x, mask, bits):
  """Multi-head attention in numpy with the operands of both matmuls
  fake-quantized: query, key, value on the signed grid, probabilities on
  the unsigned one (activation grids are full range)."""
  signed = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
  unsigned = (0, 2**bits - 1)

  def project(name, inputs):
    layer = params[name]
    return np.einsum('bld,dhk->blhk', inputs, layer['kernel']) + layer['bias']

  query = project('query', x) / np.sqrt(HEAD_DIM)
  key, value = project('key', x), project('value', x)
  query = _fake_quant(query, steps['query'], *signed)
  key = _fake_quant(key, steps['key'], *signed)
  logits = np.einsum('bqhd,bkhd->bhqk', query, key)
  logits = np.where(mask, logits, np.finfo(np.float32).min)
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  probs = _fake_quant(probs, steps['probs'], *unsigned)
  value = _fake_quant(value, steps['value'], *signed)
  heads = np.einsum('bhqk,bkhd->bqhd', probs, value)
  out = params['out']
  return np.einsum('bqhd,hdf->bqf', heads, out['kernel']) + out['bias']


@pytest.mark.parametrize('bits', [4, 8])
def test_quantized_attention_equals_a_numpy_reference(bits):
  x, mask = _inputs()
  rule = fracq.Rule(module_path='attn$', attention=fracq.TensorSpec(bits=bits))
  qm = fracq.quantize(Attention(), [rule], x)
  variables = qm.init(jax.random.key(0), x)
  # Hand-picked steps, coarse enough that quantization moves the output.
  steps = {'query': 0.11, 'key': 0.13, 'probs': 1 / 7, 'value': 0.17}
  quant = dict(variables['quant']['attn'])
  assert set(quant) == {f'{name}_step' for name in OPERANDS}
  quant.update({f'{n}_step': jnp.float32(s) for n, s in steps.items()})
  variables = {**variables, 'quant': {'attn': quant}}
  out = qm.apply(variables, x)
  params = jax.tree_util.tree_map(np.asarray, variables['params']['attn'])
  expected = _reference(params, steps, x, mask, bits)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # The quantization is visible: the float attention differs.
  float_out = Attention().apply({'params': variables['params']}, x)
  assert np.max(np.abs(out - float_out)) > 1e-3
  facts = qm.attention_facts['attn']
  assert facts.quantized and facts.query_shape == (2, LENGTH, HEADS, HEAD_DIM)
  # Per example: heads * q_len * kv_len * (qk depth + v depth).
  assert facts.macs == HEADS * LENGTH * LENGTH * 2 * HEAD_DIM


def test_calibration_starts_every_range_at_lsq_initial_step():
  x, mask = _inputs()
  rule = fracq.Rule(module_path='attn$', attention=fracq.TensorSpec(bits=8))
  qm = fracq.quantize(Attention(), [rule], x)
  variables = qm.calibrate(qm.init(jax.random.key(0), x), x)
  steps = variables['quant']['attn']
  params = jax.tree_util.tree_map(np.asarray, variables['params']['attn'])
  # LSQ's 2 mean|x| / sqrt(Qp), on each operand as the model computes it:
  # the probabilities come from the quantized query and key.
  expected = {}

  def lsq(name, value, qmax):
    expected[name] = 2 * np.mean(np.abs(value)) / np.sqrt(qmax)
    return _fake_quant(value, expected[name], -qmax - 1, qmax)

  def project(name):
    layer = params[name]
    return np.einsum('bld,dhk->blhk', x, layer['kernel']) + layer['bias']

  query = lsq('query', project('query') / np.sqrt(HEAD_DIM), 127)
  key = lsq('key', project('key'), 127)
  logits = np.einsum('bqhd,bkhd->bhqk', query, key)
  logits = np.where(mask, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  expected['probs'] = 2 * np.mean(probs / probs.sum(-1, keepdims=True))
  expected['probs'] /= np.sqrt(255)
  expected['value'] = 2 * np.mean(np.abs(project('value'))) / np.sqrt(127)
  for name in OPERANDS:
    np.testing.assert_allclose(
      steps[f'{name}_step'], expected[name], rtol=1e-5, err_msg=name
    )


def test_observed_probabilities_span_the_whole_unsigned_grid():
  x, _ = _inputs()
  spec = fracq.TensorSpec(bits=8, range_method='minmax')
  qm = fracq.quantize(Attention(), [fracq.Rule(attention=spec)], x)
  variables = qm.init(jax.random.key(0), x)
  frozen = export.freeze_attention(qm, variables)['attn']
  # The first query attends to one key only: its probability is exactly 1,
  # the observed maximum; with the zero point at 0, [0, 1] covers codes
  # 0..255 (a symmetric unsigned grid would waste the lower half).
  probs = frozen['probs']
  assert (probs['max'], probs['qmin'], probs['qmax']) == ([1.0], 0, 255)
  assert probs['scale'] == [pytest.approx(1 / 255)]
  assert 'zero_point' not in probs
  # Query, key and value keep the symmetric signed grid of the spec.
  query = frozen['query']
  assert 'zero_point' not in query and query['qmin'] == -128
  amax = max(-query['min'][0], query['max'][0])
  assert query['scale'] == [pytest.approx(amax / 127.5)]


def test_gradients_reach_every_attention_range():
  x, _ = _inputs()
  rule = fracq.Rule(module_path='attn$', attention=fracq.TensorSpec(bits=4))
  qm = fracq.quantize(Attention(), [rule], x)
  variables = qm.init(jax.random.key(0), x)

  def loss(quant):
    out = qm.apply({**variables, 'quant': quant}, x)
    return jnp.sum(out**2)

  grads = jax.jit(jax.grad(loss))(variables['quant'])['attn']
  for name in OPERANDS:
    assert np.isfinite(grads[f'{name}_step']) and grads[f'{name}_step'] != 0


def test_attention_only_rule_leaves_the_projections_to_the_layer_rules():
  x, _ = _inputs()
  rules = [
    fracq.Rule(module_path='attn', attention=fracq.TensorSpec(bits=8)),
    fracq.Rule(weight=fracq.TensorSpec(bits=4)),
  ]
  qm = fracq.quantize(Attention(), rules, x)
  # 'attn' is also in 'attn/query', but a rule whose only spec is attention
  # claims attention modules alone.
  assert {f.rule_index for f in qm.facts.values()} == {1}
  assert set(qm.facts) == {
    f'attn/{n}' for n in ('query', 'key', 'value', 'out')
  }
  assert qm.attention_facts['attn'].rule_index == 0
  # A keep_float rule first keeps the attention float.
  rules = [fracq.keep_float('attn$'), *rules]
  with pytest.warns(UserWarning, match="#1 module_path='attn'"):
    qm = fracq.quantize(Attention(), rules, x, on_unused='warn')
    variables = qm.init(jax.random.key(0), x)
  assert not any(k.endswith('_step') for k in variables['quant']['attn'])
  assert not qm.attention_facts['attn'].quantized


def test_the_lm_config_switch_quantizes_every_attention_module():
  c = configs_common.text_config(0)
  configs_common.text_quant(c, 'uniform', attention=6, weight_bits=4.0)
  context = quant_config.context_from_config(c.quant)
  assert (context.attention_layers, context.attention_bits) == ('attn$', 6)
  assert context.attention_range == 'minmax'
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  qm = uniform_factory.uniform(
    models.get_model('gpt_tiny', max_len=8),
    tokens,
    context=context,
    **c.quant.uniform.to_dict(),
  )
  # First (after float layers): an attention-only rule at 6 bits.
  assert qm.rules[0].attention == fracq.TensorSpec(
    bits=6, range_method='minmax'
  )
  assert set(qm.attention_facts) == {'block_0/attn', 'block_1/attn'}
  assert all(f.quantized for f in qm.attention_facts.values())
  # The projections are quantized by the default rule, as without it.
  assert qm.facts['block_0/attn/query'].rule == 'default'
  # Without a range method of their own: the activations'.
  c.quant.layers.attention_range = ''
  context = quant_config.context_from_config(c.quant)
  act = fracq.TensorSpec(bits=8, range_method='percentile')
  rules = context_lib.standard_rules(context, fracq.TensorSpec(bits=4), act)
  assert rules[0].attention == fracq.TensorSpec(
    bits=6, range_method='percentile'
  )


def test_rules_that_match_no_attention_module_error_clearly():
  x, _ = _inputs()
  rule = fracq.Rule(module_path='^mlp$', attention=fracq.TensorSpec(bits=8))
  with pytest.raises(ValueError, match='matched no layer.*attention spec'):
    fracq.quantize(Attention(), [rule], x)
  tokens = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match='MultiHeadDotProductAttention'):
    fracq.quantize(
      nn.Embed(16, 4),
      [rule, fracq.Rule(layer_types=('Embed',), weight=fracq.TensorSpec())],
      tokens,
    )


@pytest.mark.parametrize(
  'rule,message',
  [
    (
      fracq.Rule(attention=fracq.FracBitsSpec(bits=4.0)),
      'attention matmuls run at fixed bits',
    ),
    (
      fracq.Rule(attention=fracq.TensorSpec(granularity='channel')),
      "granularity='tensor'",
    ),
    (
      fracq.Rule(attention=fracq.TensorSpec(signed=True)),
      'drop signed',
    ),
    (
      fracq.Rule(layer_types=('Dense',), attention=fracq.TensorSpec()),
      "add 'Attention' to layer_types",
    ),
    (
      fracq.Rule(layer_types=(ATTENTION,), weight=fracq.TensorSpec()),
      'no kernel of its own',
    ),
    (
      fracq.Rule(keep_float=True, attention=fracq.TensorSpec()),
      'contradictory',
    ),
  ],
)
def test_bad_attention_rules_are_refused(rule, message):
  with pytest.raises(ValueError, match=message):
    fracq.interception.validate_rules([rule])


def test_an_attention_module_the_hooks_cannot_quantize_is_refused():
  x, _ = _inputs()
  rule = fracq.Rule(attention=fracq.TensorSpec(bits=8))
  with pytest.raises(ValueError, match='drop precision'):
    fracq.quantize(Attention(precision=jax.lax.Precision.HIGHEST), [rule], x)


def _train(qm, variables, batches, loss_fn, steps=3):
  optimizer = optax.adam(1e-2)
  trainable = {k: variables[k] for k in ('params', 'quant')}
  state = optimizer.init(trainable)

  @jax.jit
  def step(trainable, state, batch):
    def loss(t):
      return loss_fn(qm.apply({**variables, **t}, batch['x']), batch)

    value, grads = jax.value_and_grad(loss)(trainable)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(trainable, updates), state, value

  losses = []
  for _ in range(steps):
    trainable, state, value = step(trainable, state, batches)
    losses.append(float(value))
  return {**variables, **trainable}, losses


def test_tiny_gpt_trains_under_fracbits_and_exports(tmp_path):
  tokens = jnp.asarray(
    np.random.RandomState(0).randint(0, 256, (4, 9)), jnp.int32
  )
  batch = {'x': tokens[:, :-1], 'targets': tokens[:, 1:]}
  rules = [
    fracq.Rule(module_path='attn$', attention=fracq.TensorSpec(bits=8)),
    fracq.Rule(
      weight=fracq.FracBitsSpec(bits=4.0, bit_bounds=(2.0, 8.0)),
      act=fracq.TensorSpec(bits=8),
    ),
  ]
  qm = fracq.quantize(
    models.get_model('gpt_tiny', num_layers=1, max_len=8),
    rules,
    # A shape: no sign probe (every input signed; the test needs no more).
    jax.ShapeDtypeStruct(batch['x'].shape, batch['x'].dtype),
    budget=fracq.Budget(kind='size', uniform_bits=4),
    hard_assign_step=3,
    call_kwargs={'train': False},
  )
  variables = jax.jit(qm.init)(jax.random.key(0), batch['x'])
  assert set(qm.attention_facts) == {'block_0/attn'}

  def loss_fn(logits, b):
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, b['targets']
    ).mean()

  attn = variables['quant']['block_0']['attn']
  start = {n: attn[f'{n}_step'] for n in OPERANDS}
  variables, losses = _train(qm, variables, batch, loss_fn)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  trained = variables['quant']['block_0']['attn']
  assert all(trained[f'{n}_step'] != start[n] for n in OPERANDS)
  # After hard assignment (the attention operands keep their fixed bits),
  # the packed artifact exports with the operands' ranges in its manifest.
  hard = qm.for_step(3)
  path = str(tmp_path / 'gpt.fracq.safetensors')
  export.export_model(hard, hard.prepare(variables), path)
  _, _, manifest = export.read_artifact(path)
  attention = manifest['metadata']['attention']
  assert set(attention) == {'block_0/attn'}
  probs = attention['block_0/attn']['probs']
  assert (probs['signed'], probs['qmin'], probs['qmax']) == (False, 0, 255)
  # (LSQ stores |step|: a learned step may cross zero.)
  step = abs(float(trained['probs_step']))
  assert probs['scale'] == [pytest.approx(step)]
  assert attention['block_0/attn']['query']['qmin'] == -128
  # Integer programs do not lower attention: a clear refusal.
  with pytest.raises(ValueError, match='does not lower attention'):
    export.lower(hard, hard.prepare(variables), batch['x'], verify=False)


def test_tiny_vit_trains_under_uniform_qat_with_quantized_attention():
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
  batch = {'x': images, 'labels': jnp.asarray([0, 1, 2, 3])}
  rules = [
    fracq.Rule(
      weight=fracq.TensorSpec(bits=4),
      act=fracq.TensorSpec(bits=8),
      attention=fracq.TensorSpec(bits=6),
    )
  ]
  qm = fracq.quantize(
    models.get_model('vit_tiny'),
    rules,
    jax.ShapeDtypeStruct(images.shape, images.dtype),
    call_kwargs={'train': False},
  )
  variables = jax.jit(qm.init)(jax.random.key(0), images)
  assert set(qm.attention_facts) == {'block_0/attn'}
  assert 'kernel_step' in variables['quant']['block_0']['attn']['query']

  def loss_fn(logits, b):
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, b['labels']
    ).mean()

  _, losses = _train(qm, variables, batch, loss_fn)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
