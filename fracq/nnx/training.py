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

F8Net, HAWQ and float runs have no NNX path in the loop (F8Net is
linen-only, see :mod:`fracq.nnx.qat`; HAWQ on NNX models is
:func:`fracq.nnx.hawq`; a float NNX model needs no quantization wrapper).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
from flax import nnx

from fracq.methods import qat as qat_lib
from fracq.nnx.linen_twin import to_linen
from fracq.nnx.qat import QATModule
from fracq.nnx.qat import quantize

__all__ = [
  'NNXLoopModel',
]


def _shapes(tree) -> Any:
  return jax.tree.map(jax.numpy.shape, tree)


class NNXLoopModel:
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
    self.qmodule = _qmodule
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
  def _bound(self, variables, train: bool) -> QATModule:
    """A copy of the quantized module holding ``variables``, in train or
    eval mode."""
    graphdef, state = self._split
    qmodule = nnx.merge(graphdef, state, copy=True)
    qmodule.set_linen_variables(variables)
    if train:
      qmodule.train()
    else:
      qmodule.eval()
    return qmodule

  def init(self, rngs, x, *, train: bool = False, **kwargs):
    """The quantized NNX model's variables, in linen's layout (the weights
    are the NNX model's own: ``rngs``, ``x`` and ``train`` are unused)."""
    del rngs, x, train, kwargs
    return self.qmodule.linen_variables()

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
    qmodule = self._bound(variables, train)
    out = qmodule(x, **kwargs)
    if not mutable:
      return out
    new = qmodule.linen_variables()
    names = new.keys() if mutable is True else mutable
    return out, {c: new[c] for c in names if c in new}

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
