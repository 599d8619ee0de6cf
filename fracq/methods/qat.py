"""Quantization-aware training of an unmodified Flax model: uniform or FracBits.

:func:`quantize` wraps any ``flax.linen`` module with rules (see
:class:`fracq.Rule`) and returns a :class:`QATModel`. The same object serves
uniform QAT (every tensor at fixed integer bits, learned or observed ranges)
and FracBits mixed precision (Yang & Jin, AAAI 2021, arXiv 2007.02017): any
tensor whose spec is a ``FracBitsSpec`` gets a fractional bit-width trained
under a resource budget, with a hard assignment to integer bits at a chosen
step followed by fine-tuning.

Variable collections:

* ``params`` — the model's own parameters, exactly the plain model's tree.
* ``quant`` — trainable quantizer parameters (steps, clips, offsets, bits).
* ``quant_stats`` — non-trainable quantizer state (observer min/max, the
  frozen integer bits after hard assignment).

``QATModel`` implements the training loop's ``ModelWrapper`` protocol
(``fracq.train``): ``init``, ``apply``, ``penalty``, ``metrics``,
``for_step``, ``prepare``, ``report``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from fracq import graph
from fracq.interception import QuantizedModule
from fracq.interception import format_facts_table
from fracq.interception import Rule
from fracq.methods import cost as cost_lib
from fracq.methods import fracbits
from fracq.methods import providers


class QATModel:
  """A Flax module quantized by rules, with FracBits budget handling.

  Args:
    module: any ``flax.linen`` module.
    rules: quantization rules, first match wins.
    sample_input: an example input (array or ``ShapeDtypeStruct``) on which
      per-layer facts (weights, MACs) are recorded.
    budget: resource budget for learned bits (required when any rule learns
      bits, ignored otherwise).
    cost_kind: ``'size'`` or ``'bitops'`` (defaults to the budget's kind).
    penalty: the penalty form; defaults to the authors' ``|cost - target|``.
    hard_assign_step: step at which learned bits are rounded and frozen
      (``None``: never).
    hard_assign_tolerance: the relative tolerance of hard assignment.
    call_kwargs: extra keywords for the module call when recording facts
      (e.g. ``{'train': False}``).
    on_unused: ``'error'`` or ``'warn'`` for rules matching no layer.
  """

  trainable_collections = ('params', 'quant')

  def __init__(
    self,
    module: nn.Module,
    rules: Sequence[Rule],
    sample_input,
    *,
    budget: cost_lib.Budget | None = None,
    cost_kind: str | None = None,
    penalty: fracbits.Penalty | None = None,
    hard_assign_step: int | None = None,
    hard_assign_tolerance: float = 0.01,
    call_kwargs: dict | None = None,
    on_unused: str = 'error',
    kernel_transform=None,
    _hard: bool = False,
    _shared=None,
  ):
    self.module = module
    self.kernel_transform = kernel_transform
    self.hard = _hard
    self.rules = tuple(rules)
    self.on_unused = on_unused
    self.call_kwargs = dict(call_kwargs or {})
    self.signs = (
      _shared[-1]
      if _shared is not None
      else graph.probe_signs(module, self.rules, sample_input, self.call_kwargs)
    )
    self.provider = providers.QATProvider(
      hard=_hard,
      signs=self.signs,
      kernel_transform=kernel_transform,
      axis_name=getattr(module, 'bn_axis_name', None),
    )
    self.qmodule = QuantizedModule(
      module, rules, self.provider, on_unused=on_unused
    )
    self.rules = self.qmodule.rules
    self.hard_assign_step = hard_assign_step
    self.hard_assign_tolerance = hard_assign_tolerance
    self.penalty_fn = penalty or fracbits.Penalty()
    if _shared is not None:  # the hard-mode twin reuses the analysis
      (self.facts, self.cost_model, self.target, self.budget, _) = _shared
      self._twin = None
      return
    self.facts = self.qmodule.layer_facts(sample_input, **self.call_kwargs)
    self.qmodule.check_unused(self.facts)
    self.budget = budget
    self.cost_model, self.target = cost_setup(
      self.facts, self.rules, self.signs, budget, cost_kind
    )
    self._twin = None

  # -- protocol ------------------------------------------------------------
  @property
  def attention_facts(self) -> dict:
    """The attention modules rules matched (path ->
    :class:`fracq.interception.AttentionFacts`)."""
    return self.qmodule.attention_facts

  @property
  def learns_bits(self) -> bool:
    return learns_bits(self.cost_model)

  def init(self, rngs, x, *, train: bool = False, **kwargs):
    return self.qmodule.init(rngs, x, train=train, **kwargs)

  def apply(
    self,
    variables,
    x,
    *,
    train: bool = False,
    mutable=False,
    rngs=None,
    **kwargs,
  ):
    self._check_assigned(variables, 'apply')
    return self.qmodule.apply(
      variables, x, train=train, mutable=mutable, rngs=rngs, **kwargs
    )

  def calibrate(self, variables, x, **kwargs):
    """Re-initialises data-dependent quantizer ranges on real data.

    Run after loading pretrained weights (or on the first real batch): LSQ
    steps, PACT clips, shared FracBits ranges and observer statistics are
    recomputed from the current weights and the activations ``x`` produces.
    Learned and frozen bit-widths are left alone.
    """
    provider = providers.QATProvider(
      hard=self.hard,
      calibrate=True,
      signs=self.signs,
      kernel_transform=self.kernel_transform,
      axis_name=getattr(self.module, 'bn_axis_name', None),
    )
    qm = QuantizedModule(self.module, self.rules, provider, on_unused='warn')
    kwargs = {**self.call_kwargs, **kwargs}
    _, upd = qm.apply(variables, x, mutable=['quant', 'quant_stats'], **kwargs)
    return {**variables, **upd}

  def penalty(self, variables, step):
    """The resource penalty (zero in hard mode or without learned bits)."""
    return resource_penalty(
      self.cost_model,
      self.bits_view(variables),
      step,
      hard=self.hard,
      target=self.target,
      penalty_fn=self.penalty_fn,
      start_bits=self._init_bits(),
    )

  def metrics(self, variables) -> dict[str, float]:
    if self.cost_model is None:
      return {}
    out = cost_metrics(self.cost_model, self.bits_view(variables), self.target)
    info = getattr(self, 'search_info', None)
    if info:
      out['search_seconds'] = info['search_seconds']
    return out

  def for_step(self, step: int) -> 'QATModel':
    if (
      self.hard
      or self.hard_assign_step is None
      or step < self.hard_assign_step
      or not self.learns_bits
    ):
      return self
    if self._twin is None:
      self._twin = self._derived(self.module, hard=True)
    return self._twin

  def with_module(self, module: nn.Module) -> 'QATModel':
    """This model (rules, analysis, hard assignment) on another module that
    takes the same variables, e.g. a bfloat16 model's float32 copy."""
    return self._derived(module, hard=self.hard)

  def _derived(self, module: nn.Module, *, hard: bool) -> 'QATModel':
    twin = QATModel(
      module,
      self.rules,
      None,
      penalty=self.penalty_fn,
      hard_assign_step=self.hard_assign_step,
      hard_assign_tolerance=self.hard_assign_tolerance,
      call_kwargs=self.call_kwargs,
      on_unused=self.on_unused,
      kernel_transform=self.kernel_transform,
      _hard=hard,
      _shared=(
        self.facts,
        self.cost_model,
        self.target,
        self.budget,
        self.signs,
      ),
    )
    # The attention modules the rules matched, seen by this model's trace.
    twin.qmodule.attention_facts = self.attention_facts
    return twin

  def prepare(self, variables):
    """Hard assignment: round learned bits into ``quant_stats`` (idempotent).

    The frozen integer bits live in ``quant_stats/.../*_hard_bits``; they are
    written once (a negative value marks "not assigned yet"), so resuming a
    run after hard assignment never re-rounds drifted bits.
    """
    if not (self.hard and self.learns_bits):
      return variables
    stats = variables.get('quant_stats', {})
    if not fracbits.needs_hard_assignment(stats):
      return variables
    res = fracbits.hard_assign(
      variables['quant'],
      self.cost_model,
      self.target,
      tolerance=self.hard_assign_tolerance,
    )
    logging.info(res.message)
    new_stats = fracbits.write_hard_bits(stats, res.quant)
    self.last_assignment = res
    return {**variables, 'quant_stats': new_stats}

  def report(
    self, variables, workdir: str | None, step: int, writer=None
  ) -> str:
    """Per-layer bit table (logged and returned), PNG chart, TB scalars."""
    if self.cost_model is None:
      return ''
    quant = self.bits_view(variables)
    rows = cost_lib.bits_table(self.cost_model, quant, hard=self.hard)
    table = cost_lib.format_bits_table(rows, self.cost_model.kind)
    m = self.metrics(variables)
    lines = [table] + [f'{k}: {v:,.4g}' for k, v in m.items()]
    text = '\n'.join(lines)
    logging.info('Bit-widths at step %d:\n%s', step, text)
    if writer is not None:
      scal = {f'bits/weight/{r["layer"]}': r['w_bits'] for r in rows}
      scal.update({f'bits/act/{r["layer"]}': r['a_bits'] for r in rows})
      scal.update({f'cost/{k}': v for k, v in m.items()})
      writer.write_scalars(step, scal)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      plot_bits(
        rows,
        os.path.join(workdir, f'bits_step{step}.png'),
        title=f'bit-widths at step {step} '
        f'({m["compression_over_int8"]:.2f}x over INT8)',
      )
      with open(os.path.join(workdir, f'bits_step{step}.txt'), 'w') as f:
        f.write(text + '\n')
      with open(os.path.join(workdir, f'bits_step{step}.json'), 'w') as f:
        json.dump({'rows': rows, 'metrics': m}, f, indent=1)
    return text

  # -- helpers -------------------------------------------------------------
  def bits_view(self, variables):
    """The bits the model runs with: learned ones, or frozen ones if hard."""
    quant = variables.get('quant', {})
    if self.hard:
      self._check_assigned(variables, 'bits_view')
      return fracbits.hard_bits_view(quant, variables.get('quant_stats', {}))
    return quant

  def _check_assigned(self, variables, what: str) -> None:
    """Refuses a hard-mode model whose learned bits were never assigned.

    Unassigned frozen bits are -1, which the hard quantizer maps to the
    pruned (all-zero) branch, so the model would silently output zeros.
    Checked on concrete values only: under ``jit`` the bits are traced, and
    the training loop calls :meth:`prepare` on the host before tracing.
    """
    if not (self.hard and self.learns_bits):
      return
    hard_bits = fracbits.hard_bits.frozen_bits_leaves(
      variables.get('quant_stats', {})
    )
    if any(isinstance(v, jax.core.Tracer) for v in hard_bits):
      return
    if any(np.any(np.asarray(v) < 0) for v in hard_bits):
      raise ValueError(
        f'{what}: this hard-mode model (integer bits after hard assignment) '
        'got variables whose learned bits were never assigned '
        '(quant_stats *_hard_bits are still -1, which would quantize every '
        'such tensor to zeros). Run variables = model.prepare(variables) '
        'on the hard-mode model (model = qmodel.for_step(step)) first.'
      )

  def _init_bits(self) -> float:
    return initial_bits(self.rules)

  def layer_table(self) -> str:
    """What was quantized and how (per-layer facts and rules)."""
    return format_facts_table(self.facts)


def quantize(module, rules: Sequence[Rule], sample_input, **kwargs):
  """Quantizes an unmodified Flax module by rules.

  A ``flax.linen`` module gives a :class:`QATModel`; an ``nnx.Module`` gives
  a :class:`fracq.nnx.QATModule` (:func:`fracq.nnx.quantize`, same
  arguments), a quantized copy of the model.
  """
  if isinstance(module, nnx.Module):
    # fracq.nnx builds on this module: imported here to break the cycle.
    from fracq.nnx import qat as nnx_qat

    return nnx_qat.quantize(module, rules, sample_input, **kwargs)
  return QATModel(module, rules, sample_input, **kwargs)


def learns_bits(cost_model: cost_lib.CostModel | None) -> bool:
  """Whether any tensor in ``cost_model`` learns its bit-width."""
  return cost_model is not None and any(
    layer.weight.learned or layer.act.learned for layer in cost_model.layers
  )


def cost_setup(
  facts: dict,
  rules: Sequence[Rule],
  signs: dict[str, bool],
  budget: cost_lib.Budget | None,
  cost_kind: str | None,
) -> tuple[cost_lib.CostModel | None, float | None]:
  """The cost model of the layers in ``facts`` and the budget's target cost
  (``None`` unless bits are learned), for linen and NNX models alike.

  Raises:
    ValueError: bits are learned without a budget, or activation bits are
      learned under a model-size budget (which does not count them).
  """
  kind = cost_kind or (budget.kind if budget is not None else 'size')
  layers = cost_lib.layer_costs_from_facts(facts, rules, signs=signs)
  cost_model = cost_lib.CostModel(layers, kind) if layers else None
  learns = learns_bits(cost_model)
  if learns and budget is None:
    raise ValueError(
      'Rules learn bit-widths (FracBitsSpec) but no budget was given: '
      'pass budget=fracq.Budget(kind="size", uniform_bits=4) (or '
      'compression=, absolute=).'
    )
  if (
    learns
    and kind == 'size'
    and any(layer.act.learned for layer in cost_model.layers)
  ):
    # NNCF's port let activation bits drift upward with no cost at all.
    raise ValueError(
      'Activation bits are learned but a model-size budget does not '
      'count them, so nothing would hold them down. Use a BitOPs budget '
      "(budget kind='bitops') or fix the activation bits."
    )
  target = cost_model.resolve(budget) if learns else None
  return cost_model, target


def resource_penalty(
  cost_model: cost_lib.CostModel | None,
  quant,
  step,
  *,
  hard: bool,
  target: float | None,
  penalty_fn: fracbits.Penalty,
  start_bits: float,
):
  """``(penalty, metrics)`` of the bits in ``quant`` (zero in hard mode or
  without learned bits)."""
  if not learns_bits(cost_model):
    return jnp.zeros((), jnp.float32), {}
  c = cost_model.cost(quant, hard=hard)
  i8 = cost_model.int8_cost()
  metrics = {'cost': c, 'compression_over_int8': i8 / c}
  if hard:
    return jnp.zeros((), jnp.float32), metrics
  start = cost_model.uniform_cost(start_bits)
  p = penalty_fn(c, target, step=step, start_cost=start, int8_cost=i8)
  metrics['penalty'] = p
  return p, metrics


def cost_metrics(
  cost_model: cost_lib.CostModel, quant, target: float | None
) -> dict[str, float]:
  """Fractional and integer cost and compression of the bits in ``quant``."""
  frac = cost_model.describe(quant, hard=False)
  hard = cost_model.describe(quant, hard=True)
  out = {
    'cost_fractional': frac['cost'],
    'cost_integer': hard['cost'],
    'cost_int8': hard['cost_int8'],
    'compression_over_int8': hard['compression_over_int8'],
    'compression_over_int8_fractional': frac['compression_over_int8'],
  }
  if target is not None:
    out['cost_target'] = target
  return out


def initial_bits(rules: Sequence[Rule]) -> float:
  """The mean initial learned weight bits of ``rules`` (8 when none)."""
  bits = [
    r.weight.bits for r in rules if r.weight is not None and r.weight.learn_bits
  ]
  return float(np.mean(bits)) if bits else 8.0


def plot_bits(rows: list[dict], path: str, title: str = '') -> None:
  """A PNG bar chart of per-layer weight and activation bits."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  names = [r['layer'] for r in rows]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 4))
  ax.bar(x - 0.2, [r['w_bits'] for r in rows], 0.4, label='weight bits')
  ax.bar(
    x + 0.2, [min(r['a_bits'], 16) for r in rows], 0.4, label='activation bits'
  )
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=70, ha='right', fontsize=7)
  ax.set_ylabel('bits')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
