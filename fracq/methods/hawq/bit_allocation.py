"""Integer bit allocation under a budget: an ILP (HAWQ-V3 style) and manual maps.

Given, for each searched layer ``l`` and candidate bit-width ``b``, a
sensitivity ``Omega_l(b)`` and a cost ``cost_l(b)`` (model size
``params_l * b`` bits, or BitOPs ``MACs_l * b * a_l``), pick one ``b`` per
layer minimising ``sum Omega`` subject to ``sum cost <= budget``, with
layers fixed by the rules (first conv, classifier) kept as they are. Solved
exactly with ``scipy.optimize.milp``; the chosen bits are re-checked in exact
integer arithmetic, so the budget is never exceeded.

Budgets come in the three forms FracBits takes (``fracq.Budget``) and are
resolved by the same :class:`fracq.methods.cost.CostModel`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerChoice:
  """One searched layer: its cost factors and per-bit sensitivity."""

  name: str
  params: int
  macs: int
  sensitivity: Mapping[int, float]
  act_bits: float = 8.0

  def cost(self, b: int, kind: str) -> int:
    if kind == 'size':
      return self.params * b
    return int(round(self.macs * b * self.act_bits))


def allocate_bits_ilp(
  layers: Sequence[LayerChoice],
  candidates: Sequence[int],
  budget: float,
  *,
  kind: str = 'size',
  fixed_cost: float = 0.0,
) -> dict[str, int]:
  """Minimum-sensitivity bits with ``fixed_cost + sum cost <= budget``.

  Raises:
    ValueError: if even the smallest candidate everywhere exceeds the
      budget (the message gives the minimum reachable cost).
  """
  from scipy import optimize

  if kind not in ('size', 'bitops'):
    raise ValueError(f"kind must be 'size' or 'bitops', got {kind!r}.")
  cands = sorted(int(b) for b in candidates)
  if not cands or not layers:
    raise ValueError('Need at least one layer and one candidate bit-width.')
  lo = fixed_cost + sum(layer.cost(cands[0], kind) for layer in layers)
  if lo > budget:
    raise ValueError(
      f'Infeasible budget {budget:,.0f}: the minimum reachable cost with '
      f'every searched layer at {cands[0]} bits is {lo:,.0f}. Allow fewer '
      'bits or ask for less compression.'
    )
  nl, nb = len(layers), len(cands)
  c = np.array([layer.sensitivity[b] for layer in layers for b in cands], float)
  cost_row = np.array(
    [layer.cost(b, kind) for layer in layers for b in cands], float
  )
  one_hot = np.zeros((nl, nl * nb))
  for i in range(nl):
    one_hot[i, i * nb : (i + 1) * nb] = 1
  cons = [
    optimize.LinearConstraint(one_hot, 1, 1),
    optimize.LinearConstraint(cost_row[None, :], -np.inf, budget - fixed_cost),
  ]
  res = optimize.milp(
    c,
    constraints=cons,
    integrality=np.ones(nl * nb),
    bounds=optimize.Bounds(0, 1),
  )
  if not res.success:
    raise ValueError(f'The bit-allocation ILP failed: {res.message}')
  x = np.round(res.x).reshape(nl, nb)
  choice = {
    layer.name: cands[int(np.argmax(x[i]))] for i, layer in enumerate(layers)
  }
  exact = fixed_cost + sum(
    layer.cost(choice[layer.name], kind) for layer in layers
  )
  if exact > budget:  # solver tolerance: never hand back an over-budget map
    raise ValueError(f'ILP solution costs {exact:,.0f} > budget {budget:,.0f}.')
  return choice


def manual_bit_map(
  layer_names: Sequence[str], mapping: Sequence[tuple[str, int]]
) -> dict[str, int]:
  """Bits per layer from ``[(regex, bits)]``; first match wins.

  Raises:
    ValueError: for a layer no regex matches, or a regex matching nothing.
  """
  out, used = {}, set()
  for name in layer_names:
    for i, (pat, bits) in enumerate(mapping):
      if re.search(pat, name):
        out[name] = int(bits)
        used.add(i)
        break
    else:
      raise ValueError(
        f'No entry of the bit map matches layer {name!r}; add '
        "a catch-all like ('.*', 4)."
      )
  unused = [mapping[i][0] for i in range(len(mapping)) if i not in used]
  if unused:
    raise ValueError(f'Bit-map regexes matched no layer: {unused}.')
  return out


def format_bit_table(
  choice: Mapping[str, int], layers: Sequence[LayerChoice]
) -> str:
  lines = [f'{"layer":<30} {"params":>10} {"bits":>5} {"Omega(bits)":>12}']
  for layer in layers:
    b = choice[layer.name]
    lines.append(
      f'{layer.name:<30} {layer.params:>10,} {b:>5} {layer.sensitivity[b]:>12.4g}'
    )
  return '\n'.join(lines)
