"""Memory of the quantizers' backward passes: a stack of convolutions whose
inputs are fake-quantized compiles to about the temporary memory of the
same stack in float (XLA's compiled memory statistics, deterministic).

A backward pass whose activation-sized terms do not depend on the cotangent
lets the compiler compute them during the forward pass and keep them until
the backward pass: one more activation per quantized layer, about 1.55x
(LSQ) and 2.1x (FracBits) the float stack's temporaries here, against 1.1x
and 1.2x now.
"""

import jax
import jax.numpy as jnp
import pytest

from fracq import core
from fracq.core import fracbits

__all__ = []

_LAYERS = 4


def _stack_loss(quantize):
  def loss(x, kernels, scale):
    for kernel in kernels:
      x = jax.lax.conv_general_dilated(
        quantize(x, scale),
        kernel,
        (1, 1),
        'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      )
      x = jax.nn.relu(x)
    return x.sum()

  return loss


def _temporary_bytes(quantize) -> int:
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 8), jnp.float32)
  kernels = [jnp.full((3, 3, 8, 8), 0.01, jnp.float32)] * _LAYERS
  scale = jnp.float32(0.1)
  grad = jax.grad(_stack_loss(quantize), argnums=(0, 1, 2))
  compiled = jax.jit(grad).lower(x, kernels, scale).compile()
  return compiled.memory_analysis().temp_size_in_bytes


QUANTIZERS = {
  'lsq': lambda x, s: core.lsq_quantize(x, s, 0, 255, grad_scale=0.01),
  'fracbits': lambda x, s: fracbits.fractional_range_quantize(
    x, 40.0 * s, 4.5, signed=False
  ),
}


@pytest.fixture(scope='module')
def float_bytes():
  return _temporary_bytes(lambda x, s: x)


@pytest.mark.parametrize('name', sorted(QUANTIZERS))
def test_quantized_stack_backward_memory_close_to_float(name, float_bytes):
  quantized_bytes = _temporary_bytes(QUANTIZERS[name])
  assert quantized_bytes <= 1.35 * float_bytes, (
    f'{name}: {quantized_bytes / 2**20:.2f} MiB of temporaries against '
    f'{float_bytes / 2**20:.2f} MiB in float'
  )
