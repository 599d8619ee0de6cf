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
``keep_float``, and whether ``weight`` / ``act`` / ``attention`` are set; the
specs
themselves belong to the methods (layer 3) that quantize the tensors
(:class:`fracq.TensorSpec` for fixed bits, its extension
:class:`fracq.FracBitsSpec` for learned bits), which validate them
(:class:`MethodSpec`).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Sequence

# Layer types the interceptor knows how to quantize, by class name.
SUPPORTED_LAYER_TYPES = (
  'Dense',
  'DenseGeneral',
  'Conv',
  'ConvTranspose',
  'Einsum',
  'Embed',
  'Attention',
)

# Layer types a rule only matches when it names them in ``layer_types``
# (a rule with ``layer_types=None`` leaves them float).
OPT_IN_LAYER_TYPES = ('Embed',)

# The layer type of ``flax.linen.MultiHeadDotProductAttention`` modules (and
# its subclasses): only rules with an ``attention`` spec (or ``keep_float``)
# match them.
ATTENTION = 'Attention'


@typing.runtime_checkable
class MethodSpec(typing.Protocol):
  """What a rule's ``weight`` / ``act`` spec offers the mechanism.

  Each method defines its own spec (:class:`fracq.TensorSpec` for fixed
  bits, :class:`fracq.FracBitsSpec` for learned bits, ...); the interceptor
  only asks it to check itself once, when the rules are validated.
  """

  def validate(self, where: str, *, tensor: str, rule: Rule) -> None:
    """Raises ValueError, naming ``where``, on inconsistent settings;
    ``tensor`` is ``'weight'``, ``'act'`` or ``'attention'``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
  """Matches layers by module path and says how to quantize them.

  Attributes:
    module_path: regular expression searched (``re.search``) in the layer's
      module path, e.g. ``r'^conv_init$'`` or ``r'stage\\d+_block\\d+/conv'``.
    layer_types: restrict the rule to these layer classes (names from
      ``SUPPORTED_LAYER_TYPES``); ``None`` admits all of them except
      ``'Embed'`` (and ``'Attention'`` for rules without an ``attention``
      spec, see below): embedding tables are quantized only by a rule that names
      them, ``Rule(layer_types=('Embed',), weight=TensorSpec(...))``
      (weight-only: their inputs are token ids, so an ``act`` spec is
      refused). The table is the kernel: per row (``granularity='channel'``,
      one scale per token) or per group along the feature axis; both the
      lookup and ``embed.attend`` (tied output heads) use the quantized
      table.
    weight: how the layer's kernel is quantized, a method's spec
      (``fracq.TensorSpec(bits=4)``, ``fracq.FracBitsSpec(bits=3.5)``, ...);
      ``None`` keeps it float.
    act: how the layer's input activation is quantized; ``None`` keeps it
      float.
    attention: how the two activation-activation matmuls of attention are
      quantized, a fixed-bit spec (``fracq.TensorSpec(bits=8)``, per tensor,
      any activation range method; learned bits are refused). It applies to
      ``flax.linen.MultiHeadDotProductAttention`` modules (subclasses such
      as ``SelfAttention`` included; layer type ``'Attention'``) whose path
      the rule matches: both operands of ``q . k^T`` (the query after its
      ``1 / sqrt(head_dim)`` scaling, and the key) and of ``probs . v`` (the
      softmax probabilities, after attention dropout, and the value) are
      fake-quantized, each with its own range (``quant/<attn>/query_step``,
      ``key_step``, ``probs_step``, ``value_step`` for LSQ): the query, key
      and value on a signed grid, the probabilities on an unsigned one. The
      mask, softmax and dropout stay those of flax (float), as do LayerNorm
      and GELU outside the module. The attention's ``query`` / ``key`` /
      ``value`` / ``out`` projections are ``DenseGeneral`` layers matched by
      the rules like any other. Only rules with an ``attention`` spec (or
      ``keep_float``) match attention modules, and a rule whose only spec is
      ``attention`` matches nothing else, so
      ``Rule(module_path=r'attn$', attention=TensorSpec(bits=8))`` can stand
      first without claiming the projections. The module is run with flax's
      ``qk_attn_weights_einsum_cls`` / ``attn_weights_value_einsum_cls``
      hooks, so it must use ``attention_fn=nn.dot_product_attention`` (or a
      function taking those einsums), no ``precision`` and no einsum
      classes of its own. Quantized by uniform QAT and FracBits (at the
      spec's fixed bits: the resource cost does not count attention); NNX
      attention and the other methods are not covered. The packed artifact
      stores each operand's grid and scale in its manifest
      (``attention``); integer programs do not lower attention.
    keep_float: leave matched layers completely float (they are still listed
      and their facts recorded). Overrides ``weight``, ``act`` and
      ``attention``.
    name: a label for tables and error messages (defaults to the pattern).
    options: method-specific settings (e.g. a sparsity target) passed through
      untouched to the method that interprets the rule.
  """

  module_path: str = '.*'
  layer_types: tuple[str, ...] | None = None
  weight: MethodSpec | None = None
  act: MethodSpec | None = None
  attention: MethodSpec | None = None
  keep_float: bool = False
  name: str | None = None
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def label(self) -> str:
    return self.name or self.module_path

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)

  @property
  def attention_only(self) -> bool:
    """The rule's only spec is ``attention``: it matches attention modules
    and no other layer."""
    return (
      self.attention is not None and self.weight is None and (self.act is None)
    )

  def matches(self, path: str, layer_type: str) -> bool:
    if layer_type == ATTENTION:
      if self.attention is None and not self.keep_float:
        return False
    elif self.attention_only:
      return False
    if self.layer_types is None:
      if layer_type in OPT_IN_LAYER_TYPES:
        return False
    elif layer_type not in self.layer_types:
      return False
    return re.search(self.module_path, path) is not None


def keep_float(module_path: str, **kwargs) -> Rule:
  """A rule that leaves the matched layers float."""
  return Rule(module_path=module_path, keep_float=True, **kwargs)


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
    specs = (rule.weight, rule.act, rule.attention)
    if rule.keep_float and any(spec is not None for spec in specs):
      raise ValueError(
        f'{where}: keep_float=True together with weight/act/attention specs '
        'is contradictory; drop the specs or keep_float.'
      )
    if rule.layer_types is not None and ATTENTION in rule.layer_types:
      if rule.weight is not None or rule.act is not None:
        raise ValueError(
          f'{where}: a weight/act spec on Attention layers: an attention '
          'module has no kernel of its own (its query/key/value/out '
          'projections are DenseGeneral layers); quantize its matmuls with '
          'attention=TensorSpec(...) and its projections with a rule for '
          "layer_types=('DenseGeneral',)."
        )
    if rule.attention is not None and rule.layer_types is not None:
      if ATTENTION not in rule.layer_types:
        raise ValueError(
          f'{where}: an attention spec with layer_types={rule.layer_types}, '
          "which exclude 'Attention': the spec would apply to nothing; add "
          "'Attention' to layer_types or drop layer_types."
        )
    for tensor, spec in (
      ('weight', rule.weight),
      ('act', rule.act),
      ('attention', rule.attention),
    ):
      if spec is None:
        continue
      if not isinstance(spec, MethodSpec):
        raise ValueError(
          f"{where}: {tensor} must be a method's tensor spec such as "
          f'fracq.TensorSpec or fracq.FracBitsSpec, got '
          f'{type(spec).__name__}.'
        )
      spec.validate(f'{where}, {tensor}', tensor=tensor, rule=rule)
  return rules


def match_rule(
  rules: Sequence[Rule], path: str, layer_type: str
) -> tuple[int, Rule] | None:
  """Returns ``(index, rule)`` of the first rule matching, or ``None``."""
  for i, rule in enumerate(rules):
    if rule.matches(path, layer_type):
      return i, rule
  return None
