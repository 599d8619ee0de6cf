"""F8Net on NNX models (fracq.nnx.f8net) computes what linen's F8NetModel
computes on the same weights: initial formats, outputs, gradients of the
weights (and PACT clips), updated statistics; nnx.Optimizer trains it and
the integer program and ONNX come out of it bit-exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fracq.nnx as fnnx
from fracq import export
from fracq.export import onnx_export as ox
from fracq.methods.f8net import F8NetModel
from fracq.methods.f8net import F8NetOptions
from fracq.models.digits_cnn import DigitsCNN as LinenDigitsCNN
from fracq.nnx.models import DigitsCNN
from fracq.nnx.models import ResNet
from tests.nnx import nnx_helpers as helpers


def _model_and_input(arch):
  if arch == 'digits':
    model = DigitsCNN(widths=(8, 8, 8, 8, 8), rngs=nnx.Rngs(5))
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
  else:  # identity and projection residual blocks; a 4x4 (16) pool
    model = ResNet((1, 1), num_classes=3, widths=(4, 8), rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(6), (4, 8, 8, 3))
  return model, x


def _sq_loss(model, x):
  return jnp.sum(model(x) ** 2)


@pytest.mark.parametrize('arch', ['digits', 'resnet'])
def test_f8net_equal_to_linen_and_exported(arch, tmp_path):
  model, x = _model_and_input(arch)
  model.eval()
  # PACT on the chain (its clips are trainable QuantParams).
  options = F8NetOptions(pact=arch == 'digits')
  fmodel = fnnx.f8net(model, x, options=options)
  assert fmodel.use_running_average  # the model's mode
  lv = fmodel.linen_variables()
  stats = nnx.state(fmodel, fnnx.QuantStat)
  assert len(jax.tree.leaves(stats)) == len(jax.tree.leaves(lv['quant_stats']))
  if arch == 'resnet':  # a residual block's shared input format
    assert isinstance(fmodel.model.stage1_block0.input_fl_ema, fnnx.QuantStat)
  else:
    assert isinstance(fmodel.model.conv_init.pact_alpha, fnnx.QuantParam)
  # The reference: linen F8Net on the twin with the NNX weights; the
  # initial formats are its calibration on the sample.
  start = {c: lv[c] for c in ('params', 'batch_stats')}
  linen = F8NetModel(model.linen_module(), x, options=options, variables=start)
  start = {c: lv[c] for c in lv if c != 'quant_stats'}
  start['quant_stats'] = jax.tree.map(lambda a: a + 3.0, lv['quant_stats'])
  helpers.assert_trees_close(
    lv['quant_stats'], jax.jit(linen.calibrate)(start, x)['quant_stats'], atol=0
  )
  np.testing.assert_array_equal(fmodel(x), linen.apply(lv, x, train=False))

  # Training mode: one nnx.Optimizer step (SGD); its gradients of the
  # weights (and clips) and updated statistics equal linen's.
  trainable = linen.trainable_collections

  def linen_loss(params):
    out, upd = linen.apply(
      {**lv, **params}, x, train=True, mutable=['batch_stats', 'quant_stats']
    )
    return jnp.sum(out**2), upd

  lgrads, lupd = jax.jit(jax.grad(linen_loss, has_aux=True))(
    {c: lv[c] for c in trainable}
  )
  fmodel.train()
  optimizer = nnx.Optimizer(fmodel, optax.sgd(0.01), wrt=nnx.Param)

  @nnx.jit
  def train_step(fmodel, optimizer):
    grads = nnx.grad(_sq_loss)(fmodel, x)
    optimizer.update(fmodel, grads)
    return grads

  ngrads = helpers.linen_layout(train_step(fmodel, optimizer))
  state = fmodel.linen_variables()
  for collection in trainable:
    helpers.assert_trees_close(
      ngrads[collection], lgrads[collection], atol=1e-5
    )
    helpers.assert_trees_close(
      state[collection],
      jax.tree.map(
        lambda p, g: p - 0.01 * g, lv[collection], lgrads[collection]
      ),
      atol=1e-6,
    )
  helpers.assert_trees_close(state['batch_stats'], lupd['batch_stats'])
  helpers.assert_trees_close(state['quant_stats'], lupd['quant_stats'])

  # Export: the integer program equals the NNX model bit for bit (the
  # digits CNN's: test_nnx_launch.py, through the training loop).
  fmodel.eval()
  f8model, variables = fnnx.to_linen(fmodel)
  assert f8model is fmodel.f8model
  if arch == 'resnet':
    program = export.lower(f8model, variables, x)
    sim = np.asarray(fmodel(x))
    np.testing.assert_array_equal(np.asarray(program.logits(x)), sim)
    assert 'folded BN' in fmodel.report()
    pytest.importorskip('onnxruntime')
    rep = ox.export_onnx(
      f8model, variables, x, str(tmp_path / 'f8.onnx'), program=program
    )
    assert rep['onnx_prediction_match'] == 1.0


def test_f8net_float_folding_equals_the_nnx_model():
  """With simulate=False, F8Net only folds BatchNorm: the NNX model's own
  outputs (eval and train) and BatchNorm updates come out (an independent
  reference: the NNX model's code, not the twin's)."""
  model, x = _model_and_input('digits')
  model.eval()
  fmodel = fnnx.f8net(model, x, options=F8NetOptions(simulate=False))
  np.testing.assert_allclose(fmodel(x), model(x), rtol=2e-4, atol=2e-4)
  model.train()
  fmodel.train()
  np.testing.assert_allclose(fmodel(x), model(x), rtol=2e-4, atol=2e-4)
  for name in ('bn_init', 'bn1', 'bn2', 'bn3', 'bn4'):
    for stat in ('mean', 'var'):
      np.testing.assert_allclose(
        getattr(getattr(fmodel.model, name), stat).get_value(),
        getattr(getattr(model, name), stat).get_value(),
        rtol=1e-5,
        atol=1e-6,
      )


def test_f8net_bad_input():
  model, x = _model_and_input('digits')
  model.eval()
  twin = LinenDigitsCNN(widths=(8, 8, 8, 8, 8), bn_epsilon=0.5)
  with pytest.raises(ValueError, match='computes something else'):
    fnnx.f8net(model, x, linen_module=twin)
  with pytest.raises(ValueError, match='other variables'):
    fnnx.f8net(model, x, linen_module=LinenDigitsCNN(widths=(8,) * 4 + (4,)))
  fmodel = fnnx.f8net(model, x)
  with pytest.raises(ValueError, match='already quantized'):
    fnnx.f8net(fmodel, x)
