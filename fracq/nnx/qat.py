"""Quantization-aware training of NNX models: uniform QAT and FracBits.

:func:`quantize` is :func:`fracq.quantize` for ``flax.nnx`` modules: same
rules, same arguments, same providers and core math, same cost model,
penalty and hard assignment. It returns a :class:`QATModule`, an
``nnx.Module`` that holds a *copy* of the model in which every layer a rule
quantizes is wrapped in a :class:`~fracq.nnx.layers.QuantizedLayer`; the
model passed in is left intact.

Rules match the layer's graph path, ``'/'``-joined (``'conv1'``,
``'blocks/0/mlp/fc1'``: list and dict entries of ``nnx.List`` / ``nnx.Dict``
are path parts), and layer types by their linen names (``'Dense'`` for
``nnx.Linear``, ``'DenseGeneral'`` for ``nnx.LinearGeneral``; ``'Conv'``,
``'ConvTranspose'``, ``'Einsum'``, ``'Embed'``); ``'Linear'`` and
``'LinearGeneral'`` are accepted too.

Quantization runs the model eagerly on the sample input twice, as linen's
``fracq.quantize`` and ``init`` do: a float sign probe on the first example
(linen probes a fresh random init of the model, NNX the model's own
weights; the signs agree wherever a ReLU decides them), then a pass that
records per-layer facts and creates the quantizer variables from the
data. The model runs as it is, in its current
``train()``/``eval()`` mode, with ``call_kwargs``; put it in ``eval()`` mode
first to match linen's ``init(..., train=False)``. Every other variable
(BatchNorm statistics, RNG counts) is restored after these passes.

F8Net, which takes over whole layer and BatchNorm calls through the
interceptor's ``call_layer`` / ``call_module`` hooks and probes the linen
structure, runs on NNX models through their linen twins
(:func:`fracq.nnx.f8net`); HAWQ's Hessian search runs on NNX models
through :func:`fracq.nnx.hawq`; pruning and clustering pass through
``kernel_transform`` as in linen. The integer program and ONNX export go
through the model's linen twin (:func:`fracq.nnx.to_linen`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import graphlib

from fracq.interception import LayerFacts
from fracq.interception import Rule
from fracq.interception import check_unused_rules
from fracq.interception import format_facts_table
from fracq.interception import match_rule
from fracq.interception import validate_rules
from fracq.interception.interceptor import unused_rules
from fracq.methods import cost as cost_lib
from fracq.methods import fracbits
from fracq.methods import qat as qat_lib
from fracq.methods.common import STATE
from fracq.methods.common import TRAINABLE
from fracq.nnx.layers import SUPPORTED_LAYERS
from fracq.nnx.layers import QuantizedLayer
from fracq.nnx.layers import Recorder
from fracq.nnx.layers import layer_type_of
from fracq.nnx.layers import recording
from fracq.nnx.variables import QuantParam
from fracq.nnx.variables import QuantStat

__all__ = [
  'QATModule',
  'linen_entries',
  'linen_tree',
  'quantize',
  'write_linen_tree',
]

_COLLECTION_TYPES = {TRAINABLE: QuantParam, STATE: QuantStat}


class _Analysis:
  """What quantization learned about the model, shared by a QATModule's
  copies: rules, per-layer facts, signs, cost model and budget. Static
  (compared by identity) in the module's graph definition."""

  def __init__(self, **fields):
    self.__dict__.update(fields)


def _path_str(path: tuple) -> str:
  return '/'.join(str(part) for part in path)


def _layer_paths(root) -> dict[int, list[tuple]]:
  """Every graph path of every supported layer in ``root``, by object id
  (a layer reached by two paths is listed under both)."""
  found: dict[int, list[tuple]] = {}
  visited: set[int] = set()
  stack: list[tuple[tuple, Any]] = [((), root)]
  while stack:
    path, node = stack.pop()
    if layer_type_of(node) is not None:
      found.setdefault(id(node), []).append(path)
    if id(node) in visited:
      continue
    visited.add(id(node))
    impl = graphlib.get_node_impl(node)
    if impl is None or isinstance(node, nnx.Variable):
      continue
    for key, child in reversed(list(impl.node_dict(node).items())):
      if graphlib.is_node(child):
        stack.append(((*path, key), child))
  return found


