"""NNX layers quantized by the same providers as linen layers.

The interception mechanism (:mod:`fracq.interception`) drives a provider
through three objects, a :class:`~fracq.interception.Site`, a layer call with
a joint transform of the arrays the layer computes with, and the rule that
matched. This module builds the same objects over NNX layers, so uniform QAT
and FracBits run their own code, unchanged, on NNX models.

How a layer is quantized. :class:`QuantizedLayer` wraps one matched layer
(``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` grouped and depthwise
included, ``nnx.ConvTranspose``, ``nnx.Einsum``, ``nnx.Embed``; subclasses
count). Every one of them calls ``self.promote_dtype((inputs, kernel, bias),
dtype=...)`` after reading its kernel and before its matmul or convolution
(``nnx.Embed``: ``(embedding,)`` in a lookup, ``(query, embedding)`` in
``attend``), exactly where linen layers call theirs. A call of the wrapper
runs a shallow copy of the layer (same variables, same code) whose
``promote_dtype`` promotes as the layer would, then hands the kernel and
input to the provider's transform. The layer object itself is never
mutated, so the wrapper is safe under ``nnx.jit``, ``jax.jit`` of
``nnx.split`` states and ``nnx.grad``.

The provider's variables (steps, ranges, bits, observer statistics) are
attributes of the wrapper under their linen names (``kernel_step``,
``input_bits``, ...), as :class:`~fracq.nnx.variables.QuantParam` (linen
``quant``) or :class:`~fracq.nnx.variables.QuantStat` (linen
``quant_stats``). They are created by one eager pass at quantization time
(linen's ``init``), and only read or updated afterwards.

Modes, all static attributes of the wrapper set by
:class:`fracq.nnx.QATModule`: ``use_running_average`` (set by
``model.eval()``/``model.train()`` like a BatchNorm's: statistics are frozen
when True), ``hard`` (learned bits run at their hard-assigned integers),
``calibrating`` (data-dependent initial values are recomputed) and
``initializing`` (variables are created).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from fracq.interception import LayerFacts
from fracq.interception import Rule
from fracq.interception import Site
from fracq.interception import count_macs
from fracq.interception import per_tensor_transform
from fracq.interception.interceptor import transform_promoted
from fracq.methods import providers
from fracq.methods.common import STATE
from fracq.nnx.variables import variable_type

__all__ = [
  'SUPPORTED_LAYERS',
  'NNXSite',
  'QuantizedLayer',
  'Recorder',
  'layer_type_of',
  'recording',
]

# NNX layer classes and the linen layer type names rules use for them
# (``Rule(layer_types=('Dense',))`` matches ``nnx.Linear``). Order matters
# only for subclasses of several.
SUPPORTED_LAYERS: tuple[tuple[type[nnx.Module], str], ...] = (
  (nnx.Linear, 'Dense'),
  (nnx.LinearGeneral, 'DenseGeneral'),
  (nnx.Conv, 'Conv'),
  (nnx.ConvTranspose, 'ConvTranspose'),
  (nnx.Einsum, 'Einsum'),
  (nnx.Embed, 'Embed'),
)

# Linen hyperparameter names providers read, where NNX spells them otherwise.
_NNX_ATTRS = {'features': 'out_features'}


def layer_type_of(module: Any) -> str | None:
  """The linen layer type name of an NNX layer fracq quantizes, or None."""
  for cls, name in SUPPORTED_LAYERS:
    if isinstance(module, cls):
      return name
  return None


@dataclasses.dataclass
class Recorder:
  """What a float probe pass records: per-layer facts and input signs.

  Attributes:
    signs: per layer path, whether its input was ever negative.
    facts: per layer path, its :class:`~fracq.interception.LayerFacts`
      (MACs of a layer called twice add up).
    probe: run every layer float (the sign probe) instead of quantized.
  """

  signs: dict[str, bool] = dataclasses.field(default_factory=dict)
  facts: dict[str, LayerFacts] = dataclasses.field(default_factory=dict)
  probe: bool = False

  def record_sign(self, path: str, x) -> None:
    if x is None or isinstance(x, jax.core.Tracer):
      return
    negative = bool(jnp.min(x) < 0)
    self.signs[path] = self.signs.get(path, False) or negative

  def record_facts(
    self, site: Site, out, quantized: bool, einsum_str: str | None = None
  ) -> None:
    rule = site.rule
    lookup = site.layer_type == 'Embed' and site.method == '__call__'
    facts = LayerFacts(
      path=site.path,
      layer_type=site.layer_type,
      kernel_shape=site.kernel_shape,
      in_shape=site.in_shape,
      out_shape=tuple(out.shape),
      out_axes=site.out_axes,
      macs=count_macs(
        site.layer_type,
        site.kernel_shape,
        site.in_shape,
        tuple(out.shape),
        site.out_axes,
        einsum_str=einsum_str,
        lookup=lookup,
      ),
      rule=rule.label if rule is not None else None,
      rule_index=site.rule_index,
      weight_quantized=quantized and rule.weight is not None,
      act_quantized=quantized and rule.act is not None,
    )
    prev = self.facts.get(site.path)
    if prev is not None:  # a layer called again: MACs add up
      facts = dataclasses.replace(
        prev, macs=prev.macs + facts.macs, calls=prev.calls + 1
      )
    self.facts[site.path] = facts


_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
  'fracq_nnx_recorder', default=None
)


@contextlib.contextmanager
def recording(recorder: Recorder):
  """Every :class:`QuantizedLayer` called inside records into ``recorder``."""
  token = _RECORDER.set(recorder)
  try:
    yield recorder
  finally:
    _RECORDER.reset(token)


class _ValueRef:
  """A provider's view of an NNX variable: ``.value`` reads and writes it
  (the interface linen variables give providers)."""

  __slots__ = ('variable',)

  def __init__(self, variable: nnx.Variable):
    self.variable = variable

  @property
  def value(self):
    return self.variable.get_value()

  @value.setter
  def value(self, new):
    self.variable.set_value(new)


@dataclasses.dataclass
class NNXSite(Site):
  """A :class:`~fracq.interception.Site` over an NNX layer: the provider's
  variables live on the layer's :class:`QuantizedLayer` (``owner``)."""

  owner: Any = None

  def variable(self, collection: str, name: str, init_fn: Callable[[], Any]):
    return self.owner.quant_variable(collection, name, init_fn)

  def has_variable(self, collection: str, name: str) -> bool:
    return name in self.owner.quant_names

  def is_mutable(self, collection: str) -> bool:
    return self.owner.is_mutable(collection)

  @property
  def is_initializing(self) -> bool:
    return bool(self.owner.initializing)

  def layer_attr(self, name: str, default: Any = None) -> Any:
    return getattr(self.module, _NNX_ATTRS.get(name, name), default)


