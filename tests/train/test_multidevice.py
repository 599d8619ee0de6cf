"""The same model on 8 devices as on 1: quantizer statistics of the global batch.

Each test trains a few steps of a digits config with the global batch of 16
split over 8 devices and, separately, whole on 1 device (calibration
included, on the same mesh), and compares every parameter and statistic,
each leaf to ``TOL`` of its largest magnitude. After one step float32
reduction order alone leaves <= 9e-7 (measured: uniform LSQ model); over many
steps rounding flips in the quantizers amplify it (see ``fracq.train.train``),
so the tests take one or two steps. The bugs guarded against are far larger
(stated per test).
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from fracq import data as data_lib
from fracq.core import observers
from fracq import TensorSpec
from fracq.methods.common import QuantTensor
from fracq.train import quant_config
from fracq.train import train as tr

BATCH = 16
TOL = 1e-5  # of each leaf's largest |value|


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ('batch',))


def _config(name, arg='smoke', **quant):
  c = importlib.import_module(f'configs.{name}').get_config(arg)
  c.batch_size = BATCH
  for k, v in quant.items():
    c.quant[c.quant.method][k] = v
  return c


def _train(c, mesh, steps):
  """States after calibration and after ``steps`` steps on ``mesh``
  (switching wrappers as the loop does, e.g. at FracBits' hard
  assignment)."""
  module = tr.build_module(c)
  first = data_lib.digits.train_batch(0, BATCH, 0)
  wrapper = quant_config.build_model_wrapper(
    c, module, first['image'], total_steps=steps
  )
  state, tx = tr.create_train_state(
    c, wrapper, first, jax.random.key(0), total=steps, mesh=mesh
  )
  state = tr.replicate(state, mesh)
  start = jax.device_get(state)
  train_step = None
  for t in range(steps):
    new = wrapper.for_step(t)
    if new is not wrapper:
      v = new.prepare(jax.device_get(state.variables()))
      state = tr.replicate(
        state.replace(
          trainable={k: v[k] for k in state.trainable},
          state={k: v[k] for k in state.state},
        ),
        mesh,
      )
      wrapper, train_step = new, None
    train_step = train_step or tr.make_train_step(c, wrapper, tx, mesh)
    batch = data_lib.digits.train_batch(t, BATCH, 0)
    state, _ = train_step(state, tr.to_global(batch, mesh))
  return start, jax.device_get(state)


def _assert_same(s8, s1, tol=TOL):
  flat8 = jax.tree_util.tree_flatten_with_path(
    {'trainable': s8.trainable, 'state': s8.state}
  )[0]
  flat1 = jax.tree_util.tree_leaves(
    {'trainable': s1.trainable, 'state': s1.state}
  )
  assert len(flat8) == len(flat1)
  for (path, a), b in zip(flat8, flat1):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(
      a,
      b,
      rtol=0,
      atol=tol * max(np.max(np.abs(b), initial=0.0), 1e-12),
      err_msg=jax.tree_util.keystr(path),
    )


def _leaf(tree, *path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


def test_uniform_lsq_8_devices_equal_1():
  # Per-device LSQ gradient scale: every activation step update was
  # sqrt(8) = 2.83x larger on 8 devices (head input_step off by 1.3e-3
  # after one step, 127x TOL); now <= 9e-7.
  c = _config('digits_uniform')
  _, s8 = _train(c, _mesh(8), 1)
  s0, s1 = _train(c, _mesh(1), 1)
  _assert_same(s8, s1)
  # The step moved the activation steps (the comparison is not vacuous).
  assert not np.allclose(
    s1.trainable['quant']['head']['input_step'],
    s0.trainable['quant']['head']['input_step'],
    rtol=1e-4,
    atol=0,
  )


def test_lsq_grad_scale_counts_the_global_batch():
  spec = TensorSpec(bits=8)
  tensors = {
    name: QuantTensor(name, spec, True, -1, axis_name='batch')
    for name in ('input', 'kernel')
  }
  x = jnp.ones((2, 5, 3))  # per device; 8 devices -> 16 x 5 x 3 elements
  mesh = _mesh(8)

  def scales(xs):
    return jnp.array(
      [
        tensors['input'].lsq_grad_scale(xs, 255, None),
        tensors['input'].lsq_grad_scale(xs, 255, -1),
        tensors['kernel'].lsq_grad_scale(xs, 255, None),
      ]
    )

  got = jax.jit(
    jax.shard_map(
      scales,
      mesh=mesh,
      in_specs=jax.sharding.PartitionSpec('batch'),
      out_specs=jax.sharding.PartitionSpec(),
      check_vma=False,
    )
  )(jnp.ones((16, 5, 3)))
  np.testing.assert_allclose(
    got,
    [1 / np.sqrt(240 * 255), 1 / np.sqrt(80 * 255), 1 / np.sqrt(30 * 255)],
    rtol=1e-6,
  )
  # Outside a map over the axis (init, eager): the tensor's own count.
  assert tensors['input'].lsq_grad_scale(x, 255, None) == 1 / np.sqrt(30 * 255)


@pytest.mark.parametrize('act_range', ['minmax', 'ema_minmax', 'percentile'])
def test_observers_8_devices_equal_1(act_range):
  # pmean of per-device extremes: conv input_max ~10% below the global max
  # (5.51 vs 4.94 on a full run); per-device percentiles differ by ~1e-2.
  c = _config('digits_uniform', act_range=act_range)
  # lr 0, as the defect was seen: the step updates only the statistics, so
  # a quantizer rounding flip from float32 summation order cannot move the
  # parameters (with lr 0.1 minmax's BN biases differ by 4% of their
  # largest value after one step for that reason alone).
  c.learning_rate = 0.0
  _, s8 = _train(c, _mesh(8), 1)
  _, s1 = _train(c, _mesh(1), 1)
  # Float32 summation order (cross-replica BatchNorm means) can still flip a
  # single activation code, moving a later BatchNorm mean by ~5e-6 (8e-5 of
  # its largest value) and a small observed minimum by ~4e-8 (4e-5 of it):
  # 1e-3 keeps 100x below the pmean-of-extremes bug (~10%, BN means 19%).
  _assert_same(s8, s1, tol=1e-3)
  if act_range == 'minmax':
    # conv_init's input is the image: its running range is that of every
    # batch seen (calibration batch = step 0's batch, then step 0's).
    imgs = data_lib.digits.train_batch(0, BATCH, 0)['image']
    stats = s8.state['quant_stats']['conv_init']
    # (1 ulp: the step's pmean of the replicas' equal statistics.)
    np.testing.assert_allclose(stats['input_min'], imgs.min(), rtol=2e-7)
    np.testing.assert_allclose(stats['input_max'], imgs.max(), rtol=2e-7)


def test_fracbits_through_hard_assignment_8_devices_equal_1():
  # One fractional step, hard assignment, one integer step.
  c = _config('digits_fracbits', hard_assign_step=1)
  _, s8 = _train(c, _mesh(8), 2)
  _, s1 = _train(c, _mesh(1), 2)
  hard = s1.state['quant_stats']
  assert np.all(_leaf(hard, 'conv2', 'kernel_hard_bits') >= 2)
  _assert_same(s8, s1)


def test_f8net_8_devices_equal_1():
  c = _config('digits_f8net')
  _, s8 = _train(c, _mesh(8), 1)
  _, s1 = _train(c, _mesh(1), 1)
  # Formats are integers: a per-device statistic would flip one by 1.
  _assert_same(s8, s1)


def test_pcqat_8_devices_equal_1():
  c = _config('digits_pcqat')
  # lr 0: masks and centroids come from the replicated weights at
  # calibration, activation steps from the global batch; a training step
  # would only add rounding flips (the LSQ gradient scale has its own test).
  c.learning_rate = 0.0
  _, s8 = _train(c, _mesh(8), 1)
  _, s1 = _train(c, _mesh(1), 1)
  # A code flipped by float32 summation order moves a BatchNorm mean by
  # ~2e-6..9e-6 (up to 1.6e-4 of its largest value, varying between runs);
  # per-device calibration statistics are off by percents.
  _assert_same(s8, s1, tol=1e-3)


def test_global_helpers_unbound_are_identity():
  x = jnp.arange(6.0).reshape(2, 3)
  assert observers.bound_axis_size('batch') is None
  assert observers.global_batch(x, 'batch') is x
  assert observers.global_min(x, 'batch') is x
  assert observers.global_max(x, None) is x
