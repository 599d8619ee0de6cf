"""F8Net fixed-point quantization: power-of-two scales, format selection, PACT.

Reference: Jin et al., "F8Net: Fixed-Point 8-bit Only Multiplication for
Network Quantization", ICLR 2022, arXiv 2202.05239 (code: snap-research/F8Net).

Every scale is a power of two. A tensor in fixed-point format with fractional
length ``FL`` is::

    x_hat = clamp(round(x * 2^FL), lo, hi) / 2^FL

with ``[lo, hi] = [-(2^(b-1) - 1), 2^(b-1) - 1]`` signed (``[-127, 127]`` at 8
bits, FL 0..7 by default) or ``[0, 2^b - 1]`` unsigned (``[0, 255]``, FL 0..8).
``round`` is half-to-even (``jnp.round``; ``torch.round`` in the authors'
code), so the integer runtime's :func:`fracq.core.integer.rounding_right_shift`
reproduces it bit for bit. ``x * 2^FL`` and ``/ 2^FL`` are exact in float.

FL from statistics (:func:`fl_from_std`): ``FL = floor(log2(C / std))``,
clamped to the FL range, ``C = 40`` signed and ``70`` unsigned. The constants
are the authors' fit (their ``error_analysis/`` script): for ``x ~ N(0, s^2)``
(signed) or ``relu(x)`` (unsigned, ``std`` is then the std of the input
*before* the implicit ReLU) the RMS-optimal FL switches from ``n`` to ``n - 1``
at ``s ~ C / 2^n``. Re-measuring that fit in numpy (400k samples, 3000 sigmas,
this module's rounding) gives thresholds ``s * 2^n = 39.1..39.3`` signed and
``72.0..72.3`` unsigned, constant over ``n``: the floor formula is right, and
C = 40 / 70 pick one FL too many (signed, s in [39.2, 40] / 2^n) or too few
(unsigned, s in [70, 72.2] / 2^n) in a 2-3 % band below each threshold;
elsewhere it equals the brute-force optimum. ``c`` is a parameter.

Activations use an EMA (PyTorch convention, ``momentum = 0.1`` weights the new
batch) of the batch std; the FL is the floor formula applied to the EMA, which
is continuous, so it changes in training and is frozen with the state at
eval. The authors' code instead averages the per-batch FL itself and rounds
that average at eval: :func:`ema_fl_update` and :func:`freeze_fl` offer it.

Fixed-point PACT: with ``s = alpha * 2^FL / Q`` (``Q = hi``),
``PACT(x) = (alpha / Q) * clamp(round(x * Q / alpha), 0, Q)`` equals
``s * fixquant(x / s, FL)`` for every FL. ``1 / s`` folds into the previous
layer's weights and bias and ``s`` into the next layer's weights, leaving only
integer multiplies, shifts and clamps at inference (:func:`fold_pact_into_*`).
The codes ``clamp(round(x Q / alpha), 0, Q)`` do not depend on FL: once FL
train and eval agree, the activation FL only moves a factor 2^FL between the
activation and the next layer's weights, whose own FL absorbs it (unless the
weight FL range clamps).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


DEFAULT_C_SIGNED = 40.0  # authors' fit for N(0, s^2), 8-bit [-127, 127]
DEFAULT_C_UNSIGNED = 70.0  # authors' fit for relu(N(0, s^2)), 8-bit [0, 255]


def fixed_point_range(signed: bool, bits: int = 8) -> tuple[int, int]:
  """Integer range: ``(-(2^(b-1) - 1), 2^(b-1) - 1)`` or ``(0, 2^b - 1)``."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f'bits must be an integer, got {bits!r}.')
  top = 32 if signed else 31  # codes must fit an int32
  if not 2 <= bits <= top:
    raise ValueError(
      f'bits={bits} is out of range [2, {top}] for signed={signed}.'
    )
  if signed:
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return 0, 2**bits - 1


def default_fl_range(signed: bool, bits: int = 8) -> tuple[int, int]:
  """F8Net's FL range: ``(0, bits - 1)`` signed, ``(0, bits)`` unsigned."""
  fixed_point_range(signed, bits)
  return (0, bits - 1) if signed else (0, bits)


def _fl_range(signed, bits, fl_range):
  if fl_range is None:
    return default_fl_range(signed, bits)
  lo, hi = (int(v) for v in fl_range)
  if lo > hi or not -126 <= lo <= hi <= 126:
    raise ValueError(
      f'fl_range={fl_range} must be (lo, hi) with lo <= hi inside [-126, 126].'
    )
  return lo, hi


