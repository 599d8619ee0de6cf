"""What the method factories share: their :class:`Context` and rule list.

A method's factory (``fracq/methods/<method>/factory.py``) builds the model
wrapper the training loop drives from plain keyword arguments, the fields
of its config block, plus a :class:`Context`: what several methods share
(fixed and float layers, the budget, a sparsity/cluster transform, the
training length). :func:`standard_rules` is the rule list of the QAT
methods: the float layers, the fixed layers, then every other layer at the
method's specs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from fracq.interception import Rule
from fracq.methods import cost as cost_lib
from fracq.methods.qat import QATModel
from fracq.methods.uniform.spec import TensorSpec

__all__ = [
  'Context',
  'fixed_act_spec',
  'float_rules',
  'int_bits',
  'qat_model',
  'standard_rules',
]


@dataclasses.dataclass(frozen=True)
class Context:
  """What every method's factory gets besides its own config block.

  Attributes:
    fixed_layers: regex of layers kept at fixed bits ('' = none).
    fixed_bits: their weight bits.
    fixed_act_bits: their input bits.
    embed_layers: regex of the ``nn.Embed`` tables quantized (weight-only,
      one scale per row) at ``embed_bits`` ('' = embeddings stay float;
      language models: ``'^embed$'``, the byte table, also the tied output
      head).
    embed_bits: their bits.
    attention_layers: regex of the attention modules
      (``nn.MultiHeadDotProductAttention``, e.g. ``'attn$'``) whose two
      activation-activation matmuls (``q . k^T``, ``probs . v``) are
      quantized at ``attention_bits`` ('' = attention stays float), per
      tensor (``fracq.Rule``'s ``attention``); uniform QAT, FracBits (fixed
      bits) and HAWQ.
    attention_bits: their bits.
    attention_range: their range method ('' = the activations', LSQ when
      inputs stay float).
    keep_float: regex of layers left float ('' = none).
    on_unused: what a rule matching no layer does (``'error'``, ``'warn'``).
    recompute: every quantized kernel's and input's ``recompute``
      (:class:`fracq.TensorSpec`: re-quantize in the backward pass instead
      of keeping the quantized copy); ``None`` leaves the specs' default
      (float32 tensors re-quantized, 16-bit ones kept).
    budget_kind: ``'size'`` or ``'bitops'``: the cost the model reports.
    budget: the budget (FracBits, HAWQ), or ``None``.
    kernel_transform: pruning / clustering kept through training, or None.
    min_weight_bits: learned weight bits never go below this (the bits a
      cluster count needs), 0 for no bound.
    total_steps: training steps (places FracBits' hard assignment).
    float_model: ``num_batches -> (float variables, training batches)``,
      the trained float model HAWQ searches on; ``None`` when there is
      none.
  """

  fixed_layers: str = ''
  fixed_bits: int = 8
  fixed_act_bits: int = 8
  embed_layers: str = ''
  embed_bits: int = 8
  attention_layers: str = ''
  attention_bits: int = 8
  attention_range: str = ''
  keep_float: str = ''
  on_unused: str = 'error'
  recompute: bool | None = None
  budget_kind: str = 'size'
  budget: cost_lib.Budget | None = None
  kernel_transform: Any = None
  min_weight_bits: float = 0.0
  total_steps: int | None = None
  float_model: Callable[[int], tuple[dict, list]] | None = None


def float_rules(context: Context) -> list[Rule]:
  """The rule keeping ``context.keep_float`` layers float (if any)."""
  if not context.keep_float:
    return []
  return [
    Rule(module_path=context.keep_float, keep_float=True, name='keep_float')
  ]


def int_bits(bits, method: str, what: str) -> int:
  """``bits`` as an integer, or an error naming ``config.quant.<method>``.

  Raises:
    ValueError: ``bits`` is fractional.
  """
  if float(bits) != int(bits):
    raise ValueError(
      f'config.quant.{method}.{what}_bits={bits} must be an integer for '
      f"method={method!r} (fractional bits need method='fracbits')."
    )
  return int(bits)


def fixed_act_spec(
  quantize_acts: bool, act_bits, method: str, act_range: str, granularity: str
) -> TensorSpec | None:
  """The input spec of a method with fixed integer input bits (``None``
  when inputs stay float)."""
  if not quantize_acts:
    return None
  return TensorSpec(
    bits=int_bits(act_bits, method, 'act'),
    range_method=act_range,
    granularity=granularity,
  )


def standard_rules(
  context: Context, weight: TensorSpec, act: TensorSpec | None
) -> list[Rule]:
  """The float layers, the attention matmuls (at ``context.attention_bits``
  and ``context.attention_range``, by default the range method of ``act``,
  LSQ when inputs stay float), the
  embedding tables (weight-only at ``context.embed_bits``, per row), the
  fixed layers (at their fixed bits, with the range methods of ``weight`` /
  ``act``; per channel where ``weight`` is group-wise), then every other
  layer at ``weight`` / ``act``."""
  rules = float_rules(context)
  if context.attention_layers:
    # An attention-only rule: it claims the attention modules, not their
    # projections, which the rules below quantize as layers.
    rules.append(
      Rule(
        module_path=context.attention_layers,
        name='attention',
        attention=TensorSpec(
          bits=int(context.attention_bits),
          range_method=context.attention_range
          or (act.range_method if act is not None else 'lsq'),
        ),
      )
    )
  if context.embed_layers:
    rules.append(
      Rule(
        module_path=context.embed_layers,
        layer_types=('Embed',),
        name='embed',
        weight=TensorSpec(
          bits=int(context.embed_bits),
          range_method=weight.range_method,
          granularity='channel',
        ),
      )
    )
  if context.fixed_layers:
    fixed_act = None
    if act is not None:
      fixed_act = TensorSpec(
        bits=int(context.fixed_act_bits),
        range_method=act.range_method,
        granularity=act.granularity,
      )
    # Group-wise scales are for the low-bit layers; the 8-bit first and last
    # layers keep one scale per output channel.
    fixed_weight = TensorSpec(
      bits=int(context.fixed_bits),
      range_method=weight.range_method,
      granularity=(
        'channel' if weight.granularity == 'group' else weight.granularity
      ),
    )
    rules.append(
      Rule(
        module_path=context.fixed_layers,
        name='fixed',
        weight=fixed_weight,
        act=fixed_act,
      )
    )
  rules.append(Rule(module_path='.*', weight=weight, act=act, name='default'))
  return rules


def with_recompute(rules, recompute: bool | None) -> list[Rule]:
  """``rules`` with every kernel and input spec's ``recompute`` set to
  ``recompute`` (``None``: unchanged)."""
  if recompute is None:
    return list(rules)

  def spec(s):
    if not isinstance(s, TensorSpec):
      return s
    return dataclasses.replace(s, recompute=recompute)

  return [
    dataclasses.replace(r, weight=spec(r.weight), act=spec(r.act))
    for r in rules
  ]


def qat_model(module, rules, sample_x, context: Context, **kwargs) -> QATModel:
  """A :class:`~fracq.methods.qat.QATModel` with the context's cost kind,
  unused-rule policy and kernel transform (``kwargs``: the rest)."""
  return QATModel(
    module,
    with_recompute(rules, context.recompute),
    sample_x,
    cost_kind=context.budget_kind,
    call_kwargs={'train': False},
    on_unused=context.on_unused,
    kernel_transform=context.kernel_transform,
    **kwargs,
  )
