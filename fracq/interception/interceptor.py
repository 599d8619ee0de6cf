"""Quantize unmodified Flax linen models through method interceptors.

The mechanism, not an algorithm: it finds the kernels and inputs of
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` (grouped and depthwise
included), ``nn.ConvTranspose`` and ``nn.Einsum``, and the tables of
``nn.Embed`` (their ``kernel``: the lookup and ``attend``, the tied output
head, both read it), wherever they sit in a model, asks a *provider* (a
method in ``fracq.methods``) to transform them, and records per-layer facts.
It knows nothing about any one quantizer.

How it hooks in. Every supported layer calls ``self.promote_dtype(inputs,
kernel, bias, dtype=...)`` after reading its kernel and before its matmul or
convolution (``nn.Embed``: ``promote_dtype(embedding)`` in a lookup, with
no input, and ``promote_dtype(query, embedding)`` in ``attend``). Inside ``flax.linen.intercept_methods`` the interceptor replaces
a matched layer's call by the same layer *cloned onto the same scope* with a
``promote_dtype`` that first promotes as the layer would, then hands the kernel
and input to the provider. Parameters, their names and the model code are
untouched; the provider's variables (scales, bit-widths, statistics) live in
its own collections on the layer's scope, created at ``init`` and threaded
explicitly through ``apply(..., mutable=...)``.

Memory. Where the provider hands back deferred quantizers (see
:class:`Provider`), the clone's ``dot_general`` / ``conv_general_dilated``
is also replaced, by the lax op run through
:func:`fracq.core.requantizing_op`: the training step then keeps, like the
float layer, the unquantized input (and the kernel, a parameter) for the
backward pass, not quantized copies of them.

Attention. A rule with an ``attention`` spec also matches
``nn.MultiHeadDotProductAttention`` modules (layer type ``'Attention'``): the
interceptor runs the module cloned onto its own scope with flax's
``qk_attn_weights_einsum_cls`` / ``attn_weights_value_einsum_cls`` hooks set
to einsums that first hand both operands to the provider's
``quantize_attention`` (query and key, then probabilities and value). The
mask, softmax and dropout are flax's own; the projections inside are
intercepted as layers. Matched modules are recorded as
:class:`~fracq.interception.facts.AttentionFacts`, apart from the layers.

Providers and front ends. A provider sees a layer only through a
:class:`Site` (its path, type, rule, shapes, variables and attributes) and,
with the optional hooks, a :class:`LayerCall` (run the layer with a joint
transform of its input, kernel and bias) or a :class:`ModuleCall` (any other
module: BatchNorm statistics, module entries). Nothing in them exposes
linen to the provider, so another front end (NNX: walk the module graph and
replace matched layers in place) can drive the same providers by building
the same three objects over its own modules and variables.

Purity and threads. Flax keeps its interceptor stack thread-local, and the
interceptor here carries all its state in the object that one ``with`` block
installs, so nothing global is mutated; interception is active only inside
``QuantizedModule.init`` / ``apply`` and nests with other interceptors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fracq.core import recompute as core_recompute
from fracq.interception import facts as facts_lib
from fracq.interception import rules as rules_lib

_LAYER_CLASSES = {
  'Dense': nn.Dense,
  'DenseGeneral': nn.DenseGeneral,
  'Conv': nn.Conv,
  'ConvTranspose': nn.ConvTranspose,
  'Einsum': nn.Einsum,
  'Embed': nn.Embed,
}

# The parameter each layer type computes with, when it is not ``kernel``.
_WEIGHT_NAMES = {'Embed': 'embedding'}

# The methods of a layer type that read its kernel (``__call__`` for all).
_LAYER_METHODS = {'Embed': ('__call__', 'attend')}


# Layer types that declare their parameters in ``setup``, which has run on
# the layer's scope by the time its method is intercepted.
_SETUP_LAYERS = ('Embed',)


def weight_name(layer_type: str) -> str:
  """The parameter a layer of ``layer_type`` quantizes as its kernel
  (``'kernel'``; ``'embedding'`` for ``Embed``)."""
  return _WEIGHT_NAMES.get(layer_type, 'kernel')


def layer_type_of(module: nn.Module) -> str | None:
  """The supported layer type name of ``module`` (subclasses count), or None.

  ``nn.ConvLocal`` (unshared weights) is not an ``nn.Conv`` and is left alone.
  """
  for name, cls in _LAYER_CLASSES.items():
    if isinstance(module, cls):
      return name
  return None


@dataclasses.dataclass
class Site:
  """One intercepted layer call, as the provider sees it.

  Providers reach the layer only through this object (its variables, its
  attributes), never through the framework's module, so a front end for
  another module system (NNX: a module graph transformed in place) drives
  the same providers by supplying its own ``Site``.

  Attributes:
    path: the layer's module path, ``'/'``-joined.
    layer_type: ``'Dense'``, ``'Conv'``, ...
    rule: the rule that matched the layer.
    rule_index: the rule's index in the rule list.
    module: the front end's layer object (linen: the layer bound to its
      scope). Providers do not use it: they create their variables through
      :meth:`variable` and read hyperparameters with :meth:`layer_attr`.
    out_axes: kernel axes indexing output channels (set once the kernel is
      seen; ``Embed``: ``(0,)``, the table's rows).
    method: the layer method being run (``'__call__'``; ``'attend'`` for an
      ``Embed`` used as an output head).
  """

  path: str
  layer_type: str
  rule: rules_lib.Rule
  rule_index: int
  module: nn.Module
  out_axes: tuple[int, ...] = ()
  kernel_shape: tuple[int, ...] = ()
  in_shape: tuple[int, ...] = ()
  method: str = '__call__'

  def variable(self, collection: str, name: str, init_fn: Callable[[], Any]):
    """Declares (at init) or reads a variable of this layer's provider."""
    if self.layer_type in _SETUP_LAYERS:
      # Its methods are not compact: declare on the layer's scope itself.
      return self.module.scope.variable(collection, name, init_fn)
    return self.module.variable(collection, name, init_fn)

  def has_variable(self, collection: str, name: str) -> bool:
    return self.module.has_variable(collection, name)

  def is_mutable(self, collection: str) -> bool:
    return self.module.is_mutable_collection(collection)

  @property
  def is_initializing(self) -> bool:
    return self.module.is_initializing()

  @property
  def kernel_channel_axis(self) -> int:
    """The (last) output-channel axis of the kernel, for per-channel specs."""
    return self.out_axes[-1]

  def layer_attr(self, name: str, default: Any = None) -> Any:
    """A hyperparameter of the layer (``strides``, ``padding``,
    ``feature_group_count``, ...), or ``default``."""
    return getattr(self.module, name, default)


# A joint transform of the arrays a layer computes with, after dtype
# promotion: ``(inputs, kernel, bias) -> (inputs, kernel, bias)``; ``bias`` is
# None for layers without one, and a transform returning None for it drops it.
Transform = Callable[[Any, Any, Any], tuple[Any, Any, Any]]


class Provider(Protocol):
  """What a quantization method supplies to the interceptor.

  :meth:`quantize_kernel` and :meth:`quantize_input` are called for the
  layers a rule quantizes (``rule.weight`` / ``rule.act`` set), unless the
  provider takes over layer calls with ``call_layer``.

  Optional hooks, looked up by name, for methods that need more than a
  per-tensor transform (F8Net's BatchNorm folding, the structure probe):

  * ``layer_types``: the layer types the provider can quantize; matched
    layers of other types run float.
  * ``kernel_transform``: when not None, kernels of every matched layer go
    through ``quantize_kernel`` (pruning, clustering), even float ones.
  * ``call_layer(call: LayerCall)``: takes over the call of every matched
    layer; ``call.run(transform)`` runs the layer (any number of times)
    with a joint transform of its input, kernel and bias.
  * ``call_module(call: ModuleCall)``: sees the call of every module that is
    not a supported layer (``call.kind``: ``'BatchNorm'`` or ``'module'``)
    and returns its output, usually ``call.proceed(*call.args,
    **call.kwargs)`` with the arguments it chose (module entries).
    Attention modules whose operands are quantized are not handed to it.
  * ``quantize_attention(site, operand, x)``: fake-quantizes one operand of
    an attention matmul (``operand``: ``'query'``, ``'key'``, ``'probs'``
    or ``'value'``) of a module whose rule has an ``attention`` spec;
    without it such modules run float.
  * ``deferred_input(site, x)`` / ``deferred_kernel(site, kernel)``: the
    quantized tensor as a :class:`fracq.core.Deferred` (its value and a
    pure function of the tensor and the quantizer's parameters), or None
    for ``quantize_input`` / ``quantize_kernel``. A ``Dense``,
    ``DenseGeneral`` or ``Conv`` then runs its matmul or convolution
    through :func:`fracq.core.requantizing_op`, which recomputes the
    quantized operands in the backward pass instead of keeping them.
  """

  def quantize_kernel(self, site: Site, kernel: jax.Array) -> jax.Array: ...

  def quantize_input(self, site: Site, x: jax.Array) -> jax.Array: ...


class _PromoteHook:
  """A ``promote_dtype`` that promotes, then applies a joint transform."""

  def __init__(self, owner, orig, site: Site, transform: Transform | None):
    self.owner = owner
    self.orig = orig
    self.site = site
    self.transform = transform

  def __call__(self, *arrays, dtype=None, **kwargs):
    promoted = self.orig(*arrays, dtype=dtype, **kwargs)
    module = self.site.module
    return transform_promoted(
      self.site,
      promoted,
      self.transform,
      n_features=_n_features(module),
      transpose_kernel=getattr(module, 'transpose_kernel', False),
      einsum_str=_einsum_str(module),
    )


def transform_promoted(
  site: Site,
  promoted: Sequence[jax.Array],
  transform: Transform | None,
  *,
  n_features: int,
  transpose_kernel: bool,
  einsum_str: str | None,
) -> tuple:
  """What a layer's ``promote_dtype`` hands back under interception: the
  promoted ``(inputs, kernel[, bias, ...])`` (an ``Embed`` lookup: the
  table alone) with the kernel layout recorded on ``site`` and ``transform``
  applied to the input, kernel and bias. Shared by the linen and NNX
  front ends."""
  lookup = len(promoted) == 1  # an Embed lookup: the table alone
  if lookup:
    inputs, kernel, rest = None, promoted[0], []
  else:
    inputs, kernel, *rest = promoted
  site.kernel_shape = tuple(kernel.shape)
  if inputs is not None:
    site.in_shape = tuple(inputs.shape)
  site.out_axes = facts_lib.kernel_out_axes(
    site.layer_type,
    kernel.ndim,
    n_features=n_features,
    transpose_kernel=transpose_kernel,
    einsum_str=einsum_str,
  )
  if transform is None:
    return promoted
  bias = rest[0] if rest else None
  inputs, kernel, bias = transform(inputs, kernel, bias)
  if lookup:
    return (kernel,)
  return (inputs, kernel, bias, *rest[1:]) if rest else (inputs, kernel)


def _transforms_kernels(provider) -> bool:
  """Providers with a kernel transform (pruning, clustering) see every
  matched kernel, even one whose rule keeps it float (``weight=None``)."""
  return getattr(provider, 'kernel_transform', None) is not None


def _n_features(module) -> int:
  feats = getattr(module, 'features', 1)
  return len(feats) if isinstance(feats, (tuple, list)) else 1


def _in_shape(args) -> tuple[int, ...]:
  return tuple(args[0].shape) if args and hasattr(args[0], 'shape') else ()


def _is_lookup(layer_type: str, method: str) -> bool:
  """An embedding lookup: it gathers rows and multiplies nothing."""
  return layer_type == 'Embed' and method == '__call__'


def _einsum_str(module) -> str | None:
  s = getattr(module, 'einsum_str', None)
  return s.replace(' ', '') if isinstance(s, str) else None


def per_tensor_transform(provider, site: Site) -> Transform:
  """The transform of a plain provider: ``quantize_input`` on the input when
  the rule has an ``act`` spec, ``quantize_kernel`` on the kernel when it has
  a ``weight`` spec (or the provider transforms every kernel).

  A provider may also offer ``deferred_input(site, x)`` and
  ``deferred_kernel(site, kernel)``, each returning a
  :class:`fracq.core.Deferred` (or None to fall back to ``quantize_*``):
  the transform then hands the layer the deferred value, and records the
  deferred operands in its ``deferred`` dict (``'inputs'``, ``'kernel'``)
  for the layer's matmul or convolution (see :class:`_RequantizingOp`).
  """
  deferred_input = getattr(provider, 'deferred_input', None)
  deferred_kernel = getattr(provider, 'deferred_kernel', None)

  def transform(inputs, kernel, bias):
    transform.deferred = {}
    if site.rule.act is not None and inputs is not None:
      found = None if deferred_input is None else deferred_input(site, inputs)
      if found is None:
        inputs = provider.quantize_input(site, inputs)
      else:
        transform.deferred['inputs'] = found
        inputs = found.value
    if site.rule.weight is not None or _transforms_kernels(provider):
      found = None if deferred_kernel is None else deferred_kernel(site, kernel)
      if found is None:
        kernel = provider.quantize_kernel(site, kernel)
      else:
        transform.deferred['kernel'] = found
        kernel = found.value
    return inputs, kernel, bias

  transform.deferred = {}
  return transform


# The layer types whose matmul or convolution is a module field that a clone
# can replace: (the field, the ``*_cls`` field that overrides it, the lax op).
_OP_FIELDS = {
  'Dense': ('dot_general', 'dot_general_cls', jax.lax.dot_general),
  'DenseGeneral': ('dot_general', 'dot_general_cls', jax.lax.dot_general),
  'Conv': (
    'conv_general_dilated',
    'conv_general_dilated_cls',
    jax.lax.conv_general_dilated,
  ),
}


class _RequantizingOp:
  """A layer's ``dot_general`` / ``conv_general_dilated`` that runs through
  :func:`fracq.core.requantizing_op` when its operands are the deferred
  values its transform handed the layer (the same arrays: nothing was done
  to them in between), and as the plain lax op otherwise."""

  def __init__(self, transform, op):
    self.transform = transform
    self.op = op

  def __call__(self, lhs, rhs, *args, **kwargs):
    deferred = getattr(self.transform, 'deferred', None) or {}
    inputs = deferred.get('inputs')
    kernel = deferred.get('kernel')
    lhs_op = inputs if inputs is not None and inputs.value is lhs else lhs
    rhs_op = kernel if kernel is not None and kernel.value is rhs else rhs
    if lhs_op is lhs and rhs_op is rhs:
      return self.op(lhs, rhs, *args, **kwargs)
    return core_recompute.requantizing_op(
      lambda left, right: self.op(left, right, *args, **kwargs), lhs_op, rhs_op
    )


class LayerCall:
  """One call of a matched layer, handed to a provider's ``call_layer``.

  Attributes:
    site: the layer, as providers see it.
    args, kwargs: the call's arguments.
  """

  def __init__(self, owner, site: Site, module: nn.Module, args, kwargs):
    self._owner = owner
    self._module = module
    self._runs = 0
    self.site = site
    self.args = args
    self.kwargs = kwargs

  @property
  def inputs(self):
    """The layer's input array (its first argument)."""
    return self.args[0] if self.args else self.kwargs['inputs']

  def run(self, transform: Transform | None = None, args=None, kwargs=None):
    """Runs the layer (on its own scope: same parameters) with ``transform``
    applied to the arrays it computes with; ``args``/``kwargs`` replace the
    call's arguments. The site's shapes are set on return."""
    module = self._module
    scope = module.scope
    # Names the first run (or, for a layer with a setup such as Embed, the
    # layer's own setup) reserved are free again.
    if self._runs or self.site.layer_type in _SETUP_LAYERS:
      scope = scope.rewound()
    self._runs += 1
    clone = module.clone(parent=scope)
    hook = _PromoteHook(self._owner, module.promote_dtype, self.site, transform)
    # The clone is a fresh dataclass instance private to this call; its
    # promote_dtype field is swapped before it is ever used.
    object.__setattr__(clone, 'promote_dtype', hook)
    op_fields = _OP_FIELDS.get(self.site.layer_type)
    if (
      op_fields is not None
      and hasattr(transform, 'deferred')
      and getattr(clone, op_fields[0], None) is None
      and getattr(clone, op_fields[1], None) is None
    ):
      object.__setattr__(
        clone, op_fields[0], _RequantizingOp(transform, op_fields[2])
      )
    self.site.module = clone
    return getattr(clone, self.site.method)(
      *(self.args if args is None else args),
      **(self.kwargs if kwargs is None else kwargs),
    )


class ModuleCall:
  """One call of a module that is not a supported layer (a BatchNorm, a
  block, the model itself), handed to a provider's ``call_module``.

  Attributes:
    path: the module path, ``'/'``-joined (``''`` for the model itself).
    kind: ``'BatchNorm'`` or ``'module'``.
    args, kwargs: the call's arguments.
  """

  def __init__(self, module: nn.Module, next_fun, args, kwargs):
    self._module = module
    self._next_fun = next_fun
    self.path = '/'.join(module.path)
    self.kind = 'BatchNorm' if isinstance(module, nn.BatchNorm) else 'module'
    self.args = args
    self.kwargs = kwargs

  def proceed(self, *args, **kwargs):
    """Calls the module itself with these arguments."""
    return self._next_fun(*args, **kwargs)

  @property
  def inputs(self):
    """The module's first argument (``x`` for a BatchNorm)."""
    return self.args[0] if self.args else self.kwargs['x']

  def variable(self, collection: str, name: str, init_fn: Callable[[], Any]):
    """A provider variable on the module's scope (e.g. a block's input
    format)."""
    return self._module.variable(collection, name, init_fn)

  def is_mutable(self, collection: str) -> bool:
    return self._module.is_mutable_collection(collection)

  @property
  def is_initializing(self) -> bool:
    return self._module.is_initializing()

  @property
  def epsilon(self) -> float:
    """A BatchNorm's epsilon."""
    return float(self._module.epsilon)

  def batch_norm_statistics(self, x):
    """``(scale, bias, mean, var, epsilon)`` a BatchNorm normalizes ``x``
    with in this call: its running averages when it uses them, else the
    batch statistics of ``x`` (averaged over the BN's ``axis_name``; at init,
    as the BN does, the batch statistics). ``scale``/``bias`` are None when
    the BN has none. Read-only: call :meth:`proceed` for the BN's own
    updates."""
    bn = self._module
    use_ra = nn.merge_param(
      'use_running_average',
      bn.use_running_average,
      self.kwargs.get('use_running_average'),
    )
    gamma = bn.get_variable('params', 'scale') if bn.use_scale else None
    beta = bn.get_variable('params', 'bias') if bn.use_bias else None
    xf = x.astype(jnp.float32)
    red = tuple(range(xf.ndim - 1))
    if bn.is_initializing():  # as the BN does at init: batch statistics
      return gamma, beta, jnp.mean(xf, red), jnp.var(xf, red), self.epsilon
    if use_ra:
      mean = bn.get_variable('batch_stats', 'mean')
      var = bn.get_variable('batch_stats', 'var')
      return gamma, beta, mean, var, self.epsilon
    mean = jnp.mean(xf, axis=red)
    mean2 = jnp.mean(jnp.square(xf), axis=red)
    if bn.axis_name is not None:
      mean, mean2 = jax.lax.pmean((mean, mean2), bn.axis_name)
    var = jnp.maximum(mean2 - jnp.square(mean), 0.0)
    return gamma, beta, mean, var, self.epsilon


# The einsums of an attention module's two matmuls, as flax writes them.
ATTENTION_OPERANDS = {
  'qk_attn_weights_einsum_cls': ('query', 'key'),
  'attn_weights_value_einsum_cls': ('probs', 'value'),
}
_EINSUM_KWARGS = ('qk_attn_weights_einsum', 'attn_weights_value_einsum')


class _OperandEinsum:
  """An attention module's einsum class (flax calls it with no argument and
  uses the result as ``einsum(subscripts, lhs, rhs)``) whose einsum first
  hands both operands to the provider's ``quantize_attention``."""

  def __init__(self, owner, site: Site, operands, quantize, record):
    self.owner = owner
    self.site = site
    self.operands = operands
    self.quantize = quantize
    self.record = record

  def __call__(self):
    def einsum(subscripts, lhs, rhs, **kwargs):
      self.record(self.operands, lhs, rhs)
      lhs = self.quantize(self.site, self.operands[0], lhs)
      rhs = self.quantize(self.site, self.operands[1], rhs)
      return jnp.einsum(subscripts, lhs, rhs, **kwargs)

    return einsum


def _check_attention_module(path: str, module) -> None:
  """Refuses an attention module the einsum hooks cannot quantize."""
  fix = (
    'quantize its matmuls by hand, or leave it float (drop the attention '
    "spec from the rule matching '{path}')."
  ).format(path=path)
  own = [name for name in ATTENTION_OPERANDS if getattr(module, name, None)]
  if own:
    raise ValueError(
      f'{path}: the attention module sets {own} itself; fracq quantizes '
      f'attention through these einsum hooks, so it cannot; {fix}'
    )
  if getattr(module, 'precision', None) is not None:
    raise ValueError(
      f'{path}: the attention module sets precision={module.precision!r}, '
      "which flax's dot_product_attention refuses together with the einsum "
      f'hooks fracq quantizes attention with; drop precision or {fix}'
    )
  try:
    params = inspect.signature(module.attention_fn).parameters
  except (TypeError, ValueError):
    params = {}
  if not all(name in params for name in _EINSUM_KWARGS):
    raise ValueError(
      f'{path}: its attention_fn does not take the einsum arguments '
      f'{_EINSUM_KWARGS} of flax.linen.dot_product_attention, through '
      'which fracq quantizes the q.k and probs.v matmuls; use '
      f'nn.dot_product_attention (or accept and use those arguments), or '
      f'{fix}'
    )


class _Interceptor:
  """The callable installed with ``nn.intercept_methods``."""

  def __init__(
    self, rules, provider, recorder: dict | None, attention: dict | None = None
  ):
    self.rules = rules
    self.provider = provider
    self.recorder = recorder
    self.attention = attention
    self.layer_types = getattr(provider, 'layer_types', None)
    self.call_layer = getattr(provider, 'call_layer', None)
    self.call_module = getattr(provider, 'call_module', None)
    self.quantize_attention = getattr(provider, 'quantize_attention', None)

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    method = context.method_name
    if method not in ('__call__', 'attend'):
      return next_fun(*args, **kwargs)
    hook = getattr(module, 'promote_dtype', None)
    if isinstance(hook, _PromoteHook) and hook.owner is self:
      return next_fun(*args, **kwargs)  # our own clone running
    if isinstance(module, nn.MultiHeadDotProductAttention):
      return self._attention(module, next_fun, args, kwargs)
    layer_type = layer_type_of(module)
    if layer_type is None:
      if self.call_module is None or method != '__call__':
        return next_fun(*args, **kwargs)
      return self.call_module(ModuleCall(module, next_fun, args, kwargs))
    if method not in _LAYER_METHODS.get(layer_type, ('__call__',)):
      return next_fun(*args, **kwargs)
    path = '/'.join(module.path)
    found = rules_lib.match_rule(self.rules, path, layer_type)
    rule_index, rule = found if found else (None, None)
    quantize = (
      rule is not None
      and not rule.keep_float
      and (self.layer_types is None or layer_type in self.layer_types)
      and (
        self.call_layer is not None
        or rule.weight is not None
        or rule.act is not None
        or _transforms_kernels(self.provider)
      )
    )
    if not quantize:
      # Bit-for-bit the original layer; record its facts when asked.
      out = next_fun(*args, **kwargs)
      if self.recorder is not None:
        self._record_float(
          module, path, layer_type, rule, rule_index, args, out, method
        )
      return out
    site = Site(
      path=path,
      layer_type=layer_type,
      rule=rule,
      rule_index=rule_index,
      module=module,
      in_shape=_in_shape(args),
      method=method,
    )
    call = LayerCall(self, site, module, args, kwargs)
    if self.call_layer is not None:
      out = self.call_layer(call)
    else:
      out = call.run(per_tensor_transform(self.provider, site))
    if self.recorder is not None:
      self._record(site, out, rule, rule_index)
    return out

  def _attention(self, module, next_fun, args, kwargs):
    """An attention module: its matmul operands quantized when a rule with
    an ``attention`` spec matches it (and the provider quantizes them)."""
    einsum = getattr(module, 'qk_attn_weights_einsum_cls', None)
    if isinstance(einsum, _OperandEinsum) and einsum.owner is self:
      return next_fun(*args, **kwargs)  # our own clone running
    path = '/'.join(module.path)
    found = rules_lib.match_rule(self.rules, path, rules_lib.ATTENTION)
    rule_index, rule = found if found else (None, None)
    quantize = (
      rule is not None
      and rule.attention is not None
      and self.quantize_attention is not None
    )
    if not quantize:
      if self.call_module is None:
        out = next_fun(*args, **kwargs)
      else:
        out = self.call_module(ModuleCall(module, next_fun, args, kwargs))
      if rule is not None:
        self._put_attention(
          facts_lib.AttentionFacts(
            path=path, rule=rule.label, rule_index=rule_index, quantized=False
          )
        )
      return out
    _check_attention_module(path, module)
    shapes = {}

    def record(operands, lhs, rhs):
      shapes[operands[0]] = tuple(lhs.shape)
      shapes[operands[1]] = tuple(rhs.shape)

    site = Site(
      path=path,
      layer_type=rules_lib.ATTENTION,
      rule=rule,
      rule_index=rule_index,
      module=module,
      in_shape=_in_shape(args),
    )
    hooks = {
      name: _OperandEinsum(
        self, site, operands, self.quantize_attention, record
      )
      for name, operands in ATTENTION_OPERANDS.items()
    }
    clone = module.clone(parent=module.scope, **hooks)
    site.module = clone
    out = clone(*args, **kwargs)
    if 'value' in shapes:
      self._put_attention(
        facts_lib.AttentionFacts(
          path=path,
          rule=rule.label,
          rule_index=rule_index,
          quantized=True,
          query_shape=shapes['query'],
          key_shape=shapes['key'],
          value_shape=shapes['value'],
          macs=facts_lib.attention_macs(
            shapes['query'], shapes['key'], shapes['value']
          ),
        )
      )
    return out

  def _put_attention(self, f: facts_lib.AttentionFacts):
    if self.attention is None:
      return
    prev = self.attention.get(f.path)
    if prev is not None:  # a shared module called again
      f = dataclasses.replace(
        prev, macs=prev.macs + f.macs, calls=prev.calls + 1
      )
    self.attention[f.path] = f

  def _record(self, site: Site, out, rule, rule_index):
    einsum_str = _einsum_str(site.module)
    macs = facts_lib.count_macs(
      site.layer_type,
      site.kernel_shape,
      site.in_shape,
      tuple(out.shape),
      site.out_axes,
      einsum_str=einsum_str,
      lookup=_is_lookup(site.layer_type, site.method),
    )
    self._put(
      facts_lib.LayerFacts(
        path=site.path,
        layer_type=site.layer_type,
        kernel_shape=site.kernel_shape,
        in_shape=site.in_shape,
        out_shape=tuple(out.shape),
        out_axes=site.out_axes,
        macs=macs,
        rule=rule.label,
        rule_index=rule_index,
        weight_quantized=rule.weight is not None,
        act_quantized=rule.act is not None,
      )
    )

  def _record_float(
    self, module, path, layer_type, rule, rule_index, args, out, method
  ):
    kernel = module.get_variable('params', weight_name(layer_type))
    if kernel is None:
      return
    kshape = tuple(kernel.shape)
    in_shape = _in_shape(args)
    out_axes = facts_lib.kernel_out_axes(
      layer_type,
      len(kshape),
      n_features=_n_features(module),
      transpose_kernel=getattr(module, 'transpose_kernel', False),
      einsum_str=_einsum_str(module),
    )
    macs = facts_lib.count_macs(
      layer_type,
      kshape,
      in_shape,
      tuple(out.shape),
      out_axes,
      einsum_str=_einsum_str(module),
      lookup=_is_lookup(layer_type, method),
    )
    self._put(
      facts_lib.LayerFacts(
        path=path,
        layer_type=layer_type,
        kernel_shape=kshape,
        in_shape=in_shape,
        out_shape=tuple(out.shape),
        out_axes=out_axes,
        macs=macs,
        rule=rule.label if rule else None,
        rule_index=rule_index,
        weight_quantized=False,
        act_quantized=False,
      )
    )

  def _put(self, f: facts_lib.LayerFacts):
    prev = self.recorder.get(f.path)
    if prev is not None:  # a shared layer called again: MACs add up
      f = dataclasses.replace(
        prev, macs=prev.macs + f.macs, calls=prev.calls + 1
      )
    self.recorder[f.path] = f


class QuantizedModule:
  """An unmodified Flax module plus rules and a provider.

  ``init`` and ``apply`` mirror ``nn.Module.init`` / ``apply``; inside them
  the interceptor is active. The wrapped module's own ``params`` tree is
  exactly the plain model's.

  Args:
    module: any ``flax.linen`` module.
    rules: quantization rules (first match wins).
    provider: the method that transforms matched kernels and inputs.
    on_unused: ``'error'`` (default) or ``'warn'`` when a rule matches no
      layer at ``init``.
  """

  def __init__(
    self,
    module: nn.Module,
    rules: Sequence[rules_lib.Rule],
    provider: Provider,
    *,
    on_unused: str = 'error',
  ):
    if on_unused not in ('error', 'warn'):
      raise ValueError(
        f"on_unused must be 'error' or 'warn', got {on_unused!r}."
      )
    self.module = module
    self.rules = rules_lib.validate_rules(rules)
    self.provider = provider
    self.on_unused = on_unused
    # The attention modules rules matched in the last layer_facts / init.
    self.attention_facts: dict[str, facts_lib.AttentionFacts] = {}

  @contextlib.contextmanager
  def intercepting(
    self,
    recorder: dict | None = None,
    provider=None,
    attention: dict | None = None,
  ):
    """The scope inside which the module's layers are quantized.

    Args:
      recorder: a dict that receives each layer's facts.
      provider: a provider for this scope only (default: the module's),
        e.g. a calibration or capture mode of the same method.
      attention: a dict that receives the facts of the attention modules
        rules match (:class:`~fracq.interception.facts.AttentionFacts`).
    """
    provider = self.provider if provider is None else provider
    with nn.intercept_methods(
      _Interceptor(self.rules, provider, recorder, attention)
    ):
      yield

  def init(self, rngs, *args, **kwargs):
    """Like ``module.init``; also checks that every rule matched a layer."""
    recorder, attention = {}, {}
    with self.intercepting(recorder, attention=attention):
      variables = self.module.init(rngs, *args, **kwargs)
    self.attention_facts = attention
    self.check_unused(recorder)
    return variables

  def apply(self, variables, *args, **kwargs):
    """Like ``module.apply``, with the quantizers active."""
    with self.intercepting():
      return self.module.apply(variables, *args, **kwargs)

  def layer_facts(
    self, *args, rngs=None, **kwargs
  ) -> dict[str, facts_lib.LayerFacts]:
    """Per-layer facts on a real input shape (shape-only trace, no FLOPs).

    Args:
      *args: example inputs (arrays or ``jax.ShapeDtypeStruct``s).
      rngs: PRNG key(s) for init; a fixed key by default.
      **kwargs: extra call keywords (e.g. ``train=False``).
    """
    recorder, attention = {}, {}
    rngs = jax.random.key(0) if rngs is None else rngs

    def run(*a):
      with self.intercepting(recorder, attention=attention):
        return self.module.init(rngs, *a, **kwargs)

    jax.eval_shape(run, *args)
    self.attention_facts = attention
    return recorder

  def unused_rules(self, facts: dict) -> list[tuple[int, rules_lib.Rule]]:
    return unused_rules(self.rules, {**facts, **self.attention_facts})

  def check_unused(self, facts: dict) -> None:
    """Checks ``facts`` and the attention modules of the last trace."""
    check_unused_rules(
      self.rules, {**facts, **self.attention_facts}, self.on_unused
    )

  def summary(self, *args, extra=None, **kwargs) -> str:
    """A table of what was quantized and how (see ``format_facts_table``)."""
    return facts_lib.format_facts_table(
      self.layer_facts(*args, **kwargs), extra=extra
    )


def unused_rules(
  rules: Sequence[rules_lib.Rule], facts: dict
) -> list[tuple[int, rules_lib.Rule]]:
  """``(index, rule)`` of the rules that matched no layer in ``facts``."""
  used = {f.rule_index for f in facts.values()}
  return [(i, r) for i, r in enumerate(rules) if i not in used]


def check_unused_rules(
  rules: Sequence[rules_lib.Rule], facts: dict, on_unused: str = 'error'
) -> None:
  """Raises (``on_unused='error'``) or warns (``'warn'``) when a rule matched
  no layer in ``facts``, naming the rules and the model's layer paths."""
  unused = unused_rules(rules, facts)
  if not unused:
    return
  paths = sorted(facts)
  msg = (
    'These rules matched no layer: '
    + ', '.join(
      f'#{i} module_path={r.module_path!r}'
      + (f' layer_types={r.layer_types}' if r.layer_types else '')
      for i, r in unused
    )
    + f'. Layer paths in this model: {paths[:40]}'
    + (' ...' if len(paths) > 40 else '')
    + '. Fix the regex, or an earlier rule already claims those layers '
    "(first match wins); pass on_unused='warn' to allow it."
  )
  if any(r.attention is not None for _, r in unused):
    msg += (
      ' An attention spec applies to flax.linen.MultiHeadDotProductAttention'
      ' modules (their path, e.g. block_0/attn), quantized by uniform QAT'
      ' and FracBits; NNX attention and the other methods are not covered.'
    )
  if on_unused == 'error':
    raise ValueError(msg)
  warnings.warn(msg)