def channel_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
  """The shape laying a length-``size`` vector along ``axis`` of ``ndim``."""
  if not -ndim <= axis < ndim:
    raise ValueError(f'axis={axis} does not exist for a {ndim}-d tensor.')
  shape = [1] * ndim
  shape[axis % ndim] = size
  return tuple(shape)


def broadcast_param(p, ndim: int, axis: int | None, name: str = 'parameter'):
  """Scalar or same-rank ``p`` as is; a 1-D ``p`` is laid along ``axis``."""
  p = jnp.asarray(p)
  if p.ndim == 0 or p.ndim == ndim:
    return p
  if p.ndim == 1 and axis is not None:
    return p.reshape(channel_shape(ndim, axis, p.shape[0]))
  raise ValueError(
    f'{name} of shape {p.shape} does not broadcast against a '
    f'{ndim}-d tensor: pass a scalar, a {ndim}-d array, or a '
    '1-D array together with axis=<channel axis>.'
  )


def pow2(fl):
  """Exact float32 ``2^fl`` for integer ``fl`` in [-126, 127] (bit-built)."""
  fl = jnp.asarray(fl)
  if not jnp.issubdtype(fl.dtype, jnp.integer):
    fl = jnp.round(fl)  # FL is an integer; a float FL is rounded
  e = jnp.clip(fl.astype(jnp.int32), -126, 127) + 127
  return jax.lax.bitcast_convert_type(e << 23, jnp.float32)


def _check_static_fl(fl, lo, hi):
  if isinstance(fl, (int, float, np.integer, np.floating, np.ndarray)):
    a = np.asarray(fl)
    if np.any(a < lo) or np.any(a > hi) or np.any(np.round(a) != a):
      raise ValueError(
        f'fl={fl} must hold integers in the FL range '
        f'[{lo}, {hi}]; widen fl_range to allow more.'
      )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fxq(x, up, down, lo, hi, strict):
  del strict
  return jnp.clip(jnp.round(x * up), lo, hi) * down


def _fxq_fwd(x, up, down, lo, hi, strict):
  v = jnp.round(x * up)
  mask = (v > lo) & (v < hi) if strict else (v >= lo) & (v <= hi)
  return jnp.clip(v, lo, hi) * down, (mask, up, down)


def _fxq_bwd(lo, hi, strict, res, g):
  mask, up, down = res
  return jnp.where(mask, g, 0.0), jnp.zeros_like(up), jnp.zeros_like(down)


_fxq.defvjp(_fxq_fwd, _fxq_bwd)


def fixed_point_quantize(
  x,
  fl,
  *,
  signed: bool,
  bits: int = 8,
  axis: int | None = None,
  fl_range=None,
  strict_mask: bool = False,
):
  """Fixed-point fake quantization ``clamp(round(x 2^FL), lo, hi) / 2^FL``.

  Args:
    x: float input; computed in float32, returned in ``x.dtype``.
    fl: integer fractional length: a number, a (traced) integer array of the
      rank of ``x``, or a 1-D array per channel along ``axis``. Float arrays
      are rounded. Static values are checked against ``fl_range``.
    signed: ``[-(2^(b-1)-1), 2^(b-1)-1]`` if True, else ``[0, 2^b - 1]``.
    bits: word length ``b``.
    axis: channel axis of a 1-D ``fl``.
    fl_range: allowed ``(min, max)`` FL, default :func:`default_fl_range`.
    strict_mask: gradient mask. False (default, as PyTorch FakeQuantize):
      the gradient passes where ``lo <= round(x 2^FL) <= hi``. True: the
      authors' code, ``lo < round(x 2^FL) < hi``, which also zeroes the
      gradient of unsigned inputs that round to 0.

  Returns:
    ``x_hat``; straight-through gradient to ``x`` (masked), none to ``fl``.
  """
  lo, hi = fixed_point_range(signed, bits)
  _check_static_fl(fl, *_fl_range(signed, bits, fl_range))
  f = broadcast_param(fl, x.ndim, axis, 'fl')
  return _fixed_point_quantize(x, f, float(lo), float(hi), bool(strict_mask))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _fixed_point_quantize(x, f, lo, hi, strict):
  out = _fxq(x.astype(jnp.float32), pow2(f), pow2(-f), lo, hi, strict)
  return out.astype(x.dtype)