def _modules_with_weights(root) -> list[tuple[str, str]]:
  """``(path, type name)`` of the modules that own a weight matrix (an
  ``nnx.Param`` of two or more dimensions) but are no supported layer."""
  out = []
  for path, node in nnx.iter_graph(root):
    if not isinstance(node, nnx.Module) or layer_type_of(node) is not None:
      continue
    if isinstance(node, QuantizedLayer):
      continue
    impl = graphlib.get_node_impl(node)
    owns = any(
      isinstance(v, nnx.Param) and np.ndim(v.get_value()) >= 2
      for v in impl.node_dict(node).values()
    )
    if owns:
      out.append((_path_str(path), type(node).__name__))
  return out


def _replace(root, path: tuple, new):
  """Puts ``new`` at ``path`` of ``root`` (returns the new root)."""
  if not path:
    return new
  parent = root
  for key in path[:-1]:
    parent = graphlib.get_node_impl(parent).node_dict(parent)[key]
  impl = graphlib.get_node_impl(parent)
  if not isinstance(impl, graphlib.GraphNodeImpl):
    raise ValueError(
      f'{_path_str(path)}: the layer sits in a {type(parent).__name__}, '
      'which NNX cannot change in place; hold layers in nnx.List / nnx.Dict '
      '(or module attributes) to quantize them.'
    )
  impl.set_key(parent, path[-1], new)
  return root


@contextlib.contextmanager
def _restoring(root, keep=(QuantParam, QuantStat)):
  """Restores every variable of ``root`` but those of types ``keep`` on
  exit (the quantization passes leave BatchNorm statistics, RNG counts and
  the like as they were)."""
  saved = [
    (var, var.get_value())
    for _, var in nnx.iter_graph(root)
    if isinstance(var, nnx.Variable) and not isinstance(var, keep)
  ]
  try:
    yield
  finally:
    for var, value in saved:
      var.set_value(value)


def _first_example(x):
  return jax.tree.map(lambda a: jnp.asarray(a)[:1], x)


# The linen collection of each NNX variable type (subclasses first).
_LINEN_KINDS = (
  (QuantParam, TRAINABLE),
  (QuantStat, STATE),
  (nnx.BatchStat, 'batch_stats'),
  (nnx.Param, 'params'),
)


def linen_entries(model) -> Iterator[tuple[str, list[str], nnx.Variable]]:
  """``(collection, linen path parts, variable)`` of every variable of
  ``model`` that linen's layout holds (``params``, ``batch_stats``,
  ``quant``, ``quant_stats``), a quantized layer's own ``layer`` part
  dropped."""
  wrapped = {
    tuple(str(p) for p in path)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, QuantizedLayer)
  }
  for path, var in nnx.iter_graph(model):
    collection = next((c for t, c in _LINEN_KINDS if isinstance(var, t)), None)
    if collection is None:
      continue
    parts = [str(p) for p in path]
    parts = [
      p
      for i, p in enumerate(parts)
      if not (p == 'layer' and tuple(parts[:i]) in wrapped)
    ]
    yield collection, parts, var


def linen_tree(model) -> dict:
  """The variables of ``model`` in linen's layout, ``{collection: {path
  part: ...: value}}`` (current, possibly traced, arrays)."""
  out: dict = {}
  for collection, parts, var in linen_entries(model):
    node = out.setdefault(collection, {})
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = var.get_value()
  return out


def write_linen_tree(model, variables: Mapping, *, partial: bool = False):
  """Writes ``variables`` (linen's layout) into the variables of ``model``,
  in place (also traced values, under a transform).

  Args:
    model: an NNX module.
    variables: ``{collection: {path part: ...: value}}``.
    partial: write only the collections ``variables`` holds (a linen
      ``apply``'s updated collections); otherwise every variable must be
      there.

  Raises:
    ValueError: a variable of the model is missing from ``variables`` or
      has another shape there.
  """
  missing, mismatched = [], []
  for collection, parts, var in linen_entries(model):
    if partial and collection not in variables:
      continue
    node = variables.get(collection)
    for part in parts:
      node = node.get(part) if isinstance(node, Mapping) else None
    name = f'{collection}/{"/".join(parts)}'
    if node is None:
      missing.append(name)
    elif jnp.shape(node) != jnp.shape(var.get_value()):
      mismatched.append(
        f'{name}: {jnp.shape(node)} vs {jnp.shape(var.get_value())}'
      )
    else:
      var.set_value(jnp.asarray(node, var.get_value().dtype))
  if missing or mismatched:
    raise ValueError(
      f'The variables do not fit this model (missing: {missing[:5]}; other '
      f'shapes: {mismatched[:5]}). Pass the linen-layout variables of '
      'the same model (its linen_variables()).'
    )


