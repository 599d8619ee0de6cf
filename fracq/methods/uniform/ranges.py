"""Range estimators of uniform QAT, as small registered objects.

A range estimator decides where a fixed-bit tensor's grid lies. Each one is
built by a factory (optax style) and is a :class:`RangeEstimator` of plain
functions over a :class:`~fracq.methods.common.QuantTensor`:

``init(tensor, x) -> state``
  The data-dependent initial state (at ``init`` and in calibration), a
  NamedTuple whose fields are the estimator's variables, stored as
  ``{tensor}_{field}`` in ``collection``.
``update(tensor, x, state) -> state``
  Running statistics (observers only; ``None`` otherwise), applied while
  ``collection`` is mutable outside ``init``.
``quantize(tensor, x, state) -> x_hat``
  The fake-quantized tensor.
``qparams(tensor, state) -> QParams``
  The affine map ``real = (code - zero_point) * scale + offset`` and the
  grid, for freezing.
``recompute``
  Whether layers may recompute ``quantize`` in their backward pass instead
  of keeping the quantized operand (see ``fracq.core.requantizing_op``).

``get(name)`` returns the estimator registered under a spec's
``range_method``; :func:`register` adds one. The registered estimators:

========================  ==================================================
``lsq``                   learned step (LSQ), ``quant/{t}_step``
``lsq_plus``              learned step and offset (LSQ+), affine
``pact``                  learned clip (PACT), ``quant/{t}_clip``
``dorefa``                DoReFa weights (tanh normalisation), no state
``minmax``                running min/max, ``quant_stats/{t}_min|max``
``ema_minmax``            moving-average min/max (``spec.ema_decay``)
``percentile``            percentiles of each batch (``spec.percentile``)
========================  ==================================================
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fracq import core
from fracq.core import observers
from fracq.methods.common import STATE
from fracq.methods.common import TRAINABLE
from fracq.methods.common import QuantTensor
from fracq.methods.common import bcast


class QParams(NamedTuple):
  """The affine map and grid of a frozen fixed-bit tensor."""

  scale: Any
  zero_point: Any
  offset: Any
  qmin: int
  qmax: int
  signed: bool
  extras: Mapping[str, Any] | None = None


class RangeEstimator(NamedTuple):
  """A range estimator (see the module docstring)."""

  name: str
  state: type  # the NamedTuple of its variables
  collection: str
  init: Callable[[QuantTensor, Any], Any]
  quantize: Callable[[QuantTensor, Any, Any], Any]
  qparams: Callable[[QuantTensor, Any], QParams]
  update: Callable[[QuantTensor, Any, Any], Any] | None = None
  # Whether a layer may recompute ``quantize`` in its backward pass
  # (``fracq.core.requantizing_op``) instead of keeping the quantized
  # operand: set where ``quantize``'s gradient is already a custom VJP (LSQ,
  # LSQ+, observers), so forward-mode differentiation is not lost.
  recompute: bool = False


_REGISTRY: dict[str, Callable[[], RangeEstimator]] = {}


def register(name: str):
  """Registers a factory ``() -> RangeEstimator`` under ``name`` (the value
  of ``TensorSpec.range_method`` that selects it)."""

  def add(factory):
    if name in _REGISTRY:
      raise ValueError(f'range estimator {name!r} is already registered.')
    _REGISTRY[name] = factory
    return factory

  return add


def names() -> tuple[str, ...]:
  """The registered range estimators, in registration order."""
  return tuple(_REGISTRY)


def get(name: str) -> RangeEstimator:
  """The range estimator registered under ``name``."""
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise ValueError(
      f'unknown range_method={name!r}; choose one of {names()} (or register '
      'a new one with fracq.methods.uniform.ranges.register).'
    ) from None
  return factory()


def _fixed_bits(tensor: QuantTensor) -> int:
  return int(tensor.spec.bits)


def lsq_step_init(x, qp, axis, is_kernel: bool):
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
    keep = None if axis is None else axis % x.ndim
    red = tuple(a for a in range(x.ndim) if a != keep)
    amax = jnp.max(jnp.abs(x), axis=red)
    step = jnp.maximum(jnp.minimum(step, amax / qp), 1e-8)
  return step


# -- LSQ ---------------------------------------------------------------------
class LsqState(NamedTuple):
  step: Any


@register('lsq')
def lsq() -> RangeEstimator:
  """LSQ (Esser et al. 2020): a learned step, ``s * round(clip(x/s))``."""

  def init(tensor, x):
    qmax = tensor.grid()[1]
    step = lsq_step_init(tensor.batch(x), qmax, tensor.axis, tensor.is_kernel)
    return LsqState(jnp.reshape(step, tensor.param_shape(x, tensor.axis)))

  def quantize(tensor, x, state):
    qmin, qmax = tensor.grid()
    return core.lsq_quantize(
      x,
      bcast(state.step, x, tensor.axis),
      qmin,
      qmax,
      grad_scale=tensor.lsq_grad_scale(x, qmax, tensor.axis),
    )

  def qparams(tensor, state):
    qmin, qmax = tensor.grid()
    zero = np.zeros((), np.float32)
    return QParams(state.step, zero, zero, qmin, qmax, tensor.signed)

  return RangeEstimator(
    'lsq', LsqState, TRAINABLE, init, quantize, qparams, recompute=True
  )


# -- LSQ+ --------------------------------------------------------------------
class LsqPlusState(NamedTuple):
  step: Any
  offset: Any


@register('lsq_plus')
def lsq_plus() -> RangeEstimator:
  """LSQ+ (Bhalgat et al. 2020): a learned step and a learned offset."""

  def init(tensor, x):
    qmin, qmax = tensor.grid()
    axis = tensor.axis
    shape = tensor.param_shape(x, axis)
    xs = tensor.batch(x)
    step = core.lsq_init_step(xs, qmax - qmin, axis=axis)
    offset = jnp.min(xs, axis=tensor.reduce_axes(xs, axis))
    return LsqPlusState(jnp.reshape(step, shape), jnp.reshape(offset, shape))

  def quantize(tensor, x, state):
    qmin, qmax = tensor.grid()
    axis = tensor.axis
    return core.lsq_plus_quantize(
      x,
      bcast(state.step, x, axis),
      bcast(state.offset, x, axis),
      qmin,
      qmax,
      grad_scale=tensor.lsq_grad_scale(x, qmax - qmin, axis),
    )

  def qparams(tensor, state):
    qmin, qmax = tensor.grid()
    zero = np.zeros((), np.float32)
    return QParams(state.step, zero, state.offset, qmin, qmax, tensor.signed)

  return RangeEstimator(
    'lsq_plus',
    LsqPlusState,
    TRAINABLE,
    init,
    quantize,
    qparams,
    recompute=True,
  )


# -- PACT --------------------------------------------------------------------
class PactState(NamedTuple):
  clip: Any


@register('pact')
def pact() -> RangeEstimator:
  """PACT (Choi et al. 2018): a learned clip ``alpha``, grid ``[-qmax,
  qmax]`` signed and ``[0, qmax]`` unsigned, initially the observed
  maximum."""

  def init(tensor, x):
    xs = tensor.batch(x)
    clip = jnp.max(jnp.abs(xs), axis=tensor.reduce_axes(xs, tensor.axis))
    clip = jnp.maximum(clip, 1e-3)
    return PactState(jnp.reshape(clip, tensor.param_shape(x, tensor.axis)))

  def quantize(tensor, x, state):
    return core.pact_quantize(
      x,
      bcast(state.clip, x, tensor.axis),
      _fixed_bits(tensor),
      signed=tensor.signed,
    )

  def qparams(tensor, state):
    qmax = tensor.grid()[1]
    clip = np.abs(np.asarray(state.clip, np.float32))
    zero = np.zeros((), np.float32)
    return QParams(
      clip / np.float32(qmax),
      zero,
      zero,
      -qmax if tensor.signed else 0,
      qmax,
      tensor.signed,
      {'clip': clip},
    )

  return RangeEstimator('pact', PactState, TRAINABLE, init, quantize, qparams)


# -- DoReFa ------------------------------------------------------------------
class DorefaState(NamedTuple):
  pass


@register('dorefa')
def dorefa() -> RangeEstimator:
  """DoReFa weights (Zhou et al. 2016): ``tanh`` normalisation to
  ``[-1, 1]``, no state. Codes ``q = round(v n)`` in ``[0, n]``, ``n = 2^k -
  1``, value ``2 q / n - 1``."""

  def init(tensor, x):
    del tensor, x
    return DorefaState()

  def quantize(tensor, x, state):
    del state
    return core.dorefa_quantize_weight(x, _fixed_bits(tensor))

  def qparams(tensor, state):
    del state
    qmin, qmax = tensor.grid(signed=False)
    return QParams(
      np.float32(2.0) / np.float32(qmax),
      np.zeros((), np.float32),
      np.float32(-1.0),
      qmin,
      qmax,
      False,
    )

  return RangeEstimator(
    'dorefa', DorefaState, TRAINABLE, init, quantize, qparams
  )


# -- observers ---------------------------------------------------------------
class ObservedRange(NamedTuple):
  min: Any
  max: Any


def _observer(name: str, update_fn) -> RangeEstimator:
  """An observer estimator: ``update_fn(tensor, x, state) -> state`` gives
  the range after a batch (``state`` is ``None`` at init)."""

  def init(tensor, x):
    return update_fn(tensor, x, None)

  def update(tensor, x, state):
    return update_fn(tensor, x, state)

  def quantize(tensor, x, state):
    qmin, qmax = tensor.grid()
    scale, zero_point = core.minmax_to_qparams(
      jax.lax.stop_gradient(state.min),
      jax.lax.stop_gradient(state.max),
      qmin,
      qmax,
      symmetric=tensor.spec.symmetric,
    )
    return core.fake_quant(
      x,
      bcast(scale, x, tensor.axis),
      bcast(zero_point, x, tensor.axis),
      qmin,
      qmax,
    )

  def qparams(tensor, state):
    qmin, qmax = tensor.grid()
    scale, zero_point = core.minmax_to_qparams(
      state.min, state.max, qmin, qmax, symmetric=tensor.spec.symmetric
    )
    zero = np.zeros((), np.float32)
    return QParams(
      scale,
      zero_point,
      zero,
      qmin,
      qmax,
      tensor.signed,
      {'min': state.min, 'max': state.max},
    )

  return RangeEstimator(
    name, ObservedRange, STATE, init, quantize, qparams, update, True
  )


def _running(tensor, x, state):
  """``state`` as an observer state (``None``: an empty observer)."""
  if state is None:
    return observers.observer_init(tensor.param_shape(x, tensor.axis))
  return observers.MinMaxState(state.min, state.max, jnp.ones((), jnp.int32))


@register('minmax')
def minmax() -> RangeEstimator:
  """Running min/max of every batch seen (the global batch's)."""

  def update(tensor, x, state):
    new = observers.minmax_update(
      _running(tensor, x, state),
      x,
      axis=tensor.axis,
      axis_name=tensor.mesh_axis,
    )
    return ObservedRange(new.min, new.max)

  return _observer('minmax', update)


@register('ema_minmax')
def ema_minmax() -> RangeEstimator:
  """Moving-average min/max, ``m <- (1 - c) m + c min(X)`` with ``c =
  spec.ema_decay``; the first batch sets the range."""

  def update(tensor, x, state):
    new = observers.moving_average_update(
      _running(tensor, x, state),
      x,
      c=tensor.spec.ema_decay,
      axis=tensor.axis,
      axis_name=tensor.mesh_axis,
    )
    return ObservedRange(new.min, new.max)

  return _observer('ema_minmax', update)


@register('percentile')
def percentile() -> RangeEstimator:
  """The ``100 - p`` and ``p`` percentiles (``p = spec.percentile``) of the
  latest batch (of the gathered global batch)."""

  def update(tensor, x, state):
    del state
    lo, hi = observers.percentile_range(
      x,
      tensor.spec.percentile,
      axis=tensor.axis,
      axis_name=tensor.mesh_axis,
    )
    return ObservedRange(lo, hi)

  return _observer('percentile', update)
