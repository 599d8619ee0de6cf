"""Model structure from one eager probe: layer order, input signs, Conv->BN.

Flax models are Python code, not graphs. One eager call of the float model
under a method interceptor records, for every ``nn.Conv`` / ``nn.Dense``, its
call order, whether its input was ever negative, its input and output
shapes and convolution attributes, and which ``nn.BatchNorm`` reads the
*same array object* the layer returned (a Conv->BN pair that can be folded).
A BN fed by anything else (an add, an activation) is listed with the reason.
F8Net folds with it; the integer lowering builds its chains from it. The
probe is a provider of the one interception mechanism
(:mod:`fracq.interception`), and its signs come from :class:`SignProbe`.

The same probe recovers the data flow of residual nets without reading the
model code: every layer's input is matched (numerically, most recent first)
to the model input, an earlier layer's post-BN output or a residual module's
output, possibly after ReLU and a global average pool; a submodule whose
output equals ``[relu](sum of its dangling layer outputs [+ its input])``
(a layer is dangling when nothing inside the module reads it) is a residual
add. Such modules' inputs are then quantized once by F8Net and the add is
lowered to an integer op.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from fracq.graph.signs import SignProbe
from fracq.interception import QuantizedModule
from fracq.interception import Rule


def conv_padding(p):
  """Flax ``padding`` as the integer runtime takes it (strings, pairs)."""
  if p is None or isinstance(p, str):
    if isinstance(p, str) and p.upper() not in ('SAME', 'VALID'):
      raise ValueError(
        f'padding={p!r} is not supported by the integer '
        "runtime; use 'SAME', 'VALID' or explicit pairs."
      )
    return p
  if isinstance(p, int):
    return ('INT', p)
  return tuple(tuple(q) if isinstance(q, (tuple, list)) else (q, q) for q in p)


@dataclasses.dataclass
class Structure:
  order: list[str]  # quantizable layers in call order
  signs: dict[str, bool]  # input may be negative
  pairs: dict[str, str]  # layer -> the BatchNorm it feeds
  unfolded: dict[str, str]  # BatchNorm -> why it is not folded
  out_shapes: dict[str, tuple]
  in_shapes: dict[str, tuple]
  bn_eps: dict[str, float] = dataclasses.field(default_factory=dict)
  conv_attrs: dict[str, tuple] = dataclasses.field(default_factory=dict)
  # The data flow, matched numerically in the probe (see probe_structure):
  # layer -> (source tensor, relu, pool) with the source 'input', a layer
  # (its post-BN output) or a residual add (a module returning
  # ``[relu](branch outputs [+ its input])``).
  srcs: dict[str, tuple] = dataclasses.field(default_factory=dict)
  # residual module -> {'operands': [layers], 'identity': (src, relu, pool)
  # or None, 'relu': bool}
  adds: dict[str, dict] = dataclasses.field(default_factory=dict)
  # execution order of ('layer', path) / ('add', path)
  ops: list[tuple] = dataclasses.field(default_factory=list)
  # residual module -> (indices of positional array arguments read by its
  # quantized layers, signed): one quantized tensor shared by all readers
  shared: dict[str, tuple] = dataclasses.field(default_factory=dict)
  # layer path -> its facts (:class:`fracq.interception.LayerFacts`),
  # including the float layers and the rule that matched each
  facts: dict = dataclasses.field(default_factory=dict)
  # layer -> the parts of its input where it is not a plain read (its
  # ``srcs`` entry is None): one part (an average pool of a known tensor)
  # or a channel concatenation of known tensors, [(src, relu, pool)] in
  # channel order; ``pool`` is 1, a max pool, a stride-1 average pool
  # (:data:`AVG_POOLS`) or a max pool then an average pool
  # (:func:`is_pool_chain`)
  concats: dict[str, list] = dataclasses.field(default_factory=dict)


def _same(a, b):
  return tuple(a.shape) == tuple(b.shape) and np.allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-6
  )


def _relu(v):
  return np.maximum(np.asarray(v), 0)


# Max pools the probe recognises (window, strides, padding), e.g. the 3x3 /2
# stem pool of ImageNet ResNets.
MAX_POOLS = tuple(
  ('max', w, (2, 2), p)
  for w in ((3, 3), (2, 2))
  for p in (((1, 1), (1, 1)), ((0, 0), (0, 0)), ((0, 1), (0, 1)))
)


# Average pools (count_include_pad) the probe recognises in concatenation
# parts, e.g. Inception's 3x3 / 1 pool branch.
AVG_POOLS = (('avg', (3, 3), (1, 1), ((1, 1), (1, 1))),)


def is_max_pool(pool) -> bool:
  return isinstance(pool, tuple) and bool(pool) and pool[0] == 'max'


def is_avg_pool(pool) -> bool:
  return isinstance(pool, tuple) and bool(pool) and pool[0] == 'avg'


def avg_pool_sum(v, spec):
  """The window sums of ``spec`` = ('avg', window, strides, padding) on NHWC
  ``v`` (zero padding; divided by the window size: count_include_pad)."""
  _, window, strides, pads = spec
  v = jnp.asarray(v)
  return jax.lax.reduce_window(
    v,
    jnp.asarray(0, v.dtype),
    jax.lax.add,
    (1, *window, 1),
    (1, *strides, 1),
    ((0, 0), *pads, (0, 0)),
  )


def _avg_pool(v, spec):
  return np.asarray(avg_pool_sum(np.asarray(v, np.float64), spec)) / math.prod(
    spec[1]
  )


def is_pool_chain(pool) -> bool:
  """A max pool followed by an average pool: ``(max_spec, avg_spec)``."""
  return isinstance(pool, tuple) and len(pool) == 2 and is_max_pool(pool[0])


def _match_avg_pool(name, v, a):
  """``(name, relu, pool)`` if ``a`` is a stride-1 average pool of ``v``
  (possibly after ReLU, or after ReLU and a max pool); else None."""
  if v.ndim != 4 or a.ndim != 4 or v.shape[-1] != a.shape[-1]:
    return None
  for spec in AVG_POOLS:
    for relu in (False, True):
      base = _relu(v) if relu else v
      if v.shape == a.shape and _same(a, _avg_pool(base, spec)):
        return name, relu, spec
      for max_spec in MAX_POOLS:
        pooled = np.asarray(max_pool(np.asarray(base), max_spec))
        if pooled.shape == a.shape and _same(a, _avg_pool(pooled, spec)):
          return name, relu, (max_spec, spec)
  return None


def _match_parts(known, a):
  """The input of a layer that :func:`_match` does not explain: an average
  pool of one known tensor, or a channel concatenation (see
  :attr:`Structure.concats`); None if neither."""
  for name, v in reversed(known):
    hit = _match_avg_pool(name, v, np.asarray(a))
    if hit is not None:
      return [hit]
  return _match_concat(known, a)


def _match_concat(known, a):
  """The parts of ``a`` as a channel concatenation of known tensors (each
  possibly after ReLU and a max or stride-1 average pool), or None."""
  if a.ndim not in (2, 4):  # feature maps, or their global averages
    return None
  parts, offset = [], 0
  a = np.asarray(a)
  while offset < a.shape[-1]:
    found = None
    for name, v in reversed(known):
      width = v.shape[-1]
      if v.ndim != 4 or offset + width > a.shape[-1]:
        continue
      piece = a[..., offset : offset + width]
      hit = _match([(name, v)], piece) or _match_avg_pool(name, v, piece)
      if hit is not None:
        found = (hit, width)
        break
    if found is None:
      return None
    parts.append(found[0])
    offset += found[1]
  return parts if len(parts) > 1 else None


def max_pool(v, spec):
  """``spec`` = ('max', window, strides, ((lo, hi), (lo, hi))) on NHWC
  ``v`` (numpy or jax; padding never wins: -inf, or the dtype's minimum)."""
  _, window, strides, pads = spec
  v = jnp.asarray(v)
  init = (
    -jnp.inf
    if jnp.issubdtype(v.dtype, jnp.floating)
    else jnp.iinfo(v.dtype).min
  )
  return jax.lax.reduce_window(
    v,
    jnp.asarray(init, v.dtype),
    jax.lax.max,
    (1, *window, 1),
    (1, *strides, 1),
    ((0, 0), *pads, (0, 0)),
  )


def _match(known, a):
  """(name, relu, pool) of the known tensor ``a`` is (possibly after ReLU,
  then a global average pool (``pool``: the number of positions) or a max
  pool (``pool``: a :data:`MAX_POOLS` spec)), most recent first; None if
  none."""
  for name, v in reversed(known):
    if (
      v.ndim == 4
      and a.ndim == 4
      and v.shape[0] == a.shape[0]
      and v.shape[-1] == a.shape[-1]
      and all(  # stride 2
        a.shape[i] in (v.shape[i] // 2, (v.shape[i] + 1) // 2) for i in (1, 2)
      )
    ):
      for spec in MAX_POOLS:
        # ReLU first: where both match, ``a >= 0`` and relu is harmless
        for relu in (True, False):
          mp = np.asarray(max_pool(_relu(v) if relu else v, spec))
          if mp.shape == a.shape and _same(a, mp):
            return name, relu, spec
    if v.shape == a.shape:
      if _same(a, v):
        return name, False, 1
      if _same(a, _relu(v)):
        return name, True, 1
    elif (
      v.ndim > 2
      and a.ndim == 2
      and v.shape[0] == a.shape[0]
      and v.shape[-1] == a.shape[-1]
    ):
      red = tuple(range(1, v.ndim - 1))
      pool = int(math.prod(v.shape[1:-1]))
      if _same(a, np.mean(np.asarray(v, np.float64), axis=red)):
        return name, False, pool
      if _same(a, np.mean(_relu(np.asarray(v, np.float64)), axis=red)):
        return name, True, pool
  return None


def clipping_ops(module: nn.Module, variables, x, **call_kwargs) -> list[str]:
  """Names of the clipping primitives (``min``, ``clamp``) in the float
  model's computation, e.g. from ReLU6. The numeric probe cannot tell
  ``relu6`` from ``relu`` where activations stay below 6, so lowerings that
  do not model clips consult this instead of trusting values."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ('min', 'clamp'):
        found.append(eqn.primitive.name)
      for v in eqn.params.values():
        for sub in v if isinstance(v, (tuple, list)) else (v,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  x = jnp.asarray(x)[:1]
  if variables is None:  # shapes only (initializers clip: not traced)
    variables = jax.eval_shape(
      lambda a: module.init(jax.random.PRNGKey(0), a, **call_kwargs), x
    )
  walk(
    jax.make_jaxpr(lambda v, a: module.apply(v, a, **call_kwargs))(
      variables, x
    ).jaxpr
  )
  return found


_CONV_DENSE = ('Conv', 'Dense')


class _StructureProbe:
  """The provider behind :func:`probe_structure` (float model unchanged)."""

  layer_types = _CONV_DENSE

  def __init__(self, x):
    self.x = x
    self.sign_probe = SignProbe()
    self.order, self.pairs, self.unfolded = [], {}, {}
    self.outs, self.ins, self.outputs, self.eps, self.attrs = {}, {}, {}, {}, {}
    self.srcs, self.adds, self.ops, self.shared = {}, {}, [], {}
    self.concats = {}
    self.known, self.consumed, self.frames = [], set(), []
    self.values = {}

  def quantize_kernel(self, site, kernel):
    return kernel

  def quantize_input(self, site, x):
    return x

  def call_module(self, call):
    if call.kind == 'BatchNorm':
      return self._batch_norm(call)
    if call.path:
      return self._container(call)
    return call.proceed(*call.args, **call.kwargs)

  def _batch_norm(self, call):
    a = call.inputs
    bn = call.path
    self.eps[bn] = call.epsilon
    hit = self.outputs.get(id(a))
    if hit is None or hit[0] is not a:
      self.unfolded[bn] = 'its input is not the direct output of a Conv/Dense'
    elif hit[1] in self.pairs:
      self.unfolded[bn] = f'{hit[1]} already feeds {self.pairs[hit[1]]}'
    else:
      self.pairs[hit[1]] = bn
    out = call.proceed(*call.args, **call.kwargs)
    if hit is not None and hit[0] is a and self.pairs.get(hit[1]) == bn:
      layer = hit[1]
      self.values[layer] = out
      self.known[:] = [(n, out if n == layer else v) for n, v in self.known]
    return out

  def _container(self, call):
    path, args = call.path, call.args
    arr = [(i, a) for i, a in enumerate(args) if isinstance(a, jax.Array)]
    frame = {
      'path': path,
      'args': arr,
      'inner': [],
      'read': set(),
      'arg_src': _match(self.known, arr[0][1]) if len(arr) == 1 else None,
    }
    self.frames.append(frame)
    try:
      y = call.proceed(*args, **call.kwargs)
    finally:
      self.frames.pop()
    if not isinstance(y, jax.Array) or not frame['read']:
      return y
    values = self.values
    dangling = [layer for layer in frame['inner'] if layer not in self.consumed]
    if not 1 <= len(dangling) <= 2 or any(
      tuple(values[layer].shape) != tuple(y.shape) for layer in dangling
    ):
      return y
    total = sum(np.asarray(values[layer], np.float64) for layer in dangling)
    # An add: two branch outputs, or one plus the module's input.
    if len(dangling) == 2:
      cands = [None]
    elif frame['arg_src'] is not None:
      cands = [frame['arg_src']]
    else:
      return y
    for ident in cands:
      if ident is not None and tuple(arr[0][1].shape) != tuple(y.shape):
        continue
      t = total + np.asarray(arr[0][1]) if ident is not None else total
      for relu in (True, False):
        if _same(y, _relu(t) if relu else t):
          self.adds[path] = {
            'operands': dangling,
            'identity': ident,
            'relu': relu,
          }
          self.ops.append(('add', path))
          self.consumed.update(dangling)
          if ident is not None:
            self.consumed.add(ident[0])
          self.known.append((path, y))
          a0 = arr[0][1]
          self.shared[path] = (
            sorted(frame['read']),
            not bool(jnp.all(a0 >= 0)),
          )
          return y
    return y

  def call_layer(self, call):
    site, path = call.site, call.site.path
    a = call.inputs
    if not self.known:
      self.known.append(('input', jnp.asarray(self.x)))
    src = _match(self.known, a)
    self.srcs[path] = src
    if src is not None:
      self.consumed.add(src[0])
    else:
      parts = _match_parts(self.known, a)
      if parts is not None:
        self.concats[path] = parts
        self.consumed.update(part[0] for part in parts)
    for frame in self.frames:
      frame['inner'].append(path)
      frame['read'].update(i for i, b in frame['args'] if b is a)
    self.ops.append(('layer', path))
    self.order.append(path)
    self.sign_probe.record(path, a)
    self.ins[path] = tuple(a.shape)
    if site.layer_type == 'Conv':
      nsp = len(site.layer_attr('kernel_size'))
      sd = site.layer_attr('strides')
      sd = 1 if sd is None else sd
      sd = (sd,) * nsp if isinstance(sd, int) else tuple(sd)
      self.attrs[path] = (
        sd,
        conv_padding(site.layer_attr('padding')),
        int(site.layer_attr('feature_group_count')),
      )
    y = call.run()
    self.outputs[id(y)] = (y, path)
    self.outs[path] = tuple(y.shape)
    self.values[path] = y
    self.known.append((path, y))
    return y


class _ClipProbe:
  """The provider behind :func:`input_clips`: every Conv/Dense output (after
  its BatchNorm, where it has one) is shifted up by ``shift``, and each
  layer's input is recorded."""

  layer_types = _CONV_DENSE

  def __init__(self, pairs: dict[str, str], shift: float):
    self.shift = shift
    self.bns = set(pairs.values())
    self.paired = set(pairs)
    self.inputs = {}

  def quantize_kernel(self, site, kernel):
    return kernel

  def quantize_input(self, site, x):
    return x

  def call_module(self, call):
    out = call.proceed(*call.args, **call.kwargs)
    if call.kind == 'BatchNorm' and call.path in self.bns:
      out = out + self.shift
    return out

  def call_layer(self, call):
    path = call.site.path
    self.inputs[path] = np.asarray(call.inputs)
    y = call.run()
    return y if path in self.paired else y + self.shift


def input_clips(
  module: nn.Module,
  variables,
  x,
  structure: Structure,
  *,
  shift: float = 1e4,
  **call_kwargs,
) -> dict[str, float]:
  """Layer -> the upper clip of its input (e.g. 6.0 after ReLU6), for the
  layers whose input is a clipped activation of an earlier layer.

  The probe's values cannot tell ``relu6`` from ``relu`` while activations
  stay below 6, so this runs the float model once more with every layer's
  (post-BN) output shifted far above any clip: a layer reading a clipped
  activation then sees one constant, the clip (after a max or global
  average pool too); an unclipped reader sees the shifted values.
  """
  x = jnp.asarray(x)[:1]
  probe = _ClipProbe(structure.pairs, shift)
  rules = (Rule(module_path='.*', layer_types=_CONV_DENSE, name='probe'),)
  qmodule = QuantizedModule(module, rules, probe, on_unused='warn')
  with jax.disable_jit(), qmodule.intercepting({}):
    module.apply(variables, x, **call_kwargs)
  clips = {}
  for path, value in probe.inputs.items():
    src = structure.srcs.get(path)
    if src is None or src[0] == 'input' or value.size == 0:
      continue
    top, bottom = float(np.max(value)), float(np.min(value))
    if top == bottom and 0 < top < shift / 2:
      clips[path] = top
  return clips


def probe_structure(
  module: nn.Module,
  variables,
  x,
  *,
  rules: Sequence[Rule] | None = None,
  **call_kwargs,
) -> Structure:
  """Layer order, input signs, Conv->BN pairs and shapes from one eager run
  of the float model on ``x[:1]`` (``variables`` None: a fresh init).

  ``rules``: the layers to probe are the ``nn.Conv`` / ``nn.Dense`` layers
  the rules quantize (first match wins; ``keep_float`` rules leave layers
  out, as float); ``None``: every ``nn.Conv`` / ``nn.Dense``. The per-layer
  facts of the run (which rule matched which layer) are in
  ``Structure.facts``.
  """
  if rules is None:
    rules = (Rule(module_path='.*', layer_types=_CONV_DENSE, name='probe'),)
  x = jnp.asarray(x)[:1]
  probe = _StructureProbe(x)
  qmodule = QuantizedModule(module, rules, probe, on_unused='warn')
  facts = {}
  with jax.disable_jit(), qmodule.intercepting(facts):
    if variables is None:
      module.init(jax.random.PRNGKey(0), x, **call_kwargs)
    else:
      module.apply(variables, x, **call_kwargs)
  return Structure(
    probe.order,
    probe.sign_probe.signs,
    probe.pairs,
    probe.unfolded,
    probe.outs,
    probe.ins,
    probe.eps,
    probe.attrs,
    probe.srcs,
    probe.adds,
    probe.ops,
    probe.shared,
    facts,
    probe.concats,
  )
