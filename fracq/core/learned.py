"""Learned quantization ranges: LSQ, LSQ+, PACT, DoReFa.

References:
  Esser et al., "Learned Step Size Quantization", ICLR 2020, arXiv 1902.08153.
  Bhalgat et al., "LSQ+", CVPR-W 2020, arXiv 2004.09576.
  Choi et al., "PACT", arXiv 1805.06085.
  Zhou et al., "DoReFa-Net", arXiv 1606.06160.

All functions take the integer range as ``qmin``/``qmax`` (numbers or arrays,
so they also serve fractional-bit branches whose range is traced), compute in
float32 and return the input dtype. Gradients are those of the papers; see
each docstring.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import threading

import jax
import jax.numpy as jnp

from fracq.core import uniform


def round_ste(v):
  """Round half to even forward, identity backward."""
  return v + jax.lax.stop_gradient(jnp.round(v) - v)


@jax.custom_vjp
def scale_grad(v, g):
  """Identity forward (bit-exact); multiplies the gradient by ``g`` (LSQ's
  grad scale, a number or an array broadcastable to ``v``; it gets no
  gradient itself)."""
  return v


def _scale_grad_fwd(v, g):
  return v, g


def _scale_grad_bwd(g, ct):
  return sum_to(ct * g, jnp.shape(ct)), jnp.zeros_like(g)


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _reduce(x, axis):
  if axis is None:
    return tuple(range(x.ndim))
  axis = axis % x.ndim
  return tuple(a for a in range(x.ndim) if a != axis)


def lsq_init_step(x, qp, *, axis: int | None = None):
  """LSQ initial step ``2 mean|x| / sqrt(Qp)`` (per channel along ``axis``)."""
  qp = max(float(qp), 1.0)
  m = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=_reduce(x, axis))
  return jnp.maximum(2.0 * m / math.sqrt(qp), 1e-8)


def lsq_grad_scale(x, qp, *, axis: int | None = None, replicas: int = 1):
  """LSQ's gradient scale ``1 / sqrt(N * Qp)``, N elements per step.

  ``qp`` is a number (a Python float comes back) or an array, e.g. the level
  count of learned bit-widths, which may be traced (an array comes back, one
  scale per entry of ``qp``). ``replicas``: how many copies of ``x``'s shape
  make up one step's batch (the devices along the data-parallel axis, where
  ``x`` is one device's share of an activation), so that N counts the global
  batch.
  """
  n = x.size if axis is None else x.size // x.shape[axis]
  n = max(n * int(replicas), 1)
  if not isinstance(qp, numbers.Number):
    return jax.lax.rsqrt(n * jnp.maximum(jnp.asarray(qp, jnp.float32), 1.0))
  return 1.0 / math.sqrt(n * max(float(qp), 1.0))


def lsq_quantize(x, step, qmin, qmax, *, grad_scale: float = 1.0):
  """LSQ: ``x_hat = s * round(clip(x / s, qmin, qmax))``.

  Gradients (the paper's): to ``x`` 1 inside the range and 0 outside; to
  ``s``, ``round(x/s) - x/s`` inside, ``qmin`` below and ``qmax`` above,
  multiplied by ``grad_scale``.

  ``s`` is a learned parameter and may cross zero in training (the formula
  stays defined: ``s * c`` with ``c`` on the grid); the model computes the
  same whether it runs under ``jit`` or eagerly, and the exporter stores
  ``|s|`` with mirrored codes.
  """
  uniform.check_qparams(None, qmin, qmax)
  dtype = x.dtype
  f = lambda a: jnp.asarray(a, jnp.float32)
  return _lsq(
    x.astype(jnp.float32), f(step), f(qmin), f(qmax), float(grad_scale)
  ).astype(dtype)


def is_recomputing() -> bool:
  """Whether a quantizer is being traced inside :func:`recomputing`."""
  return bool(getattr(_RECOMPUTING, 'depth', 0))


def distinct_copy(v):
  """``v`` bit for bit, built so that the compiler cannot recognise it as
  ``v``.

  A backward pass that recomputes an elementwise expression of a residual
  (``x / s``) from ``distinct_copy(s)`` is not merged with the forward
  pass's ``x / s`` by common-subexpression elimination, which would keep the
  forward's full-size intermediate alive until the backward pass (the memory
  the recomputation is meant to save). Meant for the small parameters
  (scales, ranges, bits), not for activations.

  Inside :func:`recomputing` it is ``v`` itself.
  """
  if is_recomputing():
    return v
  return jnp.copysign(jnp.abs(v), v)


_RECOMPUTING = threading.local()


@contextlib.contextmanager
def recomputing():
  """Traces a quantizer's forward and backward passes that both run in a
  backward pass (``fracq.core.requantizing_op``), from parameters already
  distinct from the forward pass's: :func:`distinct_copy` is then the
  identity, so the backward formulas share the recomputed forward's
  intermediates (``x / s``: computed once, not once per use)."""
  _RECOMPUTING.depth = getattr(_RECOMPUTING, 'depth', 0) + 1
  try:
    yield
  finally:
    _RECOMPUTING.depth -= 1


def sum_to(g, shape):
  """Sums a broadcast gradient back to ``shape`` (numpy broadcasting)."""
  shape = tuple(shape)
  if g.shape == shape:
    return g
  lead = g.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
    i + lead for i, n in enumerate(shape) if n == 1 and g.shape[i + lead] != 1
  )
  return jnp.sum(g, axis=axes).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lsq(x, s, qmin, qmax, grad_scale):
  return jnp.round(jnp.clip(x / s, qmin, qmax)) * s


def _lsq_fwd(x, s, qmin, qmax, grad_scale):
  # Keep only the inputs; the backward pass recomputes x / s (cheaper in
  # memory than autodiff's residuals, same values).
  return _lsq(x, s, qmin, qmax, grad_scale), (x, s, qmin, qmax)


def _lsq_bwd(grad_scale, res, g):
  x, s, qmin, qmax = res
  # From a distinct copy of s: the forward's x / s is not kept alive for
  # this (see distinct_copy).
  v = x / distinct_copy(s)
  inside = (v >= qmin) & (v <= qmax)
  gx = jnp.where(inside, g, 0.0)
  # The step's elementwise term is a product with the cotangent g, so the
  # compiler cannot compute it before the backward pass reaches this layer
  # (a term of forward values alone is scheduled early and kept alive
  # through the whole backward: one more activation-sized buffer per
  # quantized input). The grad scale multiplies the reduced sum: a scalar
  # broadcast to x's shape is materialised by the CPU backend's reductions.
  per = jnp.where(inside, g * (jnp.round(v) - v), g * jnp.clip(v, qmin, qmax))
  gs = sum_to(per, s.shape) * grad_scale
  return gx, gs, jnp.zeros_like(qmin), jnp.zeros_like(qmax)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_plus_quantize(x, step, offset, qmin, qmax, *, grad_scale: float = 1.0):
  """LSQ+: ``x_hat = s * round(clip((x - beta) / s, qmin, qmax)) + beta``.

  The offset ``beta`` is learned too; its gradient is ``1 - (1 inside the
  range)``, i.e. 1 where ``x`` is clipped and 0 inside, as in the paper.
  """
  uniform.check_qparams(None, qmin, qmax)
  dtype = x.dtype
  f = lambda a: jnp.asarray(a, jnp.float32)
  return _lsq_plus(
    x.astype(jnp.float32), f(step), f(offset), f(qmin), f(qmax), grad_scale
  ).astype(dtype)


def _clip_weight(u, qmin, qmax):
  """The derivative of ``clip(u, qmin, qmax)`` (``min(max(u, qmin), qmax)``)
  as automatic differentiation gives it: 1 inside, 0 outside, 1/2 at a
  bound (``max`` and ``min`` split ties evenly)."""
  lower = jnp.where(u > qmin, 1.0, jnp.where(u == qmin, 0.5, 0.0))
  m = jnp.maximum(u, qmin)
  upper = jnp.where(m < qmax, 1.0, jnp.where(m == qmax, 0.5, 0.0))
  return upper * lower


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lsq_plus(x, s, b, qmin, qmax, grad_scale):
  del grad_scale  # the backward pass's only
  v = jnp.clip((x - b) / s, qmin, qmax)
  return jnp.round(v) * s + b


def _lsq_plus_fwd(x, s, b, qmin, qmax, grad_scale):
  # Only the inputs are kept (see _lsq_fwd).
  return _lsq_plus(x, s, b, qmin, qmax, grad_scale), (x, s, b, qmin, qmax)


def _lsq_plus_bwd(grad_scale, res, g):
  x, s, b, qmin, qmax = res
  # As automatic differentiation of round_ste(clip((x - b) / s)) * s + b:
  # d/dx = t (the clip's derivative), d/ds = round(v) - t u, d/db = 1 - t,
  # with the activation-sized terms products with g (see _lsq_bwd).
  u = (x - distinct_copy(b)) / distinct_copy(s)
  gx = g * _clip_weight(u, qmin, qmax)
  gs = sum_to(g * jnp.round(jnp.clip(u, qmin, qmax)) - gx * u, s.shape)
  gb = sum_to(g - gx, b.shape)
  gs, gb = gs * grad_scale, gb * grad_scale
  return gx, gs, gb, jnp.zeros_like(qmin), jnp.zeros_like(qmax)


_lsq_plus.defvjp(_lsq_plus_fwd, _lsq_plus_bwd)


def _clip_pact(x, lo, hi):
  # Explicit selects (not min/max, whose gradient splits 0.5/0.5 at ties):
  # the input's gradient is 1 on [lo, hi) and alpha's is 1 where x >= hi,
  # exactly PACT's estimator.
  y = jnp.where(x < lo, lo, x)
  return jnp.where(y >= hi, hi, y)


def pact_quantize(x, alpha, bits: int, *, signed: bool = False):
  """PACT: clip to ``[0, alpha]`` (``[-alpha, alpha]`` if signed), quantize.

  ``x_hat = round(clip(x) / d) * d`` with ``d = alpha / (2^k - 1)`` (signed:
  ``alpha / (2^(k-1) - 1)``). Straight-through over the rounding, so the
  gradient to ``alpha`` is 1 where ``x >= alpha`` (and -1 where ``x <=
  -alpha`` when signed) and 0 inside, the paper's estimator.
  """
  if isinstance(bits, (int, float)) and not 1 <= bits <= 16:
    raise ValueError(f'bits={bits} is out of range [1, 16].')
  uniform.check_qparams(alpha, 0, 1)
  dtype = x.dtype
  a = jnp.abs(jnp.asarray(alpha, jnp.float32))
  xf = x.astype(jnp.float32)
  levels = uniform.top_code(bits, signed=signed)
  if signed:
    y = _clip_pact(xf, -a, a)
  else:
    y = _clip_pact(xf, 0.0, a)
  d = jax.lax.stop_gradient(a / levels)
  q = jnp.round(y / d) * d
  return (y + jax.lax.stop_gradient(q - y)).astype(dtype)


def dorefa_normalize(w):
  """DoReFa's weight map to [0, 1]: ``tanh(w) / (2 max|tanh w|) + 1/2``."""
  t = jnp.tanh(w.astype(jnp.float32))
  return t / (2.0 * jnp.maximum(jnp.max(jnp.abs(t)), 1e-12)) + 0.5


def dorefa_quantize_weight(w, bits):
  """DoReFa weights: ``2 Q_k(w01) - 1`` with ``Q_k(v) = round(v n) / n``,
  ``n = 2^k - 1``; straight-through over the rounding (gradients flow through
  the tanh normalisation). ``bits`` may be an array (fractional branches).
  """
  dtype = w.dtype
  n = uniform.top_code(jnp.asarray(bits, jnp.float32), signed=False)
  v = dorefa_normalize(w)
  return (2.0 * round_ste(v * n) / n - 1.0).astype(dtype)
