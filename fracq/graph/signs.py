"""The one sign probe: which layer inputs can be negative.

A ReLU makes a layer's input non-negative whatever the weights are, so one
eager forward pass of a (even randomly initialised) model on one example
tells signed inputs from unsigned ones. Uniform QAT and FracBits pick their
activation grids from it, F8Net its input formats, the integer lowering its
input ranges (through :func:`fracq.graph.probe_structure`, which records
signs with the same :class:`SignProbe`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fracq.interception import QuantizedModule
from fracq.interception import Rule


class SignProbe:
  """A provider that runs every matched layer unchanged and records, per
  layer path, whether its input was ever negative (a layer called twice is
  signed if either call saw a negative input). Traced inputs are skipped.
  """

  def __init__(self, layer_types: Sequence[str] | None = None):
    self.signs: dict[str, bool] = {}
    if layer_types is not None:
      self.layer_types = tuple(layer_types)

  def record(self, path: str, x) -> None:
    """Notes the sign of ``x``, the input of the layer at ``path``."""
    if isinstance(x, jax.core.Tracer):
      return
    negative = bool(jnp.min(x) < 0)
    self.signs[path] = self.signs.get(path, False) or negative

  def call_layer(self, call):
    self.record(call.site.path, call.inputs)
    return call.run()

  def quantize_kernel(self, site, kernel):
    return kernel

  def quantize_input(self, site, x):
    return x


def probe_signs(
  module: nn.Module,
  rules: Sequence[Rule],
  sample_input,
  call_kwargs: dict | None = None,
) -> dict[str, bool]:
  """Input signs of the layers ``rules`` quantize, from one eager forward pass
  (a fresh init) on the first example of ``sample_input``.

  Without a concrete sample (None or a ``ShapeDtypeStruct``) nothing is
  known and every input is treated as signed: returns ``{}``.
  """
  if sample_input is None or not hasattr(sample_input, '__array__'):
    if sample_input is not None:
      logging.info(
        'No concrete sample input: activations treated as '
        'signed (set TensorSpec(signed=False) to override).'
      )
    return {}
  probe = SignProbe()
  qmodule = QuantizedModule(module, rules, probe, on_unused='warn')
  x = jnp.asarray(sample_input)[:1]
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    qmodule.init(jax.random.key(0), x, **(call_kwargs or {}))
  return probe.signs
