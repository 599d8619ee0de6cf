"""F8NetModel: an unmodified Flax module under F8Net (see
:mod:`fracq.methods.f8net.provider` for the transform)."""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fracq.graph import clipping_ops
from fracq.graph import probe_structure
from fracq.interception import QuantizedModule
from fracq.interception import Rule
from fracq.interception import check_unused_rules
from fracq.interception import keep_float
from fracq.methods.f8net.options import DEFAULT_RULE
from fracq.methods.f8net.options import F8NetOptions
from fracq.methods.f8net.options import f8net_rules
from fracq.methods.f8net.pact import pact_groups
from fracq.methods.f8net.provider import ALPHA_MIN
from fracq.methods.f8net.provider import PACT
from fracq.methods.f8net.provider import STATS
from fracq.methods.f8net.provider import F8NetProvider
from fracq.methods.f8net.provider import LayerRecord


class F8NetModel:
  """An unmodified Flax module under F8Net (a ``ModelWrapper``).

  The layers quantized are the ``nn.Conv`` / ``nn.Dense`` layers ``rules``
  match (first match wins, as for every method); a ``fracq.keep_float``
  rule, or no match, leaves a layer float. F8Net's rules carry no
  ``weight`` / ``act`` spec: the formats are :class:`F8NetOptions`.

  Args:
    module: any ``flax.linen`` module whose quantizable layers are
      ``nn.Conv`` / ``nn.Dense``.
    sample_input: an example batch; one example is run eagerly to find input
      signs and Conv->BatchNorm pairs.
    rules: which layers to quantize, e.g. ``[fracq.keep_float('^head$'),
      fracq.Rule(module_path='.*')]``; default: every Conv / Dense.
    options: :class:`F8NetOptions`.
    call_kwargs: keywords of the module call for the probe (e.g.
      ``{'train': False}``).
    on_unused: ``'error'`` (default) or ``'warn'`` when a rule matches no
      layer.
    variables: float variables (``params``, ``batch_stats``) to run the
      probe with; default: a fresh init of ``module``.
  """

  trainable_collections = ('params',)

  def __init__(
    self,
    module: nn.Module,
    sample_input,
    *,
    rules: Sequence[Rule] | None = None,
    options: F8NetOptions | None = None,
    call_kwargs: dict | None = None,
    on_unused: str = 'error',
    variables=None,
  ):
    if not isinstance(module, nn.Module):
      raise TypeError(
        f'F8NetModel quantizes flax.linen modules, got '
        f'{type(module).__name__}: it folds BatchNorm into the layers '
        'through the linen interceptor and probes the linen structure. '
        'For an nnx.Module use fracq.nnx.f8net(model, sample_input, ...), '
        "which runs F8Net through the model's linen twin and keeps the "
        'state in NNX variables.'
      )
    if on_unused not in ('error', 'warn'):
      raise ValueError(
        f"on_unused must be 'error' or 'warn', got {on_unused!r}."
      )
    self.module = module
    self.options = options or F8NetOptions()
    self.rules = f8net_rules(rules, self.options)
    self.call_kwargs = dict(call_kwargs or {'train': False})
    self.structure = probe_structure(
      module,
      variables,
      sample_input,
      rules=self.rules,
      **self.call_kwargs,
    )
    st = self.structure
    if not st.order:
      raise ValueError(
        'F8Net found no nn.Conv / nn.Dense layer to quantize in '
        f'{type(module).__name__}: the rules '
        f'{[r.label for r in self.rules]} leave every layer float '
        f'(layers: {sorted(st.facts)}). Add a rule matching the layers to '
        "quantize, e.g. fracq.Rule(module_path='.*'), after any keep_float "
        'rule.'
      )
    check_unused_rules(self.rules, st.facts, on_unused)
    self.signs, self.order = st.signs, st.order
    self.pairs, self.unfolded = dict(st.pairs), dict(st.unfolded)
    # residual modules whose input is quantized once at entry (see
    # F8NetProvider._share_inputs)
    self.shared = dict(st.shared)
    if not self.options.fold_bn:
      self.unfolded.update({bn: 'fold_bn=False' for bn in self.pairs.values()})
      self.pairs = {}
    # PACT clip groups (see pact_groups): reader layer / producer layer /
    # residual module (its input) -> the group's owner
    self.pact_src, self.pact_out, self.pact_entry = (
      pact_groups(st, self.pairs) if self.options.pact else ({}, {}, {})
    )
    if self.pact_src:
      self.trainable_collections = ('params', PACT)
    if self.options.pact and clipping_ops(
      module, variables, sample_input, **self.call_kwargs
    ):
      raise ValueError(
        f'pact=True: {type(module).__name__} clips activations (ReLU6 or '
        'another min/clamp), and a PACT clip folds into the producing '
        'layer only through ReLU (relu6(x / alpha) != relu6(x) / alpha). '
        'Set pact=False for this model.'
      )
    if self.options.pact and not self.pact_src:
      raise ValueError(
        'pact=True but no layer feeds exactly one quantized '
        'layer through a ReLU (conv -> [BN] -> ReLU -> conv); '
        'nothing to clip. Set pact=False.'
      )
    self.qmodule = QuantizedModule(
      module, self.rules, F8NetProvider(self), on_unused=on_unused
    )
    if self.unfolded:
      logging.warning(
        'F8Net: BatchNorm layers left float (not folded): %s',
        '; '.join(f'{k}: {v}' for k, v in self.unfolded.items()),
      )

  # -- ModelWrapper protocol ---------------------------------------------
  def _intercepting(self, provider: F8NetProvider):
    return self.qmodule.intercepting(provider=provider)

  def init(self, rngs, x, *, train: bool = False, **kwargs):
    with self._intercepting(F8NetProvider(self, 'run', train)):
      return self.module.init(rngs, x, train=train, **kwargs)

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
    with self._intercepting(F8NetProvider(self, 'run', train)):
      return self.module.apply(
        variables, x, train=train, mutable=mutable, rngs=rngs, **kwargs
      )

  def calibrate(self, variables, x, **kwargs):
    """Sets each activation FL from ``x`` (e.g. after loading weights)."""
    del kwargs
    with self._intercepting(F8NetProvider(self, 'calibrate')):
      _, upd = self.module.apply(variables, x, train=False, mutable=[STATS])
    return {**variables, **upd}

  def penalty(self, variables, step):
    del variables, step
    return jnp.zeros((), jnp.float32), {}

  def metrics(self, variables):
    del variables
    return {}

  def for_step(self, step: int):
    del step
    return self

  def prepare(self, variables):
    return variables

  def capture(self, variables, x) -> list[LayerRecord]:
    """Integer codes and formats of every quantized layer, in call order
    (eval mode, eager)."""
    provider = F8NetProvider(self, 'capture', train=False)
    with jax.disable_jit(), self._intercepting(provider):
      self.module.apply(variables, x, train=False)
    return provider.records

  def report(self, variables, workdir: str | None, step: int, writer=None):
    """Per-layer formats (logged, returned, written as JSON)."""
    del writer
    stats = variables.get(STATS, {})
    rows = []
    for path in self.order:
      node = stats
      for p in path.split('/'):
        node = node.get(p, {}) if isinstance(node, dict) else {}
      ema = node.get('input_fl_ema') if isinstance(node, dict) else None
      parts = path.split('/')
      for k in range(len(parts) - 1, 0, -1):  # a shared (block) input
        if ema is not None:
          break
        if '/'.join(parts[:k]) in self.shared:
          blk = stats
          for p in parts[:k]:
            blk = blk.get(p, {}) if isinstance(blk, dict) else {}
          ema = blk.get('input_fl_ema') if isinstance(blk, dict) else None
      clip = None
      if path in self.pact_src:  # the producer's learned clip
        node = variables.get(PACT, {})
        for p in self.pact_src[path].split('/'):
          node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and 'pact_alpha' in node:
          clip = float(max(float(np.asarray(node['pact_alpha'])), ALPHA_MIN))
      rows.append(
        {
          'layer': path,
          'input': 'int8' if self.signs.get(path, True) else 'uint8',
          'input_fl': None if ema is None else float(np.round(ema)),
          'folded_bn': self.pairs.get(path),
          'pact_clip': clip,
        }
      )
    lines = [f'{"layer":<24} {"input":<6} {"FL_in":>6} {"clip":>7}  folded BN']
    for r in rows:
      fl = '-' if r['input_fl'] is None else f'{r["input_fl"]:.0f}'
      clip = '-' if r['pact_clip'] is None else f'{r["pact_clip"]:.3g}'
      lines.append(
        f'{r["layer"]:<24} {r["input"]:<6} {fl:>6} {clip:>7}  '
        f'{r["folded_bn"] or "-"}'
      )
    for bn, why in self.unfolded.items():
      lines.append(f'unfolded {bn}: {why}')
    text = '\n'.join(lines)
    logging.info('F8Net formats at step %d:\n%s', step, text)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, f'f8net_step{step}.json'), 'w') as f:
        json.dump({'rows': rows, 'unfolded': self.unfolded}, f, indent=1)
    return text


def build(quant_cfg, module, sample_x) -> F8NetModel:
  """``F8NetModel`` from ``config.quant`` (method ``'f8net'``).

  ``quant_cfg.keep_float`` (a regex, empty for none) becomes a
  ``fracq.keep_float`` rule before the default rule (every Conv / Dense).
  """
  rules = None
  if quant_cfg.keep_float:
    rules = (
      keep_float(quant_cfg.keep_float, name='keep_float'),
      DEFAULT_RULE,
    )
  opts = F8NetOptions(
    weight_format=quant_cfg.f8_weight_format,
    act_format=quant_cfg.f8_act_format,
    weight_granularity=quant_cfg.f8_weight_granularity,
    momentum=quant_cfg.f8_momentum,
    weight_fl_range=tuple(int(v) for v in quant_cfg.f8_weight_fl_range),
    fold_bn=quant_cfg.f8_fold_bn,
    pact=bool(quant_cfg.f8_pact),
    pact_init=float(quant_cfg.f8_pact_init),
    axis_name=getattr(module, 'bn_axis_name', None),
  )
  return F8NetModel(
    module, sample_x, rules=rules, options=opts, call_kwargs={'train': False}
  )
