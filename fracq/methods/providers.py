"""The QAT provider: hands each matched tensor to its method's quantizer.

Called by the interceptor (``fracq.interception``) for every matched kernel
and input: it resolves the tensor's sign and channel axis into a
:class:`~fracq.methods.common.QuantTensor` and runs the quantizer the spec
selects (:mod:`fracq.methods.quantizers`: uniform QAT with a registered
range estimator, or FracBits). Variables the methods create on the layer's
scope:

``quant`` (trainable)
  ``{t}_step`` (LSQ/LSQ+ step), ``{t}_offset`` (LSQ+), ``{t}_clip`` (PACT),
  ``{t}_range`` (shared range of a learned-bits tensor), ``{t}_bits``
  (learned fractional bit-width), with ``t`` = ``kernel`` or ``input``; on
  an attention module whose rule has an ``attention`` spec, ``t`` =
  ``query``, ``key``, ``probs`` and ``value`` (the operands of its two
  matmuls, at fixed bits).
``quant_stats`` (state)
  ``{t}_min`` / ``{t}_max`` (observers), ``{t}_hard_bits`` (integer bits
  frozen by hard assignment; ``-1`` until then).

Initialisation is data-dependent (LSQ's ``2 mean|x| / sqrt(Qp)``, for
kernels capped at ``max|x| / Qp``, for uniform steps and FracBits ranges
alike, PACT clip
at the observed maximum, ...): at ``init`` it uses whatever the layer sees, and
:meth:`fracq.methods.qat.QATModel.calibrate` re-runs it on real data and real
(e.g. pretrained) weights.

Memory: tensors whose quantizer can be re-run (uniform QAT with LSQ, LSQ+
or an observer; FracBits on a shared range) are also handed to the
interceptor as deferred quantizers (:meth:`QATProvider.deferred_input`,
:meth:`QATProvider.deferred_kernel`), so that ``Dense``, ``DenseGeneral``
and ``Conv`` layers recompute them in the backward pass
(``fracq.core.requantizing_op``) instead of keeping a quantized copy of
every input and kernel through the training step; a spec's ``recompute``
chooses (by default: float32 tensors are recomputed, 16-bit ones kept).

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

import dataclasses

import jax.numpy as jnp

from fracq import core
from fracq.interception import Site
from fracq.methods import quantizers
from fracq.methods.common import STATE
from fracq.methods.common import TRAINABLE
from fracq.methods.common import QuantTensor
from fracq.methods.uniform.spec import TensorSpec

__all__ = [
  'ATTENTION_OPERANDS',
  'STATE',
  'TRAINABLE',
  'QATProvider',
  'attention_operand',
]


ATTENTION_OPERANDS = ('query', 'key', 'probs', 'value')


def attention_operand(
  spec: TensorSpec, operand: str
) -> tuple[TensorSpec, bool]:
  """``(spec, signed)`` of one operand of an attention matmul under a rule's
  ``attention`` spec, per tensor: ``query`` / ``key`` / ``value`` signed at
  ``spec``; ``probs`` (the softmax output, in ``[0, 1]``) unsigned, with a
  zero point at 0 (``symmetric=False``: an observer's range ``[0, max]``
  then spans the whole grid instead of its upper half)."""
  if operand not in ATTENTION_OPERANDS:
    raise ValueError(
      f'Unknown attention operand {operand!r}; one of {ATTENTION_OPERANDS}.'
    )
  if operand != 'probs':
    return spec, True
  return dataclasses.replace(spec, symmetric=False), False


class QATProvider:
  """Uniform QAT and FracBits quantizers for the interceptor.

  Args:
    hard: run learned-bit tensors at their frozen integer bits (after hard
      assignment) instead of fractional bits.
    calibrate: overwrite the data-dependent initial values of the quantizer
      variables from the current weights and inputs (used by
      ``QATModel.calibrate``; needs ``quant`` and ``quant_stats`` mutable).
    signs: per layer path, whether its input was signed on the sample input.
    kernel_transform: optional ``transform(site, kernel, calibrate) ->
      kernel`` applied before the kernel quantizer (pruning masks, weight
      clustering, ...).
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
    self.kernel_transform = kernel_transform

  # -- interceptor entry points ------------------------------------------
  def quantize_kernel(self, site: Site, kernel):
    if self.kernel_transform is not None:
      kernel = self.kernel_transform(site, kernel, self.calibrate)
    spec = site.rule.weight
    if spec is None:  # the transform alone (e.g. pruning of a float layer)
      return kernel
    signed = True if spec.signed is None else bool(spec.signed)
    tensor = self._tensor(
      site, 'kernel', spec, signed, site.kernel_channel_axis
    )
    return self._quantize(tensor, kernel)

  def quantize_input(self, site: Site, x):
    spec = site.rule.act
    # An input is unsigned when it was non-negative on the sample input
    # (e.g. after a ReLU) unless the spec says otherwise.
    signed = (
      self.signs.get(site.path, True) if spec.signed is None else spec.signed
    )
    tensor = self._tensor(site, 'input', spec, bool(signed), -1)
    return self._quantize(tensor, x)

  def deferred_kernel(self, site: Site, kernel) -> core.Deferred | None:
    """The kernel's quantization as a :class:`fracq.core.Deferred` (its
    value is :meth:`quantize_kernel`'s), which the layer recomputes in its
    backward pass instead of keeping it; None where it cannot be deferred
    (see :meth:`_deferred`), for :meth:`quantize_kernel`."""
    spec = site.rule.weight
    if spec is None or self.kernel_transform is not None:
      return None
    signed = True if spec.signed is None else bool(spec.signed)
    tensor = self._tensor(
      site, 'kernel', spec, signed, site.kernel_channel_axis
    )
    return self._deferred(tensor, kernel)

  def deferred_input(self, site: Site, x) -> core.Deferred | None:
    """The input's quantization as a :class:`fracq.core.Deferred` (its value
    is :meth:`quantize_input`'s), or None where it cannot be deferred."""
    spec = site.rule.act
    signed = (
      self.signs.get(site.path, True) if spec.signed is None else spec.signed
    )
    tensor = self._tensor(site, 'input', spec, bool(signed), -1)
    return self._deferred(tensor, x)

  def quantize_attention(self, site: Site, operand: str, x):
    """One operand of an attention matmul at the rule's ``attention`` spec
    (see :func:`attention_operand`)."""
    spec, signed = attention_operand(site.rule.attention, operand)
    return self._quantize(self._tensor(site, operand, spec, signed, -1), x)

  def _tensor(self, site, name, spec, signed, channel_axis) -> QuantTensor:
    return QuantTensor(
      name=name,
      spec=spec,
      signed=signed,
      channel_axis=channel_axis,
      path=site.path,
      out_axes=tuple(site.out_axes) if name == 'kernel' else (),
      site=site,
      hard=self.hard,
      calibrate=self.calibrate,
      axis_name=self.axis_name,
    )

  @staticmethod
  def _deferred(tensor: QuantTensor, x) -> core.Deferred | None:
    """The tensor's quantizer as a :class:`fracq.core.Deferred` where its
    spec's ``recompute`` asks for it (by default: a float32 tensor) and its
    method can re-run it (``defer`` of :mod:`fracq.methods.quantizers`:
    uniform QAT with LSQ, LSQ+ or an observer, FracBits on a shared range):
    its variables are declared and updated now, its fake quantization
    becomes a pure function of the input and those. Otherwise None (the
    caller quantizes ``x`` and the layer keeps the quantized copy), as for
    grouped kernels."""
    spec = tensor.spec
    if not spec.resolved_recompute(x.dtype) or spec.granularity == 'group':
      return None
    defer = quantizers.for_spec(spec).defer
    found = None if defer is None else defer(tensor, x.astype(jnp.float32))
    if found is None:
      return None
    quantize, params = found
    dtype = x.dtype

    def fn(source, params):
      return quantize(source.astype(jnp.float32), params).astype(dtype)

    return core.Deferred(fn(x, params), x, fn, params)

  @staticmethod
  def _quantize(tensor: QuantTensor, x):
    quantizer = quantizers.for_spec(tensor.spec)
    y = quantizer.quantize(tensor, x.astype(jnp.float32))
    return y.astype(x.dtype)
