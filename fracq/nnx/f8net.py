"""F8Net on NNX models, computed by their linen twins.

F8Net (:mod:`fracq.methods.f8net`) takes over whole layer calls and folds
each BatchNorm into the Conv / Dense feeding it; it finds those pairs, the
input signs and the residual blocks whose input is quantized once at entry
by probing the model's structure, and its integer lowering reads that same
structure. On an NNX model it runs through the model's *linen twin* (the
linen module that computes the same function with the same layer names,
``model.linen_module()``; see :func:`fracq.nnx.to_linen`):

* :func:`f8net` checks that the twin is the NNX model (same variables and
  shapes in linen's layout, same float outputs in eval mode), builds
  :class:`~fracq.methods.f8net.F8NetModel` on the twin and returns an
  :class:`F8NetModule`: an ``nnx.Module`` holding a copy of the NNX model
  (the model passed in is left intact) plus F8Net's own state, as NNX
  variables on the modules whose linen scopes hold it:
  ``<layer or residual block>/input_fl_ema`` (:class:`~fracq.nnx.QuantStat`,
  the activation formats) and with ``pact=True`` ``<layer>/pact_alpha``
  (:class:`~fracq.nnx.QuantParam`, trainable);
* calling the module reads the NNX variables in linen's layout, runs the
  twin under F8Net on them and, in training mode, writes the updated
  BatchNorm and format statistics back into the NNX variables. The values
  read are the variables' own (traced under ``nnx.grad`` / ``nnx.jit``),
  so gradients reach the NNX parameters and ``nnx.Optimizer(fmodel, tx,
  wrt=nnx.Param)`` trains the weights (and PACT clips) as linen's loop
  trains ``params`` (and ``quant``);
* the integer program and ONNX take the twin's wrapper and the variables:
  ``fracq.nnx.to_linen(fmodel)`` returns them.

The numbers are linen F8Net's on the same weights (the same computation);
what NNX adds is the state and training interface. The NNX model's own
``__call__`` is run only to check the twin (float, eval mode).

```python
fmodel = fracq.nnx.f8net(model, images)  # model: an nnx.Module with a twin
optimizer = nnx.Optimizer(fmodel, optax.sgd(0.05), wrt=nnx.Param)
fmodel.train()  # batch statistics, format EMAs updated
...
fmodel.eval()
f8model, variables = fracq.nnx.to_linen(fmodel)
program = fracq.export.lower(f8model, variables, images)
```
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.nnx import graphlib

from fracq.interception import Rule
from fracq.methods.common import STATE
from fracq.methods.common import TRAINABLE
from fracq.methods.f8net.model import F8NetModel
from fracq.methods.f8net.options import F8NetOptions
from fracq.nnx.layers import QuantizedLayer
from fracq.nnx.qat import linen_tree
from fracq.nnx.qat import write_linen_tree
from fracq.nnx.variables import variable_type

__all__ = [
  'F8NetModule',
  'f8net',
]

# The collections of the model's own state, beside F8Net's.
_MODEL_COLLECTIONS = ('params', 'batch_stats')


class F8NetModule(nnx.Module):
  """An NNX model under F8Net (built by :func:`f8net`).

  Call it like the model (``fmodel(x)``); ``fmodel.model`` is the copy of
  the model that holds the weights, BatchNorm statistics and F8Net's
  variables. ``train()`` / ``eval()`` switch between batch statistics
  (updated in place, activation-format EMAs too) and the running ones
  (formats frozen), as ``F8NetModel.apply``'s ``train`` does.
  """

  def __init__(self, model: nnx.Module, f8model: F8NetModel, *, train: bool):
    self.model = model
    self.f8 = nnx.static(f8model)
    self.use_running_average = not train

  @property
  def f8model(self) -> F8NetModel:
    """The linen twin's :class:`~fracq.methods.f8net.F8NetModel`."""
    return self.f8

  @property
  def options(self) -> F8NetOptions:
    return self.f8.options

  def linen_variables(self) -> dict:
    """The whole state in linen's layout (``params``, ``batch_stats``,
    ``quant_stats`` and with PACT ``quant``), the variables'
    current (traced under a transform) arrays: what the twin's
    ``F8NetModel`` takes."""
    return linen_tree(self.model)

  def set_linen_variables(self, variables: dict) -> None:
    """Writes the collections ``variables`` holds (linen's layout) into the
    NNX variables, in place.

    Raises:
      ValueError: a variable is missing there or has another shape.
    """
    write_linen_tree(self.model, variables, partial=True)

  def __call__(self, x):
    variables = self.linen_variables()
    if self.use_running_average:
      return self.f8.apply(variables, x, train=False)
    out, updates = self.f8.apply(
      variables, x, train=True, mutable=['batch_stats', STATE]
    )
    self.set_linen_variables(updates)
    return out

  def calibrate(self, x) -> None:
    """Sets every activation format from ``x`` (eval mode, as linen's
    ``F8NetModel.calibrate``), e.g. after loading weights."""
    new = self.f8.calibrate(self.linen_variables(), x)
    self.set_linen_variables({STATE: new[STATE]})

  def capture(self, x):
    """Integer codes and formats of every quantized layer (eager; see
    ``F8NetModel.capture``)."""
    return self.f8.capture(self.linen_variables(), x)

  def report(self, workdir: str | None = None, step: int = 0) -> str:
    """Per-layer formats (``F8NetModel.report``)."""
    return self.f8.report(self.linen_variables(), workdir, step)


