"""assert_integer_only is an allow-list: any float step inside the program
fails, only the documented boundary steps are allowed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq import export
from fracq.core import integer as ints


def _program():
  """A two-layer chain program (real-multiplier requantization)."""
  rng = np.random.RandomState(0)
  m0, ex = ints.quantize_multiplier(np.array([0.01, 0.02, 0.015]))
  first = export.IntLayer(
    path='d0',
    layer_type='Dense',
    kernel=rng.randint(-7, 8, (4, 3)).astype(np.int8),
    bias=rng.randint(-50, 50, 3).astype(np.int32),
    requant=(
      'mult',
      np.ones(3, np.int32),
      np.atleast_1d(m0),
      np.atleast_1d(ex),
    ),
    out_range=(0, 255),
    relu=True,
  )
  head = export.IntLayer(
    path='d1',
    layer_type='Dense',
    kernel=rng.randint(-7, 8, (3, 2)).astype(np.int8),
    bias=np.zeros(2, np.int32),
    out_scale=np.array([0.5, 0.25], np.float32),
  )
  return export.IntegerProgram(
    layers=[first, head], input_scale=0.1, input_range=(-128, 127), kind='qat'
  )


_X = jnp.asarray(np.random.RandomState(1).randn(5, 4), jnp.float32)


def test_real_program_passes_and_boundary_is_opt_in():
  prog = _program()
  codes = prog.quantize_input(_X)
  ints.assert_integer_only(prog, codes)
  ints.assert_integer_only(jax.jit(lambda c: prog(c)), codes)
  # Quantize at entry + dequantize at exit: allowed only as boundary steps.
  ints.assert_integer_only(prog.logits, _X, boundary=True)
  with pytest.raises(AssertionError, match='float multiply'):
    ints.assert_integer_only(prog.logits, _X)


@pytest.mark.parametrize(
  'name,fn',
  [
    ('divide', lambda a: a.astype(jnp.float32) / 3.7),
    ('exp', lambda a: jnp.exp(a.astype(jnp.float32))),
    ('sqrt', lambda a: jnp.sqrt(a.astype(jnp.float32))),
    (
      'float in the middle',
      lambda a: (a.astype(jnp.float32) * 0.5).astype(jnp.int32) + 1,
    ),
    (
      'float add of two results',
      lambda a: a.astype(jnp.float32) + a.astype(jnp.float32),
    ),
  ],
)
@pytest.mark.parametrize('boundary', [False, True])
def test_float_steps_fail(name, fn, boundary):
  prog = _program()
  codes = prog.quantize_input(_X)
  with pytest.raises(AssertionError, match='allow-list'):
    ints.assert_integer_only(lambda c: fn(prog(c)), codes, boundary=boundary)
  # Also when hidden under jit.
  with pytest.raises(AssertionError, match='allow-list'):
    ints.assert_integer_only(
      jax.jit(lambda c: fn(prog(c))), codes, boundary=boundary
    )


def test_float_entry_steps_are_limited_to_quantization():
  prog = _program()
  # A transcendental on the float input is not a quantization step.
  with pytest.raises(AssertionError, match='float exp'):
    ints.assert_integer_only(
      lambda x: prog(prog.quantize_input(jnp.exp(x))), _X, boundary=True
    )


def test_predict_is_argmax_of_dequantized_logits():
  # One Dense head whose classes have very different scales: the raw int32
  # accumulator says class 1 (500 > 10), the real logits class 0
  # (10 * 1.0 > 500 * 0.01).
  kernel = np.array([[1, 50], [0, 0]], np.int8)
  prog = export.IntegerProgram(
    layers=[
      export.IntLayer(
        path='head',
        layer_type='Dense',
        kernel=kernel,
        bias=np.zeros(2, np.int32),
        out_scale=np.array([1.0, 0.01], np.float32),
      )
    ],
    input_scale=0.5,
    input_range=(-128, 127),
    kind='qat',
  )
  x = jnp.asarray([[5.0, 0.0], [-5.0, 0.0]], jnp.float32)
  codes = np.round(np.asarray(x) / 0.5)  # 10 and -10
  # numpy reference: (codes @ kernel) * per-class scale
  ref = (codes @ kernel.astype(np.float64)) * np.array([1.0, 0.01])
  np.testing.assert_allclose(np.asarray(prog.logits(x)), ref, rtol=1e-6)
  raw = np.asarray(prog(prog.quantize_input(x)))
  assert raw[0].argmax() == 1 and ref[0].argmax() == 0  # the raw trap
  np.testing.assert_array_equal(np.asarray(prog.predict(x)), ref.argmax(1))
