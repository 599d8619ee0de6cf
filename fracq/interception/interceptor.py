"""Quantize unmodified Flax linen models through method interceptors.

The mechanism, not an algorithm: it finds the kernels and inputs of
``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv`` (grouped and depthwise
included), ``nn.ConvTranspose`` and ``nn.Einsum`` wherever they sit in a
model, asks a *provider* (a method in ``fracq.methods``) to transform them,
and records per-layer facts. It knows nothing about any one quantizer.

How it hooks in. Every supported layer calls ``self.promote_dtype(inputs,
kernel, bias, dtype=...)`` after reading its kernel and before its matmul or
convolution. Inside ``flax.linen.intercept_methods`` the interceptor replaces
a matched layer's call by the same layer *cloned onto the same scope* with a
``promote_dtype`` that first promotes as the layer would, then hands the kernel
and input to the provider. Parameters, their names and the model code are
untouched; the provider's variables (scales, bit-widths, statistics) live in
its own collections on the layer's scope, created at ``init`` and threaded
explicitly through ``apply(..., mutable=...)``.

Purity and threads. Flax keeps its interceptor stack thread-local, and the
interceptor here carries all its state in the object that one ``with`` block
installs, so nothing global is mutated; interception is active only inside
``QuantizedModule.init`` / ``apply`` and nests with other interceptors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax

from fracq.interception import facts as facts_lib
from fracq.interception import rules as rules_lib

_LAYER_CLASSES = {
  'Dense': nn.Dense,
  'DenseGeneral': nn.DenseGeneral,
  'Conv': nn.Conv,
  'ConvTranspose': nn.ConvTranspose,
  'Einsum': nn.Einsum,
}


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

  Attributes:
    path: the layer's module path, ``'/'``-joined.
    layer_type: ``'Dense'``, ``'Conv'``, ...
    rule: the rule that matched the layer.
    rule_index: the rule's index in the rule list.
    module: the layer (bound to its scope); providers create their variables
      through :meth:`variable`.
    out_axes: kernel axes indexing output channels (set once the kernel is
      seen).
  """

  path: str
  layer_type: str
  rule: rules_lib.Rule
  rule_index: int
  module: nn.Module
  out_axes: tuple[int, ...] = ()
  kernel_shape: tuple[int, ...] = ()
  in_shape: tuple[int, ...] = ()

  def variable(self, collection: str, name: str, init_fn: Callable[[], Any]):
    """Declares (at init) or reads a variable of this layer's provider."""
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


class Provider(Protocol):
  """What a quantization method supplies to the interceptor."""

  def quantize_kernel(self, site: Site, kernel: jax.Array) -> jax.Array: ...

  def quantize_input(self, site: Site, x: jax.Array) -> jax.Array: ...


class _PromoteHook:
  """A ``promote_dtype`` that promotes, then lets the provider transform."""

  def __init__(self, owner, orig, site: Site):
    self.owner = owner
    self.orig = orig
    self.site = site

  def __call__(self, *arrays, dtype=None, **kwargs):
    inputs, kernel, *rest = self.orig(*arrays, dtype=dtype, **kwargs)
    site = self.site
    site.kernel_shape = tuple(kernel.shape)
    site.in_shape = tuple(inputs.shape)
    site.out_axes = facts_lib.kernel_out_axes(
      site.layer_type,
      kernel.ndim,
      n_features=_n_features(site.module),
      transpose_kernel=getattr(site.module, 'transpose_kernel', False),
      einsum_str=_einsum_str(site.module),
    )
    rule = site.rule
    if rule.act is not None:
      inputs = self.owner.provider.quantize_input(site, inputs)
    if rule.weight is not None or _transforms_kernels(self.owner.provider):
      kernel = self.owner.provider.quantize_kernel(site, kernel)
    return (inputs, kernel, *rest)


def _transforms_kernels(provider) -> bool:
  """Providers with a kernel transform (pruning, clustering) see every
  matched kernel, even one whose rule keeps it float (``weight=None``)."""
  return getattr(provider, 'kernel_transform', None) is not None


