"""Quantization rules: which layers get quantized, and how.

A rule is a frozen, keyword-only dataclass matched by regular expression on a
layer's module path (``'stage1_block0/conv1'``: the names of the enclosing
modules joined by ``/``). For each intercepted layer the *first* rule whose
``module_path`` matches (``re.search``) and whose ``layer_types`` admits the
layer decides what happens to it; a layer no rule matches stays float.

Rules are validated once, when a model is wrapped, with messages that say how
to fix the mistake; a rule that matches no layer is an error unless the user
opts into a warning (``on_unused='warn'``).

The interception mechanism reads only ``module_path``, ``layer_types`` and
``keep_float``; everything else is for the method (layer 3) that quantizes the
tensors.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from fracq.core import uniform

# Layer types the interceptor knows how to quantize, by class name.
SUPPORTED_LAYER_TYPES = (
  'Dense',
  'DenseGeneral',
  'Conv',
  'ConvTranspose',
  'Einsum',
  'Embed',
)

# Layer types a rule only matches when it names them in ``layer_types``
# (a rule with ``layer_types=None`` leaves them float).
OPT_IN_LAYER_TYPES = ('Embed',)

_RANGE_METHODS = (
  'minmax',
  'ema_minmax',
  'percentile',
  'lsq',
  'lsq_plus',
  'pact',
  'dorefa',
)
_GRANULARITIES = ('tensor', 'channel', 'group')


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorSpec:
  """How one tensor (a layer's kernel, or its input activation) is quantized.

  Attributes:
    bits: integer bit-width (fixed), or the initial bit-width when
      ``learn_bits`` is set (may then be fractional).
    learn_bits: learn a fractional bit-width (FracBits). The bit-width is a
      trainable variable clamped to ``bit_bounds``.
    bit_bounds: ``(b_min, b_max)`` for learned bits. ``b_min < 1`` enables the
      0-bit (pruned) branch.
    bits_per_channel: one bit-width per output channel ("kernel-wise");
      kernels only.
    range_method: where the clipping range comes from: ``'minmax'`` (running
      min/max observer), ``'ema_minmax'`` (moving-average min/max, c=0.01),
      ``'percentile'``, ``'lsq'`` (learned step), ``'lsq_plus'`` (learned step
      and offset), ``'pact'`` (learned clip, activations), ``'dorefa'``
      (tanh-normalised weights, DoReFa).
    signed: signed integer range. ``None`` means: kernels signed; activations
      signed unless the layer's input at init is non-negative (e.g. after a
      ReLU), then unsigned.
    symmetric: zero point fixed at 0 (otherwise affine with a zero point).
    narrow_range: drop the most negative code (e.g. ``[-7, 7]`` at 4 bits).
      ``None`` (the default) resolves per tensor in :meth:`int_grid`: narrow
      for signed symmetric kernels (the symmetric grid FracBits uses, so
      2-bit kernels are ternary) and for any signed tensor with learned bits,
      full otherwise (activations, unsigned or affine tensors). An explicit
      ``True``/``False`` wins for fixed bits; learned bits use the symmetric
      shared-range grid and refuse an explicit value.
    granularity: ``'tensor'``, ``'channel'`` (kernels: per output channel,
      for an ``Embed`` table per row, i.e. per token; activations: per
      last-axis channel) or ``'group'`` (kernels only): one scale (range,
      zero point) per group of ``group_size`` consecutive input features
      per output channel, the usual granularity of low-bit LLM weights. The
      input features are the kernel's contraction axes flattened in memory
      order (``Dense``: its input axis; ``Conv``: ``kh * kw * cin``;
      ``DenseGeneral``: its non-output axes; ``Embed``: the feature axis of
      each row), and they must be a multiple of ``group_size``. Works with
      fixed bits (every kernel range method but ``'dorefa'``, which has no
      scale) and with learned bits (FracBits: bits per layer, one shared
      range per group); ``bits_per_channel`` does not combine with it.
    group_size: the number of consecutive input features sharing a scale
      (``granularity='group'`` only; required there).
    percentile: the percentile used by ``range_method='percentile'``.
    ema_decay: ``c`` in ``m <- (1 - c) m + c min(X)`` for ``'ema_minmax'``.
  """

  bits: float = 8
  learn_bits: bool = False
  bit_bounds: tuple[float, float] = (2.0, 8.0)
  bits_per_channel: bool = False
  range_method: str = 'lsq'
  signed: bool | None = None
  symmetric: bool = True
  narrow_range: bool | None = None
  granularity: str = 'tensor'
  group_size: int | None = None
  percentile: float = 99.99
  ema_decay: float = 0.01

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
    # Uniform and FracBits kernels share the symmetric grid, so a FracBits
    # model frozen at k bits computes what uniform k-bit QAT computes.
    return signed and self.symmetric and (is_kernel or self.learn_bits)

  def validate(self, where: str) -> None:
    """Raises ValueError, naming ``where``, if the settings are inconsistent."""
    lo, hi = self.bit_bounds
    if not 0 <= lo <= hi <= 16:
      raise ValueError(
        f'{where}: bit_bounds={self.bit_bounds} must satisfy '
        '0 <= b_min <= b_max <= 16.'
      )
    if self.learn_bits:
      if not lo <= self.bits <= hi:
        raise ValueError(
          f'{where}: initial bits={self.bits} lies outside '
          f'bit_bounds={self.bit_bounds}; pick bits inside the bounds.'
        )
    else:
      if float(self.bits) != int(self.bits) or not 1 <= self.bits <= 16:
        raise ValueError(
          f'{where}: bits={self.bits} must be an integer in [1, 16] when '
          'learn_bits=False (set learn_bits=True for fractional bits).'
        )
    if self.learn_bits and self.narrow_range is not None:
      raise ValueError(
        f'{where}: narrow_range={self.narrow_range} with learn_bits=True: '
        'learned bits quantize on a shared range with the symmetric grid '
        '[-(2^(k-1)-1), 2^(k-1)-1] (signed) or [0, 2^k-1] (unsigned); '
        'leave narrow_range unset (None).'
      )
    if (
      not self.learn_bits
      and self.signed
      and self.symmetric
      and int(self.bits) == 1
      and self.range_method != 'dorefa'
    ):
      raise ValueError(
        f'{where}: signed=True at bits=1: a signed symmetric 1-bit grid is '
        '{0}, so the tensor would quantize to zeros; use bits=2 (ternary) '
        'or signed=False.'
      )
    if self.range_method not in _RANGE_METHODS:
      raise ValueError(
        f'{where}: unknown range_method={self.range_method!r}; choose one '
        f'of {_RANGE_METHODS}.'
      )
    if self.granularity not in _GRANULARITIES:
      raise ValueError(
        f'{where}: unknown granularity={self.granularity!r}; choose one of '
        f'{_GRANULARITIES}.'
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
      if self.bits_per_channel:
        raise ValueError(
          f"{where}: granularity='group' with bits_per_channel=True: "
          'group-wise kernels learn their bits per layer; drop '
          "bits_per_channel or use granularity='channel'."
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """Matches layers by module path and says how to quantize them.

  Attributes:
    module_path: regular expression searched (``re.search``) in the layer's
      module path, e.g. ``r'^conv_init$'`` or ``r'stage\\d+_block\\d+/conv'``.
    layer_types: restrict the rule to these layer classes (names from
      ``SUPPORTED_LAYER_TYPES``); ``None`` admits all of them except
      ``'Embed'``: embedding tables are quantized only by a rule that names
      them, ``Rule(layer_types=('Embed',), weight=TensorSpec(...))``
      (weight-only: their inputs are token ids, so an ``act`` spec is
      refused). The table is the kernel: per row (``granularity='channel'``,
      one scale per token) or per group along the feature axis; both the
      lookup and ``embed.attend`` (tied output heads) use the quantized
      table.
    weight: how the layer's kernel is quantized; ``None`` keeps it float.
    act: how the layer's input activation is quantized; ``None`` keeps it
      float.
    keep_float: leave matched layers completely float (they are still listed
      and their facts recorded). Overrides ``weight`` and ``act``.
    name: a label for tables and error messages (defaults to the pattern).
    options: method-specific settings (e.g. a sparsity target) passed through
      untouched to the method that interprets the rule.
  """

  module_path: str = '.*'
  layer_types: tuple[str, ...] | None = None
  weight: TensorSpec | None = None
  act: TensorSpec | None = None
  keep_float: bool = False
  name: str | None = None
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def label(self) -> str:
    return self.name or self.module_path

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)

  def matches(self, path: str, layer_type: str) -> bool:
    if self.layer_types is None:
      if layer_type in OPT_IN_LAYER_TYPES:
        return False
    elif layer_type not in self.layer_types:
      return False
    return re.search(self.module_path, path) is not None


def keep_float(module_path: str, **kwargs) -> Rule:
  """A rule that leaves the matched layers float."""
  return Rule(module_path=module_path, keep_float=True, **kwargs)


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
  the rest of the network is searched or pushed lower.
  """
  w = weight_spec or TensorSpec(bits=bits, granularity='channel')
  w = dataclasses.replace(w, bits=bits, learn_bits=False)
  a = None
  if act_bits is not None:
    a = act_spec or TensorSpec(bits=act_bits)
    a = dataclasses.replace(a, bits=act_bits, learn_bits=False)
  return Rule(module_path=module_path, weight=w, act=a, **kwargs)


