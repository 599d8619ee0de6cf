"""NNX models quantized by fracq.nnx compute what the same linen models
quantized by fracq.quantize compute: initial quantizer state, outputs,
gradients of weights, ranges and bits, statistics, FracBits cost, penalty
and hard assignment (the linen front end is the reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fracq
import fracq.nnx as fnnx
from fracq import Budget
from fracq import Rule
from fracq import FracBitsSpec
from fracq import TensorSpec
from fracq import export
from fracq.methods import preserve
from fracq.models.digits_cnn import DigitsCNN as LinenDigitsCNN
from fracq.nnx.models import DigitsCNN
from fracq.nnx.models import ResNet
from fracq.nnx.models import load_linen_variables
from tests.nnx import nnx_helpers as helpers

WIDTHS = (8, 8, 8, 8, 8)


def _digits_pair(rules, budget=None):
  """A linen and an NNX digits CNN with the same weights, both quantized
  by ``rules`` on the same sample (NNX in eval mode, as linen's init)."""
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
  lq = fracq.quantize(
    LinenDigitsCNN(widths=WIDTHS),
    rules,
    x,
    budget=budget,
    hard_assign_step=10,
    call_kwargs={'train': False},
  )
  lv = lq.init(jax.random.key(0), x)
  model = DigitsCNN(widths=WIDTHS, rngs=nnx.Rngs(5))
  load_linen_variables(model, lv)
  model.eval()
  nq = fnnx.quantize(model, rules, x, budget=budget, hard_assign_step=10)
  return x, lq, lv, nq


def _train_grads(lq, lv, nq, x, with_penalty):
  """Gradients of ``sum(logits^2) (+ penalty)`` in train mode, and the
  updated statistics, in linen and in NNX."""

  def linen_loss(trainable):
    out, upd = lq.apply(
      {**lv, **trainable},
      x,
      train=True,
      mutable=['batch_stats', 'quant_stats'],
    )
    loss = jnp.sum(out**2)
    if with_penalty:
      loss = loss + lq.penalty({**lv, **trainable}, 3)[0]
    return loss, upd

  trainable = {'params': lv['params'], 'quant': lv['quant']}
  lgrads, lupd = jax.jit(jax.grad(linen_loss, has_aux=True))(trainable)

  def nnx_loss(model):
    loss = jnp.sum(model(x) ** 2)
    if with_penalty:
      loss = loss + model.penalty(3)[0]
    return loss

  nq.train()
  ngrads = nnx.jit(nnx.grad(nnx_loss))(nq)
  return lgrads, lupd, helpers.linen_layout(ngrads), nq


FRACBITS_RULES = [
  fracq.fixed_bits(r'^conv_init$|^head$', bits=8),
  Rule(
    module_path='.*',
    weight=FracBitsSpec(bits=3.5, granularity='channel'),
    act=TensorSpec(bits=8),
  ),
]


def test_digits_fracbits_equal_to_linen():
  budget = Budget(kind='size', uniform_bits=3)
  x, lq, lv, nq = _digits_pair(FRACBITS_RULES, budget)
  # Analysis and initial quantizer state.
  assert nq.facts == lq.facts
  assert nq.signs == lq.signs
  assert nq.target == pytest.approx(lq.target)
  helpers.assert_trees_close(nq.variables('quant'), lv['quant'])
  helpers.assert_trees_close(nq.variables('quant_stats'), lv['quant_stats'])
  # Eval outputs.
  nq.eval()
  np.testing.assert_allclose(
    nq(x), lq.apply(lv, x, train=False), rtol=1e-5, atol=1e-6
  )
  # Gradients of weights, ranges and bits (task loss + penalty).
  lgrads, lupd, ngrads, nq = _train_grads(lq, lv, nq, x, with_penalty=True)
  helpers.assert_trees_close(ngrads['params'], lgrads['params'], atol=1e-5)
  helpers.assert_trees_close(ngrads['quant'], lgrads['quant'], atol=1e-5)
  state = helpers.linen_layout(nnx.state(nq))
  helpers.assert_trees_close(state['batch_stats'], lupd['batch_stats'])
  assert 'kernel_bits' in ngrads['quant']['conv1']
  assert float(jnp.abs(ngrads['quant']['conv1']['kernel_bits']).sum()) > 0
  # Cost, penalty and metrics.
  lpen, lmet = lq.penalty(lv, 3)
  npen, nmet = nq.penalty(3)
  assert float(npen) == pytest.approx(float(lpen), rel=1e-6)
  assert float(nmet['cost']) == pytest.approx(float(lmet['cost']), rel=1e-6)
  assert nq.metrics() == pytest.approx(lq.metrics(lv), rel=1e-6)


def test_digits_fracbits_hard_assignment_and_export_equal_to_linen(tmp_path):
  budget = Budget(kind='size', uniform_bits=3)
  x, lq, lv, nq = _digits_pair(FRACBITS_RULES, budget)
  # Spread the learned bits so that rounding has choices to make.
  quant = jax.tree.map(lambda v: v, lv['quant'])
  for i, name in enumerate(['conv1', 'conv2', 'conv3', 'conv4']):
    bits = quant[name]['kernel_bits']
    quant[name]['kernel_bits'] = (
      bits + 0.37 * (i - 1.5) + 0.05 * jnp.arange(bits.size).reshape(bits.shape)
    )
  lv = {**lv, 'quant': quant}
  nq._write('quant', quant)
  hard = lq.for_step(10)
  lv_hard = hard.prepare(lv)
  result = nq.hard_assign()
  assert result is not None
  helpers.assert_trees_close(
    nq.variables('quant_stats'), lv_hard['quant_stats']
  )
  assert nq.metrics() == pytest.approx(hard.metrics(lv_hard), rel=1e-6)
  nq.eval()
  np.testing.assert_allclose(
    nq(x), hard.apply(lv_hard, x, train=False), rtol=1e-5, atol=1e-6
  )
  # Idempotent: a second assignment changes nothing.
  assert nq.hard_assign() is None
  assert float(nq.penalty(0)[0]) == 0.0
  # The whole state in linen's layout, and the packed artifact from it.
  nvars = nq.linen_variables()
  helpers.assert_trees_close(nvars, lv_hard, atol=0, rtol=0)
  lsize = export.export_model(hard, lv_hard, str(tmp_path / 'linen'))
  nsize = export.export_model(nq, nvars, str(tmp_path / 'nnx'))
  assert nsize == lsize
  lcodes, lfloats, lmanifest = export.read_artifact(str(tmp_path / 'linen'))
  ncodes, nfloats, nmanifest = export.read_artifact(str(tmp_path / 'nnx'))
  assert nmanifest == lmanifest
  helpers.assert_trees_close(ncodes, lcodes, atol=0, rtol=0)
  helpers.assert_trees_close(nfloats, lfloats, atol=0, rtol=0)


def test_lsq_convs_equal_to_linen():
  """Uniform QAT (LSQ, per-channel weights, 8-bit inputs) on grouped,
  depthwise and transposed convolutions (the transformer's layers:
  test_resnet_and_transformer_equal_to_linen)."""
  rules = [
    Rule(
      weight=TensorSpec(bits=4, granularity='channel'),
      act=TensorSpec(bits=8),
    ),
  ]
  x = helpers.images()
  lq = fracq.quantize(helpers.LinenConvs(), rules, x)
  lv = lq.init(jax.random.key(0), x)
  model = helpers.NNXConvs(nnx.Rngs(7))
  load_linen_variables(model, lv)
  nq = fnnx.quantize(model, rules, x)
  assert nq.facts == lq.facts
  helpers.assert_trees_close(nq.variables('quant'), lv['quant'])
  np.testing.assert_allclose(nq(x), lq.apply(lv, x), rtol=1e-5, atol=1e-5)

  def linen_loss(trainable):
    return jnp.sum(lq.apply({**lv, **trainable}, x) ** 2)

  trainable = {'params': lv['params'], 'quant': lv['quant']}
  lgrads = jax.jit(jax.grad(linen_loss))(trainable)
  ngrads = helpers.linen_layout(
    nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(nq)
  )
  helpers.assert_trees_close(ngrads['params'], lgrads['params'], atol=1e-4)
  helpers.assert_trees_close(ngrads['quant'], lgrads['quant'], atol=1e-4)


def test_pcqat_equal_to_linen(tmp_path):
  """PCQAT (pruning mask and trainable centroids through ``kernel_transform``,
  LSQ on top): state, outputs, gradients and the artifact equal linen's."""
  transform = preserve.PreserveTransform(
    prune=True, cluster=True, clusters=4, sparsity=0.5
  )
  rules = [
    Rule(
      weight=TensorSpec(bits=4, granularity='channel'),
      act=TensorSpec(bits=8),
    )
  ]
  x = jax.random.normal(jax.random.key(2), (16, 4))
  lq = fracq.quantize(helpers.LinenMLP(), rules, x, kernel_transform=transform)
  lv = lq.init(jax.random.key(0), x)
  model = helpers.NNXMLP(nnx.Rngs(3))
  load_linen_variables(model, lv)
  nq = fnnx.quantize(model, rules, x, kernel_transform=transform)
  helpers.assert_trees_close(nq.variables('quant'), lv['quant'])
  helpers.assert_trees_close(nq.variables('quant_stats'), lv['quant_stats'])
  assert float(jnp.mean(lv['quant_stats']['fc2']['kernel_mask'])) == 0.5
  np.testing.assert_allclose(nq(x), lq.apply(lv, x), rtol=1e-5, atol=1e-6)

  def linen_loss(trainable):
    return jnp.sum(lq.apply({**lv, **trainable}, x) ** 2)

  trainable = {'params': lv['params'], 'quant': lv['quant']}
  lgrads = jax.jit(jax.grad(linen_loss))(trainable)
  ngrads = helpers.linen_layout(
    nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(nq)
  )
  helpers.assert_trees_close(ngrads['quant'], lgrads['quant'], atol=1e-5)
  helpers.assert_trees_close(ngrads['params'], lgrads['params'], atol=1e-5)
  lsize = export.export_model(lq, lv, str(tmp_path / 'linen'))
  nsize = export.export_model(nq, nq.linen_variables(), str(tmp_path / 'nnx'))
  assert nsize == lsize and nsize.structure_saved_bytes > 0


def _fracbits_and_lsq(fracbits_path):
  """FracBits (learned per-channel bits) on the layers ``fracbits_path``
  matches, LSQ at 4 bits on the others, 8-bit inputs everywhere, an
  embedding at 8 bits."""
  return [
    Rule(
      layer_types=('Embed',),
      weight=TensorSpec(bits=8, granularity='channel'),
    ),
    Rule(
      module_path=fracbits_path,
      weight=FracBitsSpec(bits=3.5, granularity='channel'),
      act=TensorSpec(bits=8),
    ),
    Rule(
      weight=TensorSpec(bits=4, granularity='channel'), act=TensorSpec(bits=8)
    ),
  ]


@pytest.mark.parametrize('arch', ['resnet', 'transformer'])
def test_resnet_and_transformer_equal_to_linen(arch):
  """A ResNet (basic blocks with BatchNorm, identity and projection
  residual adds) and a small transformer (embedding lookup and tied head,
  the zoo's block: LayerNorm, attention, MLP; a DenseGeneral and an
  Einsum) in NNX and linen with the same weights: FracBits on some layers
  and uniform QAT (LSQ) on the others give equal outputs, gradients of
  weights, ranges and bits (task loss + penalty), statistics and cost."""
  if arch == 'resnet':
    model = ResNet((1, 1), num_classes=3, widths=(4, 8), rngs=nnx.Rngs(2))
    linen_model = model.linen_module()
    x = jax.random.normal(jax.random.key(6), (2, 6, 6, 3))
    rules = _fracbits_and_lsq(r'^stage1')[1:]
  else:
    model = helpers.NNXBlock(nnx.Rngs(2))
    linen_model = helpers.LinenBlock()
    x = helpers.tokens()
    rules = _fracbits_and_lsq(r'^block/attn/')
  budget = Budget(kind='size', uniform_bits=3)
  lq = fracq.quantize(
    linen_model, rules, x, budget=budget, call_kwargs={'train': False}
  )
  lv = lq.init(jax.random.key(0), x)
  load_linen_variables(model, lv)
  model.eval()
  nq = fnnx.quantize(model, rules, x, budget=budget)
  assert nq.facts == lq.facts
  assert nq.signs == lq.signs
  helpers.assert_trees_close(nq.variables('quant'), lv['quant'])
  nq.eval()
  np.testing.assert_allclose(
    nq(x), lq.apply(lv, x, train=False), rtol=1e-5, atol=1e-5
  )
  lgrads, lupd, ngrads, nq = _train_grads(lq, lv, nq, x, with_penalty=True)
  helpers.assert_trees_close(ngrads['params'], lgrads['params'], atol=1e-4)
  helpers.assert_trees_close(ngrads['quant'], lgrads['quant'], atol=1e-4)
  # The FracBits layers' learned bits get (nonzero) gradients.
  learned = [
    path
    for path, f in lq.facts.items()
    if f.weight_quantized and lq.rules[f.rule_index].weight.learn_bits
  ]
  assert learned
  bits_grad = 0.0
  for path in learned:
    node = ngrads['quant']
    for part in path.split('/'):
      node = node[part]
    bits_grad += float(jnp.abs(node['kernel_bits']).sum())
  assert bits_grad > 0
  state = helpers.linen_layout(nnx.state(nq))
  if arch == 'resnet':
    helpers.assert_trees_close(state['batch_stats'], lupd['batch_stats'])
  assert nq.metrics() == pytest.approx(lq.metrics(lv), rel=1e-6)
