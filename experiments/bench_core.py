"""Benchmark: the FracBits quantizer vs one uniform fake quantization.

Prints, for a 3x3x256x256 kernel (per-channel ranges) and a 128x32x32x64
activation, the time of the fractional quantizer (forward, and forward +
backward) relative to one uniform fake quantization of the same tensor with
the same range method (learned step), both measured in this process.

  python experiments/bench_core.py
"""

import time

import jax
import jax.numpy as jnp

from fracq import core


def _time(f, *args, reps=20):
  jax.block_until_ready(f(*args))
  best = float('inf')
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / reps)
  return best


def bench(name, x, r, per_channel_axis):
  def uniform(x, r):
    step = r / 7.0
    return core.lsq_quantize(x, step, -8, 7)

  def frac(x, r):
    return core.fractional_range_quantize(x, r, 3.4, signed=True)

  rows = []
  for label, fn in (
    ('forward', lambda f: jax.jit(f)),
    (
      'fwd+bwd',
      lambda f: jax.jit(
        jax.grad(lambda x, r: jnp.sum(f(x, r) ** 2), argnums=(0, 1))
      ),
    ),
  ):
    tu = _time(fn(uniform), x, r)
    tf = _time(fn(frac), x, r)
    rows.append((name, label, tu * 1e3, tf * 1e3, tf / tu))
  return rows


def main():
  k = jax.random.normal(jax.random.key(0), (3, 3, 256, 256))
  rk = jnp.max(jnp.abs(k), axis=(0, 1, 2)).reshape(1, 1, 1, 256)
  a = jax.random.normal(jax.random.key(1), (128, 32, 32, 64))
  ra = jnp.float32(3.0)
  rows = bench('kernel 3x3x256x256', k, rk, 3) + bench(
    'activation 128x32x32x64', a, ra, None
  )
  print(f'device: {jax.devices()[0].device_kind}')
  print(
    f'{"tensor":<26} {"pass":<8} {"uniform ms":>11} {"FracBits ms":>12} '
    f'{"ratio":>6}'
  )
  for r in rows:
    print(f'{r[0]:<26} {r[1]:<8} {r[2]:>11.3f} {r[3]:>12.3f} {r[4]:>6.2f}x')


if __name__ == '__main__':
  main()
