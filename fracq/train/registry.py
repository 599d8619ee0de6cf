"""Quantization methods by name: one factory each, plain keyword arguments.

``METHODS`` maps ``config.quant.method`` to a :class:`Method`; its factory
builds the model wrapper the training loop drives. Each factory lives in
its method's package (``fracq/methods/<method>/factory.py``); its
keyword-only parameters after ``context`` are the fields of the method's
config block (``config.quant.<method>``) and their defaults are the block's
defaults (:func:`block_defaults`); what several methods share (fixed and
float layers, the budget, a sparsity/cluster transform, the training
length) comes in a :class:`~fracq.methods.context.Context`.

Methods:

* ``'none'``: the float model (or float pruning / clustering with
  ``config.quant.preserve``), :func:`float_run`.
* ``'uniform'``: every tensor at fixed integer bits
  (:func:`fracq.methods.uniform.factory.uniform`).
* ``'fracbits'``: learned fractional bits under a budget, hard assignment at
  ``hard_assign_fraction`` of training, then fine-tuning at integer bits
  (:func:`fracq.methods.fracbits.factory.fracbits`).
* ``'hawq'``: integer bits per layer from Hessian sensitivity and an ILP
  under the same budget (on a trained float model), then uniform QAT at
  those bits (:func:`fracq.methods.hawq.factory.hawq`).
* ``'f8net'``: 8-bit fixed point (power-of-two scales), BatchNorm folded
  (:func:`fracq.methods.f8net.factory.f8net`).

:func:`fracq.methods.preserve.factory.preserve_transform` is the factory of
``config.quant.preserve`` (pruning / clustering kept through training),
which applies on top of any method but F8Net.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable

from ml_collections import config_dict

from fracq.interception import Rule
from fracq.methods import context as context_lib
from fracq.methods.context import Context
from fracq.methods.f8net.factory import f8net
from fracq.methods.fracbits.factory import fracbits
from fracq.methods.hawq.factory import hawq
from fracq.methods.uniform.factory import uniform
from fracq.train.model_wrapper import PlainModel

__all__ = [
  'METHODS',
  'Method',
  'block_defaults',
  'float_run',
  'get',
]


@dataclasses.dataclass(frozen=True)
class Method:
  """A quantization method.

  Attributes:
    factory: ``factory(module, sample_x, *, context, **block)`` -> the model
      wrapper.
    uses_budget: the method needs ``config.quant.budget``.
    quantized: the model it builds is quantized (else float, possibly
      pruned / clustered).
    preserve: it accepts ``config.quant.preserve``.
  """

  factory: Callable[..., Any]
  uses_budget: bool = False
  quantized: bool = True
  preserve: bool = True


def float_run(module, sample_x, *, context: Context):
  """The float model; with a kernel transform, float pruning / clustering
  (every layer seen, nothing quantized)."""
  if context.kernel_transform is None:
    return PlainModel(module)
  rules = context_lib.float_rules(context) + [
    Rule(module_path='.*', name='preserve')
  ]
  return context_lib.qat_model(module, rules, sample_x, context)


METHODS: dict[str, Method] = {
  'none': Method(float_run, quantized=False),
  'uniform': Method(uniform),
  'fracbits': Method(fracbits, uses_budget=True),
  'hawq': Method(hawq, uses_budget=True, preserve=False),
  'f8net': Method(f8net, preserve=False),
}


def get(name: str) -> Method:
  """The method called ``name``; a clear error listing the valid ones."""
  if name not in METHODS:
    raise ValueError(
      f'config.quant.method={name!r} is unknown; choose one of '
      f'{", ".join(repr(m) for m in METHODS)}.'
    )
  return METHODS[name]


def _keyword_fields(factory) -> dict[str, inspect.Parameter]:
  params = inspect.signature(factory).parameters
  return {
    name: p
    for name, p in params.items()
    if p.kind is p.KEYWORD_ONLY and name not in ('context', 'total_steps')
  }


def block_defaults(factory) -> dict[str, Any]:
  """The config block of ``factory``: its keyword fields and defaults
  (``None`` defaults become typed placeholders, so that command-line
  overrides of them parse)."""
  hints = typing.get_type_hints(factory)
  out = {}
  for name, param in _keyword_fields(factory).items():
    value = param.default
    if value is None:
      kinds = [t for t in typing.get_args(hints[name]) if t is not type(None)]
      value = config_dict.placeholder(kinds[0])
    out[name] = value
  return out
