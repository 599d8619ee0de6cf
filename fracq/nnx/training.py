"""NNX models in fracq's training loop (``config.model_api = 'nnx'``).

The loop (:mod:`fracq.train.train`) drives a model through the functional
protocol of :class:`fracq.train.model_wrapper.ModelWrapper`: variables in
linen's layout (``{'params', 'batch_stats', 'quant', 'quant_stats'}``) go
in and out of ``init`` / ``apply`` / ``calibrate``, so that its data-parallel
step, optimizer, checkpoints, resumption and hard-assignment switch serve
every model alike. :class:`NNXLoopModel` gives a quantized NNX model that
protocol:

* the method's factory (uniform QAT or FracBits, with the config's
  budget, fixed layers and kernel transform) builds its linen wrapper on the
  NNX model's *linen twin* (``model.linen_module()``: the same function
  with the same layer names). That wrapper holds what the method decided:
  the rules (FracBits' initial bits resolved from the budget), the cost
  model and target, the penalty, the hard-assignment step;
* the NNX model is quantized by :func:`fracq.nnx.quantize` with exactly
  those rules and settings, and checked to be the same quantized model
  (same per-layer facts and input signs, same variable tree and shapes);
* the model's computation (``init``, ``apply``, ``calibrate``) is the NNX
  model's: each call merges a copy of the quantized NNX module, writes the
  variables into it, runs it in train or eval mode and reads the updated
  state back in linen's layout;
* what only reads the variables (penalty, metrics, hard assignment,
  reports) is the linen wrapper's, on the same layout;
* :meth:`NNXLoopModel.to_linen` hands the exports (packed artifact,
  integer program, ONNX) the checked linen twin (:func:`fracq.nnx.to_linen`).

F8Net (``config.quant.method='f8net'``): :class:`NNXF8NetLoopModel` runs
:func:`fracq.nnx.f8net` with the rules and options of the ``F8NetModel``
the factory built for the twin (checked to find the same structure); its
variables start from the NNX model's weights, each call merges a copy of
the :class:`~fracq.nnx.F8NetModule` holding the variables, and export
takes its ``F8NetModel`` (the integer program is F8Net's, bit-exact).

HAWQ and float runs have no NNX path in the loop (HAWQ on NNX models is
:func:`fracq.nnx.hawq`; a float NNX model needs no quantization wrapper).
:func:`loop_model` picks the class for the factory's wrapper.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
from flax import nnx

from fracq.methods import qat as qat_lib
from fracq.methods.common import STATE
from fracq.methods.f8net.model import F8NetModel
from fracq.nnx.f8net import f8net
from fracq.nnx.linen_twin import to_linen
from fracq.nnx.qat import QATModule
from fracq.nnx.qat import quantize
from fracq.nnx.qat import write_linen_tree

__all__ = [
  'NNXF8NetLoopModel',
  'NNXLoopModel',
  'loop_model',
]


def _shapes(tree) -> Any:
  return jax.tree.map(jax.numpy.shape, tree)


class _LinenLayoutLoop:
  """What both loop models share: an NNX module (``_live``, split into
  ``_split``) computing on variables in linen's layout, the layout the loop's
  state, checkpoints and export use."""

  _live: nnx.Module
  _split: tuple

  def _bound(self, variables, train: bool):
    """A copy of the module holding ``variables``, in train or eval mode."""
    graphdef, state = self._split
    module = nnx.merge(graphdef, state, copy=True)
    write_linen_tree(module.model, variables)
    if train:
      module.train()
    else:
      module.eval()
    return module

  def init(self, rngs, x, *, train: bool = False, **kwargs):
    """The NNX model's variables, in linen's layout (the weights are the
    NNX model's own: ``rngs``, ``x`` and ``train`` are unused)."""
    del rngs, x, train, kwargs
    return self._live.linen_variables()

  def _apply(self, variables, x, train: bool, mutable, **kwargs):
    """The module on ``x`` with ``variables``; with ``mutable`` (a list of
    collections, or True for all) also the updated collections, as linen's
    ``apply`` returns them."""
    module = self._bound(variables, train)
    out = module(x, **kwargs)
    if not mutable:
      return out
    new = module.linen_variables()
    names = new.keys() if mutable is True else mutable
    return out, {c: new[c] for c in names if c in new}


class NNXLoopModel(_LinenLayoutLoop):
  """A quantized NNX model behind the training loop's model protocol.

  Args:
    model: the float NNX model (left intact; it is copied).
    linen_wrapper: the method's :class:`~fracq.methods.qat.QATModel` of the
      model's linen twin (same layer names), built by the method's factory.
    sample_x: the batch the linen wrapper was traced on (the NNX model is
      quantized on it, in eval mode).

  Raises:
    TypeError: ``linen_wrapper`` is not a quantized model.
    ValueError: the NNX model and its twin differ (layers, signs,
      variables), naming the difference.
  """

  trainable_collections = ('params', 'quant')

  def __init__(
    self,
    model: nnx.Module,
    linen_wrapper: qat_lib.QATModel,
    sample_x,
    *,
    _qmodule: QATModule | None = None,
  ):
    if not isinstance(linen_wrapper, qat_lib.QATModel):
      raise TypeError(
        'The NNX training path runs quantization-aware methods (uniform, '
        f'fracbits); this method built a {type(linen_wrapper).__name__}'
        '. Use a QAT method, or the linen API for it '
        "(config.model_api='linen')."
      )
    self.linen = linen_wrapper
    if _qmodule is None:
      _qmodule = self._quantize(model, sample_x)
    self.qmodule = self._live = _qmodule
    self._split = nnx.split(_qmodule)
    self._hard_twin: NNXLoopModel | None = None

  def _quantize(self, model: nnx.Module, sample_x) -> QATModule:
    linen = self.linen
    model = nnx.clone(model)
    model.eval()  # the quantization passes, as linen's init(train=False)
    cost_model = linen.cost_model
    qmodule = quantize(
      model,
      linen.rules,
      sample_x,
      budget=linen.budget,
      cost_kind=cost_model.kind if cost_model is not None else None,
      penalty=linen.penalty_fn,
      hard_assign_step=linen.hard_assign_step,
      hard_assign_tolerance=linen.hard_assign_tolerance,
      on_unused=linen.on_unused,
      kernel_transform=linen.kernel_transform,
      axis_name=getattr(linen.module, 'bn_axis_name', None),
    )
    name = type(model).__name__
    if qmodule.facts != linen.facts:
      differ = sorted(
        path
        for path in set(qmodule.facts) | set(linen.facts)
        if qmodule.facts.get(path) != linen.facts.get(path)
      )
      raise ValueError(
        f'{name} and its linen twin quantize different layers or shapes '
        f'(first: {differ[:5]}); linen_module() must return the linen '
        'module computing the same function with the same layer names.'
      )
    if qmodule.signs != linen.signs:
      differ = sorted(
        path
        for path in qmodule.signs
        if qmodule.signs[path] != linen.signs.get(path)
      )
      raise ValueError(
        f'The input signs of {name} differ from its linen twin at {differ}'
        ' (a layer input negative in one model only); the two must compute '
        'the same function.'
      )
    nnx_shapes = _shapes(qmodule.linen_variables())
    linen_shapes = _shapes(
      jax.eval_shape(
        lambda x: linen.init(jax.random.key(0), x, train=False), sample_x
      )
    )
    if nnx_shapes != linen_shapes:
      raise ValueError(
        f'The variables of {name} in linen layout differ from its linen '
        f"twin's: {nnx_shapes} vs {linen_shapes}."
      )
    return qmodule

  # -- what the method decided (the linen wrapper's) ---------------------------
  @property
  def module(self):
    """The linen twin module."""
    return self.linen.module

  @property
  def rules(self):
    return self.linen.rules

  @property
  def facts(self):
    return self.linen.facts

  @property
  def cost_model(self):
    return self.linen.cost_model

  @property
  def hard(self) -> bool:
    return self.linen.hard

  @property
  def hard_assign_step(self):
    return self.linen.hard_assign_step

  @property
  def learns_bits(self) -> bool:
    return self.linen.learns_bits

  def layer_table(self) -> str:
    return self.qmodule.layer_table()

  # -- the computation (the NNX model's) ----------------------------------------
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
    """The NNX model on ``x`` with ``variables``; with ``mutable`` (a list
    of collections, or True for all) also the updated collections, as
    linen's ``apply`` returns them. ``rngs`` is unused: an NNX model holds
    its own random streams."""
    del rngs
    self.linen._check_assigned(variables, 'apply')  # pylint: disable=protected-access
    return self._apply(variables, x, train, mutable, **kwargs)

  def calibrate(self, variables, x, **kwargs):
    """Data-dependent quantizer ranges and statistics recomputed on ``x``
    (eval mode, as linen's ``calibrate``); other variables unchanged."""
    qmodule = self._bound(variables, train=False)
    qmodule.calibrate(x, **kwargs)
    new = qmodule.linen_variables()
    return {
      **variables,
      **{c: new[c] for c in ('quant', 'quant_stats') if c in new},
    }

  # -- what reads the variables (the linen wrapper's) ------------------------
  def penalty(self, variables, step):
    return self.linen.penalty(variables, step)

  def metrics(self, variables) -> dict[str, float]:
    return self.linen.metrics(variables)

  def bits_view(self, variables):
    return self.linen.bits_view(variables)

  def prepare(self, variables):
    return self.linen.prepare(variables)

  def report(self, variables, workdir, step, writer=None) -> str:
    return self.linen.report(variables, workdir, step, writer)

  def for_step(self, step: int) -> 'NNXLoopModel':
    """This model, or from FracBits' hard-assignment step on its hard-mode
    twin (integer bits; :meth:`prepare` freezes them into the variables)."""
    twin = self.linen.for_step(step)
    if twin is self.linen:
      return self
    if self._hard_twin is None:
      qmodule = nnx.clone(self.qmodule)
      qmodule.hard = True
      for layer in qmodule.quantized_layers():
        layer.hard = True
      self._hard_twin = NNXLoopModel(None, twin, None, _qmodule=qmodule)
      logging.info('NNX model: switched to hard-assigned bits.')
    return self._hard_twin

  # -- export -------------------------------------------------------------------
  def to_linen(self, variables, sample_x):
    """The checked linen twin (:func:`fracq.nnx.to_linen`) of this model
    holding ``variables``: ``(linen wrapper, variables)`` for
    :func:`fracq.export.export_model`, ``export_integer`` and
    ``export_onnx``."""
    qmodule = nnx.clone(self.qmodule)
    qmodule.set_linen_variables(jax.device_get(variables))
    qmodule.eval()
    return to_linen(qmodule, sample_x, self.linen.module)


class NNXF8NetLoopModel(_LinenLayoutLoop):
  """An NNX model under F8Net behind the training loop's model protocol.

  Args:
    model: the float NNX model (left intact; it is copied).
    linen_wrapper: the ``F8NetModel`` the method's factory built for the
      model's linen twin (its rules, options and call keywords are used).
    sample_x: the batch the factory traced the twin with.

  Raises:
    TypeError: ``linen_wrapper`` is not an ``F8NetModel``.
    ValueError: the NNX model and its twin differ (variables, outputs) or
      F8Net finds another structure on the NNX weights (signs, folded
      BatchNorms, residual entries).
  """

  def __init__(self, model: nnx.Module, linen_wrapper: F8NetModel, sample_x):
    if not isinstance(linen_wrapper, F8NetModel):
      raise TypeError(
        'NNXF8NetLoopModel takes the F8NetModel of the F8Net factory, got '
        f'{type(linen_wrapper).__name__}; QAT methods use NNXLoopModel.'
      )
    model = nnx.clone(model)
    model.eval()
    fmodule = f8net(
      model,
      sample_x,
      rules=linen_wrapper.rules,
      options=linen_wrapper.options,
      linen_module=linen_wrapper.module,
      call_kwargs=linen_wrapper.call_kwargs,
      on_unused='warn',
    )
    found, want = fmodule.f8model, linen_wrapper
    for name in ('order', 'signs', 'pairs', 'shared'):
      if getattr(found, name) != getattr(want, name):
        raise ValueError(
          f'F8Net finds another {name} on the NNX weights of '
          f'{type(model).__name__} than on its linen twin: '
          f'{getattr(found, name)} vs {getattr(want, name)}.'
        )
    self.fmodule = self._live = fmodule
    self.f8model = fmodule.f8model
    self.trainable_collections = self.f8model.trainable_collections
    self._split = nnx.split(fmodule)

  @property
  def module(self):
    """The linen twin module."""
    return self.f8model.module

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
    """The NNX model under F8Net on ``x`` with ``variables``; with
    ``mutable``, also the updated collections (as linen's ``apply``)."""
    del rngs, kwargs
    return self._apply(variables, x, train, mutable)

  def calibrate(self, variables, x, **kwargs):
    """Every activation format from ``x`` (eval mode)."""
    del kwargs
    fmodule = self._bound(variables, train=False)
    fmodule.calibrate(x)
    return {**variables, STATE: fmodule.linen_variables()[STATE]}

  def penalty(self, variables, step):
    return self.f8model.penalty(variables, step)

  def metrics(self, variables) -> dict[str, float]:
    return self.f8model.metrics(variables)

  def for_step(self, step: int) -> 'NNXF8NetLoopModel':
    del step
    return self

  def prepare(self, variables):
    return variables

  def report(self, variables, workdir, step, writer=None) -> str:
    return self.f8model.report(variables, workdir, step, writer)

  def to_linen(self, variables, sample_x):
    """``(F8NetModel, variables)`` for ``export_integer`` and
    ``export_onnx`` (the model computes through its twin)."""
    del sample_x
    return self.f8model, variables


def loop_model(model: nnx.Module, linen_wrapper, sample_x):
  """The loop's NNX model for the wrapper the method's factory built for
  the model's twin: :class:`NNXF8NetLoopModel` for F8Net, else
  :class:`NNXLoopModel` (which refuses methods with no NNX path)."""
  if isinstance(linen_wrapper, F8NetModel):
    return NNXF8NetLoopModel(model, linen_wrapper, sample_x)
  return NNXLoopModel(model, linen_wrapper, sample_x)