def fixed_point_to_int(
  x,
  fl,
  *,
  signed: bool,
  bits: int = 8,
  axis: int | None = None,
  dtype=jnp.int32,
):
  """Integer codes ``clamp(round(x 2^FL), lo, hi)`` of a fixed-point tensor.

  Also quantizes int32 biases at ``FL_in + FL_w`` (``signed=True, bits=32``;
  the range is then clipped to the largest float32 below 2^31).
  """
  lo, hi = fixed_point_range(signed, bits)
  hi = min(hi, 2**31 - 128)  # float32 rounds 2^31 - 1 up to 2^31
  lo = max(lo, -(2**31 - 128))
  f = broadcast_param(fl, x.ndim, axis, 'fl')
  v = jnp.round(x.astype(jnp.float32) * pow2(f))
  return jnp.clip(v, float(lo), float(hi)).astype(dtype)


def _default_c(signed, bits, c):
  if c is not None:
    if c <= 0:
      raise ValueError(f'c={c} must be positive.')
    return float(c)
  if bits != 8:
    raise ValueError(
      f'C = 40 / 70 were fitted for 8-bit words; for bits={bits}'
      ' pass c explicitly (about C * 2^(bits - 8)).'
    )
  return DEFAULT_C_SIGNED if signed else DEFAULT_C_UNSIGNED


def fl_from_std(
  std, signed: bool, *, c: float | None = None, bits: int = 8, fl_range=None
):
  """F8Net's format rule ``FL = clamp(floor(log2(C / std)), fl_min, fl_max)``.

  ``std`` may be traced and per channel; ``std = 0`` gives ``fl_max``. For
  unsigned tensors ``std`` is the std of the input before the ReLU/clamp.
  Returns int32.
  """
  lo, hi = _fl_range(signed, bits, fl_range)
  c = _default_c(signed, bits, c)
  std = jnp.asarray(std, jnp.float32)
  fl = jnp.floor(jnp.log2(c / std))
  return jnp.clip(fl, lo, hi).astype(jnp.int32)


def _reduce_axes(ndim, axis):
  if axis is None:
    return tuple(range(ndim))
  if not -ndim <= axis < ndim:
    raise ValueError(f'axis={axis} does not exist for a {ndim}-d tensor.')
  return tuple(a for a in range(ndim) if a != axis % ndim)


def fl_from_data(x, signed: bool, *, axis: int | None = None, **kwargs):
  """:func:`fl_from_std` of the population ``std(x)`` (per channel on ``axis``).

  F8Net uses it for weights, on the BN-folded kernel (``axis=-1`` per output
  channel, None per layer).
  """
  xf = jax.lax.stop_gradient(x.astype(jnp.float32))
  return fl_from_std(
    jnp.std(xf, axis=_reduce_axes(x.ndim, axis)), signed, **kwargs
  )


def fl_grid_search(
  x, signed: bool, fl_candidates=None, *, bits: int = 8, axis: int | None = None
):
  """The FL among ``fl_candidates`` minimizing the RMS quantization error.

  Args:
    x: float tensor (no gradient flows; this chooses a format).
    signed: range of :func:`fixed_point_quantize`.
    fl_candidates: static integers, default the whole default FL range.
    bits: word length.
    axis: None for one FL per tensor, else one FL per slice along ``axis``.

  Returns:
    int32 FL (scalar, or shape ``(x.shape[axis],)``); the smallest candidate
    wins ties (``argmin``), e.g. for an all-zero tensor.
  """
  if fl_candidates is None:
    lo, hi = default_fl_range(signed, bits)
    fl_candidates = range(lo, hi + 1)
  cands = [int(f) for f in fl_candidates]
  if not cands:
    raise ValueError('fl_candidates is empty; give at least one FL.')
  lo, hi = fixed_point_range(signed, bits)
  return _grid_search(
    x, tuple(cands), float(lo), float(hi), _reduce_axes(x.ndim, axis)
  )


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _grid_search(x, cands, lo, hi, red):
  xf = jax.lax.stop_gradient(x.astype(jnp.float32))
  # Mean square error: same argmin as the RMS, without sqrt rounding ties.
  errs = jnp.stack(
    [
      jnp.mean(
        jnp.square(xf - _fxq(xf, pow2(f), pow2(-f), lo, hi, False)), axis=red
      )
      for f in cands
    ]
  )
  return jnp.asarray(cands, jnp.int32)[jnp.argmin(errs, axis=0)]


