"""Quantizer state of NNX models as NNX variables: filters, optimizers,
split/merge, jit, observers in train/eval mode, the original model left
intact, and an orbax round trip after hard assignment."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import fracq
import fracq.nnx as fnnx
from fracq import Budget
from fracq import Rule
from fracq import FracBitsSpec
from fracq import TensorSpec
from tests.nnx import nnx_helpers as helpers


RULES = [
  fracq.fixed_bits(r'^fc1$|^head$', bits=8),
  Rule(
    module_path='fc2',
    weight=FracBitsSpec(bits=4.5, granularity='channel'),
    act=TensorSpec(bits=8, range_method='minmax'),
  ),
]


def _sample():
  return jax.random.normal(jax.random.key(0), (16, 4))


def _quantized(seed=0):
  model = helpers.NNXMLP(nnx.Rngs(seed))
  # fracq.quantize hands NNX models to fracq.nnx.quantize.
  qmodel = fracq.quantize(
    model, RULES, _sample(), budget=Budget(kind='size', uniform_bits=3)
  )
  assert isinstance(qmodel, fnnx.QATModule)
  return model, qmodel


def test_original_model_left_intact():
  model, qmodel = _quantized()
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  assert type(model.fc2) is nnx.Linear
  assert isinstance(qmodel.model.fc2, fnnx.QuantizedLayer)
  assert qmodel.model.fc2.layer is not model.fc2
  # Reads of the layer's own attributes pass through the wrapper.
  assert qmodel.model.fc2.out_features == 16
  np.testing.assert_array_equal(
    qmodel.model.fc2.kernel[...], model.fc2.kernel[...]
  )
  # The float model still runs float, with its weights unchanged.
  after = nnx.to_pure_dict(nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert not nnx.state(model, fnnx.QuantParam)


def test_filters_optimizer_and_jit_step():
  _, qmodel = _quantized()
  quant = nnx.to_flat_state(nnx.state(qmodel, fnnx.QuantParam))
  stats = nnx.to_flat_state(nnx.state(qmodel, fnnx.QuantStat))
  quant_names = {path[-1] for path, _ in quant}
  stat_names = {path[-1] for path, _ in stats}
  assert {'kernel_bits', 'kernel_range', 'kernel_step'} <= quant_names
  assert stat_names == {'input_min', 'input_max', 'kernel_hard_bits'}
  # QuantParam is an nnx.Param: the optimizer trains it with the weights.
  optimizer = nnx.Optimizer(qmodel, optax.sgd(0.1), wrt=nnx.Param)
  x = _sample()
  y = jnp.arange(16) % 3

  @nnx.jit
  def step(qmodel, optimizer, x, y):
    def loss_fn(qmodel):
      logits = qmodel(x)
      task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return task + qmodel.penalty(0)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(qmodel)
    optimizer.update(qmodel, grads)
    return loss

  bits0 = np.asarray(qmodel.model.fc2.kernel_bits.get_value())
  # The running max of fc2's input (a QuantStat) on 10x the data: it
  # follows the forward pass (before the update), never the optimizer.
  x = 10.0 * x
  seen = float(jnp.max(nnx.relu(qmodel.model.fc1(x))))
  step(qmodel, optimizer, x, y)
  bits1 = np.asarray(qmodel.model.fc2.kernel_bits.get_value())
  assert np.all(np.isfinite(bits1)) and not np.allclose(bits0, bits1)
  np.testing.assert_allclose(
    qmodel.model.fc2.input_max.get_value(), seen, rtol=1e-6
  )


def test_observers_update_in_train_mode_only():
  _, qmodel = _quantized()
  big = 10.0 * _sample()
  qmodel.eval()
  max0 = float(qmodel.model.fc2.input_max.get_value())
  qmodel(big)
  assert float(qmodel.model.fc2.input_max.get_value()) == max0
  qmodel.train()
  nnx.jit(lambda m, x: m(x))(qmodel, big)
  assert float(qmodel.model.fc2.input_max.get_value()) > max0


def test_split_merge_and_orbax_round_trip_after_hard_assignment(tmp_path):
  _, qmodel = _quantized(seed=0)
  qmodel.hard_assign()
  hard_bits = np.asarray(qmodel.model.fc2.kernel_hard_bits.get_value())
  assert np.all(hard_bits >= 0)
  qmodel.eval()
  x = _sample()
  expected = np.asarray(qmodel(x))
  graphdef, state = nnx.split(qmodel)
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), expected)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'state', state)
  checkpointer.wait_until_finished()
  # A fresh quantization of another float model, then the saved state.
  _, restored = _quantized(seed=1)
  _, abstract = nnx.split(restored)
  nnx.update(restored, checkpointer.restore(tmp_path / 'state', abstract))
  assert restored.hard_assign() is None  # the bits came with the state
  restored.eval()
  np.testing.assert_array_equal(restored(x), expected)
  np.testing.assert_array_equal(
    restored.model.fc2.kernel_hard_bits.get_value(), hard_bits
  )


def test_linen_layout_written_back():
  """set_linen_variables is the inverse of linen_variables (what the
  training loop's NNX path relies on), and refuses a tree that does not
  fit."""
  _, qmodel = _quantized()
  variables = qmodel.linen_variables()
  doubled = jax.tree.map(lambda v: 2 * v, variables)
  qmodel.set_linen_variables(doubled)
  jax.tree.map(np.testing.assert_array_equal, qmodel.linen_variables(), doubled)
  # Read through the layers themselves: the wrapped layer's kernel and the
  # wrapper's quantizer variables.
  np.testing.assert_array_equal(
    qmodel.model.fc2.layer.kernel[...], 2 * variables['params']['fc2']['kernel']
  )
  np.testing.assert_array_equal(
    qmodel.model.fc2.input_max.get_value(),
    2 * variables['quant_stats']['fc2']['input_max'],
  )
  with pytest.raises(ValueError, match=r'missing: .*params/fc1/kernel'):
    qmodel.set_linen_variables({**variables, 'params': {}})
  wrong = jax.tree.map(lambda v: v, variables)
  wrong['quant']['fc2']['kernel_bits'] = jnp.zeros((3,))
  with pytest.raises(ValueError, match=r'other shapes: .*kernel_bits'):
    qmodel.set_linen_variables(wrong)