def _einsum_str(layer, call_str: str | None) -> str | None:
  s = call_str if call_str is not None else getattr(layer, 'einsum_str', None)
  return s.replace(' ', '') if isinstance(s, str) else None


def _n_features(layer) -> int:
  feats = getattr(layer, 'out_features', 1)
  return len(feats) if isinstance(feats, (tuple, list)) else 1


class _PromoteHook:
  """An NNX ``promote_dtype`` that promotes as the layer would, records the
  kernel layout on the site, then applies a joint transform."""

  def __init__(self, orig, site: NNXSite, transform, einsum_str: str | None):
    self.orig = orig
    self.site = site
    self.transform = transform
    self.einsum_str = einsum_str

  def __call__(self, arrays, /, *, dtype=None, **kwargs):
    promoted = tuple(self.orig(arrays, dtype=dtype, **kwargs))
    module = self.site.module
    return transform_promoted(
      self.site,
      promoted,
      self.transform,
      n_features=_n_features(module),
      transpose_kernel=bool(getattr(module, 'transpose_kernel', False)),
      einsum_str=self.einsum_str,
    )


def _in_shape(args, kwargs) -> tuple[int, ...]:
  x = args[0] if args else kwargs.get('inputs', kwargs.get('query'))
  return tuple(x.shape) if hasattr(x, 'shape') else ()