class ActFormatState(NamedTuple):
  std: jnp.ndarray  # EMA of the batch std (float32, scalar or per channel)
  count: jnp.ndarray  # number of updates seen (int32)


def act_format_init(shape=(), init_std: float = 1.0) -> ActFormatState:
  """A fresh activation-format state; ``init_std`` only matters before the
  first update (which copies the batch std)."""
  return ActFormatState(
    jnp.full(shape, init_std, jnp.float32), jnp.zeros((), jnp.int32)
  )


def ema_std_update(
  state: ActFormatState, x, momentum: float = 0.1, *, axis: int | None = None
) -> ActFormatState:
  """``std <- (1 - momentum) std + momentum std(x)``; the first copies it.

  ``axis`` keeps one std per channel. Pure: returns a new state.
  """
  if not 0 < momentum <= 1:
    raise ValueError(
      f'momentum={momentum} must be in (0, 1] (PyTorch '
      'convention: the weight of the new batch).'
    )
  xf = jax.lax.stop_gradient(x.astype(jnp.float32))
  batch = jnp.std(xf, axis=_reduce_axes(x.ndim, axis))
  new = jnp.where(
    state.count == 0, batch, (1.0 - momentum) * state.std + momentum * batch
  )
  return ActFormatState(new, state.count + 1)


def activation_fl(state: ActFormatState, *, signed: bool, **kwargs):
  """The activation FL: :func:`fl_from_std` of the EMA std (int32).

  Call it on the updated state in training and on the frozen one at eval.
  """
  return fl_from_std(state.std, signed, **kwargs)


def ema_fl_update(fl_ema, batch_fl, momentum: float = 0.1):
  """Authors' variant: a continuous EMA of the per-batch FL itself."""
  if not 0 < momentum <= 1:
    raise ValueError(f'momentum={momentum} must be in (0, 1].')
  return (1.0 - momentum) * jnp.asarray(
    fl_ema, jnp.float32
  ) + momentum * jnp.asarray(batch_fl, jnp.float32)


def freeze_fl(fl_ema, *, signed: bool, bits: int = 8, fl_range=None):
  """Eval FL of the authors' variant: ``clamp(round(fl_ema))`` as int32."""
  lo, hi = _fl_range(signed, bits, fl_range)
  return jnp.clip(jnp.round(fl_ema), lo, hi).astype(jnp.int32)


def pact_scale(alpha, fl, *, signed: bool = False, bits: int = 8):
  """``s = |alpha| (1 / Q) 2^FL``, ``Q`` the largest code: PACT's step, 2^FL."""
  _, q = fixed_point_range(signed, bits)
  a = jnp.abs(jnp.asarray(alpha, jnp.float32))
  # Multiply by 1/Q rather than divide: XLA rewrites division by a constant
  # into this inside jit, so eager and jitted results stay identical.
  return (a * (1.0 / float(q))) * pow2(fl)


def fixed_point_pact(
  x,
  alpha,
  fl,
  *,
  signed: bool = False,
  bits: int = 8,
  axis: int | None = None,
  alpha_grad: str = 'pact',
):
  """Fixed-point PACT: ``s * fixquant(x / s, FL)`` with ``s = pact_scale``.

  Forward this is PACT with clip ``alpha`` and ``Q`` levels, bit-identical
  for every FL: ``round(clip(x) / d) * d`` with ``d = alpha * (1 / Q)`` in
  float32. FL only fixes the integer layout (the codes ``round(x / s 2^FL)``
  are PACT's).

  Args:
    x: float input.
    alpha: clip level (scalar or per channel along ``axis``).
    fl: the activation's FL (scalar or per channel).
    signed: clip to ``[-alpha, alpha]`` with ``Q = 2^(b-1) - 1``.
    bits: word length.
    axis: channel axis of 1-D ``alpha`` / ``fl``.
    alpha_grad: ``'pact'`` (default): PACT's estimator, gradient to ``alpha``
      1 where ``x >= alpha`` (-1 where ``x <= -alpha`` signed), 0 inside;
      ``'autodiff'``: differentiate through ``s`` with the masked STE, as the
      authors' folded code does, which adds the rounding residual
      ``(x_hat - x) / alpha`` inside the range (LSQ-like).
  """
  lo, hi = fixed_point_range(signed, bits)
  if alpha_grad not in ('pact', 'autodiff'):
    raise ValueError(f"alpha_grad={alpha_grad!r}: use 'pact' or 'autodiff'.")
  a = broadcast_param(
    jnp.abs(jnp.asarray(alpha, jnp.float32)), x.ndim, axis, 'alpha'
  )
  f = broadcast_param(fl, x.ndim, axis, 'fl')
  return _pact(x, a, f, float(lo), float(hi), signed, alpha_grad)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _pact(x, a, f, lo, hi, signed, alpha_grad):
  s = (a * (1.0 / hi)) * pow2(f)  # as pact_scale
  xf = x.astype(jnp.float32)
  if alpha_grad == 'autodiff':
    out = s * _fxq(xf / s, pow2(f), pow2(-f), lo, hi, False)
  elif alpha_grad == 'pact':
    # Explicit selects, not jnp.clip (whose gradient splits at ties): the
    # input's gradient is 1 on [lo, alpha) and alpha's 1 where x >= alpha.
    y = jnp.where(xf < (-a if signed else 0.0), -a if signed else 0.0, xf)
    y = jnp.where(y >= a, a, y)
    q = s * _fxq(y / s, pow2(f), pow2(-f), lo, hi, False)
    out = y + jax.lax.stop_gradient(q - y)
  return out.astype(x.dtype)