class QATModule(nnx.Module):
  """An NNX model quantized by rules, with FracBits budget handling.

  Call it like the model (``qmodel(x)``); ``qmodel.model`` is the quantized
  copy of the model. Its ``train()`` / ``eval()`` also switch the
  quantizers' statistics (observers) on and off, like BatchNorm's.

  State: the model's own variables keep their types (``nnx.Param``,
  ``nnx.BatchStat``, ...; a quantized layer's under ``<path>/layer``); the
  quantizer state is :class:`~fracq.nnx.QuantParam` (trainable, an
  ``nnx.Param``) and :class:`~fracq.nnx.QuantStat` (statistics, frozen
  bits), at ``<path>/<name>`` with the linen variable names.
  """

  def __init__(self, model: nnx.Module, analysis: _Analysis):
    self.model = model
    self.analysis = nnx.static(analysis)
    self.hard = False

  # -- the model ----------------------------------------------------------------
  def __call__(self, *args, **kwargs):
    return self.model(*args, **kwargs)

  def quantized_layers(self) -> Iterator[QuantizedLayer]:
    """The model's quantized layers, in graph order."""
    for _, node in nnx.iter_graph(self.model):
      if isinstance(node, QuantizedLayer):
        yield node

  def _set(self, **attributes):
    for layer in self.quantized_layers():
      for name, value in attributes.items():
        setattr(layer, name, value)

  # -- analysis -----------------------------------------------------------------
  @property
  def rules(self) -> tuple[Rule, ...]:
    return self.analysis.rules

  @property
  def facts(self) -> dict[str, LayerFacts]:
    return self.analysis.facts

  @property
  def signs(self) -> dict[str, bool]:
    return self.analysis.signs

  @property
  def cost_model(self) -> cost_lib.CostModel | None:
    return self.analysis.cost_model

  @property
  def target(self) -> float | None:
    return self.analysis.target

  @property
  def learns_bits(self) -> bool:
    return qat_lib.learns_bits(self.cost_model)

  @property
  def kernel_transform(self):
    return self.analysis.kernel_transform

  def layer_table(self) -> str:
    """What was quantized and how (per-layer facts and rules)."""
    return format_facts_table(self.facts)

  # -- variables in linen's layout ------------------------------------------------
  def variables(self, collection: str) -> dict:
    """The quantizer variables of ``collection`` (``'quant'`` or
    ``'quant_stats'``) as linen lays them out: ``{path part: ...: {name:
    value}}``. Values are the variables' current (possibly traced) arrays,
    so the cost of ``variables('quant')`` is differentiable under
    ``nnx.grad``."""
    vtype = _COLLECTION_TYPES[collection]
    tree: dict = {}
    for layer in self.quantized_layers():
      entries = {
        name: var.get_value()
        for name, var in layer.quant_variables().items()
        if isinstance(var, vtype)
      }
      if not entries:
        continue
      node = tree
      for part in layer.path.split('/'):
        node = node.setdefault(part, {})
      node.update(entries)
    return tree

  def linen_variables(self) -> dict:
    """The whole state in linen's layout, as ``fracq.quantize``'s
    ``init`` returns it: ``{'params', 'batch_stats', 'quant',
    'quant_stats'}`` nested by module path (a quantized layer's parameters
    under its own path, without the wrapper's ``layer`` part). The
    variables' current arrays (traced under a transform); what
    :func:`fracq.export.export_model` takes with this module as the model:
    ``export_model(qmodel, qmodel.linen_variables(), path)``.
    """
    return linen_tree(self.model)

  def set_linen_variables(self, variables: dict) -> None:
    """Writes a state in linen's layout (:meth:`linen_variables`) into the
    model's variables, in place (also traced values, under a transform).

    Raises:
      ValueError: a variable of the model is missing from ``variables``
        or has another shape there.
    """
    write_linen_tree(self.model, variables)

  def _write(self, collection: str, tree: dict) -> None:
    """Writes the leaves of a linen-layout ``tree`` into the variables."""
    for layer in self.quantized_layers():
      node = tree
      try:
        for part in layer.path.split('/'):
          node = node[part]
      except KeyError:
        continue
      for name, var in layer.quant_variables().items():
        if name in node and isinstance(var, _COLLECTION_TYPES[collection]):
          var.set_value(jnp.asarray(node[name], var.get_value().dtype))

  def bits_view(self) -> dict:
    """The bits the model runs with, in linen's ``quant`` layout: learned
    ones, or after hard assignment the frozen integer ones."""
    quant = self.variables(TRAINABLE)
    if self.hard:
      return fracbits.hard_bits_view(quant, self.variables(STATE))
    return quant

  # -- training -------------------------------------------------------------------
  def calibrate(self, *args, **kwargs):
    """Re-initialises data-dependent quantizer ranges on real data, in place.

    Run after loading pretrained weights (or on the first real batch): LSQ
    steps, PACT clips, shared FracBits ranges and observer statistics are
    recomputed from the current weights and the activations the inputs
    produce. Learned and frozen bit-widths are left alone, and so are the
    model's other variables (BatchNorm statistics). The model runs in its
    current mode: call ``eval()`` first to calibrate through BatchNorm's
    running statistics, as linen's ``calibrate`` does (``train=False``).
    """
    kwargs = {**self.analysis.call_kwargs, **kwargs}
    self._set(calibrating=True)
    try:
      with _restoring(self.model):
        self.model(*args, **kwargs)
    finally:
      self._set(calibrating=False)

  def penalty(self, step):
    """``(penalty, metrics)``: the resource penalty to add to the task loss
    (zero after hard assignment or without learned bits)."""
    return qat_lib.resource_penalty(
      self.cost_model,
      self.bits_view(),
      step,
      hard=self.hard,
      target=self.target,
      penalty_fn=self.analysis.penalty_fn,
      start_bits=qat_lib.initial_bits(self.rules),
    )

  def metrics(self) -> dict[str, float]:
    """Fractional and integer cost, compression over INT8, the target."""
    if self.cost_model is None:
      return {}
    return qat_lib.cost_metrics(self.cost_model, self.bits_view(), self.target)

  def hard_assign(self):
    """Rounds the learned bits to integers under the budget (FracBits' hard
    assignment), freezes them in the ``*_hard_bits`` :class:`QuantStat`
    variables and switches the quantizers to them. Idempotent: a model
    already assigned (also one restored from a checkpoint taken after
    assignment) keeps its bits. Returns the assignment (``None`` when
    nothing was rounded)."""
    result = None
    if self.learns_bits:
      stats = self.variables(STATE)
      if fracbits.needs_hard_assignment(stats):
        result = fracbits.hard_assign(
          self.variables(TRAINABLE),
          self.cost_model,
          self.target,
          tolerance=self.analysis.hard_assign_tolerance,
        )
        logging.info(result.message)
        self._write(STATE, fracbits.write_hard_bits(stats, result.quant))
    self.hard = True
    self._set(hard=True)
    return result

  def for_step(self, step: int) -> 'QATModule':
    """Hard-assigns once ``step`` reaches ``hard_assign_step``; returns
    this module (the training loop's protocol)."""
    hard_step = self.analysis.hard_assign_step
    if (
      not self.hard
      and hard_step is not None
      and step >= hard_step
      and self.learns_bits
    ):
      self.hard_assign()
    return self

  def report(self, workdir: str | None = None, step: int = 0) -> str:
    """Per-layer bit table (logged and returned); with ``workdir``, also
    ``bits_step{step}.png`` / ``.txt`` / ``.json`` as linen's report."""
    if self.cost_model is None:
      return ''
    quant = self.bits_view()
    rows = cost_lib.bits_table(self.cost_model, quant, hard=self.hard)
    table = cost_lib.format_bits_table(rows, self.cost_model.kind)
    metrics = self.metrics()
    text = '\n'.join([table] + [f'{k}: {v:,.4g}' for k, v in metrics.items()])
    logging.info('Bit-widths at step %d:\n%s', step, text)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      qat_lib.plot_bits(
        rows,
        os.path.join(workdir, f'bits_step{step}.png'),
        title=f'bit-widths at step {step} '
        f'({metrics["compression_over_int8"]:.2f}x over INT8)',
      )
      with open(os.path.join(workdir, f'bits_step{step}.txt'), 'w') as f:
        f.write(text + '\n')
      with open(os.path.join(workdir, f'bits_step{step}.json'), 'w') as f:
        json.dump({'rows': rows, 'metrics': metrics}, f, indent=1)
    return text