def validate_rules(rules: Sequence[Rule]) -> tuple[Rule, ...]:
  """Checks a rule list once; returns it as a tuple.

  Raises:
    ValueError: with a message naming the offending rule and the fix.
  """
  if isinstance(rules, Rule):
    rules = (rules,)
  rules = tuple(rules)
  if not rules:
    raise ValueError(
      'Empty rule list: pass at least one fracq.Rule (e.g. '
      "Rule(module_path='.*', weight=TensorSpec(bits=8)))."
    )
  for i, rule in enumerate(rules):
    if not isinstance(rule, Rule):
      raise ValueError(
        f'rule #{i} is a {type(rule).__name__}, not a '
        'fracq.Rule; build rules with fracq.Rule(...).'
      )
    where = f'rule #{i} ({rule.label!r})'
    try:
      re.compile(rule.module_path)
    except re.error as e:
      raise ValueError(
        f'{where}: module_path {rule.module_path!r} is not a valid regular '
        f'expression: {e}.'
      ) from None
    if rule.layer_types is not None:
      if isinstance(rule.layer_types, str):
        raise ValueError(
          f'{where}: layer_types must be a tuple of names, e.g. '
          f"('Conv',), not the string {rule.layer_types!r}."
        )
      bad = [t for t in rule.layer_types if t not in SUPPORTED_LAYER_TYPES]
      if bad:
        raise ValueError(
          f'{where}: unknown layer_types {bad}; supported are '
          f'{SUPPORTED_LAYER_TYPES}.'
        )
    if (
      rule.layer_types is not None
      and 'Embed' in rule.layer_types
      and rule.act is not None
    ):
      raise ValueError(
        f'{where}: an act spec on Embed layers: an embedding lookup takes '
        'token ids, not activations, so Embed is quantized weight-only; '
        'drop act (or give the Embed layers a rule of their own, '
        "Rule(layer_types=('Embed',), weight=TensorSpec(...)))."
      )
    if rule.keep_float and (rule.weight is not None or rule.act is not None):
      raise ValueError(
        f'{where}: keep_float=True together with weight/act specs is '
        'contradictory; drop the specs or keep_float.'
      )
    for tensor, spec in (('weight', rule.weight), ('act', rule.act)):
      if spec is None:
        continue
      if not isinstance(spec, TensorSpec):
        raise ValueError(
          f'{where}: {tensor} must be a fracq.TensorSpec, got '
          f'{type(spec).__name__}.'
        )
      spec.validate(f'{where}, {tensor}')
      if tensor == 'act' and spec.granularity == 'group':
        raise ValueError(
          f"{where}: granularity='group' is for weights (kernels); "
          "quantize activations with granularity 'tensor' or 'channel'."
        )
      if tensor == 'act' and spec.bits_per_channel:
        raise ValueError(
          f'{where}: bits_per_channel is only supported for '
          'weights (kernel-wise bits).'
        )
      if tensor == 'act' and spec.range_method == 'dorefa':
        raise ValueError(
          f'{where}: DoReFa normalisation is for weights; use '
          "range_method='pact' for activations."
        )
      # DoReFa's 1-bit weights are binary (+-1), a grid of their own.
      if (
        tensor == 'weight'
        and not spec.learn_bits
        and spec.symmetric
        and int(spec.bits) == 1
        and spec.signed is not False
        and spec.range_method != 'dorefa'
      ):
        raise ValueError(
          f'{where}: 1-bit signed kernels: a signed symmetric 1-bit grid '
          'is {0}, so every weight would quantize to zero and nothing '
          'trains; use bits=2 (ternary) or signed=False.'
        )
      if tensor == 'weight' and spec.range_method == 'pact':
        raise ValueError(
          f'{where}: PACT clips activations; use '
          "'lsq', 'minmax' or 'dorefa' for weights."
        )
    if (
      rule.weight is None
      and rule.act is not None
      and rule.act.learn_bits
      and not rule.keep_float
    ):
      raise ValueError(
        f'{where}: activation bits are learned (act.learn_bits=True) on '
        'layers whose weights stay float (weight=None); the resource cost '
        'only counts layers with quantized kernels, so nothing would hold '
        'those bits down. Quantize the weights too (weight=TensorSpec(...)) '
        'or fix the activation bits (act.learn_bits=False).'
      )
  return rules


def match_rule(
  rules: Sequence[Rule], path: str, layer_type: str
) -> tuple[int, Rule] | None:
  """Returns ``(index, rule)`` of the first rule matching, or ``None``."""
  for i, rule in enumerate(rules):
    if rule.matches(path, layer_type):
      return i, rule
  return None