def _along(v, ndim, axis):
  v = jnp.asarray(v, jnp.float32)
  if v.ndim == 0:
    return v
  v = v.reshape(-1)
  return v.reshape(channel_shape(ndim, axis, v.shape[0]))


def fold_pact_into_previous(
  kernel, bias, alpha, fl, *, signed: bool = False, bits: int = 8
):
  """``(W / s, b / s)``: the previous layer then outputs ``z / s``.

  ``kernel``'s output channels are its last axis (HWIO / Dense ``(in, out)``);
  ``s`` (:func:`pact_scale`) is scalar or per output channel. With
  ``z = conv(a, W) + b``, ``PACT(z) = s * fixquant(z / s, FL)`` and
  ``z / s = conv(a, W / s) + b / s``; the integer model requantizes that
  accumulator to FL by a shift. ``bias=None`` stays None.
  """
  s = pact_scale(alpha, fl, signed=signed, bits=bits)
  k = kernel / _along(s, kernel.ndim, -1)
  b = None if bias is None else bias / _along(s, 1, 0)
  return k, b


def fold_pact_into_next(
  kernel, alpha, fl, *, signed: bool = False, bits: int = 8, in_axis: int = -2
):
  """``s * V``: the consumer of ``PACT(z)`` reads ``fixquant(z / s)`` instead.

  ``conv(PACT(z), V) = conv(fixquant(z / s, FL), s V)``. A per-channel ``s``
  scales the input-channel axis ``in_axis`` (-2 for HWIO / Dense; use -1 for
  a depthwise HWIO kernel ``(H, W, 1, C)``). The result is then quantized
  with its own weight FL.
  """
  s = pact_scale(alpha, fl, signed=signed, bits=bits)
  return kernel * _along(s, kernel.ndim, in_axis)


def bn_batch_stats(y):
  """Batch mean and biased variance over all axes but the last (channels)."""
  red = tuple(range(y.ndim - 1))
  return jnp.mean(y, axis=red), jnp.var(y, axis=red)


def fold_bn(kernel, bias, gamma, beta, mean, var, eps: float = 1e-5):
  """Folds BatchNorm into the preceding conv / dense layer.

  ``BN(conv(x, W) + b) = conv(x, W') + b'`` with ``g = gamma / sqrt(var +
  eps)``, ``W' = W g`` (per output channel, the kernel's last axis) and
  ``b' = beta + (b - mean) g``. Pass batch statistics of ``conv(x, W) + b``
  (:func:`bn_batch_stats`) in training, running statistics at eval. ``bias``,
  ``gamma``, ``beta`` may be None (0, 1, 0). Differentiable in all inputs.
  """
  if mean is None or var is None:
    raise ValueError(
      'fold_bn needs mean and var (batch statistics in '
      'training, running statistics at eval).'
    )
  cout = kernel.shape[-1]
  f = lambda v, d: (
    jnp.full((cout,), d, jnp.float32)
    if v is None
    else (jnp.asarray(v, jnp.float32).reshape(cout))
  )
  g = f(gamma, 1.0) / jnp.sqrt(f(var, 0.0) + eps)
  k = kernel * g.reshape(channel_shape(kernel.ndim, -1, cout))
  b = f(beta, 0.0) + (f(bias, 0.0) - f(mean, 0.0)) * g
  return k.astype(kernel.dtype), b