def _node_at(root, parts: Sequence[str]):
  """The graph node at ``parts`` under ``root`` (``None`` if absent)."""
  node = root
  for part in parts:
    impl = graphlib.get_node_impl(node)
    if impl is None or isinstance(node, nnx.Variable):
      return None
    children = {str(k): v for k, v in impl.node_dict(node).items()}
    if part not in children:
      return None
    node = children[part]
  return node


def _add_variables(model: nnx.Module, collection: str, tree) -> None:
  """Puts the leaves of a linen collection ``tree`` on ``model``'s
  modules as NNX variables, at their linen scope paths."""
  vtype = variable_type(collection)
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = [str(k.key) for k in path]
    owner = _node_at(model, parts[:-1])
    if not isinstance(owner, nnx.Module):
      raise ValueError(
        f'F8Net keeps {collection}/{"/".join(parts)} on the linen scope '
        f'{"/".join(parts[:-1])!r}, which is no module of the NNX model. '
        'The NNX model must nest its modules as its linen twin does (same '
        'attribute names), e.g. a residual block as one module.'
      )
    setattr(owner, parts[-1], vtype(value))


def _twin_of(model: nnx.Module, linen_module: nn.Module | None) -> nn.Module:
  if linen_module is not None:
    return linen_module
  make = getattr(model, 'linen_module', None)
  if make is None:
    raise ValueError(
      f'{type(model).__name__} names no linen twin, which F8Net on NNX '
      'models runs through: give it a linen_module() method returning the '
      'linen module that computes the same function with the same layer '
      'names, or pass linen_module=. Uniform QAT and FracBits need no twin '
      '(fracq.nnx.quantize).'
    )
  return make()


def _check_twin(model, twin, float_vars, sample_input, call_kwargs, rtol):
  """Raises unless ``twin`` has the NNX model's variables and computes its
  float function (eval mode) on the sample."""
  name = type(twin).__name__
  expected = jax.eval_shape(
    lambda: twin.init(jax.random.key(0), sample_input, **call_kwargs)
  )
  expected = {c: expected[c] for c in _MODEL_COLLECTIONS if c in expected}
  shapes = jax.tree.map(np.shape, float_vars)
  if jax.tree.map(lambda a: tuple(a.shape), expected) != shapes:
    raise ValueError(
      f'The linen twin {name} has other variables than the NNX model: '
      f'linen {jax.tree.structure(expected)}, NNX '
      f'{jax.tree.structure(float_vars)}. Name the NNX layers as the linen '
      'modules are named.'
    )
  evaluated = nnx.clone(model)
  evaluated.eval()
  # Compiled: one program each runs faster than the ops one by one.
  got = np.asarray(nnx.jit(lambda m, x: m(x))(evaluated, sample_input))
  ref = np.asarray(
    jax.jit(functools.partial(twin.apply, **call_kwargs))(
      float_vars, sample_input
    )
  )
  span = float(np.ptp(ref)) or 1.0
  err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
  if got.shape != ref.shape or err > rtol * span:
    raise ValueError(
      f'The linen twin {name} computes something else than the NNX model '
      f'(float, eval mode) on the sample (max |difference| {err:.3g}, output '
      f'range {span:.3g}); the twin must compute the same function.'
    )


