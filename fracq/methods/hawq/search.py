"""HAWQ-style mixed precision: Hessian sensitivity + ILP, then uniform QAT.

The baseline FracBits is compared against (seed 000's reviewers asked for
it). From a trained float model:

1. per searched layer, the average Hessian trace of its kernel (Hutchinson,
   :mod:`fracq.core.hessian`) on a few training batches;
2. sensitivity ``Omega_l(b) = avg_trace_l * ||Q_b(W_l) - W_l||^2`` for each
   candidate ``b`` (symmetric per-channel quantizer);
3. an ILP (:mod:`fracq.methods.hawq.bit_allocation`) picks one bit-width per
   layer under the same budget FracBits takes, fixed layers kept;
4. the chosen integer bits become ordinary uniform-QAT rules (one per
   layer) and the model is fine-tuned through the normal QAT path.
"""

from __future__ import annotations

import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fracq import data as data_lib
from fracq.core import hessian
from fracq.interception import Rule
from fracq.methods.hawq import bit_allocation
from fracq.methods import cost as cost_lib
from fracq.methods.uniform import TensorSpec


def _path_of(keypath) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in keypath)


def mean_over_processes(traces, layers):
  """``traces`` with each layer's ``avg_trace`` averaged over the processes.

  Each process traces the loss of its own (equal) part of the global
  batches with the same probes; the trace is linear in the loss, so the mean
  over processes is the trace of the global-batch loss, and every process
  then allocates the same bits. A no-op in a single process.
  """
  if jax.process_count() == 1:
    return traces
  from jax.experimental import multihost_utils

  local = np.array([traces[name]['avg_trace'] for name in layers], np.float32)
  every = np.asarray(multihost_utils.process_allgather(local))
  out = {name: dict(v) for name, v in traces.items()}
  for name, v in zip(layers, every.mean(axis=0)):
    out[name]['avg_trace'] = float(v)
    out[name]['trace'] = float(v) * out[name]['n']
  return out


def search(
  module,
  variables,
  facts,
  rules,
  budget_target: float,
  kind: str,
  batches,
  *,
  candidates=(2, 3, 4, 5, 6, 8),
  num_probes: int = 32,
  seed: int = 0,
):
  """Runs steps 1-3; returns ``(bits per layer, info)``.

  Args:
    module: the plain Flax module.
    variables: its trained float variables (``params``, ``batch_stats``).
    facts: per-layer facts (``QuantizedModule.layer_facts``).
    rules: the rule list; layers whose rule fixes integer weight bits are
      kept, those whose weight spec learns bits are searched.
    budget_target: absolute cost (bits or BitOPs) not to exceed.
    kind: ``'size'`` or ``'bitops'``.
    batches: training batches for the traces (images and labels, or
      token windows: ``fracq.data.model_input`` / ``model_target``).
    candidates: candidate integer bit-widths.
    num_probes: Rademacher probes per batch.
    seed: PRNG seed of the probes.
  """
  t0 = time.time()
  searched, fixed_cost, act_bits = [], 0.0, {}
  for path, f in facts.items():
    if not f.weight_quantized:
      continue
    rule = rules[f.rule_index]
    a = rule.act.bits if rule.act is not None else cost_lib.FLOAT_BITS
    act_bits[path] = float(a)
    if rule.weight.learn_bits:
      searched.append(path)
    else:
      b = float(rule.weight.bits)
      fixed_cost += f.numel * b if kind == 'size' else f.macs * b * a
  params = variables['params']
  leaves = jax.tree_util.tree_leaves_with_path(params)
  groups = {}
  for kp, _ in leaves:
    p = _path_of(kp)
    for layer in searched:
      if p == f'{layer}/kernel':
        groups[layer] = [kp]
  other = {k: v for k, v in variables.items() if k != 'params'}

  def loss_fn(p, batch):
    x = data_lib.model_input(batch)
    out = module.apply({'params': p, **other}, x, train=False)
    out = out[0] if isinstance(out, tuple) else out
    # Classification: (batch, classes) logits; language models: (batch,
    # length, vocab), every position's next-token loss.
    return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(
        out, data_lib.model_target(batch)
      )
    )

  traces = hessian.hutchinson_traces(
    loss_fn,
    params,
    jax.random.key(seed),
    groups=groups,
    num_probes=num_probes,
    batches=batches,
  )
  traces = mean_over_processes(traces, searched)
  kernels = {
    _path_of(kp)[: -len('/kernel')]: x
    for kp, x in leaves
    if _path_of(kp).endswith('/kernel')
  }
  choices = []
  for layer in searched:
    omega = hessian.hawq_sensitivity(
      max(traces[layer]['avg_trace'], 0.0),
      kernels[layer],
      hessian.symmetric_per_channel,
      candidates,
    )
    f = facts[layer]
    choices.append(
      bit_allocation.LayerChoice(
        name=layer,
        params=f.numel,
        macs=f.macs,
        sensitivity=omega,
        act_bits=act_bits[layer],
      )
    )
  choice = bit_allocation.allocate_bits_ilp(
    choices, candidates, budget_target, kind=kind, fixed_cost=fixed_cost
  )
  info = {
    'search_seconds': time.time() - t0,
    'traces': traces,
    'table': bit_allocation.format_bit_table(choice, choices),
  }
  logging.info(
    'HAWQ bit allocation (%.1fs):\n%s', info['search_seconds'], info['table']
  )
  return choice, info


def rules_for_bits(rules, choice: dict[str, int]) -> list[Rule]:
  """Uniform-QAT rules: the fixed/float rules, then one rule per searched
  layer at its chosen integer bits (same range method and activations)."""
  learned = [r for r in rules if r.weight is not None and r.weight.learn_bits]
  if not learned:
    raise ValueError('No rule learns bits: nothing for HAWQ to allocate.')
  template = learned[0]
  keep = [
    r for r in rules if not (r.weight is not None and r.weight.learn_bits)
  ]
  per_layer = [
    Rule(
      module_path=f'^{re.escape(path)}$',
      name=f'hawq_{bits}b',
      weight=TensorSpec(
        bits=bits,
        range_method=template.weight.range_method,
        granularity=template.weight.granularity,
        group_size=template.weight.group_size,
      ),
      act=template.act,
    )
    for path, bits in choice.items()
  ]
  # Fixed and float rules first: they claim their layers exactly as before.
  return keep + per_layer
