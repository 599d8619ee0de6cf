"""``fracq.core.requantizing_op``: a layer's matmul or convolution whose
backward pass recomputes its quantized operands. Values and gradients
against automatic differentiation of the same quantized layer, its memory
against the float layer (XLA's compiled statistics, deterministic), and a
quantized model's training step with and without it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fracq
from fracq import core
from fracq.core import recompute

__all__ = []

_QMIN, _QMAX = -128.0, 127.0


def _lsq(v, step):
  return core.lsq_quantize(v, step, _QMIN, _QMAX, grad_scale=0.05)


def _random(shape, seed, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _dot(lhs, rhs):
  return jax.lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (0,)), ((), ())))


def _conv(lhs, rhs):
  return jax.lax.conv_general_dilated(
    lhs, rhs, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def _deferred(source, step):
  return core.Deferred(_lsq(source, step), source, _lsq, step)


CASES = {
  'dot': (_dot, (6, 5, 16), (16, 8), jnp.float32(0.05), jnp.float32(0.01)),
  'conv per channel': (
    _conv,
    (2, 6, 6, 4),
    (3, 3, 4, 8),
    jnp.float32(0.05),
    jnp.linspace(0.004, 0.02, 8, dtype=jnp.float32).reshape(1, 1, 1, 8),
  ),
}


@pytest.mark.parametrize('deferred', ['both', 'input', 'kernel'])
@pytest.mark.parametrize('case', sorted(CASES))
def test_matches_autodiff_of_the_quantized_layer(case, deferred):
  op, x_shape, w_shape, x_step, w_step = CASES[case]
  x = _random(x_shape, 0, 2.0)
  w = _random(w_shape, 1, 0.3)
  x_defer = deferred in ('both', 'input')
  w_defer = deferred in ('both', 'kernel')

  def reference(x, w, x_step, w_step):
    return op(_lsq(x, x_step), _lsq(w, w_step))

  def recomputed(x, w, x_step, w_step):
    lhs = _deferred(x, x_step) if x_defer else _lsq(x, x_step)
    rhs = _deferred(w, w_step) if w_defer else _lsq(w, w_step)
    return core.requantizing_op(op, lhs, rhs)

  args = (x, w, x_step, w_step)
  cot = _random(jax.eval_shape(reference, *args).shape, 2)

  def run(fn):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(cot))

  got = jax.jit(lambda: run(recomputed))()
  want = jax.jit(lambda: run(reference))()
  for name, left, right in zip(['out', 'dx', 'dw'], got, want):
    np.testing.assert_allclose(left, right, rtol=1e-6, atol=1e-6, err_msg=name)
  # The steps' gradients are float32 sums of terms of both signs over the
  # whole tensor, whose order the compiler picks per fusion.
  for name, left, right in zip(['dsx', 'dsw'], got[3:], want[3:]):
    np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-6, err_msg=name)


def test_plain_operands_are_the_plain_op():
  x, w = _random((3, 4), 3), _random((4, 2), 4)
  np.testing.assert_array_equal(core.requantizing_op(_dot, x, w), _dot(x, w))


def test_tied_parameters_are_bit_exact_even_for_a_nan_witness():
  params = {
    'step': jnp.array([0.5, -0.0, 0.0, 3e-38], jnp.float32),
    'count': jnp.array(3, jnp.int32),
  }
  for witness in (1.0, jnp.nan):
    tied = jax.jit(recompute._after)(params, jnp.float32(witness))
    np.testing.assert_array_equal(
      np.asarray(tied['step']).view(np.uint32),
      np.asarray(params['step']).view(np.uint32),
    )
    assert tied['count'] == 3


def _readers_loss(quantized, blocks):
  """A stack of ``blocks`` blocks in which three Dense layers read one
  activation (a transformer's query, key and value projections), each with
  its own quantizer."""

  def layer(x, kernel, step):
    if quantized == 'float':
      return _dot(x, kernel)
    if quantized == 'plain':
      return _dot(_lsq(x, step), _lsq(kernel, step))
    return core.requantizing_op(
      _dot, _deferred(x, step), _deferred(kernel, step)
    )

  def loss(x, kernels, steps):
    for block in range(blocks):
      readers = zip(kernels[3 * block : 3 * block + 3], steps)
      x = jnp.tanh(sum(layer(x, kernel, step) for kernel, step in readers))
    return jnp.sum(x**2)

  return loss


def _temporary_bytes(quantized, blocks) -> int:
  x = _random((512, 64), 5)
  kernels = [_random((64, 64), 6 + i, 0.1) for i in range(3 * blocks)]
  steps = [jnp.float32(0.02 + 0.01 * i) for i in range(3)]
  grad = jax.grad(_readers_loss(quantized, blocks), argnums=(0, 1, 2))
  compiled = jax.jit(grad).lower(x, kernels, steps).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _bytes_per_block(quantized) -> float:
  """Temporaries added by each block: what the backward pass keeps per
  block (the constant part, one block's transient backward buffers,
  cancels)."""
  return (_temporary_bytes(quantized, 6) - _temporary_bytes(quantized, 2)) / 4


def test_readers_of_one_activation_keep_no_quantized_copies():
  float_bytes = _bytes_per_block('float')
  plain_bytes = _bytes_per_block('plain')
  recomputed_bytes = _bytes_per_block('recomputed')
  activation = 512 * 64 * 4
  # Automatic differentiation keeps a quantized copy of each block's input
  # per reader until the backward pass; recomputing them keeps what float
  # keeps.
  assert plain_bytes >= float_bytes + 2 * activation
  assert recomputed_bytes <= float_bytes, (recomputed_bytes, float_bytes)


class _Branches(nn.Module):
  """A convolution, then two Dense layers reading its output (a
  projection shortcut's shape)."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(nn.Conv(8, (3, 3), dtype=self.dtype, name='conv')(x))
    x = x.reshape(x.shape[0], -1)
    left = nn.Dense(10, dtype=self.dtype, name='left')(x)
    return left + nn.Dense(10, dtype=self.dtype, name='right')(x)


def _setting(method, **extra):
  """``(rules, quantize kwargs, hard)`` of one quantization method."""
  if method.startswith('fracbits'):
    weight = fracq.FracBitsSpec(
      bits=3.6, granularity='channel', bits_per_channel=True, **extra
    )
    act = fracq.FracBitsSpec(bits=4.3, **extra)
    budget = fracq.Budget(kind='bitops', uniform_bits=4)
    kwargs = {'budget': budget, 'hard_assign_step': 0}
    return [fracq.Rule(weight=weight, act=act)], kwargs, method.endswith('hard')
  symmetric = method != 'lsq_plus'  # LSQ+ learns an offset
  common = {'bits': 4, 'range_method': method, 'symmetric': symmetric, **extra}
  spec = fracq.TensorSpec(granularity='channel', **common)
  return [fracq.Rule(weight=spec, act=fracq.TensorSpec(**common))], {}, False


def _model_step(method, x, labels, dtype=jnp.float32, **extra):
  """One training step's loss, logits, state and gradients of ``_Branches``
  quantized by ``method`` (FracBits: learned bits, or, ``'fracbits
  hard'``, the frozen integer bits of hard assignment)."""
  rules, kwargs, hard = _setting(method, **extra)
  qmodel = fracq.quantize(
    _Branches(dtype=dtype),
    rules,
    x[:1],
    call_kwargs={'train': False},
    **kwargs,
  )
  variables = qmodel.init(jax.random.key(0), x)
  if hard:
    qmodel = qmodel.for_step(0)
    assert qmodel.hard
    variables = jax.tree_util.tree_map_with_path(
      lambda path, v: (
        jnp.full_like(v, 3.0 if 'kernel' in jax.tree_util.keystr(path) else 5.0)
        if 'hard_bits' in jax.tree_util.keystr(path)
        else v
      ),
      variables,
    )
  trainable = {c: variables[c] for c in ('params', 'quant') if c in variables}
  state = {c: v for c, v in variables.items() if c not in trainable}

  def loss(trainable):
    logits, new_state = qmodel.apply(
      {**trainable, **state}, x, train=True, mutable=list(state)
    )
    one_hot = jax.nn.one_hot(labels, 10)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.mean(jnp.sum(one_hot * log_probs, -1))
    return ce, (logits, new_state)

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)


def _counting(monkeypatch):
  """The operand types of every ``requantizing_op`` call from now on."""
  calls = []

  def counted(op, lhs, rhs):
    calls.append((type(lhs).__name__, type(rhs).__name__))
    return core.requantizing_op(op, lhs, rhs)

  monkeypatch.setattr(recompute, 'requantizing_op', counted)
  return calls


@pytest.mark.parametrize(
  'method', ['lsq', 'lsq_plus', 'minmax', 'fracbits', 'fracbits hard']
)
def test_quantized_model_step_is_unchanged(method, monkeypatch):
  x = _random((4, 6, 6, 3), 7)
  labels = jnp.array([1, 2, 3, 4])
  calls = _counting(monkeypatch)
  recomputed = _model_step(method, x, labels)
  # Every layer recomputed both operands (init and the training step).
  assert calls and set(calls) == {('Deferred', 'Deferred')}
  calls.clear()
  kept = _model_step(method, x, labels, recompute=False)
  assert not calls  # every layer kept its quantized operands
  left = jax.tree_util.tree_leaves(recomputed)
  right = jax.tree_util.tree_leaves(kept)
  assert len(left) == len(right)
  for a, b in zip(left, right):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_half_precision_keeps_the_quantized_copies_by_default(monkeypatch):
  x = _random((4, 6, 6, 3), 7)
  labels = jnp.array([1, 2, 3, 4])
  calls = _counting(monkeypatch)
  _model_step('lsq', x, labels, dtype=jnp.bfloat16)
  assert not calls
  calls.clear()
  _model_step('lsq', x, labels, dtype=jnp.bfloat16, recompute=True)
  assert calls and set(calls) == {('Deferred', 'Deferred')}


def test_recompute_setting_is_checked():
  with pytest.raises(ValueError, match='recompute'):
    fracq.quantize(
      _Branches(),
      [fracq.Rule(weight=fracq.TensorSpec(bits=4, recompute='yes'))],
      _random((1, 6, 6, 3), 7),
      call_kwargs={'train': False},
    )
