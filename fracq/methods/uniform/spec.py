"""The rule spec of a quantized tensor at fixed bits, and the base of every
method's spec.

:class:`TensorSpec` says how one tensor (a layer's kernel, or its input
activation) is quantized by uniform QAT: its integer bits, its grid and the
range estimator (:mod:`fracq.methods.uniform.ranges`) that places the grid.
A method with settings of its own extends it, as qwix's ``QtRule`` extends
its base rule: :class:`fracq.methods.fracbits.FracBitsSpec` adds learned
fractional bits. The interception mechanism treats specs as opaque; it only
asks each one to :meth:`~TensorSpec.validate` itself once, when the rules
are checked.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from fracq.core import uniform
from fracq.interception import Rule
from fracq.methods import cost
from fracq.methods.uniform import ranges

__all__ = [
  'GRANULARITIES',
  'TensorSpec',
  'fixed_bits',
]

GRANULARITIES = ('tensor', 'channel', 'group')

# Former TensorSpec fields that now belong to FracBits' spec.
_MOVED_TO_FRACBITS = ('learn_bits', 'bit_bounds', 'bits_per_channel')


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorSpec:
  """How one tensor (a layer's kernel, or its input activation) is quantized
  at fixed integer bits.

  Learned fractional bits (FracBits) are :class:`fracq.FracBitsSpec`, which
  extends this class with its own fields; ``TensorSpec(learn_bits=True)``
  is refused with a message naming it.

  Attributes:
    bits: integer bit-width (a method's spec may give it another meaning,
      e.g. FracBits' initial bits).
    range_method: where the clipping range comes from, a range estimator
      registered in :mod:`fracq.methods.uniform.ranges`: ``'minmax'``
      (running min/max observer), ``'ema_minmax'`` (moving-average min/max,
      c=0.01), ``'percentile'``, ``'lsq'`` (learned step), ``'lsq_plus'``
      (learned step and offset), ``'pact'`` (learned clip, activations),
      ``'dorefa'`` (tanh-normalised weights, DoReFa).
    signed: signed integer range. ``None`` means: kernels signed; activations
      signed unless the layer's input at init is non-negative (e.g. after a
      ReLU), then unsigned.
    symmetric: zero point fixed at 0 (otherwise affine with a zero point).
    narrow_range: drop the most negative code (e.g. ``[-7, 7]`` at 4 bits).
      ``None`` (the default) resolves per tensor in :meth:`int_grid`: narrow
      for signed symmetric kernels (the symmetric grid FracBits uses, so
      2-bit kernels are ternary), full otherwise (activations, unsigned or
      affine tensors). An explicit ``True``/``False`` wins.
    granularity: ``'tensor'``, ``'channel'`` (kernels: per output channel,
      for an ``Embed`` table per row, i.e. per token; activations: per
      last-axis channel) or ``'group'`` (kernels only): one scale (range,
      zero point) per group of ``group_size`` consecutive input features
      per output channel, the usual granularity of low-bit LLM weights. The
      input features are the kernel's contraction axes flattened in memory
      order (``Dense``: its input axis; ``Conv``: ``kh * kw * cin``;
      ``DenseGeneral``: its non-output axes; ``Embed``: the feature axis of
      each row), and they must be a multiple of ``group_size``. Works with
      every kernel range method but ``'dorefa'`` (which has no scale) and
      with learned bits (FracBits: bits per layer, one shared range per
      group).
    group_size: the number of consecutive input features sharing a scale
      (``granularity='group'`` only; required there).
    percentile: the percentile used by ``range_method='percentile'``.
    ema_decay: ``c`` in ``m <- (1 - c) m + c min(X)`` for ``'ema_minmax'``.
    recompute: what a ``Dense``, ``DenseGeneral`` or ``Conv`` layer keeps
      of this tensor for its backward pass, a memory/time trade-off with
      the same values, and the same gradients to float32 rounding. ``True``: the tensor before
      quantization, re-quantized in the backward pass (no quantized copy
      lives through the step; see ``fracq.core.requantizing_op``).
      ``False``: the quantized copy automatic differentiation keeps.
      ``None`` (the default): re-quantize float32 tensors, keep the copy of
      a 16-bit one (``half_precision=True``), which is half the size and
      whose re-quantization repeats the float32 casts. Quantizers without
      a hand-written gradient (DoReFa, PACT) and group-wise kernels are
      always kept.
  """

  bits: float = 8
  range_method: str = 'lsq'
  signed: bool | None = None
  symmetric: bool = True
  narrow_range: bool | None = None
  granularity: str = 'tensor'
  group_size: int | None = None
  percentile: float = 99.99
  ema_decay: float = 0.01
  recompute: bool | None = None

  # The quantizer that runs tensors of this spec (fracq.methods.quantizers).
  quantizer: ClassVar[str] = 'uniform'
  # Whether the bit-width is a trainable variable under a budget (FracBits)
  # rather than fixed; the cost model and hard assignment count such tensors.
  learn_bits: ClassVar[bool] = False

  def __new__(cls, *args: Any, **kwargs: Any):
    del args  # keyword-only: the generated __init__ refuses positionals
    fields = {f.name for f in dataclasses.fields(cls)}
    if 'learn_bits' in kwargs and cls.learn_bits:
      raise ValueError(
        f'{cls.__name__} learns its bits by definition; drop learn_bits '
        '(fixed bits are fracq.TensorSpec(bits=...)).'
      )
    moved = [k for k in _MOVED_TO_FRACBITS if k in kwargs and k not in fields]
    if moved:
      raise ValueError(
        f'{cls.__name__}({moved[0]}=...): {", ".join(moved)} moved to '
        "FracBits' own spec. Learned fractional bits are "
        'fracq.FracBitsSpec(bits=<initial bits>, bit_bounds=(2, 8), '
        'bits_per_channel=False, ...) with the other TensorSpec fields; '
        'fixed bits are fracq.TensorSpec(bits=<integer>, ...) without '
        'learn_bits.'
      )
    return super().__new__(cls)

  def resolved_recompute(self, dtype) -> bool:
    """``recompute`` with its default (``None``) resolved for a tensor of
    ``dtype``: re-quantize float32 (and wider) tensors, keep 16-bit ones."""
    if self.recompute is not None:
      return bool(self.recompute)
    return jnp.dtype(dtype).itemsize >= 4

  def int_grid(
    self, *, signed: bool, is_kernel: bool, bits: int | None = None
  ) -> tuple[int, int]:
    """``(qmin, qmax)`` of this tensor's integer grid at ``bits`` (default
    ``self.bits``). The one place the provider (training) and the exporter
    (freeze, lowering) read the grid convention from.

    Args:
      signed: the tensor's resolved sign (kernels: signed unless
        ``signed=False``; activations: from the sample input).
      is_kernel: the tensor is a layer's kernel (it decides the default of
        ``narrow_range``).
      bits: integer bit-width; defaults to ``self.bits``.
    """
    return uniform.int_range(
      int(self.bits if bits is None else bits),
      signed=signed,
      narrow_range=self.resolved_narrow_range(
        signed=signed, is_kernel=is_kernel
      ),
    )

  def resolved_narrow_range(self, *, signed: bool, is_kernel: bool) -> bool:
    """``narrow_range`` with its default (``None``) resolved; see the class
    docstring."""
    if self.narrow_range is not None:
      return bool(self.narrow_range)
    return signed and self.symmetric and self._narrow_by_default(is_kernel)

  def _narrow_by_default(self, is_kernel: bool) -> bool:
    # Uniform and FracBits kernels share the symmetric grid, so a FracBits
    # model frozen at k bits computes what uniform k-bit QAT computes.
    return is_kernel

  def tensor_bits(self, *, signed: bool) -> cost.TensorBits:
    """How this tensor's bits count in the cost model: fixed."""
    del signed  # fixed bits count the same either way
    return cost.TensorBits(
      fixed=float(self.bits), bounds=(float(self.bits),) * 2
    )

  def fixed(self, bits: int) -> TensorSpec:
    """This spec at fixed integer ``bits``: a plain :class:`TensorSpec` with
    this spec's grid and range settings (a method's own fields dropped)."""
    common = {
      f.name: getattr(self, f.name) for f in dataclasses.fields(TensorSpec)
    }
    return TensorSpec(**{**common, 'bits': bits})

  def validate(
    self, where: str, *, tensor: str = 'weight', rule: Rule | None = None
  ) -> None:
    """Raises ValueError, naming ``where``, if the settings are inconsistent.

    Args:
      where: the rule and tensor, for messages.
      tensor: ``'weight'`` (the layer's kernel), ``'act'`` (its input) or
        ``'attention'`` (the operands of an attention module's ``q . k^T``
        and ``probs . v``: activations at fixed bits, per tensor, with
        signs of their own).
      rule: the rule holding this spec (a method may check it as a whole).
    """
    del rule  # fixed bits need nothing but the spec
    if tensor == 'attention':
      self._validate_attention(where)
      tensor = 'act'  # otherwise checked as activations
    self._validate_bits(where, tensor)
    self._validate_range(where, tensor)

  def _validate_attention(self, where: str) -> None:
    if self.learn_bits:
      raise ValueError(
        f'{where}: {type(self).__name__} learns bits, but the attention '
        'matmuls run at fixed bits (the resource cost does not count them); '
        'use attention=fracq.TensorSpec(bits=8) (or another integer).'
      )
    if self.granularity != 'tensor':
      raise ValueError(
        f'{where}: granularity={self.granularity!r}: the attention operands '
        "have one range each; use granularity='tensor'."
      )
    if self.signed is not None:
      raise ValueError(
        f'{where}: signed={self.signed}: the attention operands have signs '
        'of their own (query, key and value signed, probabilities '
        'unsigned); drop signed.'
      )

  def _validate_bits(self, where: str, tensor: str) -> None:
    if float(self.bits) != int(self.bits) or not 1 <= self.bits <= 16:
      raise ValueError(
        f'{where}: bits={self.bits} must be an integer in [1, 16] for fixed '
        'bits (fractional bits are learned: use fracq.FracBitsSpec).'
      )
    if int(self.bits) == 1 and self.symmetric and self.range_method != 'dorefa':
      # DoReFa's 1-bit weights are binary (+-1), a grid of their own.
      if self.signed:
        raise ValueError(
          f'{where}: signed=True at bits=1: a signed symmetric 1-bit grid '
          'is {0}, so the tensor would quantize to zeros; use bits=2 '
          '(ternary) or signed=False.'
        )
      if tensor == 'weight' and self.signed is None:
        raise ValueError(
          f'{where}: 1-bit signed kernels: a signed symmetric 1-bit grid '
          'is {0}, so every weight would quantize to zero and nothing '
          'trains; use bits=2 (ternary) or signed=False.'
        )

  def _validate_range(self, where: str, tensor: str) -> None:
    if self.range_method not in ranges.names():
      raise ValueError(
        f'{where}: unknown range_method={self.range_method!r}; choose one '
        f'of {ranges.names()} (or register a new one with '
        'fracq.methods.uniform.ranges.register).'
      )
    if self.recompute not in (None, True, False):
      raise ValueError(
        f'{where}: recompute={self.recompute!r} must be True (re-quantize '
        'in the backward pass), False (keep the quantized copy) or None '
        '(re-quantize float32 tensors, keep 16-bit ones).'
      )
    if self.granularity not in GRANULARITIES:
      raise ValueError(
        f'{where}: unknown granularity={self.granularity!r}; choose one of '
        f'{GRANULARITIES}.'
      )
    if self.granularity == 'group':
      if (
        isinstance(self.group_size, bool)
        or not isinstance(self.group_size, int)
        or self.group_size < 1
      ):
        raise ValueError(
          f"{where}: granularity='group' needs group_size, a positive "
          f'integer (got {self.group_size!r}), e.g. group_size=32: one '
          'scale per 32 consecutive input features of each output channel.'
        )
      if self.range_method == 'dorefa':
        raise ValueError(
          f"{where}: granularity='group' with range_method='dorefa': "
          'DoReFa normalises the whole tensor and has no scale to group; use '
          "range_method='lsq' or 'minmax' for group-wise kernels."
        )
    elif self.group_size is not None:
      raise ValueError(
        f'{where}: group_size={self.group_size} is only used with '
        "granularity='group'; set granularity='group' or drop group_size."
      )
    if self.range_method == 'lsq_plus' and self.symmetric:
      raise ValueError(
        f'{where}: range_method="lsq_plus" learns an offset; set '
        'symmetric=False.'
      )
    if not 0 < self.percentile <= 100:
      raise ValueError(f'{where}: percentile must be in (0, 100].')
    if not 0 < self.ema_decay <= 1:
      raise ValueError(f'{where}: ema_decay must be in (0, 1].')
    if tensor == 'act' and self.granularity == 'group':
      raise ValueError(
        f"{where}: granularity='group' is for weights (kernels); "
        "quantize activations with granularity 'tensor' or 'channel'."
      )
    if tensor == 'act' and self.range_method == 'dorefa':
      raise ValueError(
        f'{where}: DoReFa normalisation is for weights; use '
        "range_method='pact' for activations."
      )
    if tensor == 'weight' and self.range_method == 'pact':
      raise ValueError(
        f'{where}: PACT clips activations; use '
        "'lsq', 'minmax' or 'dorefa' for weights."
      )


def fixed_bits(
  module_path: str,
  bits: int = 8,
  *,
  act_bits: int | None = 8,
  weight_spec: TensorSpec | None = None,
  act_spec: TensorSpec | None = None,
  **kwargs,
) -> Rule:
  """A rule quantizing matched layers at fixed integer bits (e.g. 8-bit).

  The common use is the first conv and the classifier, kept at 8 bits while
  the rest of the network is searched or pushed lower. ``weight_spec`` /
  ``act_spec`` give the grid and range settings (any method's spec: only
  its :class:`TensorSpec` fields are kept, at ``bits`` / ``act_bits``).
  """
  weight = (weight_spec or TensorSpec(granularity='channel')).fixed(bits)
  act = None
  if act_bits is not None:
    act = (act_spec or TensorSpec()).fixed(act_bits)
  return Rule(module_path=module_path, weight=weight, act=act, **kwargs)
