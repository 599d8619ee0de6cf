"""Model structure from one eager probe: layer order, input signs, Conv->BN.

Flax models are Python code, not graphs. One eager call of the float model
under a method interceptor records, for every ``nn.Conv`` / ``nn.Dense``, its
call order, whether its input was ever negative, its input and output
shapes and convolution attributes, and which ``nn.BatchNorm`` reads the
*same array object* the layer returned (a Conv->BN pair that can be folded).
A BN fed by anything else (an add, an activation) is listed with the reason.
F8Net folds with it; the integer lowering builds its chains from it.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from fracq.interception.interceptor import layer_type_of


def conv_padding(p):
  """Flax ``padding`` as the integer runtime takes it (strings, pairs)."""
  if p is None or isinstance(p, str):
    if isinstance(p, str) and p.upper() not in ('SAME', 'VALID'):
      raise ValueError(f'padding={p!r} is not supported by the integer '
                       "runtime; use 'SAME', 'VALID' or explicit pairs.")
    return p
  if isinstance(p, int):
    return ('INT', p)
  return tuple(tuple(q) if isinstance(q, (tuple, list)) else (q, q)
               for q in p)


@dataclasses.dataclass
class Structure:
  order: list[str]               # quantizable layers in call order
  signs: dict[str, bool]         # input may be negative
  pairs: dict[str, str]          # layer -> the BatchNorm it feeds
  unfolded: dict[str, str]       # BatchNorm -> why it is not folded
  out_shapes: dict[str, tuple]
  in_shapes: dict[str, tuple]
  bn_eps: dict[str, float] = dataclasses.field(default_factory=dict)
  conv_attrs: dict[str, tuple] = dataclasses.field(default_factory=dict)


def probe_structure(module: nn.Module, variables, x, *, skip: str = '',
                    **call_kwargs) -> Structure:
  """Layer order, input signs, Conv->BN pairs and shapes from one eager run
  of the float model on ``x[:1]`` (``variables`` None: a fresh init).

  ``skip``: a regex of layer paths to leave out (layers kept float).
  """
  order, signs, pairs, unfolded = [], {}, {}, {}
  outs, ins, outputs, eps, attrs = {}, {}, {}, {}, {}

  def icpt(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(m, nn.BatchNorm):
      a = args[0] if args else kwargs['x']
      bn = '/'.join(m.path)
      eps[bn] = float(m.epsilon)
      hit = outputs.get(id(a))
      if hit is None or hit[0] is not a:
        unfolded[bn] = 'its input is not the direct output of a Conv/Dense'
      elif hit[1] in pairs:
        unfolded[bn] = f'{hit[1]} already feeds {pairs[hit[1]]}'
      else:
        pairs[hit[1]] = bn
      return next_fun(*args, **kwargs)
    path = '/'.join(m.path)
    if layer_type_of(m) not in ('Conv', 'Dense') or (
        skip and re.search(skip, path)):
      return next_fun(*args, **kwargs)
    a = args[0] if args else kwargs['inputs']
    order.append(path)
    signs[path] = not bool(jnp.all(a >= 0))
    ins[path] = tuple(a.shape)
    if layer_type_of(m) == 'Conv':
      nsp = len(m.kernel_size)
      sd = m.strides if m.strides is not None else 1
      sd = (sd,) * nsp if isinstance(sd, int) else tuple(sd)
      attrs[path] = (sd, conv_padding(m.padding), int(m.feature_group_count))
    y = next_fun(*args, **kwargs)
    outputs[id(y)] = (y, path)
    outs[path] = tuple(y.shape)
    return y

  x = jnp.asarray(x)[:1]
  with jax.disable_jit(), nn.intercept_methods(icpt):
    if variables is None:
      module.init(jax.random.PRNGKey(0), x, **call_kwargs)
    else:
      module.apply(variables, x, **call_kwargs)
  return Structure(order, signs, pairs, unfolded, outs, ins, eps, attrs)
