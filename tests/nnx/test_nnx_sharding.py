"""Data-parallel training of a quantized NNX model on 2 (fake CPU) devices
computes what 1 device computes on the whole batch: LSQ steps and their
gradients, observer statistics, FracBits bits and weights, through
``nnx.shard_map`` (explicit collectives: the quantizers reduce their
statistics over the bound ``axis_name``) and through ``jax.jit`` with
shardings (the compiler partitions the global batch). The quantizer state
stays replicated."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fracq
import fracq.nnx as fnnx
from fracq import Budget
from fracq import FracBitsSpec
from fracq import Rule
from fracq import TensorSpec
from tests.nnx import nnx_helpers as helpers

AXIS = 'batch'
BATCH = 16  # global; 8 examples per device on 2 devices
RULES = [
  fracq.fixed_bits(r'^fc1$|^head$', bits=8),  # LSQ steps
  Rule(
    module_path='fc2',
    weight=FracBitsSpec(bits=4.5, granularity='channel'),
    act=TensorSpec(bits=8, range_method='minmax'),  # a min/max observer
  ),
]


def _mesh():
  if len(jax.devices()) < 2:
    pytest.skip('needs 2 devices (tests/conftest.py fakes 8 CPU devices)')
  return Mesh(np.array(jax.devices()[:2]), (AXIS,))


def _data():
  x = jax.random.normal(jax.random.key(0), (BATCH, 4))
  # Halves of different scales: each device sees other extremes than the
  # whole batch, so per-device statistics would differ from global ones.
  x = x * jnp.where(jnp.arange(BATCH) < BATCH // 2, 1.0, 3.0)[:, None]
  return x, jnp.arange(BATCH) % 3


def _setup():
  x, y = _data()
  model = helpers.NNXMLP(nnx.Rngs(0))
  qmodel = fnnx.quantize(
    model,
    RULES,
    x,
    budget=Budget(kind='size', uniform_bits=3),
    axis_name=AXIS,
  )
  qmodel.train()
  optimizer = nnx.Optimizer(qmodel, optax.sgd(1.0), wrt=nnx.Param)
  return qmodel, optimizer, x, y


def _step(qmodel, optimizer, x, y):
  """One training step; gradients averaged over ``AXIS`` where it is
  bound (inside ``nnx.shard_map``)."""

  def loss_fn(qmodel):
    logits = qmodel(x)
    task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return task + qmodel.penalty(0)[0]

  loss, grads = nnx.value_and_grad(loss_fn)(qmodel)
  try:
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
  except NameError:  # not under shard_map: the whole batch is here
    pass
  optimizer.update(qmodel, grads)
  return loss


def _quant_state(qmodel):
  """Every variable of the model (weights, quantizer parameters and
  statistics), flat by path, as numpy."""
  return {
    path: np.asarray(var.get_value())
    for path, var in nnx.to_flat_state(nnx.state(qmodel))
  }


@functools.cache
def _reference(steps):
  """The state and losses after ``steps`` steps on 1 device (shared by
  the tests)."""
  qmodel, optimizer, x, y = _setup()
  step = nnx.jit(_step)
  losses = [float(step(qmodel, optimizer, x, y)) for _ in range(steps)]
  return _quant_state(qmodel), losses


def _assert_same(got, want):
  assert got.keys() == want.keys()
  for path, value in want.items():
    scale = max(float(np.max(np.abs(value), initial=0.0)), 1e-12)
    np.testing.assert_allclose(
      got[path], value, rtol=0, atol=1e-5 * scale, err_msg=str(path)
    )


def test_shard_map_two_devices_equal_one():
  mesh = _mesh()
  want, want_losses = _reference(2)
  qmodel, optimizer, x, y = _setup()
  start = _quant_state(qmodel)
  step = nnx.jit(
    nnx.shard_map(
      _step,
      mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P(AXIS)),
      out_specs=P(),
      check_vma=False,
    )
  )
  losses = [float(step(qmodel, optimizer, x, y)) for _ in range(2)]
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  got = _quant_state(qmodel)
  _assert_same(got, want)
  # Not vacuous: the observer saw the whole batch (a device's half alone
  # has a smaller maximum), and steps, bits and weights moved.
  fc2 = qmodel.model.fc2
  half = float(jnp.max(nnx.relu(qmodel.model.fc1(x[: BATCH // 2]))))
  assert float(fc2.input_max.get_value()) > half
  for name in ('fc1', 'head'):
    key = ('model', name, 'input_step')
    assert not np.allclose(got[key], start[key], rtol=1e-4, atol=0), name
  key = ('model', 'fc2', 'kernel_bits')
  assert not np.allclose(got[key], start[key], rtol=1e-4, atol=0)


def test_jit_with_shardings_two_devices_equal_one():
  mesh = _mesh()
  want, _ = _reference(2)
  qmodel, optimizer, x, y = _setup()
  graphdef, state = nnx.split((qmodel, optimizer))
  replicated = NamedSharding(mesh, P())
  by_batch = NamedSharding(mesh, P(AXIS))
  state = jax.device_put(state, replicated)
  x, y = jax.device_put((x, y), by_batch)

  @jax.jit
  def step(state, x, y):
    qmodel, optimizer = nnx.merge(graphdef, state)
    loss = _step(qmodel, optimizer, x, y)
    return nnx.state((qmodel, optimizer)), loss

  for _ in range(2):
    state, _ = step(state, x, y)
  qmodel, _ = nnx.merge(graphdef, state)
  _assert_same(_quant_state(qmodel), want)
  # The quantizer state comes back replicated over the mesh.
  quant = nnx.state(qmodel, nnx.Any(fnnx.QuantParam, fnnx.QuantStat))
  for path, var in nnx.to_flat_state(quant):
    value = var.get_value()
    assert value.sharding.is_fully_replicated, path
    assert value.sharding.device_set == set(mesh.devices.flat), path
