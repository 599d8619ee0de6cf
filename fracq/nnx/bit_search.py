"""HAWQ on NNX models: the Hessian search on the float model's parameters,
then uniform QAT at the chosen bits.

The same search as linen's ``method='hawq'`` (:func:`fracq.methods.hawq.
search.search`: Hutchinson traces of each searched kernel, sensitivities,
an ILP under the budget), run on the NNX model through a linen-like view
of it (``apply(variables, x)`` merges the traced parameters into the
model), so the kernels, probes and losses are the ones linen's search sees
for the same weights. The chosen integer bits become one uniform-QAT rule
per layer (:func:`fracq.methods.hawq.search.rules_for_bits`), and the
model is quantized by them with :func:`fracq.nnx.quantize`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx

from fracq.interception import Rule
from fracq.methods import cost as cost_lib
from fracq.methods import hawq as hawq_lib
from fracq.nnx.qat import QATModule
from fracq.nnx.qat import quantize

__all__ = [
  'float_variables',
  'hawq',
]


def float_variables(model: nnx.Module) -> dict:
  """The float NNX model's parameters in linen's layout,
  ``{'params': {path part: ...: array}}`` (what the search traces)."""
  return {'params': nnx.state(model, nnx.Param).to_pure_dict()}


class _LinenView:
  """``apply(variables, x, **ignored)``: runs the NNX model in eval mode
  with ``variables['params']`` in place of its parameters (traceable; the
  model itself is not changed)."""

  def __init__(self, model: nnx.Module, call_kwargs: dict):
    self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
    self.call_kwargs = call_kwargs

  def apply(self, variables, x, **unused_linen_kwargs):
    params = jax.tree.map(lambda leaf: leaf, self.params)
    nnx.replace_by_pure_dict(params, variables['params'])
    model = nnx.merge(self.graphdef, params, self.rest)
    model.eval()
    return model(x, **self.call_kwargs)


def hawq(
  model: nnx.Module,
  rules: Sequence[Rule],
  sample_input,
  batches: Sequence[Any],
  *,
  budget: cost_lib.Budget,
  candidates: Sequence[int] = (2, 3, 4, 5, 6, 8),
  num_probes: int = 32,
  seed: int = 0,
  call_kwargs: dict | None = None,
  **quantize_kwargs,
) -> tuple[QATModule, dict[str, int], dict]:
  """HAWQ's bit search on a trained float NNX model, then uniform QAT.

  Args:
    model: the trained float ``nnx.Module`` (left intact).
    rules: the rules; layers whose weight spec learns bits
      (``FracBitsSpec``) are searched, fixed-bit and float
      rules keep their layers.
    sample_input: an example input, as for :func:`fracq.nnx.quantize`.
    batches: training batches for the traces (``{'image', 'label'}`` or
      ``{'inputs', 'targets'}`` dicts, as linen's search takes).
    budget: the resource budget the bits must meet.
    candidates: candidate integer weight bits.
    num_probes: Rademacher probes per batch.
    seed: the probes' PRNG seed.
    call_kwargs: extra keywords for the model call.
    **quantize_kwargs: more :func:`fracq.nnx.quantize` arguments
      (``axis_name``, ``kernel_transform``, ...).

  Returns:
    ``(qmodel, bits, info)``: the model quantized by uniform QAT at the
    chosen bits, the bits per searched layer path and the search's info
    (traces, table, seconds).

  Raises:
    ValueError: no budget, or no rule learns bits (nothing to search).
  """
  if budget is None:
    raise ValueError(
      'HAWQ needs a budget: pass budget=fracq.Budget(kind=..., '
      'uniform_bits=...).'
    )
  probe = quantize(
    model,
    rules,
    sample_input,
    budget=budget,
    call_kwargs=call_kwargs,
    **quantize_kwargs,
  )
  if not probe.learns_bits:
    raise ValueError(
      'No rule learns weight bits: nothing for HAWQ to search. Mark the '
      'searched layers with fracq.FracBitsSpec(bits=..., ...).'
    )
  bits, info = hawq_lib.search(
    _LinenView(model, dict(call_kwargs or {})),
    float_variables(model),
    probe.facts,
    probe.rules,
    probe.target,
    probe.cost_model.kind,
    batches,
    candidates=tuple(candidates),
    num_probes=num_probes,
    seed=seed,
  )
  qmodel = quantize(
    model,
    hawq_lib.rules_for_bits(probe.rules, bits),
    sample_input,
    call_kwargs=call_kwargs,
    **quantize_kwargs,
  )
  return qmodel, bits, info
