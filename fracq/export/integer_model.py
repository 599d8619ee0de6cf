"""Integer-only inference: lower a trained fracq model to integer programs.

A *program* is the model as a chain of integer layers. Each layer reads
integer activation codes (uint8 / int8), multiplies them with integer kernel
codes into an int32 accumulator (``preferred_element_type=jnp.int32``), adds
an int32 bias, optionally applies ReLU and a global-average-pool *sum*, and
requantizes the accumulator to the next layer's codes:

* F8Net (:func:`lower_f8net`): every scale is a power of two, so the
  requantization is a rounding right shift (``FL_in + FL_w - FL_next``, plus
  ``log2(k)`` after a k-element pool sum) and a clamp. The simulated
  fixed-point model computes exactly the same numbers, so predictions *and*
  logits agree bit for bit (checked at lowering time).
* Uniform QAT / FracBits (:func:`lower_qat`): LSQ activation steps and
  per-channel kernel steps are arbitrary reals; BatchNorm (running
  statistics) folds into a per-channel real multiplier
  ``M = s_in s_w gamma / (sqrt(var + eps) s_next)`` that
  :func:`fracq.core.integer.requantize` applies exactly in integers
  (``M0 * 2^(shift - 31)``, 31-bit mantissa), and the folded bias becomes
  int32 at the accumulator's scale. Rounding the bias and the multiplier can
  move a code by one near ties, so logits agree to a small tolerance.

Which models lower: chains of ``nn.Conv`` / ``nn.Dense`` layers, each
optionally followed by its BatchNorm, then ReLU when the next layer's input
is non-negative, with an optional global average pool before a final
``nn.Dense`` (the digits CNN, VGG-style nets). The structure is read from one
probe of the model (:func:`probe_structure`) and then *verified*: lowering
runs the program next to the fake-quantized model on the sample batch and
raises if they disagree (e.g. a residual add, a max pool or a pool window
that is not a power of two), so an unsupported model gets an error, never a
silently wrong integer model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fracq.core import fixed_point as fxp
from fracq.core import integer as ints


@dataclasses.dataclass
class IntLayer:
  """One integer layer of a program.

  Attributes:
    path: the Flax module path.
    layer_type: ``'Conv'`` or ``'Dense'``.
    kernel: integer kernel codes (Flax layout: HWIO or (in, out)).
    bias: int32 bias at the accumulator's scale, or None.
    strides / padding / feature_group_count: convolution attributes.
    relu: apply ReLU to the accumulator (the next input is non-negative).
    pool: number of positions summed by a global average pool after this
      layer (1: none).
    requant: ``('shift', shift)`` (power-of-two scales) or
      ``('mult', sign, m0, exponent)`` (real multipliers); None for the last
      layer, whose int32 accumulator is the output.
    out_range: ``(qmin, qmax)`` of the next layer's input codes.
    out_scale: real value of one accumulator unit of the last layer (per
      channel), for dequantizing the output.
  """

  path: str
  layer_type: str
  kernel: np.ndarray
  bias: np.ndarray | None
  strides: tuple[int, ...] | None = None
  padding: Any = None
  feature_group_count: int = 1
  relu: bool = False
  pool: int = 1
  requant: tuple | None = None
  out_range: tuple[int, int] | None = None
  out_scale: np.ndarray | None = None


@dataclasses.dataclass
class IntegerProgram:
  """An integer-only model: input quantization, layers, output scale."""

  layers: list[IntLayer]
  input_scale: float          # real value of one input code
  input_range: tuple[int, int]
  kind: str                   # 'f8net' or 'qat'

  def quantize_input(self, x) -> jax.Array:
    """Float images -> input codes (the only float op, at the boundary)."""
    lo, hi = self.input_range
    q = jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) /
                           jnp.float32(self.input_scale)), lo, hi)
    return q.astype(_code_dtype(lo, hi))

  def __call__(self, codes) -> jax.Array:
    """Integer codes -> int32 output accumulator (integer ops only)."""
    return integer_forward(self, codes)

  def logits(self, x) -> jax.Array:
    """Float images -> dequantized logits."""
    acc = integer_forward(self, self.quantize_input(x))
    return acc.astype(jnp.float32) * jnp.asarray(self.layers[-1].out_scale,
                                                 jnp.float32)

  def summary(self) -> str:
    lines = [f'{"layer":<20} {"type":<6} {"kernel":<18} {"bias":<5} '
             f'{"relu":<5} {"pool":>4}  requant']
    for l in self.layers:
      rq = '-' if l.requant is None else l.requant[0]
      if l.requant is not None and l.requant[0] == 'shift':
        s = np.unique(np.asarray(l.requant[1]))
        rq = f'>> {s[0]}' if s.size == 1 else f'>> {s.min()}..{s.max()}'
      lines.append(f'{l.path:<20} {l.layer_type:<6} '
                   f'{str(l.kernel.dtype) + str(list(l.kernel.shape)):<18} '
                   f'{"int32" if l.bias is not None else "-":<5} '
                   f'{str(l.relu):<5} {l.pool:>4}  {rq}')
    return '\n'.join(lines)


def _code_dtype(lo, hi):
  if lo >= 0 and hi <= 255:
    return jnp.uint8
  if lo >= -128 and hi <= 127:
    return jnp.int8
  return jnp.int16 if -32768 <= lo and hi <= 32767 else jnp.int32


def _along_last(v, ndim):
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape((1,) * (ndim - 1) + (v.shape[0],))


def integer_forward(program: IntegerProgram, codes) -> jax.Array:
  """Runs ``program`` on integer input codes; returns the int32 output."""
  x = codes
  for l in program.layers:
    if l.layer_type == 'Conv':
      pad = l.padding
      if isinstance(pad, tuple) and pad and pad[0] == 'INT':
        pad = ((pad[1], pad[1]),) * (x.ndim - 2)
      acc = ints.int_conv(x, jnp.asarray(l.kernel), l.strides, pad,
                          l.feature_group_count)
    else:
      acc = ints.int_dense(x, jnp.asarray(l.kernel))
    if l.bias is not None:
      acc = acc + _along_last(jnp.asarray(l.bias, jnp.int32), acc.ndim)
    if l.requant is None:
      return acc
    if l.relu:
      acc = jnp.maximum(acc, 0)
    if l.pool > 1:
      acc = jnp.sum(acc, axis=tuple(range(1, acc.ndim - 1)), dtype=jnp.int32)
    lo, hi = l.out_range
    if l.requant[0] == 'shift':
      y = ints.shift_fraclen(acc, jnp.asarray(l.requant[1], jnp.int32))
      y = jnp.clip(y, lo, hi)
    else:
      _, sign, m0, sh = l.requant
      acc = acc * _along_last(jnp.asarray(sign, jnp.int32), acc.ndim)
      y = ints.requantize(acc, jnp.asarray(m0), jnp.asarray(sh), 0, lo, hi)
    x = y.astype(_code_dtype(lo, hi))
  raise ValueError('The program has no output layer.')


# -- structure --------------------------------------------------------------
@dataclasses.dataclass
class Structure:
  order: list[str]               # quantizable layers in call order
  signs: dict[str, bool]         # input may be negative
  pairs: dict[str, str]          # layer -> the BatchNorm it feeds
  unfolded: dict[str, str]       # BatchNorm -> why it is not folded
  out_shapes: dict[str, tuple]
  in_shapes: dict[str, tuple]


def probe_structure(module: nn.Module, variables, x, **call_kwargs
                    ) -> Structure:
  """Layer order, input signs, Conv->BN pairs and shapes from one eager run
  of the float model (``variables`` may be None: fresh init)."""
  from fracq.interception.interceptor import layer_type_of
  order, signs, pairs, unfolded = [], {}, {}, {}
  outs, ins, outputs = {}, {}, {}

  def icpt(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(m, nn.BatchNorm):
      a = args[0] if args else kwargs['x']
      bn = '/'.join(m.path)
      hit = outputs.get(id(a))
      if hit is not None and hit[0] is a and hit[1] not in pairs:
        pairs[hit[1]] = bn
      else:
        unfolded[bn] = 'its input is not the direct output of a Conv/Dense'
      return next_fun(*args, **kwargs)
    if layer_type_of(m) not in ('Conv', 'Dense'):
      return next_fun(*args, **kwargs)
    path = '/'.join(m.path)
    a = args[0] if args else kwargs['inputs']
    order.append(path)
    signs[path] = not bool(jnp.all(a >= 0))
    ins[path] = tuple(a.shape)
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
  return Structure(order, signs, pairs, unfolded, outs, ins)


def _link(st: Structure, i: int) -> tuple[bool, int]:
  """(relu, pool) between layer i and layer i+1 of a chain, or an error."""
  a, b = st.order[i], st.order[i + 1]
  out, nxt = st.out_shapes[a], st.in_shapes[b]
  relu = not st.signs[b]
  if out[1:] == nxt[1:]:
    return relu, 1
  if len(out) > 2 and len(nxt) == 2 and out[-1] == nxt[-1]:
    return relu, int(np.prod(out[1:-1]))
  raise ValueError(
      f'Integer lowering supports chains of Conv/Dense layers (with BN, ReLU '
      f'and a final global average pool): {a} outputs {out} but {b} reads '
      f'{nxt}. This model is not such a chain (pooling, reshapes, branches); '
      'export it with fracq.export.export_model (packed artifact) instead.')


def _verify(program, simulated_logits, x, exact: bool, atol: float):
  got = np.asarray(program.logits(x))
  ref = np.asarray(simulated_logits)
  if got.shape != ref.shape:
    raise ValueError(f'Integer program output {got.shape} != model output '
                     f'{ref.shape}: the model is not a supported chain.')
  err = float(np.max(np.abs(got - ref))) if got.size else 0.0
  span = float(np.ptp(ref)) or 1.0
  if (exact and err != 0.0) or (not exact and err > atol * span):
    raise ValueError(
        f'The integer program disagrees with the fake-quantized model (max '
        f'|logit diff| {err:.3g}, logit range {span:.3g}): the model has '
        'operations the chain lowering does not model (residual adds, max '
        'pooling, ...). Export the packed artifact instead.')
  return err


# -- F8Net ------------------------------------------------------------------
def lower_f8net(f8model, variables, sample_x, *, verify: bool = True
                ) -> IntegerProgram:
  """The integer-only program of a trained :class:`F8NetModel`.

  Raises ValueError if a BatchNorm is not folded, a pool window is not a
  power of two, or (``verify``) the program's logits on ``sample_x`` are not
  bit-identical to the simulated model's.
  """
  if f8model.unfolded:
    raise ValueError('Integer-only F8Net needs every BatchNorm folded; not '
                     f'folded: {f8model.unfolded}.')
  x = jnp.asarray(sample_x)
  recs = f8model.capture(variables, x[:1])
  st = probe_structure(f8model.module, variables, x, train=False)
  if [r.path for r in recs] != st.order:
    raise ValueError('Every Conv/Dense must be quantized for integer-only '
                     f'inference; quantized {[r.path for r in recs]}, model '
                     f'has {st.order} (check keep_float).')
  layers = []
  for i, r in enumerate(recs):
    S = np.asarray(r.input_fl) + np.asarray(r.weight_fl)
    l = IntLayer(path=r.path, layer_type=r.layer_type,
                 kernel=np.asarray(r.kernel_codes, np.int8),
                 bias=None if r.bias_codes is None else
                 np.asarray(r.bias_codes, np.int32).reshape(-1),
                 strides=None if r.strides is None else tuple(r.strides),
                 padding=_padding(r.padding),
                 feature_group_count=int(r.feature_group_count))
    if i + 1 < len(recs):
      nxt = recs[i + 1]
      l.relu, l.pool = _link(st, i)
      pool_shift = 0
      if l.pool > 1:
        pool_shift = int(round(math.log2(l.pool)))
        if 2 ** pool_shift != l.pool:
          raise ValueError(
              f'{r.path}: a {l.pool}-element average pool is not a power-of-'
              'two shift; F8Net folds its correction into the next layer, '
              'which the simulated model does not do yet.')
      l.requant = ('shift', (S + pool_shift - nxt.input_fl).astype(np.int32))
      l.out_range = fxp.fixed_point_range(nxt.signed_input)
    else:
      l.out_scale = (2.0 ** (-S.astype(np.float64))).astype(np.float32)
    layers.append(l)
  first = recs[0]
  program = IntegerProgram(
      layers=layers, input_scale=2.0 ** -first.input_fl,
      input_range=fxp.fixed_point_range(first.signed_input), kind='f8net')
  if verify:
    ref = f8model.apply(variables, x, train=False)
    _verify(program, ref, x, exact=True, atol=0.0)
  return program


def _padding(p):
  if p is None or isinstance(p, str):
    if isinstance(p, str) and p.upper() not in ('SAME', 'VALID'):
      raise ValueError(f'padding={p!r} is not supported by the integer '
                       "runtime; use 'SAME', 'VALID' or explicit pairs.")
    return p
  if isinstance(p, int):
    return ('INT', p)
  return tuple(tuple(q) if isinstance(q, (tuple, list)) else (q, q)
               for q in p)
