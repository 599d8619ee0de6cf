"""The QAT provider: turns a rule's TensorSpec into quantizer variables + math.

Called by the interceptor (``fracq.interception``) for every matched kernel
and input. Variables it creates on the layer's scope:

``quant`` (trainable)
  ``{t}_step`` (LSQ/LSQ+ step), ``{t}_offset`` (LSQ+), ``{t}_clip`` (PACT),
  ``{t}_range`` (shared range of a learned-bits tensor), ``{t}_bits``
  (learned fractional bit-width), with ``t`` = ``kernel`` or ``input``.
``quant_stats`` (state)
  ``{t}_min`` / ``{t}_max`` (observers), ``{t}_hard_bits`` (integer bits
  frozen by hard assignment; ``-1`` until then).

Initialisation is data-dependent (LSQ's ``2 mean|x| / sqrt(Qp)``, for
kernels capped at ``max|x| / Qp``, for uniform steps and FracBits ranges
alike, PACT clip
at the observed maximum, ...): at ``init`` it uses whatever the layer sees, and
:meth:`fracq.methods.qat.QATModel.calibrate` re-runs it on real data and real
(e.g. pretrained) weights.

Data parallelism: with ``axis_name`` set (the model's BatchNorm axis) and that
axis bound (inside the ``shard_map`` of the train step or of calibration),
every activation statistic is the one of the global batch, so the quantizer
evolves identically on any number of devices and hosts: LSQ's gradient scale
counts the elements of the global batch, min/max observers use
``pmin``/``pmax`` (EMA observers average those), percentile observers and
data-dependent initial values (LSQ step, LSQ+ offset, PACT clip, FracBits
range) are computed on the ``all_gather``-ed batch. Kernels are replicated,
so their statistics need no collective.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fracq import core
from fracq.core import observers
from fracq.interception import Site

TRAINABLE = 'quant'
STATE = 'quant_stats'


def _reduce_axes(ndim: int, keep: int | None) -> tuple[int, ...]:
  if keep is None:
    return tuple(range(ndim))
  keep = keep % ndim
  return tuple(a for a in range(ndim) if a != keep)


def _keepdims_shape(x, axis: int | None):
  """Shape of a per-channel parameter broadcastable against ``x``."""
  if axis is None:
    return ()
  return (x.shape[axis],)


def _bcast(p, x, axis: int | None):
  """Reshape a per-channel vector ``p`` to broadcast along ``axis`` of x."""
  if axis is None or p.ndim == 0:
    return p
  shape = [1] * x.ndim
  shape[axis % x.ndim] = p.shape[0]
  return p.reshape(shape)


class QATProvider:
  """Uniform QAT and FracBits quantizers for the interceptor.

  Args:
    hard: run learned-bit tensors at their frozen integer bits (after hard
      assignment) instead of fractional bits.
    calibrate: overwrite the data-dependent initial values of the quantizer
      variables from the current weights and inputs (used by
      ``QATModel.calibrate``; needs ``quant`` and ``quant_stats`` mutable).
    axis_name: the data-parallel mesh axis (the model's BatchNorm axis);
      where it is bound, activation statistics are those of the global batch.
  """

  def __init__(
    self,
    hard: bool = False,
    calibrate: bool = False,
    signs: dict[str, bool] | None = None,
    kernel_transform=None,
    axis_name: str | None = None,
  ):
    self.hard = hard
    self.calibrate = calibrate
    self.axis_name = axis_name
    self.signs = dict(signs or {})
    # Optional ``transform(site, kernel, calibrate) -> kernel`` applied before
    # the kernel quantizer (pruning masks, weight clustering, ...).
    self.kernel_transform = kernel_transform

  # -- interceptor entry points ------------------------------------------
  def quantize_kernel(self, site: Site, kernel):
    if self.kernel_transform is not None:
      kernel = self.kernel_transform(site, kernel, self.calibrate)
    spec = site.rule.weight
    if spec is None:  # the transform alone (e.g. pruning of a float layer)
      return kernel
    axis = site.kernel_channel_axis if spec.granularity == 'channel' else None
    return self._quantize(site, 'kernel', spec, kernel, axis, True)

  def quantize_input(self, site: Site, x):
    spec = site.rule.act
    axis = -1 if spec.granularity == 'channel' else None
    return self._quantize(site, 'input', spec, x, axis, False)

  # -- global-batch statistics ---------------------------------------------
  def _act_axis(self, t):
    """The mesh axis an ``input`` is split over (kernels: none)."""
    return self.axis_name if t == 'input' else None

  def _stats_x(self, x, t):
    """``x`` for data-dependent initial values: the global batch for
    inputs (only evaluated at init and calibration, never in a step)."""
    return observers.global_batch(x, self._act_axis(t))

  def lsq_grad_scale(self, x, qp, axis, t):
    """LSQ's ``1 / sqrt(N Qp)`` with N the elements per channel of the
    global batch: per-device count times the devices along the batch axis
    for inputs; a kernel's own size for kernels. ``qp`` may be traced."""
    replicas = observers.bound_axis_size(self._act_axis(t)) or 1
    return core.lsq_grad_scale(x, qp, axis=axis, replicas=replicas)

  # -- variables ------------------------------------------------------------
  def _var(self, site, col, name, init_fn, calibratable=True):
    v = site.variable(col, name, init_fn)
    if (
      calibratable
      and self.calibrate
      and site.is_mutable(col)
      and not site.is_initializing
    ):
      v.value = init_fn()
    return v

  # -- dispatch ----------------------------------------------------------
  def _quantize(self, site, t, spec, x, axis, is_kernel):
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    signed = self._sign_flag(site, t, spec, xf, is_kernel)
    if spec.learn_bits:
      y = self._fractional(site, t, spec, xf, axis, signed, is_kernel)
    else:
      y = self._uniform(
        site, t, spec, xf, axis, signed, int(spec.bits), is_kernel
      )
    return y.astype(dtype)

  def _sign_flag(self, site, t, spec, x, is_kernel):
    """Kernels are signed; an input is unsigned when it was non-negative on
    the sample input (e.g. after a ReLU) unless the spec says otherwise."""
    if spec.signed is not None:
      return spec.signed
    if is_kernel:
      return True
    return self.signs.get(site.path, True)

  # -- uniform (fixed integer bits) ----------------------------------------
  def _uniform(self, site, t, spec, x, axis, signed, bits, is_kernel=False):
    if signed and spec.symmetric and bits < 2 and spec.range_method != 'dorefa':
      # Kernels are refused when the rules are validated; an input's sign is
      # only known from the sample input, so it is checked here.
      raise ValueError(
        f'{site.path}: {t} is signed at 1 bit, a grid with no symmetric '
        'non-zero level; use 2 bits or TensorSpec(signed=False).'
      )
    qmin, qmax = spec.int_grid(signed=signed, bits=bits, is_kernel=is_kernel)
    m = spec.range_method
    red = _reduce_axes(x.ndim, axis)
    pshape = _keepdims_shape(x, axis)
    if m == 'lsq':
      step = self._var(
        site,
        TRAINABLE,
        f'{t}_step',
        lambda: _reshape(
          _lsq_step_init(self._stats_x(x, t), qmax, axis, is_kernel), pshape
        ),
      )
      return core.lsq_quantize(
        x,
        _bcast(step.value, x, axis),
        qmin,
        qmax,
        grad_scale=self.lsq_grad_scale(x, qmax, axis, t),
      )
    if m == 'lsq_plus':
      step = self._var(
        site,
        TRAINABLE,
        f'{t}_step',
        lambda: _reshape(
          core.lsq_init_step(self._stats_x(x, t), qmax - qmin, axis=axis),
          pshape,
        ),
      )
      offset = self._var(
        site,
        TRAINABLE,
        f'{t}_offset',
        lambda: _reshape(jnp.min(self._stats_x(x, t), axis=red), pshape),
      )
      return core.lsq_plus_quantize(
        x,
        _bcast(step.value, x, axis),
        _bcast(offset.value, x, axis),
        qmin,
        qmax,
        grad_scale=self.lsq_grad_scale(x, qmax - qmin, axis, t),
      )
    if m == 'pact':
      clip = self._var(
        site,
        TRAINABLE,
        f'{t}_clip',
        lambda: _reshape(
          jnp.maximum(jnp.max(jnp.abs(self._stats_x(x, t)), axis=red), 1e-3),
          pshape,
        ),
      )
      return core.pact_quantize(
        x, _bcast(clip.value, x, axis), bits, signed=signed
      )
    if m == 'dorefa':
      return core.dorefa_quantize_weight(x, bits)
    return self._observed(site, t, spec, x, axis, qmin, qmax)

  def _observed(self, site, t, spec, x, axis, qmin, qmax):
    """min/max, moving-average min/max, percentile observers.

    The batch statistic is the global batch's: extremes through
    ``pmin``/``pmax``, percentiles of the gathered batch (exactly the
    one-device value; the gather costs one copy of the layer input).
    """
    m = spec.range_method
    red = _reduce_axes(x.ndim, axis)
    pshape = _keepdims_shape(x, axis)
    ax = self._act_axis(t)
    if m == 'percentile':
      lo_fn = lambda: _reshape(
        jnp.percentile(self._stats_x(x, t), 100 - spec.percentile, axis=red),
        pshape,
      )
      hi_fn = lambda: _reshape(
        jnp.percentile(self._stats_x(x, t), spec.percentile, axis=red), pshape
      )
    else:
      lo_fn = lambda: _reshape(
        observers.global_min(jnp.min(x, axis=red), ax), pshape
      )
      hi_fn = lambda: _reshape(
        observers.global_max(jnp.max(x, axis=red), ax), pshape
      )
    lo = self._var(site, STATE, f'{t}_min', lo_fn)
    hi = self._var(site, STATE, f'{t}_max', hi_fn)
    if site.is_mutable(STATE) and not site.is_initializing:
      if m == 'ema_minmax':
        c = spec.ema_decay
        lo.value = (1 - c) * lo.value + c * lo_fn()
        hi.value = (1 - c) * hi.value + c * hi_fn()
      elif m == 'minmax':
        lo.value = jnp.minimum(lo.value, lo_fn())
        hi.value = jnp.maximum(hi.value, hi_fn())
      else:
        lo.value, hi.value = lo_fn(), hi_fn()
    scale, zp = core.minmax_to_qparams(
      jax.lax.stop_gradient(lo.value),
      jax.lax.stop_gradient(hi.value),
      qmin,
      qmax,
      symmetric=spec.symmetric,
    )
    return core.fake_quant(
      x, _bcast(scale, x, axis), _bcast(zp, x, axis), qmin, qmax
    )

  # -- FracBits (learned fractional bits) ----------------------------------
  def _fractional(self, site, t, spec, x, axis, signed, is_kernel):
    lo_b, hi_b = spec.bit_bounds
    red = _reduce_axes(x.ndim, axis)
    pshape = _keepdims_shape(x, axis)
    bshape = pshape if (is_kernel and spec.bits_per_channel) else ()
    if is_kernel and spec.bits_per_channel and axis is None:
      bshape = (x.shape[site.kernel_channel_axis],)
    bits = self._var(
      site,
      TRAINABLE,
      f'{t}_bits',
      lambda: jnp.full(bshape, float(spec.bits), jnp.float32),
      calibratable=False,
    )
    hard = self._var(
      site,
      STATE,
      f'{t}_hard_bits',
      lambda: jnp.full(bshape, -1.0, jnp.float32),
      calibratable=False,
    )
    baxis = (
      axis
      if axis is not None
      else (site.kernel_channel_axis if bshape else None)
    )
    b = bits.value
    if self.hard:
      b = jax.lax.stop_gradient(hard.value)
    bits_now = b
    b = _bcast(b, x, baxis)
    m = spec.range_method
    init_bits = float(spec.bits)
    if m == 'dorefa':
      branch = core.dorefa_branch
    else:
      # One shared range r for both branches, set and trained like uniform
      # LSQ's step s at the same integer bits through r = s * Qp: initial
      # value LSQ's at the initial bits, LSQ's gradient scale at the bits in
      # use. A model frozen at k bits then computes what uniform k-bit QAT
      # computes from the same weights and data, with dL/dr = dL/ds / Qp.
      # (Below 2 signed / 1 unsigned bits the initial grid mixes in the
      # pruned branch; the range is then the smallest grid's.)
      qmax0 = _levels(spec, init_bits, signed, is_kernel)

      def range_init():
        xs = self._stats_x(x, t)
        if m == 'pact' or (not signed and m != 'lsq'):
          return _reshape(
            jnp.maximum(jnp.max(jnp.abs(xs), axis=red), 1e-4), pshape
          )
        return _reshape(
          _lsq_step_init(xs, qmax0, axis, is_kernel) * qmax0, pshape
        )

      ref = self._var(site, TRAINABLE, f'{t}_range', range_init)
      r = core.learned.scale_grad(
        ref.value,
        self._range_grad_scale(
          x, bits_now, lo_b, hi_b, signed, axis, t, ref.value.shape
        ),
      )
      r = _bcast(r, x, axis)
      if self.hard:
        return core.hard_quantize(
          x,
          b,
          lambda xx, k: _lsq_at_bits(xx, r, k, signed),
          min_nonzero_bits=2 if signed else 1,
        )
      return core.fractional_range_quantize(
        x, r, b, signed=signed, b_min=lo_b, b_max=hi_b, allow_zero_bit=lo_b < 1
      )
    if self.hard:
      return core.hard_quantize(x, b, branch)
    return core.fractional_quantize(
      x, b, branch, b_min=lo_b, b_max=hi_b, allow_zero_bit=lo_b < 1
    )

  def _range_grad_scale(self, x, bits, lo_b, hi_b, signed, axis, t, rshape):
    """LSQ's gradient scale for a shared range, at the level count of the
    integer bits in use (hard mode) or of the lower branch (fractional
    bits), one per range entry."""
    # The level counts of fracq.core.fracbits' shared-range branches (the
    # grid int_grid resolves for learned bits), computed on traced bits.
    k = jnp.floor(jnp.clip(bits, lo_b, hi_b))
    qp = jax.lax.stop_gradient(
      2.0 ** (k - 1.0) - 1.0 if signed else 2.0**k - 1.0
    )
    if qp.ndim and qp.shape != tuple(rshape):
      qp = jnp.mean(qp)  # per-channel bits sharing a per-tensor range
    return self.lsq_grad_scale(x, qp, axis, t)


def _lsq_at_bits(x, r, k, signed: bool):
  """``Q_k`` on the shared range ``r`` as LSQ's quantizer with step
  ``r / Qp`` (``k`` may be traced). Same values as the shared-range branches
  of ``fracq.core.fracbits``, and LSQ's straight-through mask for ``x``,
  which passes the gradient at the grid's ends too (e.g. ReLU zeros), so a
  frozen model trains as uniform LSQ does. LSQ's gradient scale is already
  on ``r``."""
  qp = 2.0 ** (k - 1.0) - 1.0 if signed else 2.0**k - 1.0
  qmin = -qp if signed else jnp.zeros_like(qp)
  return core.lsq_quantize(x, jnp.abs(r) / jnp.maximum(qp, 1.0), qmin, qp)


def _lsq_step_init(x, qp, axis, is_kernel: bool):
  """The initial step of uniform LSQ and (times ``Qp``) of FracBits' shared
  range: LSQ's ``2 mean|x| / sqrt(Qp)``, for kernels capped at
  ``max|x| / Qp``.

  Uniform QAT and FracBits use the same rule, so they start from the same
  grid at equal bits. For a kernel the cap binds where LSQ's estimate would
  put the top code beyond every weight (high bits, or few heavy-tailed
  weights per channel): the top codes would go unused and the grid would
  only be coarser, since no weight is clipped under either value. An
  input's maximum comes from one calibration batch and does not bound later
  inputs, so activations keep LSQ's estimate unchanged.
  """
  qp = max(float(qp), 1.0)
  step = core.lsq_init_step(x, qp, axis=axis)
  if is_kernel:
    amax = jnp.max(jnp.abs(x), axis=_reduce_axes(x.ndim, axis))
    step = jnp.maximum(jnp.minimum(step, amax / qp), 1e-8)
  return step


def _levels(spec, bits: float, signed: bool, is_kernel: bool) -> float:
  """``Qp`` of the integer grid at ``floor(bits)`` (from the spec's grid
  convention); 1 below the smallest grid of that sign."""
  k = int(math.floor(bits))
  if k < (2 if signed else 1):
    return 1.0
  return float(spec.int_grid(signed=signed, bits=k, is_kernel=is_kernel)[1])


def _reshape(v, shape):
  return jnp.reshape(v, shape)


# -- hard-assignment bookkeeping (used by QATModel) --------------------------
def _walk(tree, fn, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      _walk(v, fn, prefix + (k,))
    else:
      fn(prefix, k, v)


def needs_hard_assignment(stats) -> bool:
  """True while any ``*_hard_bits`` is still unassigned (negative)."""
  found = []
  _walk(
    stats,
    lambda p, k, v: (
      found.append(bool(jnp.any(v < 0))) if k.endswith('_hard_bits') else None
    ),
  )
  return any(found)


def _copy_renamed(target, source, old: str, new: str):
  """``target`` (copied) with every ``*{old}`` leaf of ``source`` written
  under the name ``*{new}`` at the same module path."""
  out = jax.tree_util.tree_map(lambda v: v, target)

  def put(prefix, k, v):
    if not k.endswith(old):
      return
    node = out
    for p in prefix:
      node = node[p]
    node[k[: -len(old)] + new] = v.astype(jnp.float32)

  _walk(source, put)
  return out


def write_hard_bits(stats, rounded_quant):
  """Copies rounded ``*_bits`` from ``quant`` into ``quant_stats``."""
  return _copy_renamed(stats, rounded_quant, '_bits', '_hard_bits')


def hard_bits_view(quant, stats):
  """``quant`` with every ``*_bits`` replaced by its frozen integer value."""
  return _copy_renamed(quant, stats, '_hard_bits', '_bits')