# NNX class names rules may use beside the linen names they stand for.
_NNX_TYPE_NAMES = {'Linear': 'Dense', 'LinearGeneral': 'DenseGeneral'}


def _linen_type_names(rule: Rule) -> Rule:
  """``rule`` with NNX layer type names (``'Linear'``) in ``layer_types``
  replaced by the linen names the rules know (``'Dense'``)."""
  if not isinstance(rule, Rule) or not isinstance(rule.layer_types, tuple):
    return rule  # validate_rules explains what is wrong
  names = tuple(_NNX_TYPE_NAMES.get(t, t) for t in rule.layer_types)
  if names == rule.layer_types:
    return rule
  return dataclasses.replace(rule, layer_types=names)


def _quantizes(rule: Rule | None, kernel_transform) -> bool:
  """Whether a matched layer is quantized (the interceptor's condition for
  the QAT provider)."""
  return (
    rule is not None
    and not rule.keep_float
    and (
      rule.weight is not None
      or rule.act is not None
      or kernel_transform is not None
    )
  )


def _unused_message(rules, facts, root) -> str | None:
  """A clearer error when an unused rule's regex names modules that own
  weights but are no layer fracq quantizes."""
  unused = unused_rules(rules, facts)
  if not unused:
    return None
  candidates = _modules_with_weights(root)
  hits = [
    (i, path, name)
    for i, rule in unused
    for path, name in candidates
    if re.search(rule.module_path, path)
  ]
  if not hits:
    return None
  supported = ', '.join(f'nnx.{cls.__name__}' for cls, _ in SUPPORTED_LAYERS)
  listed = '; '.join(
    f'rule #{i} matches {path!r}, a {name}' for i, path, name in hits[:10]
  )
  return (
    f'{listed}: not an NNX layer type fracq quantizes (supported: '
    f'{supported}, and their subclasses), so the rule matched no layer. '
    'Point the rule at the supported layers inside it, or build the module '
    'from supported layers.'
  )


