"""F8Net's options and rules.

Which layers F8Net quantizes comes from :class:`fracq.Rule`s, matched as for
every method (first match wins, on the layer's module path and type): every
``nn.Conv`` / ``nn.Dense`` a rule matches gets its kernel and its input at
8-bit fixed point; a ``fracq.keep_float(...)`` rule (or no match) leaves the
layer float. The formats come from :class:`F8NetOptions`, not from
``TensorSpec``s, so F8Net's rules carry no ``weight`` / ``act`` spec.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from fracq.interception import Rule
from fracq.interception import keep_float as keep_float_rule
from fracq.interception import validate_rules

# The layer types F8Net quantizes.
LAYER_TYPES = ('Conv', 'Dense')
# The default rule: every Conv / Dense.
DEFAULT_RULE = Rule(module_path='.*', layer_types=LAYER_TYPES, name='f8net')


@dataclasses.dataclass(frozen=True)
class F8NetOptions:
  """How F8Net quantizes (its numeric options; layers come from rules).

  Attributes:
    weight_format: ``'std'`` (FL from the folded kernel's std) or ``'grid'``
      (RMS-optimal FL).
    act_format: same choice for activations (per batch, then EMA).
    weight_granularity: ``'layer'`` (one FL per kernel, as the paper) or
      ``'channel'`` (one FL per output channel).
    momentum: EMA momentum of the activation FL (PyTorch convention).
    weight_fl_range: allowed weight FLs.
    act_fl_range: allowed activation FLs (``None``: 0..7 signed, 0..8
      unsigned, as the paper).
    keep_float: a regex of layer paths left float (their inputs too). The
      older spelling of a rule: it is translated into
      ``fracq.keep_float(keep_float)``, placed before the model's rules.
      New code passes ``rules=[fracq.keep_float(...), ...]`` instead.
    fold_bn: fold Conv/Dense -> BatchNorm pairs (else BNs stay float).
    axis_name: the data-parallel mesh axis (the module's BN axis): training
      activation statistics are averaged over it.
    simulate: quantize (default). False runs the transform with identity
      quantizers: the BN-folded float model, which equals the original one
      (a check of the folding itself).
    pact: fixed-point PACT clips folded into the producing layer (see
      :mod:`fracq.methods.f8net.provider`).
    pact_init: initial clip, in the producer's output units. 4 suits
      BN-normalized ReLU outputs: its grid ``4 / 256`` is the ``2^-6`` the
      statistics rule picks for unit std; training then moves it.
  """

  weight_format: str = 'std'
  act_format: str = 'std'
  weight_granularity: str = 'layer'
  momentum: float = 0.1
  weight_fl_range: tuple[int, int] = (0, 15)
  act_fl_range: tuple[int, int] | None = None
  keep_float: str = ''
  fold_bn: bool = True
  simulate: bool = True
  axis_name: str | None = None
  pact: bool = False
  pact_init: float = 4.0

  def __post_init__(self):
    for name in ('weight_format', 'act_format'):
      if getattr(self, name) not in ('std', 'grid'):
        raise ValueError(
          f"{name}={getattr(self, name)!r}: use 'std' "
          "(F8Net's floor(log2(C/std))) or 'grid' (RMS search)."
        )
    if self.weight_granularity not in ('layer', 'channel'):
      raise ValueError(
        f'weight_granularity={self.weight_granularity!r}: use '
        "'layer' or 'channel'."
      )
    if not 0 < self.momentum <= 1:
      raise ValueError(f'momentum={self.momentum} must be in (0, 1].')
    if self.keep_float:
      try:
        re.compile(self.keep_float)
      except re.error as e:
        raise ValueError(
          f'keep_float={self.keep_float!r} is not a valid regular '
          f'expression: {e}.'
        ) from None
    if not self.pact_init > 0:
      raise ValueError(
        f'pact_init={self.pact_init} must be > 0 (the initial '
        'clip of a ReLU output).'
      )


def f8net_rules(
  rules: Sequence[Rule] | None, options: F8NetOptions
) -> tuple[Rule, ...]:
  """F8Net's validated rule list: ``rules`` (default: every Conv / Dense),
  preceded by ``fracq.keep_float(options.keep_float)`` when that is set.

  Raises:
    ValueError: a rule carries a ``weight`` / ``act`` spec (F8Net's formats
      are its options) or names a layer type F8Net does not quantize.
  """
  rules = (DEFAULT_RULE,) if rules is None else validate_rules(rules)
  for i, rule in enumerate(rules):
    where = f'rule #{i} ({rule.label!r})'
    if rule.weight is not None or rule.act is not None:
      raise ValueError(
        f'{where}: F8Net quantizes the kernel and input of every layer a '
        'rule matches to 8-bit fixed point, with formats set by '
        'F8NetOptions; it takes no weight/act TensorSpec. Use '
        f'Rule(module_path={rule.module_path!r}) to quantize those layers '
        'or fracq.keep_float(...) to keep them float.'
      )
    other = [t for t in rule.layer_types or () if t not in LAYER_TYPES]
    if other and not rule.keep_float:
      raise ValueError(
        f'{where}: F8Net quantizes {LAYER_TYPES} layers only, not {other}; '
        f'restrict layer_types to {LAYER_TYPES}.'
      )
  if options.keep_float:
    rules = (
      keep_float_rule(options.keep_float, name='F8NetOptions.keep_float'),
    ) + rules
  return rules