class QuantizedLayer(nnx.Module):
  """One NNX layer quantized by a rule, through the linen providers.

  Attributes:
    layer: the original layer (its parameters unchanged, under ``layer``).
    path: the layer's graph path in the model, ``'/'``-joined.
    layer_type: the linen layer type name (``'Dense'`` for ``nnx.Linear``).
    rule, rule_index: the rule that matched (``None`` for a layer no rule
      quantizes: it runs float, only recording facts).
    signed_input: the input's sign from the probe (``None``: unknown,
      treated as signed).
    quant_names: the names of the quantizer variables, attributes of this
      module.
  """

  def __init__(
    self,
    layer: nnx.Module,
    *,
    path: str,
    layer_type: str,
    rule: Rule | None,
    rule_index: int | None,
    quantized: bool,
    axis_name: str | None = None,
    kernel_transform: Any = None,
  ):
    self.layer = layer
    self.path = path
    self.layer_type = layer_type
    self.rule = rule
    self.rule_index = rule_index
    self.quantized = quantized
    self.axis_name = axis_name
    self.kernel_transform = kernel_transform
    self.signed_input: bool | None = None
    self.quant_names: tuple[str, ...] = ()
    self.use_running_average = False
    self.hard = False
    self.calibrating = False
    self.initializing = False

  def __getattr__(self, name: str):
    """Reads of other attributes go to the wrapped layer (``features``,
    ``embedding``, ...), so model code that reads its layers keeps working;
    the variables read that way are the float ones."""
    if name.startswith('_') or name == 'layer':
      raise AttributeError(name)
    try:
      layer = object.__getattribute__(self, 'layer')
    except AttributeError:
      raise AttributeError(name) from None
    return getattr(layer, name)

  # -- the provider's variables ---------------------------------------------
  def quant_variable(self, collection: str, name: str, init_fn):
    """Creates (in the init pass) or reads the quantizer variable ``name``."""
    vtype = variable_type(collection)
    if name in self.quant_names:
      var = getattr(self, name)
      if not isinstance(var, vtype):
        raise ValueError(
          f'{self.path}: quantizer variable {name!r} is a '
          f'{type(var).__name__}, but the method declares it in '
          f'{collection!r} ({vtype.__name__}); quantize the float model '
          'again with fracq.nnx.quantize.'
        )
    elif self.initializing:
      var = vtype(jnp.asarray(init_fn()))
      setattr(self, name, var)
      self.quant_names = (*self.quant_names, name)
    else:
      raise ValueError(
        f'{self.path}: the quantizer needs variable {name!r} '
        f'({vtype.__name__}), which this layer does not have. Variables are '
        'created when fracq.nnx.quantize runs the model once; a model whose '
        'rules or methods changed since must be quantized again from the '
        'float model.'
      )
    return _ValueRef(var)

  def is_mutable(self, collection: str) -> bool:
    """Linen's mutable collections: everything while initializing or
    calibrating; statistics while not ``use_running_average``."""
    if self.initializing or self.calibrating:
      return True
    return collection == STATE and not self.use_running_average

  def quant_variables(self) -> dict[str, nnx.Variable]:
    """This layer's quantizer variables by name."""
    return {name: getattr(self, name) for name in self.quant_names}

  # -- calls ------------------------------------------------------------------
  def __call__(self, *args, **kwargs):
    return self._run('__call__', args, kwargs)

  def attend(self, *args, **kwargs):
    """``nnx.Embed.attend`` (a tied output head) with the quantized table."""
    if self.layer_type != 'Embed':
      raise AttributeError(
        f'{self.path}: a quantized {self.layer_type} has no attend method.'
      )
    return self._run('attend', args, kwargs)

  def _run(self, method: str, args, kwargs):
    recorder = _RECORDER.get()
    site = NNXSite(
      path=self.path,
      layer_type=self.layer_type,
      rule=self.rule,
      rule_index=self.rule_index,
      module=self.layer,
      in_shape=_in_shape(args, kwargs),
      method=method,
      owner=self,
    )
    quantize = self.quantized and not (recorder is not None and recorder.probe)
    transform = None
    if quantize:
      signs = (
        {} if self.signed_input is None else {self.path: self.signed_input}
      )
      provider = providers.QATProvider(
        hard=self.hard,
        calibrate=self.calibrating,
        signs=signs,
        kernel_transform=self.kernel_transform,
        axis_name=self.axis_name,
      )
      transform = per_tensor_transform(provider, site)
    call_str = kwargs.get('einsum_str', args[1] if len(args) > 1 else None)
    einsum_str = (
      _einsum_str(self.layer, call_str) if self.layer_type == 'Einsum' else None
    )
    layer = copy.copy(self.layer)
    hook = _PromoteHook(self.layer.promote_dtype, site, transform, einsum_str)
    # The copy is private to this call and shares the layer's variables;
    # its promote_dtype is swapped before it is ever used.
    object.__setattr__(layer, 'promote_dtype', hook)
    out = getattr(layer, method)(*args, **kwargs)
    if recorder is not None:
      if not recorder.probe:
        recorder.record_facts(site, out, self.quantized, einsum_str)
      elif not (self.layer_type == 'Embed' and method == '__call__'):
        recorder.record_sign(self.path, args[0] if args else None)
    return out
