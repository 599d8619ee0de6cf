"""Integer programs and ONNX from NNX models, through their linen twins.

The integer lowering (:func:`fracq.export.lower`, :func:`fracq.export.
export_integer`, :func:`fracq.export.onnx_export.export_onnx`) reads a
model's structure by tracing a linen module (:mod:`fracq.graph`). An NNX
model reaches it through its *linen twin*: the linen module that computes
the same function with the same layer names, so that the NNX state in
linen's layout (:meth:`fracq.nnx.QATModule.linen_variables`) is that
module's variables. :func:`to_linen` quantizes the twin by the NNX model's
own rules, budget and kernel transform, checks that the two are one model
(same per-layer facts, same variable tree and shapes, same eval outputs on
the sample) and returns the linen wrapper and variables every export takes:

```python
wrapper, variables = fracq.nnx.to_linen(qmodel, images)
program = fracq.export.lower(wrapper, variables, images)
report = fracq.export.onnx_export.export_onnx(
  wrapper, variables, images, 'model.onnx'
)
```

Which NNX models can be lowered: those whose twin the linen QAT lowering
supports, quantized by uniform QAT or hard-assigned FracBits: networks of
``nnx.Conv`` / ``nnx.Linear`` layers with BatchNorm, ReLU / ReLU6,
depthwise convolutions, residual adds, concatenations and average / max
pools (:class:`fracq.nnx.models.DigitsCNN`, :class:`fracq.nnx.models.
ResNet`). The twin is the ``linen_module()`` method of the NNX model or is
passed in. ``TransformerBlock`` has a twin, but the QAT lowering refuses
attention; models that cannot be lowered export the packed artifact
(``export.export_model(qmodel, qmodel.linen_variables(), path)``). An NNX
model under F8Net (:func:`fracq.nnx.f8net`) computes through its twin
already: ``to_linen(fmodel)`` returns its ``F8NetModel`` and variables,
which lower to bit-exact integer programs (ResNets included).
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import numpy as np
from flax import nnx
from flax import linen as nn

from fracq.methods import qat as qat_lib
from fracq.methods.f8net.model import F8NetModel
from fracq.nnx.f8net import F8NetModule
from fracq.nnx.qat import QATModule

__all__ = [
  'to_linen',
]


def _default_call_kwargs(linen_module: nn.Module) -> dict:
  params = inspect.signature(type(linen_module).__call__).parameters
  return {'train': False} if 'train' in params else {}


def _per_example(facts: dict) -> dict:
  """Layer facts without the batch axis (the two models may have been
  traced on batches of different sizes)."""
  return {
    path: dataclasses.replace(
      fact, in_shape=fact.in_shape[1:], out_shape=fact.out_shape[1:]
    )
    for path, fact in facts.items()
  }


def _shapes(tree) -> dict:
  return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def to_linen(
  qmodel,
  sample_input=None,
  linen_module: nn.Module | None = None,
  *,
  call_kwargs: dict | None = None,
  rtol: float = 1e-5,
) -> tuple[qat_lib.QATModel | F8NetModel, dict]:
  """The linen twin of a quantized NNX model, checked to be the same model.

  Args:
    qmodel: a :class:`fracq.nnx.QATModule` (hard-assigned or not), or a
      :class:`fracq.nnx.F8NetModule` (which computes through its twin,
      checked when it was built: its ``F8NetModel`` and variables are
      returned as they are, and the other arguments are unused).
    sample_input: a batch to compare the two models' outputs on (eval
      mode) and to trace the twin with.
    linen_module: the linen module computing what ``qmodel.model`` computes,
      with the same layer names; by default the NNX model's
      ``linen_module()``.
    call_kwargs: keywords for the linen module's call; by default
      ``{'train': False}`` where its ``__call__`` takes ``train``.
    rtol: the outputs' allowed difference, relative to their range.

  Returns:
    ``(wrapper, variables)``: a linen :class:`~fracq.methods.qat.QATModel`
    (its hard-mode twin when ``qmodel`` is hard-assigned; an
    ``F8NetModel`` for an ``F8NetModule``) and
    ``qmodel.linen_variables()``, for :func:`fracq.export.lower`,
    :func:`fracq.export.export_integer`, ``export_onnx`` and
    :func:`fracq.export.export_model`.

  Raises:
    ValueError: no twin is known, or the twin differs from the NNX model
      (layers, variables or outputs), naming the difference.
  """
  if isinstance(qmodel, F8NetModule):
    return qmodel.f8model, qmodel.linen_variables()
  if not isinstance(qmodel, QATModule):
    raise TypeError(
      'to_linen takes the QATModule fracq.nnx.quantize returns (or the '
      f'F8NetModule of fracq.nnx.f8net), got {type(qmodel).__name__}.'
    )
  if sample_input is None:
    raise ValueError(
      'to_linen needs sample_input for a QATModule: a batch to check the '
      'twin on (e.g. a few training examples).'
    )
  if linen_module is None:
    make = getattr(qmodel.model, 'linen_module', None)
    if make is None:
      raise ValueError(
        f'{type(qmodel.model).__name__} names no linen twin: give it a '
        'linen_module() method returning the linen module that computes '
        'the same function with the same layer names, or pass '
        'linen_module=. Without one, export the packed artifact: '
        'export.export_model(qmodel, qmodel.linen_variables(), path).'
      )
    linen_module = make()
  if call_kwargs is None:
    call_kwargs = _default_call_kwargs(linen_module)
  analysis = qmodel.analysis
  hard_step = analysis.hard_assign_step
  if qmodel.hard:
    hard_step = 0
  wrapper = qat_lib.quantize(
    linen_module,
    analysis.rules,
    sample_input,
    budget=analysis.budget,
    penalty=analysis.penalty_fn,
    hard_assign_step=hard_step,
    hard_assign_tolerance=analysis.hard_assign_tolerance,
    call_kwargs=call_kwargs,
    kernel_transform=analysis.kernel_transform,
  )
  if qmodel.hard:
    wrapper = wrapper.for_step(0)
  name = type(linen_module).__name__
  linen_facts, nnx_facts = (
    _per_example(wrapper.facts),
    _per_example(qmodel.facts),
  )
  if linen_facts != nnx_facts:
    differ = sorted(
      path
      for path in set(linen_facts) | set(nnx_facts)
      if linen_facts.get(path) != nnx_facts.get(path)
    )
    raise ValueError(
      f'The linen twin {name} has other layers than the NNX model (they '
      f'differ at {differ[:10]}); the twin must name and shape its layers '
      'as the NNX model does.'
    )
  variables = qmodel.linen_variables()
  expected = jax.eval_shape(
    lambda: wrapper.init(jax.random.key(0), sample_input)
  )
  if _shapes(expected) != _shapes(variables):
    raise ValueError(
      f'The linen twin {name} has other variables than the NNX model: '
      f'linen {jax.tree.structure(expected)}, NNX '
      f'{jax.tree.structure(variables)}. Name the NNX layers as the linen '
      'modules are named.'
    )
  evaluated = nnx.clone(qmodel)
  evaluated.eval()
  got = np.asarray(evaluated(sample_input))
  ref = np.asarray(wrapper.apply(variables, sample_input, **call_kwargs))
  span = float(np.ptp(ref)) or 1.0
  err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
  if got.shape != ref.shape or err > rtol * span:
    raise ValueError(
      f'The linen twin {name} computes something else than the NNX model '
      f'on the sample (max |difference| {err:.3g}, output range '
      f'{span:.3g}); the twin must compute the same function.'
    )
  return wrapper, variables
