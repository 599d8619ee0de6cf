"""Resource cost of a quantized model, differentiable in its bit-widths.

Two costs, both bilinear in the bits (FracBits, Yang & Jin, AAAI 2021,
arXiv 2007.02017, section 3.2):

* model size: ``sum_l numel_l * b_w,l`` bits. Kernel weights only: biases and
  BatchNorm parameters stay float (32-bit) and are not part of the budget;
  the exporter reports them separately. Kernel-wise bits split a layer's
  weights evenly over its output channels.
* BitOPs: ``sum_l MACs_l * b_w,l * b_a,l``. A layer whose input is not
  quantized counts its activations at 32 bits.

A quantized ``nn.Embed`` table counts like a kernel in the size (``numel``
of the table times its bits); its lookups have no MACs, its ``attend``
(a tied output head) has a Dense's. Per-channel and per-group scales are
not in the cost: the exporter reports them as overhead.

Only layers with quantized kernels enter the cost. Bit-widths are read from
the ``quant`` collection (``kernel_bits`` / ``input_bits``) for learned
tensors and from the rule for fixed ones; learned bits are clamped to their
bounds by the quantizer's own :func:`fracq.core.fracbits.clamp_bits` (a
bit-width past a bound costs the bound, and the penalty gradient still leads
back inside), so the cost describes the model that actually runs. Below the
smallest non-zero grid (2 bits signed, 1 unsigned) the quantizer mixes the
pruned branch with weight ``b / m``, which the cost, linear in ``b``, counts
exactly. The integer (``hard``) cost rounds with the quantizer's rule
(:func:`fracq.core.fracbits.round_bits`): a signed bit-width never rounds to
1.

Budgets can be stated three ways (:class:`Budget`): an absolute cost, a
compression rate over the INT8 model, or the cost of an equivalent uniform
k-bit model in which the fixed layers (first conv, classifier) keep their
fixed bits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fracq.core import fracbits

FLOAT_BITS = 32
KINDS = ('size', 'bitops')


@dataclasses.dataclass(frozen=True)
class TensorBits:
  """The bit-width of one tensor: a fixed number or a learned variable.

  ``min_nonzero_bits`` tells how learned bits round to integers, as the
  quantizer does: 2 for a signed symmetric grid (no 1-bit width: its integer
  bit-widths are ``{0, 2, 3, ...}``), 1 for unsigned and DoReFa grids.
  """

  fixed: float | None = None  # fixed bits; None when learned
  bounds: tuple[float, float] = (2.0, 8.0)
  per_channel: bool = False
  min_nonzero_bits: int = 1

  @property
  def learned(self) -> bool:
    return self.fixed is None


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """The cost-relevant facts of one layer with a quantized kernel."""

  path: str
  numel: int
  macs: int
  out_channels: int
  weight: TensorBits
  act: TensorBits


def _lookup(tree: Mapping[str, Any], path: str, name: str):
  node = tree
  for part in path.split('/'):
    node = node[part]
  return node[name]


def _bits_value(tb: TensorBits, quant, path, name, hard: bool):
  if not tb.learned:
    return jnp.asarray(tb.fixed, jnp.float32)
  b = _lookup(quant, path, name).astype(jnp.float32)
  lo, hi = tb.bounds
  if hard:
    return fracbits.round_bits_with_offset(
      b, 0.0, lo, hi, min_nonzero_bits=tb.min_nonzero_bits
    )
  # The quantizer's clamp: past a bound the gradient still points back in.
  return fracbits.clamp_bits(b, jnp.float32(lo), jnp.float32(hi))


@dataclasses.dataclass(frozen=True)
class Budget:
  """A resource budget, in one of three forms (exactly one must be set).

  Attributes:
    kind: ``'size'`` (bits of kernel weights) or ``'bitops'``.
    absolute: the cost itself (bits, or BitOPs).
    compression: a compression rate over the INT8 model (``cost_int8 /
      rate``), as NNCF states it.
    uniform_bits: the cost of a uniform k-bit model (weights, and for BitOPs
      activations, at k bits) with the fixed layers at their fixed bits, as the
      FracBits authors state it.
  """

  kind: str = 'size'
  absolute: float | None = None
  compression: float | None = None
  uniform_bits: float | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
        f'Budget kind must be one of {KINDS}, got {self.kind!r}.'
      )
    given = [
      n
      for n in ('absolute', 'compression', 'uniform_bits')
      if getattr(self, n) is not None
    ]
    if len(given) != 1:
      raise ValueError(
        'State a budget in exactly one form: absolute=, '
        f'compression= or uniform_bits= (got {given or "none"}).'
      )
    v = getattr(self, given[0])
    if not v > 0:
      raise ValueError(f'Budget {given[0]}={v} must be positive.')


class CostModel:
  """Size or BitOPs of a model as a function of its bit-widths."""

  def __init__(self, layers: list[LayerCost], kind: str = 'size'):
    if kind not in KINDS:
      raise ValueError(f'cost kind must be one of {KINDS}, got {kind!r}.')
    if not layers:
      raise ValueError(
        'No layer with a quantized kernel: nothing to cost. '
        'Check the rules (weight=TensorSpec(...)).'
      )
    self.layers = tuple(layers)
    self.kind = kind

  # -- differentiable cost -------------------------------------------------
  def layer_costs(self, quant, *, hard: bool = False) -> dict[str, jax.Array]:
    out = {}
    for layer in self.layers:
      bw = _bits_value(layer.weight, quant, layer.path, 'kernel_bits', hard)
      ba = _bits_value(layer.act, quant, layer.path, 'input_bits', hard)
      w_mean = jnp.mean(bw) if bw.ndim else bw
      if self.kind == 'size':
        out[layer.path] = layer.numel * w_mean
      else:
        out[layer.path] = layer.macs * w_mean * ba
    return out

  def integer_cost(self, quant) -> float:
    """The ``hard`` cost on the host in float64 (exact for integer bits).

    Hard assignment compares it with the budget: float32 sums of costs in
    the millions round by several units, enough to pass a budget they
    exceed.
    """
    total = 0.0
    for layer in self.layers:
      bw = np.asarray(
        _bits_value(layer.weight, quant, layer.path, 'kernel_bits', True),
        np.float64,
      )
      ba = float(_bits_value(layer.act, quant, layer.path, 'input_bits', True))
      w_mean = float(bw.mean())
      total += (
        layer.numel * w_mean
        if self.kind == 'size'
        else layer.macs * w_mean * ba
      )
    return total

  def cost(self, quant, *, hard: bool = False) -> jax.Array:
    """Total cost (bits or BitOPs); ``hard`` rounds learned bits."""
    return sum(self.layer_costs(quant, hard=hard).values())

  # -- reference costs -------------------------------------------------------
  def _const_cost(self, w_bits_fn, a_bits_fn) -> float:
    total = 0.0
    for layer in self.layers:
      bw, ba = w_bits_fn(layer), a_bits_fn(layer)
      total += layer.numel * bw if self.kind == 'size' else layer.macs * bw * ba
    return float(total)

  def uniform_cost(self, k: float) -> float:
    """Cost with every learned tensor at ``k`` bits, fixed ones as fixed."""
    w = lambda layer: k if layer.weight.learned else layer.weight.fixed
    a = lambda layer: k if layer.act.learned else layer.act.fixed
    return self._const_cost(w, a)

  def uniform_equivalent_bits(self, target: float) -> float:
    """The uniform bit-width whose :meth:`uniform_cost` equals ``target``.

    The real ``k`` with every learned tensor at ``k`` bits and fixed ones as
    fixed (the inverse of :meth:`uniform_cost`; not clipped to the bit
    bounds). The cost is ``c0 + c1 k + c2 k^2`` with non-negative
    coefficients (``c2`` from BitOPs layers whose weights and activations are
    both learned), increasing for ``k >= 0``: the non-negative root is
    unique.

    Raises:
      ValueError: if no tensor is learned, or ``target`` is below the cost
        of the fixed tensors alone (``k = 0``).
    """
    c0 = self.uniform_cost(0.0)
    c1_plus_c2 = self.uniform_cost(1.0) - c0
    c2 = 0.5 * (self.uniform_cost(2.0) - 2 * self.uniform_cost(1.0) + c0)
    c1 = c1_plus_c2 - c2
    unit = 'bits' if self.kind == 'size' else 'BitOPs'
    if c1 <= 0 and c2 <= 0:
      raise ValueError(
        'No learned bit-width in the cost model: every '
        'uniform bit-width costs the same.'
      )
    rest = float(target) - c0
    if rest < 0:
      raise ValueError(
        f'target {target:,.0f} {unit} is below the cost of the fixed '
        f'tensors alone ({c0:,.0f} {unit}, learned ones at 0 bits): no '
        'uniform bit-width reaches it.'
      )
    # Root of c2 k^2 + c1 k - rest in the form that stays exact when c2 = 0.
    return float(2.0 * rest / (c1 + np.sqrt(c1 * c1 + 4.0 * c2 * rest)))

  def int8_cost(self) -> float:
    """Cost of the INT8 model: every quantized tensor at 8 bits (float
    activations stay at 32)."""
    a = lambda layer: (
      8.0
      if (layer.act.learned or layer.act.fixed != FLOAT_BITS)
      else float(FLOAT_BITS)
    )
    return self._const_cost(lambda layer: 8.0, a)

  def bound_cost(self, which: str) -> float:
    """Cost with every learned tensor at its lower or upper bound."""
    i = 0 if which == 'min' else 1
    w = lambda layer: (
      layer.weight.bounds[i] if layer.weight.learned else layer.weight.fixed
    )
    a = lambda layer: (
      layer.act.bounds[i] if layer.act.learned else layer.act.fixed
    )
    return self._const_cost(w, a)

  def resolve(self, budget: Budget) -> float:
    """The absolute target of ``budget`` for this model.

    Raises:
      ValueError: if the target cannot be met even with every learned
        bit-width at its lower bound, cannot be reached even with every
        learned bit-width at its upper bound (the penalty would push the
        bits up against their bounds and never hold them at the target), or
        the budget's kind differs.
    """
    if budget.kind != self.kind:
      raise ValueError(
        f'Budget kind {budget.kind!r} does not match the '
        f'cost model kind {self.kind!r}.'
      )
    if budget.absolute is not None:
      target = float(budget.absolute)
    elif budget.compression is not None:
      target = self.int8_cost() / budget.compression
    else:
      target = self.uniform_cost(budget.uniform_bits)
    lo, hi = self.bound_cost('min'), self.bound_cost('max')
    unit = 'bits' if self.kind == 'size' else 'BitOPs'
    if target < lo * (1 - 1e-9):
      raise ValueError(
        f'Impossible budget: target {target:,.0f} {unit} is below the '
        f'minimum reachable {lo:,.0f} {unit} (every learned bit-width at '
        'its lower bound, fixed layers as fixed). Lower the bit bounds '
        '(FracBitsSpec.bit_bounds), quantize more layers, or ask for less '
        f'compression (at most {self.int8_cost() / lo:.2f}x over INT8).'
      )
    if target > hi * (1 + 1e-9):
      uniform = (
        f'{self.uniform_equivalent_bits(hi):.2f} uniform bits, '
        if hi > lo
        else ''
      )
      raise ValueError(
        f'Unreachable budget: target {target:,.0f} {unit} is above the '
        f'maximum reachable {hi:,.0f} {unit} (every learned bit-width at '
        'its upper bound, fixed layers as fixed): the bits would pile up '
        'at their upper bounds. Raise the upper bit bound (b_max in '
        'FracBitsSpec.bit_bounds), or lower the budget (at most '
        f'{hi:,.0f} {unit}, {uniform}or at least '
        f'{self.int8_cost() / hi:.2f}x compression over INT8).'
      )
    return target

  def describe(self, quant, *, hard: bool = False) -> dict[str, float]:
    """Host-side scalars for logs: cost, INT8 cost, compression over INT8."""
    c = float(self.cost(quant, hard=hard))
    i8 = self.int8_cost()
    return {'cost': c, 'cost_int8': i8, 'compression_over_int8': i8 / c}


def bits_table(model: CostModel, quant, *, hard: bool = False) -> list[dict]:
  """Per-layer learned/fixed bits and costs, for reports."""
  rows = []
  costs = model.layer_costs(quant, hard=hard)
  for layer in model.layers:
    bw = np.asarray(
      _bits_value(layer.weight, quant, layer.path, 'kernel_bits', hard)
    )
    ba = np.asarray(
      _bits_value(layer.act, quant, layer.path, 'input_bits', hard)
    )
    rows.append(
      {
        'layer': layer.path,
        'params': layer.numel,
        'macs': layer.macs,
        'w_bits': float(bw.mean()),
        'w_bits_min': float(bw.min()),
        'w_bits_max': float(bw.max()),
        'w_learned': layer.weight.learned,
        'a_bits': float(ba),
        'a_learned': layer.act.learned,
        'cost': float(costs[layer.path]),
      }
    )
  return rows


def format_bits_table(rows: list[dict], kind: str) -> str:
  """A per-layer bit-width table a person reads."""
  unit = 'size(bits)' if kind == 'size' else 'BitOPs'
  head = (
    f'{"layer":<34} {"params":>10} {"MACs":>12} {"w_bits":>8} '
    f'{"a_bits":>7} {unit:>14}'
  )
  lines = [head, '-' * len(head)]
  for r in rows:
    wb = f'{r["w_bits"]:.2f}' + ('' if r['w_learned'] else '*')
    if r['w_bits_min'] != r['w_bits_max']:
      wb = f'{r["w_bits_min"]:.0f}-{r["w_bits_max"]:.0f}'
    ab = f'{r["a_bits"]:.2f}' + ('' if r['a_learned'] else '*')
    lines.append(
      f'{r["layer"]:<34} {r["params"]:>10,} {r["macs"]:>12,} '
      f'{wb:>8} {ab:>7} {r["cost"]:>14,.0f}'
    )
  lines.append('(* fixed by rule)')
  return '\n'.join(lines)


def layer_costs_from_facts(
  facts, rules, signs: Mapping[str, bool] | None = None
) -> list[LayerCost]:
  """Builds cost records from interceptor facts and the rules that matched.

  Args:
    facts: interceptor facts keyed by layer path.
    rules: the rules the facts' ``rule_index`` refer to.
    signs: whether each layer's input is signed (as the QAT provider decides
      it); missing layers count as signed. Kernels are signed unless their
      TensorSpec says ``signed=False``. Each spec says how its bits count
      (``spec.tensor_bits(signed=...)``: fixed, or FracBits' learned
      variable).
  """
  signs = {} if signs is None else signs
  out = []
  for f in facts.values():
    if not f.weight_quantized:
      continue
    rule = rules[f.rule_index]
    w, a = rule.weight, rule.act

    def tb(spec, default_signed):
      if spec is None:
        return TensorBits(fixed=float(FLOAT_BITS), bounds=(32.0, 32.0))
      signed = default_signed if spec.signed is None else bool(spec.signed)
      return spec.tensor_bits(signed=signed)

    out.append(
      LayerCost(
        path=f.path,
        numel=f.numel,
        macs=f.macs,
        out_channels=f.out_channels,
        weight=tb(w, True),
        act=tb(a, bool(signs.get(f.path, True))),
      )
    )
  return out
