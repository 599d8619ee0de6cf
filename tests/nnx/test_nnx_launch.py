"""The training loop on NNX models (``config.model_api = 'nnx'``): the
digits configs train the NNX digits CNN through FracBits' hard assignment
(or under F8Net) and export, and the loop's NNX model computes what its linen twin computes
on the same variables."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import export
from fracq.data import digits
from fracq.nnx import models as nnx_models
from fracq.nnx.training import NNXLoopModel
from fracq.train import checkpoint as ckpt_lib
from fracq.train import quant_config
from fracq.train import train as tr
from tests.nnx import nnx_helpers as helpers


STEPS = 2


def _config(name, arg='smoke'):
  """The config's smoke run on the NNX digits CNN, narrowed to seconds:
  two steps, one log, evaluation and checkpoint."""
  c = importlib.import_module(f'configs.{name}').get_config(arg)
  c.model_api = 'nnx'
  c.model_kwargs.widths = (8, 8, 8, 8, 8)
  c.num_train_steps = STEPS
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = STEPS
  if c.quant.method == 'fracbits':
    c.quant.fracbits.hard_assign_step = 1
  return c


def test_fracbits_config_trains_hard_assigns_and_exports(tmp_path):
  c = _config('digits_fracbits')
  c.export = True
  metrics = tr.train_and_evaluate(c, str(tmp_path))
  raw = ckpt_lib.restore_raw(str(tmp_path))
  variables = {**raw['trainable'], **raw['state']}
  hard = {
    layer: np.asarray(variables['quant_stats'][layer]['kernel_hard_bits'])
    for layer in ('conv1', 'conv2', 'conv3', 'conv4')
  }
  assert all(np.all((bits >= 2) & (bits <= 8)) for bits in hard.values())
  assert metrics['cost_integer'] <= metrics['cost_target'] * 1.0001
  # The artifact stores the kernels at the frozen bits.
  _, _, manifest = export.read_artifact(
    str(tmp_path / 'model.fracq.safetensors')
  )
  for layer, bits in hard.items():
    np.testing.assert_array_equal(
      manifest['tensors'][f'{layer}/kernel.packed']['bits'], bits
    )
  assert manifest['metadata']['method'] == 'fracbits'
  # The integer program and ONNX came through the checked linen twin.
  assert (tmp_path / 'model.int.safetensors').exists()
  assert metrics['integer_prediction_match'] >= 0.9
  # Checked teacher-forced on the export batch: at most one tie per layer
  # and 0.1% of its codes (the lowering refuses more).
  assert 0 < metrics['integer_checked_codes']
  assert (
    metrics['integer_tied_codes']
    <= 6 + 1e-3 * (metrics['integer_checked_codes'])
  )
  assert (tmp_path / 'model.onnx').exists()
  # The loop's accuracy is the NNX model's; the reference: the linen twin
  # the config builds with model_api='linen', holding the checkpoint.
  images, labels = digits.load_digits_split()[2:4]
  c.model_api = 'linen'
  linen = quant_config.build_model_wrapper(
    c, tr.build_module(c, axis_name=None), jnp.asarray(images[:1]), STEPS
  ).for_step(STEPS)
  assert linen.hard
  logits = linen.apply(variables, jnp.asarray(images), train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  assert accuracy == pytest.approx(metrics['eval_accuracy'], abs=1e-6)


def test_uniform_loop_model_equals_linen_twin():
  """The loop's NNX model (apply in train mode with updated statistics,
  gradients of weights and LSQ steps) against the linen wrapper the config
  builds for its twin, on the same variables."""
  c = _config('digits_uniform')
  x = jnp.asarray(digits.train_batch(0, 16, 0)['image'])
  wrapper = quant_config.build_model_wrapper(
    c, tr.build_module(c, axis_name=None), x[:1], STEPS
  )
  assert isinstance(wrapper, NNXLoopModel)
  linen = wrapper.linen
  variables = wrapper.init(jax.random.key(0), x[:1])
  mutable = [c for c in ('batch_stats', 'quant_stats') if c in variables]
  trainable = {k: variables[k] for k in ('params', 'quant')}
  state = {k: variables[k] for k in mutable}

  def loss(model, trainable):
    out, new = model.apply(
      {**trainable, **state}, x, train=True, mutable=mutable
    )
    return jnp.sum(out**2), (out, new)

  grads, (out, new) = jax.jit(
    jax.grad(lambda t: loss(wrapper, t), has_aux=True)
  )(trainable)
  want_grads, (want_out, want_new) = jax.jit(
    jax.grad(lambda t: loss(linen, t), has_aux=True)
  )(trainable)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  helpers.assert_trees_close(new, want_new)
  helpers.assert_trees_close(grads, want_grads, atol=1e-4)
  assert float(jnp.abs(grads['quant']['conv1']['input_step'])) > 0


def test_f8net_config_trains_and_exports_bit_exact(tmp_path):
  """digits_f8net with model_api='nnx': the NNX model under F8Net trains
  and exports an integer program whose accuracy on the test set is the
  loop's (its logits equal the F8Net model's bit for bit; the NNX F8Net
  model against linen F8Net: test_nnx_f8net.py)."""
  c = _config('digits_f8net')
  c.export = True
  metrics = tr.train_and_evaluate(c, str(tmp_path))
  assert metrics['integer_prediction_match'] == 1.0
  assert metrics['integer_max_logit_diff_rel'] == 0.0
  raw = ckpt_lib.restore_raw(str(tmp_path))
  assert set(raw['state']['quant_stats']) >= {'conv_init', 'conv1', 'head'}
  program = export.load_program(str(tmp_path / 'model.int.safetensors'))
  images, labels = digits.load_digits_split()[2:4]
  logits = np.asarray(program.logits(jnp.asarray(images)))
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  assert accuracy == pytest.approx(metrics['eval_accuracy'], abs=1e-6)


def test_nnx_api_errors():
  for name in ('digits_hawq', 'digits_float'):
    with pytest.raises(tr.ConfigError, match="model_api='linen'"):
      tr.check_config(_config(name))
  c = _config('digits_uniform')
  c.model_api = 'flax'
  with pytest.raises(tr.ConfigError, match="one of \\('linen', 'nnx'\\)"):
    tr.check_config(c)
  with pytest.raises(ValueError, match='no NNX version'):
    nnx_models.get_model('resnet18', rngs=None)
