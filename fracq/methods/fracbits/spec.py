"""FracBits' rule spec: a tensor whose bit-width is learned.

:class:`FracBitsSpec` extends the fixed-bit :class:`fracq.TensorSpec` (its
grid and range settings) with FracBits' own fields: the learned bit-width
starts at ``bits``, is clamped to ``bit_bounds`` and may be one per output
channel. The spec's class selects the quantizer
(:mod:`fracq.methods.fracbits.quantizer`), and the cost model and hard
assignment count every tensor whose spec learns bits.

References:
  Yang & Jin, "FracBits: Mixed Precision Quantization via Fractional
  Bit-Widths", AAAI 2021.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fracq.interception import Rule
from fracq.methods import cost
from fracq.methods.uniform.spec import TensorSpec

__all__ = ['FracBitsSpec']


@dataclasses.dataclass(frozen=True, kw_only=True)
class FracBitsSpec(TensorSpec):
  """A tensor quantized at a learned fractional bit-width (FracBits).

  Every :class:`fracq.TensorSpec` field keeps its meaning (range method,
  sign, granularity, ...), except ``bits``, the *initial* bit-width (it may
  be fractional), and ``narrow_range``, which must stay ``None``: learned
  bits quantize on a shared range with the symmetric grid.

  Attributes:
    bit_bounds: ``(b_min, b_max)`` the learned bits are clamped to.
      ``b_min < 1`` enables the 0-bit (pruned) branch.
    bits_per_channel: one bit-width per output channel ("kernel-wise");
      kernels only, not with ``granularity='group'``.
  """

  bit_bounds: tuple[float, float] = (2.0, 8.0)
  bits_per_channel: bool = False

  quantizer: ClassVar[str] = 'fracbits'
  learn_bits: ClassVar[bool] = True

  def _narrow_by_default(self, is_kernel: bool) -> bool:
    # Signed learned bits, kernels and inputs, use the symmetric grid.
    del is_kernel
    return True

  def tensor_bits(self, *, signed: bool) -> cost.TensorBits:
    """How this tensor's bits count in the cost model: a variable within
    ``bit_bounds``, rounded to integers as the quantizer rounds them (a
    signed symmetric grid has no 1-bit width; DoReFa's 1-bit grid is
    ``{-1, 1}``)."""
    symmetric_grid = signed and self.range_method != 'dorefa'
    return cost.TensorBits(
      fixed=None,
      bounds=tuple(map(float, self.bit_bounds)),
      per_channel=self.bits_per_channel,
      min_nonzero_bits=2 if symmetric_grid else 1,
    )

  def validate(
    self, where: str, *, tensor: str = 'weight', rule: Rule | None = None
  ) -> None:
    """Raises ValueError, naming ``where``, if the settings are inconsistent
    (see :meth:`fracq.TensorSpec.validate`); with ``rule``, also refuses
    learned input bits on a layer whose kernel stays float."""
    super().validate(where, tensor=tensor, rule=rule)
    if self.granularity == 'group' and self.bits_per_channel:
      raise ValueError(
        f"{where}: granularity='group' with bits_per_channel=True: "
        'group-wise kernels learn their bits per layer; drop '
        "bits_per_channel or use granularity='channel'."
      )
    if tensor == 'act' and self.bits_per_channel:
      raise ValueError(
        f'{where}: bits_per_channel is only supported for '
        'weights (kernel-wise bits).'
      )
    if (
      tensor == 'act'
      and rule is not None
      and rule.weight is None
      and not rule.keep_float
    ):
      raise ValueError(
        f'{where}: activation bits are learned (FracBitsSpec) on layers '
        'whose weights stay float (weight=None); the resource cost only '
        'counts layers with quantized kernels, so nothing would hold those '
        'bits down. Quantize the weights too (weight=fracq.TensorSpec(...) '
        'or FracBitsSpec(...)) or fix the activation bits '
        '(act=fracq.TensorSpec(bits=...)).'
      )

  def _validate_bits(self, where: str, tensor: str) -> None:
    del tensor  # the same for kernels and inputs
    lo, hi = self.bit_bounds
    if not 0 <= lo <= hi <= 16:
      raise ValueError(
        f'{where}: bit_bounds={self.bit_bounds} must satisfy '
        '0 <= b_min <= b_max <= 16.'
      )
    if not lo <= self.bits <= hi:
      raise ValueError(
        f'{where}: initial bits={self.bits} lies outside '
        f'bit_bounds={self.bit_bounds}; pick bits inside the bounds.'
      )
    if self.narrow_range is not None:
      raise ValueError(
        f'{where}: narrow_range={self.narrow_range} on learned bits '
        '(FracBitsSpec): learned bits quantize on a shared range with the '
        'symmetric grid [-(2^(k-1)-1), 2^(k-1)-1] (signed) or [0, 2^k-1] '
        '(unsigned); leave narrow_range unset (None).'
      )