def quantize(
  model: nnx.Module,
  rules: Sequence[Rule],
  sample_input,
  *,
  budget: cost_lib.Budget | None = None,
  cost_kind: str | None = None,
  penalty: fracbits.Penalty | None = None,
  hard_assign_step: int | None = None,
  hard_assign_tolerance: float = 0.01,
  call_kwargs: dict | None = None,
  on_unused: str = 'error',
  kernel_transform=None,
  axis_name: str | None = None,
) -> QATModule:
  """Quantizes an NNX model by rules (the NNX twin of
  :func:`fracq.quantize`; same arguments).

  Args:
    model: any ``nnx.Module``. It is copied (``nnx.clone``) and left intact.
    rules: quantization rules, first match wins, matched on graph paths.
    sample_input: an example input (an array, or a tuple of arrays passed
      as positional arguments) to probe signs, record per-layer facts and
      initialise the quantizers on.
    budget, cost_kind, penalty, hard_assign_step, hard_assign_tolerance:
      FracBits' budget handling, as in :class:`fracq.QATModel`.
    call_kwargs: extra keywords for the model call in the quantization
      passes and :meth:`QATModule.calibrate`.
    on_unused: ``'error'`` or ``'warn'`` for rules matching no layer.
    kernel_transform: an optional kernel transform (pruning, clustering),
      as in :class:`fracq.QATModel`.
    axis_name: the data-parallel mesh axis activation statistics are
      reduced over where it is bound (linen: the model's ``bn_axis_name``).

  Returns:
    A :class:`QATModule` holding the quantized copy.

  Raises:
    ValueError: a rule matches no layer (naming unsupported modules its
      regex matches), a layer is reached by two graph paths, or the rules
      are invalid.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f'fracq.nnx.quantize takes an nnx.Module, got {type(model).__name__}; '
      'quantize linen modules with fracq.quantize.'
    )
  if on_unused not in ('error', 'warn'):
    raise ValueError(f"on_unused must be 'error' or 'warn', got {on_unused!r}.")
  rules = validate_rules([_linen_type_names(rule) for rule in rules])
  call_kwargs = dict(call_kwargs or {})
  args = sample_input if isinstance(sample_input, tuple) else (sample_input,)

  quantized = [
    _path_str(path)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, QuantizedLayer)
  ]
  if quantized:
    raise ValueError(
      f'The model is already quantized (quantized layers at {quantized[:5]}).'
      ' Quantize the float model instead: fracq.nnx.quantize copies it and '
      'leaves it intact, so keep a reference to it.'
    )
  model = nnx.clone(model)
  paths = _layer_paths(model)
  shared = {i: p for i, p in paths.items() if len(p) > 1}
  if shared:
    listed = '; '.join(
      ' and '.join(repr(_path_str(p)) for p in ps) for ps in shared.values()
    )
    raise ValueError(
      f'The same layer object is reached by several graph paths ({listed}). '
      'fracq gives every layer path its own quantizer, so a shared layer '
      'would be quantized twice, differently. Reach the layer by one path '
      '(e.g. tie weights by calling embed.attend rather than storing the '
      'layer twice), or give each path its own layer.'
    )

  wrappers = []
  for (path,) in paths.values():
    node = model
    for key in path:
      node = graphlib.get_node_impl(node).node_dict(node)[key]
    layer = node
    layer_type = layer_type_of(layer)
    path_str = _path_str(path)
    found = match_rule(rules, path_str, layer_type)
    rule_index, rule = found if found else (None, None)
    wrapper = QuantizedLayer(
      layer,
      path=path_str,
      layer_type=layer_type,
      rule=rule,
      rule_index=rule_index,
      quantized=_quantizes(rule, kernel_transform),
      axis_name=axis_name,
      kernel_transform=kernel_transform,
    )
    model = _replace(model, path, wrapper)
    wrappers.append((path, wrapper))

  signs = _probe_signs(model, args, call_kwargs)
  recorder = Recorder()
  for _, wrapper in wrappers:
    wrapper.signed_input = signs.get(wrapper.path)
    wrapper.initializing = True
  try:
    with _restoring(model), recording(recorder):
      model(*args, **call_kwargs)
  finally:
    for _, wrapper in wrappers:
      wrapper.initializing = False
  for path, wrapper in wrappers:  # float layers: back to the plain layer
    if not wrapper.quantized:
      model = _replace(model, path, wrapper.layer)

  facts = recorder.facts
  message = _unused_message(rules, facts, model)
  if message is not None:
    if on_unused == 'error':
      raise ValueError(message)
    warnings.warn(message)
  else:
    check_unused_rules(rules, facts, on_unused)
  cost_model, target = qat_lib.cost_setup(
    facts, rules, signs, budget, cost_kind
  )
  analysis = _Analysis(
    rules=rules,
    facts=facts,
    signs=signs,
    cost_model=cost_model,
    target=target,
    budget=budget,
    penalty_fn=penalty or fracbits.Penalty(),
    hard_assign_step=hard_assign_step,
    hard_assign_tolerance=hard_assign_tolerance,
    call_kwargs=call_kwargs,
    kernel_transform=kernel_transform,
  )
  return QATModule(model, analysis)


def _probe_signs(model, args, call_kwargs) -> dict[str, bool]:
  """Input signs of the wrapped layers, from one float pass on the first
  example (linen's sign probe: see :mod:`fracq.graph.signs`)."""
  if not all(hasattr(a, '__array__') for a in args):
    return {}
  recorder = Recorder(probe=True)
  with _restoring(model), recording(recorder):
    model(*_first_example(args), **call_kwargs)
  return recorder.signs
