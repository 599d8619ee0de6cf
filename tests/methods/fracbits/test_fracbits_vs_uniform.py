"""FracBits frozen at k bits against uniform k-bit QAT, like for like.

Both quantize signed kernels on the symmetric grid [-(2^(k-1)-1),
2^(k-1)-1] and unsigned inputs on [0, 2^k-1], with LSQ's range estimate and
gradient scale; FracBits learns the range r = step * Qp. Built from the same
weights and calibrated on the same data, the two must compute the same
fake-quantized tensors.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq.interception import QuantizedModule


class TinyConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(6, (3, 3), name='conv')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(5, name='head')(x)


# Non-negative images: every layer's input is unsigned.
X = jax.random.uniform(jax.random.key(0), (8, 6, 6, 2))


def _uniform(k):
  rule = fracq.Rule(
    weight=fracq.TensorSpec(bits=k, granularity='channel'),
    act=fracq.TensorSpec(bits=k),
  )
  return fracq.quantize(TinyConvNet(), [rule], X)


def _fracbits(k):
  rule = fracq.Rule(
    weight=fracq.FracBitsSpec(
      bits=float(k),
      bit_bounds=(2.0, 8.0),
      granularity='channel',
    ),
    act=fracq.FracBitsSpec(bits=float(k), bit_bounds=(2.0, 8.0)),
  )
  return fracq.quantize(
    TinyConvNet(),
    [rule],
    X,
    hard_assign_step=0,
    budget=fracq.Budget(kind='bitops', uniform_bits=k),
  )


def _pair(k):
  """(uniform model, variables), (hard FracBits model, variables) from the
  same weights, each calibrated on X."""
  uq = _uniform(k)
  vu = uq.init(jax.random.key(1), X)
  # A non-zero bias: with a zero bias, sums of integer codes make exact-zero
  # pre-activations, where the two models' float rounding (a few ulps apart)
  # would pick different sides of the ReLU kink.
  params = {
    **vu['params'],
    'conv': {
      **vu['params']['conv'],
      'bias': 0.1 * jax.random.normal(jax.random.key(4), (6,)),
    },
  }
  vu = uq.calibrate({**vu, 'params': params}, X)
  fq = _fracbits(k)
  vf = fq.init(jax.random.key(2), X)
  vf = {**vf, 'params': vu['params']}
  hard = fq.for_step(0)
  vf = hard.prepare(vf)
  for layer in ('conv', 'head'):
    for t in ('kernel', 'input'):
      assert float(vf['quant_stats'][layer][f'{t}_hard_bits']) == k
  # Calibrated in hard mode, so every layer sees the k-bit inputs the
  # uniform model sees.
  vf = hard.calibrate(vf, X)
  return (uq, vu), (hard, vf)


def _captured(qmodel, variables):
  """The fake-quantized kernels and inputs the model computes with."""
  seen = {}

  class Capture:
    def quantize_kernel(self, site, k):
      out = qmodel.provider.quantize_kernel(site, k)
      seen[(site.path, 'kernel')] = np.asarray(out)
      return out

    def quantize_input(self, site, a):
      out = qmodel.provider.quantize_input(site, a)
      seen[(site.path, 'input')] = np.asarray(out)
      return out

  qm = QuantizedModule(qmodel.module, qmodel.rules, Capture(), on_unused='warn')
  qm.apply(variables, X)
  return seen


def _qp(k, t):
  return 2 ** (k - 1) - 1 if t == 'kernel' else 2**k - 1


def _assert_same_tensors(uq, vu, hard, vf, k):
  a, b = _captured(uq, vu), _captured(hard, vf)
  assert (
    set(a)
    == set(b)
    == {(layer, t) for layer in ('conv', 'head') for t in ('kernel', 'input')}
  )
  for key in a:
    layer, t = key
    step = np.asarray(vu['quant'][layer][f'{t}_step'])
    # Integer codes on the uniform model's grid: identical, and inside the
    # symmetric (kernels) or unsigned (inputs) k-bit grid.
    codes_u = np.round(a[key] / step)
    codes_f = np.round(b[key] / step)
    np.testing.assert_array_equal(codes_f, codes_u, err_msg=str(key))
    lo = -_qp(k, t) if t == 'kernel' else 0
    assert codes_u.min() >= lo and codes_u.max() <= _qp(k, t)
    # FracBits' step is r / Qp with r = step * Qp: equal up to float32
    # rounding of that product and quotient (a few ulps), far below a step.
    np.testing.assert_allclose(
      b[key], a[key], rtol=3e-7, atol=0, err_msg=str(key)
    )


@pytest.mark.parametrize('k', [2, 3, 4, 8])
def test_frozen_fracbits_equals_uniform_at_init(k):
  (uq, vu), (hard, vf) = _pair(k)
  for layer in ('conv', 'head'):
    for t in ('kernel', 'input'):
      np.testing.assert_allclose(
        vf['quant'][layer][f'{t}_range'],
        np.asarray(vu['quant'][layer][f'{t}_step']) * _qp(k, t),
        rtol=1e-6,
      )
  _assert_same_tensors(uq, vu, hard, vf, k)
  np.testing.assert_allclose(
    hard.apply(vf, X), uq.apply(vu, X), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('k', [2, 4])
def test_range_gradient_is_step_gradient_over_qp(k):
  (uq, vu), (hard, vf) = _pair(k)
  cot = jax.random.normal(jax.random.key(3), (X.shape[0], 5))

  def grads(model, v):
    def loss(quant):
      return jnp.sum(model.apply({**v, 'quant': quant}, X) * cot)

    return jax.grad(loss)(v['quant'])

  gu, gf = grads(uq, vu), grads(hard, vf)
  lr = 0.05
  new_u = jax.tree_util.tree_map(lambda p, g: p - lr * g, vu['quant'], gu)
  new_f = dict(vf['quant'])
  for layer in ('conv', 'head'):
    new_f[layer] = dict(new_f[layer])
    for t in ('kernel', 'input'):
      qp = _qp(k, t)
      g_step = np.asarray(gu[layer][f'{t}_step'])
      g_range = np.asarray(gf[layer][f'{t}_range'])
      assert np.any(g_step != 0)
      # r = step * Qp  =>  dL/dr = dL/dstep / Qp, both with LSQ's gradient
      # scale 1 / sqrt(N Qp).
      np.testing.assert_allclose(
        g_range * qp, g_step, rtol=1e-4, atol=1e-7 * np.abs(g_step).max()
      )
      # The SGD step that moves r as the step moves (r' = Qp * step').
      new_f[layer][f'{t}_range'] = (
        vf['quant'][layer][f'{t}_range'] - lr * qp * qp * g_range
      )
  # After the range update the two still quantize alike.
  _assert_same_tensors(
    uq, {**vu, 'quant': new_u}, hard, {**vf, 'quant': new_f}, k
  )
