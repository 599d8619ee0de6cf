"""What every quantization method shares: one tensor's view and its freeze.

:class:`QuantTensor` is one quantized tensor (a layer's ``kernel`` or
``input``) as a method sees it: its spec, sign and channel axis, and either
the layer's scope (training: declare and update variables) or the layer's
stored variables (freezing a trained model). Methods read and write their
own variables through it by their own names, so nothing outside a method
knows what the method stores.

:class:`Frozen` is the export contract: what a method's ``freeze`` returns
for a kernel or an input, the integer codes (kernels) and the affine map
``real = (code - zero_point) * scale + offset``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from fracq import core
from fracq.core import observers
from fracq.interception import Site

if TYPE_CHECKING:  # the spec module imports this one (via the range estimators)
  from fracq.methods.uniform.spec import TensorSpec

TRAINABLE = 'quant'
STATE = 'quant_stats'


@dataclasses.dataclass(frozen=True)
class QuantTensor:
  """One quantized tensor of one layer, as a method sees it.

  Attributes:
    name: ``'kernel'``, ``'input'`` or an attention operand (``'query'``,
      ``'key'``, ``'probs'``, ``'value'``); variables are named
      ``{name}_{suffix}`` on the layer's scope.
    spec: the rule's spec for this tensor.
    signed: the resolved sign (kernels: signed unless the spec says
      otherwise; inputs: the spec's, else the sign probed on the sample).
    channel_axis: the kernel's output-channel axis (``-1`` for inputs), the
      axis of per-channel parameters and per-channel bits.
    out_axes: all of the kernel's output axes (``()``: ``(channel_axis,)``);
      the other axes are the contraction axes a group-wise spec groups.
    path: the layer's path (for messages).
    site: the layer's scope while training (``None`` when freezing).
    stored: the layer's stored variables per collection when freezing.
    hard: learned bits run at their hard-assigned integer values.
    calibrate: overwrite data-dependent initial values (calibration).
    axis_name: the data-parallel mesh axis (inputs' global statistics).
  """

  name: str
  spec: TensorSpec
  signed: bool
  channel_axis: int
  path: str = ''
  out_axes: tuple[int, ...] = ()
  site: Site | None = None
  stored: Mapping[str, Mapping[str, Any]] | None = None
  hard: bool = False
  calibrate: bool = False
  axis_name: str | None = None

  @property
  def is_kernel(self) -> bool:
    return self.name == 'kernel'

  @property
  def axis(self) -> int | None:
    """The axis of per-channel range parameters (``None``: per tensor).
    Group-wise tensors are quantized on their :func:`group_view`, whose
    channels (last axis) are the groups."""
    if self.spec.granularity in ('channel', 'group'):
      return self.channel_axis
    return None

  def grid(self, bits: int | None = None, *, signed: bool | None = None):
    """``(qmin, qmax)`` at integer ``bits`` (default the spec's), from the
    spec's grid convention (``TensorSpec.int_grid``)."""
    return self.spec.int_grid(
      signed=self.signed if signed is None else signed,
      bits=int(self.spec.bits if bits is None else bits),
      is_kernel=self.is_kernel,
    )

  # -- variables --------------------------------------------------------------
  def variable(
    self, collection: str, suffix: str, init_fn, calibratable: bool = True
  ):
    """Declares (at init) or reads ``{name}_{suffix}``; in calibration a
    ``calibratable`` variable is reset to ``init_fn()``."""
    var = self.site.variable(collection, f'{self.name}_{suffix}', init_fn)
    if (
      calibratable
      and self.calibrate
      and self.site.is_mutable(collection)
      and not self.site.is_initializing
    ):
      var.value = init_fn()
    return var

  def updating(self, collection: str) -> bool:
    """Whether running statistics in ``collection`` are updated now."""
    return self.site.is_mutable(collection) and not self.site.is_initializing

  def read(self, collection: str, suffix: str):
    """A stored variable of a trained model (freezing)."""
    name = f'{self.name}_{suffix}'
    try:
      return self.stored[collection][name]
    except (KeyError, TypeError):
      raise ValueError(
        f'{self.path}: no {collection}/{name} in the variables; freeze the '
        'variables the quantized model was initialised (and trained) with.'
      ) from None

  # -- statistics -------------------------------------------------------------
  @property
  def mesh_axis(self) -> str | None:
    """The mesh axis this tensor is split over (kernels: none)."""
    return None if self.is_kernel else self.axis_name

  def batch(self, x):
    """``x`` for data-dependent initial values: the global batch for inputs
    (evaluated at init and calibration only, never in a step)."""
    return observers.global_batch(x, self.mesh_axis)

  def lsq_grad_scale(self, x, qp, axis: int | None):
    """LSQ's ``1 / sqrt(N Qp)`` with N the elements per channel of the
    global batch (inputs) or of the kernel; ``qp`` may be traced."""
    replicas = observers.bound_axis_size(self.mesh_axis) or 1
    return core.lsq_grad_scale(x, qp, axis=axis, replicas=replicas)

  # -- shapes -----------------------------------------------------------------
  def reduce_axes(self, x, axis: int | None = None) -> tuple[int, ...]:
    """Axes a per-``axis`` statistic of ``x`` reduces over."""
    if axis is None:
      return tuple(range(x.ndim))
    keep = axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != keep)

  def param_shape(self, x, axis: int | None) -> tuple[int, ...]:
    """Shape of a per-channel parameter along ``axis`` (``()`` per tensor)."""
    return () if axis is None else (x.shape[axis],)


def bcast(param, x, axis: int | None):
  """Reshapes a per-channel vector to broadcast along ``axis`` of ``x``."""
  param = jnp.asarray(param, jnp.float32)
  if axis is None or param.ndim == 0:
    return param
  shape = [1] * x.ndim
  shape[axis % x.ndim] = param.shape[0]
  return param.reshape(shape)


class Frozen(NamedTuple):
  """A frozen kernel or input: the export contract of every method.

  ``real = (codes - zero_point) * scale + offset``; ``scale``,
  ``zero_point`` and ``offset`` are scalars or per-channel vectors along
  ``axis``, or, for a group-wise kernel (``group_size`` set), arrays of
  shape ``(groups, out_channels)``: entry ``[g, n]`` maps input features
  ``g * group_size ... (g + 1) * group_size - 1`` of output channel ``n``
  (the kernel's contraction axes flattened in memory order, its
  ``out_axes`` flattened likewise; :func:`expand_groups` broadcasts them
  onto the kernel). ``codes`` are ``signed`` (or not) ``bits``-bit integers
  (``None`` for inputs, quantized at run time); ``bits`` is per tensor or
  per channel (0: a pruned channel, all-zero codes). ``qmin`` / ``qmax`` are
  the grid (inputs; for kernels the grid at the largest bits). ``extras``:
  the trained range parameters worth recording when they are not the scale
  itself (``clip``, ``range``, ``min`` / ``max``).
  """

  codes: np.ndarray | None
  scale: np.ndarray
  bits: np.ndarray
  axis: int | None
  signed: bool
  zero_point: np.ndarray
  offset: np.ndarray
  qmin: int = 0
  qmax: int = 0
  extras: Mapping[str, np.ndarray] | None = None
  group_size: int | None = None
  out_axes: tuple[int, ...] | None = None


def _np_bcast(value, ndim: int, axis: int):
  value = np.asarray(value, np.float32)
  if value.ndim == 0 or value.size == 1:
    return value.reshape(())
  shape = [1] * ndim
  shape[axis] = value.shape[0]
  return value.reshape(shape)


def kernel_codes(
  tensor: QuantTensor,
  fake_quant,
  *,
  scale,
  bits,
  signed: bool,
  zero_point=0.0,
  offset=0.0,
) -> Frozen:
  """A kernel frozen from its fake-quantized values and affine map.

  The codes are read off the fake-quantized kernel (the kernel the model
  computes with, bit for bit). A learned step (LSQ) can cross zero in
  training: the kernel ``s * c`` with ``s < 0`` is ``|s| * (-c)``, stored as
  the positive scale and mirrored codes where they stay on the grid (always
  on the symmetric grid kernels use by default), since integer programs need
  positive scales; on a full-range grid a mirrored ``-qmin`` would leave it
  and the negative scale is kept (the artifact stays exact; integer lowering
  refuses it).
  """
  fq = np.asarray(fake_quant, np.float32)
  axis = tensor.channel_axis % fq.ndim
  scale = np.asarray(scale, np.float32)
  zero_point = np.asarray(zero_point, np.float32)
  offset = np.asarray(offset, np.float32)
  bits = np.asarray(bits).astype(np.int32)
  s_b = _np_bcast(scale, fq.ndim, axis)
  safe = np.where(s_b == 0, 1, s_b)
  shifted = fq - _np_bcast(offset, fq.ndim, axis)
  codes = np.where(
    s_b == 0,
    0,
    np.round(shifted / safe) + _np_bcast(zero_point, fq.ndim, axis),
  )
  top = int(np.max(bits))
  qmin, qmax = tensor.grid(top, signed=bool(signed)) if top > 0 else (0, 0)
  if np.any(scale < 0) and not np.any(zero_point != 0):
    mirrored = np.where(s_b < 0, -codes, codes)
    if mirrored.min() >= qmin and mirrored.max() <= qmax:
      codes, scale = mirrored, np.abs(scale)
  return Frozen(
    codes=codes.astype(np.int32),
    scale=scale,
    bits=bits,
    axis=axis,
    signed=bool(signed),
    zero_point=zero_point,
    offset=offset,
    qmin=int(qmin),
    qmax=int(qmax),
  )


# A method's quantizer: ``quantize(tensor, x) -> fake-quantized x`` and
# ``freeze(tensor, x) -> Frozen`` (``x`` the kernel, ``None`` for inputs).
QuantizeFn = Callable[[QuantTensor, Any], Any]
FreezeFn = Callable[[QuantTensor, Any], Frozen]


# -- group-wise kernels ---------------------------------------------------------
def _group_out_axes(tensor: QuantTensor) -> tuple[int, ...]:
  return tuple(tensor.out_axes) or (tensor.channel_axis,)


def group_view(tensor: QuantTensor, kernel):
  """``(view_tensor, columns)``: a group-wise kernel as the per-channel
  tensor its quantizer runs on (:func:`fracq.core.group_columns`: one
  column per group and output channel, ``group_size`` rows), so every
  per-channel method is per-group on the kernel.

  Raises:
    ValueError: on inputs, or when ``group_size`` does not divide the
      kernel's input features, naming the layer and the length.
  """
  spec = tensor.spec
  if not tensor.is_kernel:
    raise ValueError(
      f"{tensor.path}: granularity='group' is for kernels; quantize the "
      "layer's input per tensor or per channel."
    )
  out_axes = _group_out_axes(tensor)
  shape = tuple(kernel.shape)
  keep = {a % len(shape) for a in out_axes}
  length = int(np.prod([n for a, n in enumerate(shape) if a not in keep]))
  if length % spec.group_size:
    raise ValueError(
      f'{tensor.path}: group_size={spec.group_size} does not divide the '
      f"kernel's contraction length {length} (kernel shape {shape}, output "
      f'axes {out_axes}); pick a group_size that divides {length}, or give '
      'this layer a rule with another granularity.'
    )
  columns = core.group_columns(kernel, out_axes, spec.group_size)
  view = dataclasses.replace(tensor, channel_axis=-1, out_axes=(1,))
  return view, columns


def from_group_view(tensor: QuantTensor, columns, shape):
  """The kernel of shape ``shape`` whose :func:`group_view` is ``columns``."""
  return core.ungroup_columns(
    columns, shape, _group_out_axes(tensor), tensor.spec.group_size
  )


def group_frozen(tensor: QuantTensor, frozen: Frozen, shape) -> Frozen:
  """A kernel frozen on its :func:`group_view`, back in the kernel's layout
  (codes) with ``(groups, out_channels)`` scales, zero points and
  offsets."""
  out_axes = tuple(a % len(shape) for a in _group_out_axes(tensor))
  channels = int(np.prod([shape[a] for a in out_axes]))

  def per_group(value):
    value = np.asarray(value, np.float32)
    return value if value.size == 1 else value.reshape(-1, channels)

  codes = np.asarray(
    from_group_view(tensor, np.asarray(frozen.codes), shape), np.int32
  )
  return frozen._replace(
    codes=codes,
    scale=per_group(frozen.scale),
    zero_point=per_group(frozen.zero_point),
    offset=per_group(frozen.offset),
    axis=out_axes[-1],
    group_size=int(tensor.spec.group_size),
    out_axes=out_axes,
  )


def expand_groups(value, shape, out_axes, group_size: int) -> np.ndarray:
  """A ``(groups, out_channels)`` array (or a scalar) of a group-wise kernel
  broadcast to the kernel's ``shape``."""
  value = np.asarray(value, np.float32)
  if value.size == 1:
    return np.broadcast_to(value.reshape(()), tuple(shape))
  columns = np.broadcast_to(value.reshape(1, -1), (group_size, value.size))
  return np.asarray(
    core.ungroup_columns(columns, shape, out_axes, group_size), np.float32
  )