def _n_features(module) -> int:
  feats = getattr(module, 'features', 1)
  return len(feats) if isinstance(feats, (tuple, list)) else 1


def _einsum_str(module) -> str | None:
  s = getattr(module, 'einsum_str', None)
  return s.replace(' ', '') if isinstance(s, str) else None


class _Interceptor:
  """The callable installed with ``nn.intercept_methods``."""

  def __init__(self, rules, provider, recorder: dict | None):
    self.rules = rules
    self.provider = provider
    self.recorder = recorder

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    hook = getattr(module, 'promote_dtype', None)
    if isinstance(hook, _PromoteHook) and hook.owner is self:
      return next_fun(*args, **kwargs)  # our own clone running
    layer_type = layer_type_of(module)
    if layer_type is None:
      return next_fun(*args, **kwargs)
    path = '/'.join(module.path)
    found = rules_lib.match_rule(self.rules, path, layer_type)
    rule_index, rule = found if found else (None, None)
    quantize = (
      rule is not None
      and not rule.keep_float
      and (
        rule.weight is not None
        or rule.act is not None
        or _transforms_kernels(self.provider)
      )
    )
    if not quantize:
      # Bit-for-bit the original layer; record its facts when asked.
      out = next_fun(*args, **kwargs)
      if self.recorder is not None:
        self._record_float(
          module, path, layer_type, rule, rule_index, args, out
        )
      return out
    site = Site(
      path=path,
      layer_type=layer_type,
      rule=rule,
      rule_index=rule_index,
      module=module,
    )
    clone = module.clone(parent=module.scope)
    hook = _PromoteHook(self, module.promote_dtype, site)
    # The clone is a fresh dataclass instance private to this call; its
    # promote_dtype field is swapped before it is ever used.
    object.__setattr__(clone, 'promote_dtype', hook)
    site.module = clone
    out = clone(*args, **kwargs)
    if self.recorder is not None:
      self._record(site, out, rule, rule_index)
    return out

  def _record(self, site: Site, out, rule, rule_index):
    einsum_str = _einsum_str(site.module)
    macs = facts_lib.count_macs(
      site.layer_type,
      site.kernel_shape,
      site.in_shape,
      tuple(out.shape),
      site.out_axes,
      einsum_str=einsum_str,
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
    self, module, path, layer_type, rule, rule_index, args, out
  ):
    kernel = module.get_variable('params', 'kernel')
    if kernel is None:
      return
    kshape = tuple(kernel.shape)
    in_shape = tuple(args[0].shape) if args else ()
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

  @contextlib.contextmanager
  def intercepting(self, recorder: dict | None = None):
    """The scope inside which the module's layers are quantized."""
    with nn.intercept_methods(
      _Interceptor(self.rules, self.provider, recorder)
    ):
      yield

  def init(self, rngs, *args, **kwargs):
    """Like ``module.init``; also checks that every rule matched a layer."""
    recorder = {}
    with self.intercepting(recorder):
      variables = self.module.init(rngs, *args, **kwargs)
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
    recorder = {}
    rngs = jax.random.key(0) if rngs is None else rngs

    def run(*a):
      with self.intercepting(recorder):
        return self.module.init(rngs, *a, **kwargs)

    jax.eval_shape(run, *args)
    return recorder

  def unused_rules(self, facts: dict) -> list[tuple[int, rules_lib.Rule]]:
    used = {f.rule_index for f in facts.values()}
    return [(i, r) for i, r in enumerate(self.rules) if i not in used]

  def check_unused(self, facts: dict) -> None:
    unused = self.unused_rules(facts)
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
    if self.on_unused == 'error':
      raise ValueError(msg)
    warnings.warn(msg)

  def summary(self, *args, extra=None, **kwargs) -> str:
    """A table of what was quantized and how (see ``format_facts_table``)."""
    return facts_lib.format_facts_table(
      self.layer_facts(*args, **kwargs), extra=extra
    )