def f8net(
  model: nnx.Module,
  sample_input,
  *,
  rules: Sequence[Rule] | None = None,
  options: F8NetOptions | None = None,
  linen_module: nn.Module | None = None,
  call_kwargs: dict | None = None,
  on_unused: str = 'error',
  rtol: float = 1e-5,
) -> F8NetModule:
  """F8Net on an NNX model (the NNX twin of
  :class:`~fracq.methods.f8net.F8NetModel`; same ``rules`` and ``options``).

  The activation formats start from ``sample_input`` run through the
  model's own weights (eval mode): what ``F8NetModel.init`` followed by
  loading those weights and ``calibrate`` gives.

  Args:
    model: an ``nnx.Module`` with a linen twin (below). It is copied and
      left intact; its weights and BatchNorm statistics are the F8Net
      model's.
    sample_input: an example batch: the structure probe, the twin check and
      the initial activation formats.
    rules: which ``nnx.Conv`` / ``nnx.Linear`` layers to quantize (matched
      on their paths, which are the twin's), as for ``F8NetModel``.
    options: :class:`~fracq.methods.f8net.F8NetOptions`.
    linen_module: the linen twin: the linen module computing what ``model``
      computes, with the same layer names and a ``train`` argument; by
      default ``model.linen_module()``.
    call_kwargs: keywords of the twin's call for the probe and the check;
      default ``{'train': False}``.
    on_unused: ``'error'`` or ``'warn'`` for rules matching no layer.
    rtol: the float outputs' allowed difference between the model and its
      twin, relative to their range.

  Returns:
    An :class:`F8NetModule` in the model's mode (eval when its BatchNorms
    use running averages, else train).

  Raises:
    ValueError: no twin is known, or the twin differs from the NNX model
      (variables or outputs), or F8Net's own checks fail (rules, PACT).
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f'fracq.nnx.f8net takes an nnx.Module, got {type(model).__name__}; '
      'run F8Net on linen modules with fracq.methods.f8net.F8NetModel.'
    )
  if any(
    isinstance(node, (QuantizedLayer, F8NetModule))
    for _, node in nnx.iter_graph(model)
  ):
    raise ValueError(
      'The model is already quantized; run F8Net on the float model '
      '(fracq.nnx.f8net and fracq.nnx.quantize copy it and leave it '
      'intact, so keep a reference to it).'
    )
  twin = _twin_of(model, linen_module)
  call_kwargs = dict(call_kwargs or {'train': False})
  model = nnx.clone(model)
  float_vars = linen_tree(model)
  float_vars = {c: float_vars[c] for c in _MODEL_COLLECTIONS if c in float_vars}
  _check_twin(model, twin, float_vars, sample_input, call_kwargs, rtol)
  f8model = F8NetModel(
    twin,
    sample_input,
    rules=rules,
    options=options,
    call_kwargs=call_kwargs,
    on_unused=on_unused,
    variables=float_vars,  # the probe runs the model's own weights
  )
  # F8Net's variables (formats, PACT clips) from the model's own weights:
  # a linen apply creates the missing variables of mutable collections with
  # the initializers init uses.
  create = functools.partial(
    f8model.apply, train=False, mutable=[TRAINABLE, STATE]
  )
  _, created = jax.jit(create)(float_vars, sample_input)
  for collection in (TRAINABLE, STATE):
    if created.get(collection):
      _add_variables(model, collection, created[collection])
  modes = [
    node.use_running_average
    for _, node in nnx.iter_graph(model)
    if isinstance(node, nnx.BatchNorm)
  ]
  return F8NetModule(model, f8model, train=not (modes and all(modes)))
