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
``nn.Dense`` (the digits CNN, VGG-style nets). F8Net models with residual
adds (ResNet basic and bottleneck blocks with identity or 1x1-conv/BN
projection shortcuts, and max pools such as the ImageNet stem's, which run
on the codes; tested on ResNet-20, ``resnet_tiny`` and
``resnet_tiny_bottleneck``) lower to *graph* programs: each
layer names its input, and an :class:`IntAdd` shifts its int32 operands left
to the finest operand's FL (exact), adds, applies ReLU and requantizes with a
rounding right shift. The data flow comes from the probe
(:func:`probe_structure`: a module whose output is ``[relu](its dangling
branch outputs [+ its input])``), and the F8Net simulation quantizes such a
module's input once, so the shortcut reads the same 8-bit tensor as the
convs and the program stays bit-exact. The structure is read from one
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

import jax
import jax.numpy as jnp
import numpy as np

from fracq.core import fixed_point as fxp
from fracq.core import integer as ints
from fracq.graph.structure import Structure
from fracq.graph.structure import clipping_ops
from fracq.graph.structure import conv_padding
from fracq.graph.structure import is_max_pool
from fracq.graph.structure import max_pool
from fracq.graph.structure import probe_structure


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
    maxpool: a max pool of the output codes (graph programs: e.g. the 3x3
      /2 stem pool of ImageNet ResNets), ``('max', window, strides,
      padding)``; max commutes with the monotone requantization, so pooling
      codes equals quantizing the pooled values.
    requant: ``('shift', shift)`` (power-of-two scales) or
      ``('mult', sign, m0, exponent)`` (real multipliers); None for the last
      layer, whose int32 accumulator is the output.
    out_range: ``(qmin, qmax)`` of the next layer's input codes.
    out_scale: real value of one accumulator unit of the last layer (per
      channel), for dequantizing the output.
    acc_shift: the accumulator is shifted left by this many bits before the
      bias is added, so the bias (and everything after) keeps ``acc_shift``
      more fractional bits (real-multiplier programs: a bias rounded to
      whole accumulator units would shift every output by up to half a unit).
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
  acc_shift: int = 0
  src: str | None = None
  maxpool: tuple | None = None


@dataclasses.dataclass
class IntAdd:
  """A residual add of a graph program (F8Net).

  Each input (a previous op's output, by path: int32 accumulators of
  layers without ``requant``, or 8-bit codes) is shifted left by its
  ``shifts`` entry (FL alignment to the finest operand, exact; saturated to
  int32) and the int32 sum goes through the same tail as a layer: optional
  ReLU, global-pool sum, rounding right shift ``requant`` and clamp to
  ``out_range``.
  """

  path: str
  inputs: list[str]
  shifts: list[np.ndarray]
  relu: bool = False
  pool: int = 1
  requant: tuple | None = None
  out_range: tuple[int, int] | None = None
  out_scale: np.ndarray | None = None
  layer_type: str = 'Add'
  maxpool: tuple | None = None


@dataclasses.dataclass
class IntegerProgram:
  """An integer-only model: input quantization, layers, output scale.

  A *chain* program's layers each read the previous layer's output. A
  *graph* program (residual nets) names each layer's input (``IntLayer.src``:
  an earlier op's path, or ``'input'``) and has :class:`IntAdd` ops; every
  op's output is kept under its path.
  """

  layers: list[IntLayer]
  input_scale: float  # real value of one input code
  input_range: tuple[int, int]
  kind: str  # 'f8net' or 'qat'

  def quantize_input(self, x) -> jax.Array:
    """Float images -> input codes (the only float op, at the boundary)."""
    lo, hi = self.input_range
    q = jnp.clip(
      jnp.round(jnp.asarray(x, jnp.float32) / jnp.float32(self.input_scale)),
      lo,
      hi,
    )
    return q.astype(_code_dtype(lo, hi))

  def __call__(self, codes) -> jax.Array:
    """Integer codes -> int32 output accumulator (integer ops only).

    Each output channel is in its own units (``out_scale`` is per channel
    for per-channel head scales), so the raw accumulator is not comparable
    across classes: classify with :meth:`predict`, or dequantize with
    :meth:`logits`.
    """
    return integer_forward(self, codes)

  def predict(self, x) -> jax.Array:
    """Float images -> predicted class: the argmax of :meth:`logits` (the
    int32 outputs brought to one scale), not of the raw accumulator."""
    return jnp.argmax(self.logits(x), axis=-1)

  def logits(self, x) -> jax.Array:
    """Float images -> dequantized logits."""
    acc = integer_forward(self, self.quantize_input(x))
    scale = np.asarray(self.layers[-1].out_scale, np.float32)
    if scale.size == 1:
      scale = scale.reshape(())
    return acc.astype(jnp.float32) * _along_last(scale, acc.ndim)

  def summary(self) -> str:
    lines = [
      f'{"layer":<20} {"type":<6} {"kernel":<18} {"bias":<5} '
      f'{"relu":<5} {"pool":>4}  requant'
    ]
    for l in self.layers:
      if isinstance(l, IntAdd):
        lines.append(
          f'{l.path:<20} {"Add":<6} '
          f'{"+".join(l.inputs):<18} {"-":<5} {str(l.relu):<5} '
          f'{l.pool:>4}  '
          f'{"-" if l.requant is None else l.requant[0]}'
        )
        continue
      rq = '-' if l.requant is None else l.requant[0]
      if l.requant is not None and l.requant[0] == 'shift':
        s = np.unique(np.asarray(l.requant[1]))
        rq = f'>> {s[0]}' if s.size == 1 else f'>> {s.min()}..{s.max()}'
      lines.append(
        f'{l.path:<20} {l.layer_type:<6} '
        f'{str(l.kernel.dtype) + str(list(l.kernel.shape)):<18} '
        f'{"int32" if l.bias is not None else "-":<5} '
        f'{str(l.relu):<5} {l.pool:>4}  {rq}'
        + (
          ''
          if l.maxpool is None
          else f', max pool {"x".join(map(str, l.maxpool[1]))} '
          f'/{l.maxpool[2][0]}'
        )
      )
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


def _tail(l, acc):
  """ReLU, pool sum, requantization and clamp of an int32 accumulator."""
  if l.requant is None:
    return acc
  if l.requant[0] == 'mult':  # negative BN scales flip a channel
    acc = acc * _along_last(jnp.asarray(l.requant[1], jnp.int32), acc.ndim)
  if l.relu:
    acc = jnp.maximum(acc, 0)
  if l.pool > 1:
    acc = jnp.sum(acc, axis=tuple(range(1, acc.ndim - 1)), dtype=jnp.int32)
  lo, hi = l.out_range
  if l.requant[0] == 'shift':
    y = ints.shift_fraclen(acc, jnp.asarray(l.requant[1], jnp.int32))
    y = jnp.clip(y, lo, hi)
  else:
    _, _, m0, sh = l.requant
    y = ints.requantize(acc, jnp.asarray(m0), jnp.asarray(sh), 0, lo, hi)
  y = y.astype(_code_dtype(lo, hi))
  return y if l.maxpool is None else max_pool(y, l.maxpool)


def _graph_forward(program: IntegerProgram, codes) -> jax.Array:
  env = {'input': codes}
  y = codes
  for l in program.layers:
    if isinstance(l, IntAdd):
      acc = None
      for name, sh in zip(l.inputs, l.shifts):
        v = ints.shift_fraclen(env[name], -jnp.asarray(sh, jnp.int32))
        acc = v if acc is None else acc + v
    else:
      acc = _layer_acc(l, env[l.src if l.src is not None else 'input'])
    y = _tail(l, acc)
    env[l.path] = y
  return y


def _layer_acc(l, x):
  if l.layer_type == 'Conv':
    pad = l.padding
    if isinstance(pad, tuple) and pad and pad[0] == 'INT':
      pad = ((pad[1], pad[1]),) * (x.ndim - 2)
    acc = ints.int_conv(
      x, jnp.asarray(l.kernel), l.strides, pad, l.feature_group_count
    )
  else:
    acc = ints.int_dense(x, jnp.asarray(l.kernel))
  if l.acc_shift:
    acc = acc << l.acc_shift
  if l.bias is not None:
    acc = acc + _along_last(jnp.asarray(l.bias, jnp.int32), acc.ndim)
  return acc


def is_graph(program: IntegerProgram) -> bool:
  return any(isinstance(l, IntAdd) or l.src is not None for l in program.layers)


def integer_forward(program: IntegerProgram, codes) -> jax.Array:
  """Runs ``program`` on integer input codes; returns the int32 output."""
  if is_graph(program):
    return _graph_forward(program, codes)
  x = codes
  for l in program.layers:
    x = _tail(l, _layer_acc(l, x))
    if l.requant is None:  # the int32 accumulator of the last layer
      return x
  return x  # a truncated program (e.g. for debugging) ends in codes


# -- structure ----------------------------------------------------------------
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
    'export it with fracq.export.export_model (packed artifact) instead.'
  )


def _verify(program, simulated_logits, x, exact: bool, atol: float):
  got = np.asarray(program.logits(x))
  ref = np.asarray(simulated_logits)
  if got.shape != ref.shape:
    raise ValueError(
      f'Integer program output {got.shape} != model output '
      f'{ref.shape}: the model is not a supported chain.'
    )
  err = float(np.max(np.abs(got - ref))) if got.size else 0.0
  span = float(np.ptp(ref)) or 1.0
  if (exact and err != 0.0) or (not exact and err > atol * span):
    raise ValueError(
      f'The integer program disagrees with the fake-quantized model (max '
      f'|logit diff| {err:.3g}, logit range {span:.3g}): the model has '
      'operations the chain lowering does not model (residual adds, max '
      'pooling, ...). Export the packed artifact instead.'
    )
  return err


# -- F8Net ------------------------------------------------------------------
def _refuse_clips(module, variables, x, call_kwargs):
  ops = clipping_ops(module, variables, x, **call_kwargs)
  if ops:
    raise ValueError(
      f'{type(module).__name__} clips activations ({len(ops)} `min`/'
      '`clamp` operations, e.g. ReLU6); the integer lowering represents '
      'ReLU only, and a ReLU6 link would be exact only while activations '
      'stay below 6. Use ReLU, or export the packed artifact instead.'
    )


def _input_range(signed: bool, code_max: int | None) -> tuple[int, int]:
  """Code range of a layer's 8-bit fixed-point input; a PACT clip (folded
  into the producer, see fracq.methods.f8net) lowers the top code to
  ``code_max = min(255, 2^FL)``."""
  lo, hi = fxp.fixed_point_range(signed)
  return (lo, hi if code_max is None else min(hi, int(code_max)))


def lower_f8net(
  f8model, variables, sample_x, *, verify: bool = True
) -> IntegerProgram:
  """The integer-only program of a trained :class:`F8NetModel`.

  Raises ValueError if a BatchNorm is not folded, a pool window is not a
  power of two, or (``verify``) the program's logits on ``sample_x`` are not
  bit-identical to the simulated model's.
  """
  if f8model.unfolded:
    raise ValueError(
      'Integer-only F8Net needs every BatchNorm folded; not '
      f'folded: {f8model.unfolded}.'
    )
  x = jnp.asarray(sample_x)
  recs = f8model.capture(variables, x[:1])
  st = probe_structure(f8model.module, variables, x, train=False)
  _refuse_clips(f8model.module, variables, x, {'train': False})
  if [r.path for r in recs] != st.order:
    raise ValueError(
      'Every Conv/Dense must be quantized for integer-only '
      f'inference; quantized {[r.path for r in recs]}, model '
      f'has {st.order} (check keep_float).'
    )
  if st.adds or any(
    s is not None and is_max_pool(s[2]) for s in st.srcs.values()
  ):
    return _lower_f8net_graph(f8model, variables, recs, st, x, verify)
  layers = []
  for i, r in enumerate(recs):
    S = np.asarray(r.input_fl) + np.asarray(r.weight_fl)
    l = IntLayer(
      path=r.path,
      layer_type=r.layer_type,
      kernel=np.asarray(r.kernel_codes, np.int8),
      bias=None
      if r.bias_codes is None
      else np.asarray(r.bias_codes, np.int32).reshape(-1),
      strides=None if r.strides is None else tuple(r.strides),
      padding=conv_padding(r.padding),
      feature_group_count=int(r.feature_group_count),
    )
    if i + 1 < len(recs):
      nxt = recs[i + 1]
      l.relu, l.pool = _link(st, i)
      pool_shift = 0
      if l.pool > 1:
        pool_shift = int(round(math.log2(l.pool)))
        if 2**pool_shift != l.pool:
          raise ValueError(
            f'{r.path}: a {l.pool}-element average pool is not a power-of-'
            'two shift; F8Net folds its correction into the next layer, '
            'which the simulated model does not do yet.'
          )
      l.requant = ('shift', (S + pool_shift - nxt.input_fl).astype(np.int32))
      l.out_range = _input_range(nxt.signed_input, nxt.input_code_max)
    else:
      l.out_scale = (2.0 ** (-S.astype(np.float64))).astype(np.float32)
    layers.append(l)
  first = recs[0]
  program = IntegerProgram(
    layers=layers,
    input_scale=2.0**-first.input_fl,
    input_range=fxp.fixed_point_range(first.signed_input),
    kind='f8net',
  )
  if verify:
    ref = f8model.apply(variables, x, train=False)
    _verify(program, ref, x, exact=True, atol=0.0)
  return program


def _lower_f8net_graph(f8model, variables, recs, st, x, verify):
  """Graph program of an F8Net model with residual adds (see
  :class:`IntAdd`): the data flow comes from the probe (``st.srcs``,
  ``st.adds``); every tensor has one FL shared by its readers, so each op
  requantizes once, to that FL."""
  rec = {r.path: r for r in recs}
  acc_fl = {
    p: np.asarray(r.input_fl) + np.asarray(r.weight_fl) for p, r in rec.items()
  }
  codes_fl, links = {}, {}
  for kind, p in st.ops:
    if kind != 'layer':
      continue
    src = st.srcs.get(p)
    if src is None:
      raise ValueError(
        f'{p}: its input is not an earlier layer, add or the '
        'model input (possibly after ReLU / global average '
        'pool); the model is neither a chain nor a residual '
        'graph the integer lowering supports (max pooling, '
        'concatenation, ...).'
      )
    name, relu, pool = src
    link = (
      int(rec[p].input_fl),
      bool(relu),
      pool,
      bool(rec[p].signed_input),
      rec[p].input_code_max,
    )
    if links.setdefault(name, link) != link:
      raise ValueError(
        f'{name} is read as {links[name]} and as {link} '
        '(FL, relu, pool, signed, clip): its readers do not share '
        'one quantized tensor.'
      )
    codes_fl[name] = link[0]
  operands = {l for a in st.adds.values() for l in a['operands']}
  both = operands & set(links)
  if both:
    raise ValueError(
      f'{sorted(both)} feed both an add and a layer; not '
      'supported by the integer lowering.'
    )
  ops, seq = {}, []
  for kind, p in st.ops:
    if kind == 'layer':
      r = rec[p]
      l = IntLayer(
        path=p,
        layer_type=r.layer_type,
        kernel=np.asarray(r.kernel_codes, np.int8),
        bias=None
        if r.bias_codes is None
        else np.asarray(r.bias_codes, np.int32).reshape(-1),
        strides=None if r.strides is None else tuple(r.strides),
        padding=conv_padding(r.padding),
        feature_group_count=int(r.feature_group_count),
        src=st.srcs[p][0],
      )
    else:
      a = st.adds[p]
      names = list(a['operands'])
      fls = [acc_fl[n] for n in names]
      if a['identity'] is not None:
        ident = a['identity'][0]
        if ident not in codes_fl or a['identity'][2] != links[ident][2]:
          raise ValueError(
            f'{p}: its shortcut {ident} is not a quantized '
            'tensor read by a layer.'
          )
        names.append(ident)
        fls.append(np.asarray(codes_fl[ident]))
      top = fls[0]
      for f in fls[1:]:
        top = np.maximum(top, f)
      acc_fl[p] = top
      l = IntAdd(
        path=p,
        inputs=names,
        shifts=[np.asarray(top - f, np.int32) for f in fls],
        relu=bool(a['relu']),
      )
    ops[p] = l
    seq.append(l)
  for name, (fl, relu, pool, signed, code_max) in links.items():
    if name == 'input':
      continue
    l = ops[name]
    if is_max_pool(pool):
      l.maxpool, pool = pool, 1
    pool_shift = int(round(math.log2(pool)))
    if 2**pool_shift != pool:
      raise ValueError(
        f'{name}: a {pool}-element average pool is not a power-of-two shift.'
      )
    l.relu = l.relu or relu
    l.pool = pool
    l.requant = ('shift', np.asarray(acc_fl[name] + pool_shift - fl, np.int32))
    l.out_range = _input_range(signed, code_max)
  last = seq[-1]
  if last.path in links or not isinstance(last, IntLayer):
    raise ValueError('The program must end in a Conv/Dense layer.')
  last.out_scale = (2.0 ** (-acc_fl[last.path].astype(np.float64))).astype(
    np.float32
  )
  if 'input' not in links:
    raise ValueError('No layer reads the model input directly.')
  fl_in, _, _, signed, _ = links['input']
  program = IntegerProgram(
    layers=seq,
    input_scale=2.0**-fl_in,
    input_range=fxp.fixed_point_range(signed),
    kind='f8net',
  )
  if verify:
    ref = f8model.apply(variables, x, train=False)
    _verify(program, ref, x, exact=True, atol=0.0)
  return program


def _tree_node(tree, path):
  for p in path.split('/'):
    tree = tree[p]
  return tree


def lower_qat(
  qmodel, variables, sample_x, *, verify: bool = True, tolerance: float = 0.05
) -> IntegerProgram:
  """The integer-only program of a uniform-QAT or (hard-assigned) FracBits
  :class:`~fracq.methods.qat.QATModel`.

  Needs every Conv/Dense quantized with LSQ kernel steps (or FracBits shared
  ranges) and fixed-bit LSQ per-tensor input steps. BatchNorm (running
  statistics) and the layer bias fold into a per-channel real multiplier and
  an int32 bias; ``verify`` checks the dequantized logits on ``sample_x``
  against the fake-quantized model within ``tolerance`` of the logit range
  (a structural check; tests hold it to 1e-3).
  """
  from fracq.export.freeze import freeze as freeze_fn

  x = jnp.asarray(sample_x)
  params = variables['params']
  quant = variables.get('quant', {})
  stats = variables.get('batch_stats', {})
  st = probe_structure(qmodel.module, variables, x, **qmodel.call_kwargs)
  _refuse_clips(qmodel.module, variables, x, qmodel.call_kwargs)
  frozen = freeze_fn(qmodel, variables)
  missing = [p for p in st.order if p not in frozen]
  if missing:
    raise ValueError(
      f'Integer-only inference needs every Conv/Dense kernel '
      f'quantized; float: {missing}.'
    )
  for p in st.order:
    if frozen[p].affine:
      raise ValueError(
        f'{p}: its kernel grid is affine (a zero point or offset: '
        'asymmetric observer, LSQ+ or DoReFa), which the integer program '
        'does not lower; quantize kernels symmetrically (lsq, pact, '
        'symmetric observers, FracBits ranges) or export the packed '
        'artifact (export_model), which stores any kernel exactly.'
      )
  in_q = {}
  for p in st.order:
    spec = qmodel.rules[qmodel.facts[p].rule_index].act
    if (
      spec is None
      or spec.range_method != 'lsq'
      or spec.learn_bits
      or (spec.granularity != 'tensor')
    ):
      raise ValueError(
        f'{p}: integer-only inference needs the input quantized with a '
        'per-tensor LSQ step at fixed bits (act_range=lsq, '
        'act_granularity=tensor, learn_act_bits=False).'
      )
    lo, hi = spec.int_grid(signed=st.signs[p], is_kernel=False)
    step = float(np.abs(np.asarray(_tree_node(quant, p)['input_step'])))
    in_q[p] = (step, (lo, hi))
  layers = []
  for i, p in enumerate(st.order):
    fz = frozen[p]
    s_in = in_q[p][0]
    s_w = np.broadcast_to(
      np.asarray(fz.scale, np.float64).reshape(-1), (fz.codes.shape[-1],)
    )
    node = _tree_node(params, p)
    cout = fz.codes.shape[-1]
    b = np.asarray(node.get('bias', np.zeros(cout)), np.float64)
    g = np.ones(cout)
    beta = b
    bn = st.pairs.get(p)
    if bn is not None:
      bnp, bns = _tree_node(params, bn), _tree_node(stats, bn)
      gamma = np.asarray(bnp.get('scale', np.ones(cout)), np.float64)
      g = gamma / np.sqrt(np.asarray(bns['var'], np.float64) + st.bn_eps[bn])
      beta = (
        np.asarray(bnp.get('bias', np.zeros(cout)), np.float64)
        + (b - np.asarray(bns['mean'], np.float64)) * g
      )
    unit = s_in * s_w * g  # real value of one accumulator unit
    if np.any(unit == 0):
      raise ValueError(
        f'{p}: a zero scale (BN gamma or step) makes the '
        'integer requantization degenerate.'
      )
    # Headroom: |acc| <= sum |w| * max |x| per channel; keep 2 spare bits.
    qlo, qhi = in_q[p][1]
    red = tuple(range(fz.codes.ndim - 1))
    bound = float(
      np.max(np.sum(np.abs(fz.codes.astype(np.int64)), axis=red))
    ) * max(abs(qlo), abs(qhi))
    bound = max(bound + float(np.max(np.abs(beta / unit))), 1.0)
    acc_shift = int(np.clip(28 - math.ceil(math.log2(bound)), 0, 16))
    unit = unit / 2.0**acc_shift
    bias = np.round(beta / unit)
    if np.any(np.abs(bias) >= 2**31):
      raise ValueError(f'{p}: the folded bias overflows int32.')
    l = IntLayer(
      path=p,
      layer_type=qmodel.facts[p].layer_type,
      kernel=fz.codes.astype(
        np.int8
        if fz.codes.min(initial=0) >= -128 and fz.codes.max(initial=0) <= 127
        else np.int16
      ),
      bias=bias.astype(np.int32),
      acc_shift=acc_shift,
    )
    if l.layer_type not in ('Conv', 'Dense'):
      raise ValueError(f'{p}: {l.layer_type} layers are not lowered.')
    if l.layer_type == 'Conv':
      l.strides, l.padding, l.feature_group_count = st.conv_attrs[p]
    if i + 1 < len(st.order):
      nxt = st.order[i + 1]
      l.relu, l.pool = _link(st, i)
      sign = np.where(unit < 0, -1, 1).astype(np.int32)
      m0, ex = ints.quantize_multiplier(np.abs(unit) / (l.pool * in_q[nxt][0]))
      l.requant = ('mult', sign, np.atleast_1d(m0), np.atleast_1d(ex))
      l.out_range = in_q[nxt][1]
    else:
      l.out_scale = unit.astype(np.float32)
    layers.append(l)
  first = st.order[0]
  program = IntegerProgram(
    layers=layers,
    input_scale=in_q[first][0],
    input_range=in_q[first][1],
    kind='qat',
  )
  if verify:
    ref = qmodel.apply(variables, x, **qmodel.call_kwargs)
    _verify(program, ref, x, exact=False, atol=tolerance)
  return program


# -- on disk ------------------------------------------------------------------
PROGRAM_FORMAT = 'fracq-integer-program-1'  # chains
GRAPH_FORMAT = 'fracq-integer-program-2'  # graphs (named inputs, adds)


def _maxpool_json(spec):
  if spec is None:
    return None
  _, window, strides, pads = spec
  return {
    'window': list(window),
    'strides': list(strides),
    'padding': [list(p) for p in pads],
  }


def _maxpool_spec(e):
  if e is None:
    return None
  return (
    'max',
    tuple(e['window']),
    tuple(e['strides']),
    tuple(tuple(p) for p in e['padding']),
  )


def _i32_as_f32(a):
  """int32 tensors ride in the artifact's float32 blob bit-cast (exact)."""
  return np.ascontiguousarray(np.asarray(a, np.int32)).view(np.float32)


def _f32_as_i32(a):
  return np.ascontiguousarray(np.asarray(a, np.float32)).view(np.int32)


def _kernel_bits(k: np.ndarray) -> tuple[int, bool]:
  """Smallest two's-complement (or unsigned) width holding every code."""
  lo, hi = int(k.min(initial=0)), int(k.max(initial=0))
  if lo >= 0:
    return max(1, hi.bit_length()), False
  return max(2, max((-lo - 1).bit_length(), hi.bit_length()) + 1), True


def save_program(
  program: IntegerProgram,
  path: str,
  *,
  overwrite: bool = False,
  metadata: dict | None = None,
  kernel_bits: dict | None = None,
) -> int:
  """Writes ``program`` as a packed artifact (:mod:`fracq.export.artifact`).

  Kernels are bit-packed at ``kernel_bits[path]`` (one width, or a list of
  per-output-channel widths; default: the narrowest width holding their
  codes, 8 for F8Net); int32 biases, requantization
  multipliers and shifts are stored exactly (int32 bit-cast into the float
  blob, names ending ``.i32``); the layer list is in the manifest. Returns
  the file size in bytes.
  """
  from fracq.export import artifact

  packed, floats, layers = {}, {}, []
  kernel_bits = dict(kernel_bits or {})
  for l in program.layers:
    if isinstance(l, IntAdd):
      for i, sh in enumerate(l.shifts):
        floats[f'{l.path}/add_shift{i}.i32'] = _i32_as_f32(np.atleast_1d(sh))
      if l.requant is not None:
        floats[f'{l.path}/shift.i32'] = _i32_as_f32(np.atleast_1d(l.requant[1]))
      if l.out_scale is not None:
        floats[f'{l.path}/out_scale'] = np.atleast_1d(
          np.asarray(l.out_scale, np.float32)
        )
      layers.append(
        {
          'path': l.path,
          'type': 'Add',
          'inputs': l.inputs,
          'relu': bool(l.relu),
          'pool': int(l.pool),
          'maxpool': _maxpool_json(l.maxpool),
          'out_range': None if l.out_range is None else list(l.out_range),
          'requant': None if l.requant is None else l.requant[0],
        }
      )
      continue
    k = np.asarray(l.kernel)
    bits, signed = _kernel_bits(k)
    b = kernel_bits.get(l.path, bits)
    if np.ndim(b):
      # Per-channel widths: signed like the kernel's grid (a channel may
      # hold only non-negative codes).
      signed = True
    packed[f'{l.path}/kernel'] = artifact.PackedTensor(
      codes=k.astype(np.int32), bits=b, signed=signed, axis=-1
    )
    if l.bias is not None:
      floats[f'{l.path}/bias.i32'] = _i32_as_f32(l.bias)
    entry = {
      'path': l.path,
      'type': l.layer_type,
      'relu': bool(l.relu),
      'acc_shift': int(l.acc_shift),
      'pool': int(l.pool),
      'groups': int(l.feature_group_count),
      'strides': None if l.strides is None else list(l.strides),
      'padding': l.padding
      if not isinstance(l.padding, tuple)
      else [list(p) if isinstance(p, tuple) else p for p in l.padding],
      'out_range': None if l.out_range is None else list(l.out_range),
      'requant': None if l.requant is None else l.requant[0],
      'kernel_dtype': str(k.dtype),
    }
    if l.src is not None:
      entry['src'] = l.src
    if l.maxpool is not None:
      entry['maxpool'] = _maxpool_json(l.maxpool)
    if l.requant is not None and l.requant[0] == 'shift':
      floats[f'{l.path}/shift.i32'] = _i32_as_f32(np.atleast_1d(l.requant[1]))
    elif l.requant is not None:
      _, sign, m0, sh = l.requant
      for n, v in (('sign', sign), ('m0', m0), ('exp', sh)):
        floats[f'{l.path}/{n}.i32'] = _i32_as_f32(np.atleast_1d(v))
    if l.out_scale is not None:
      floats[f'{l.path}/out_scale'] = np.atleast_1d(
        np.asarray(l.out_scale, np.float32)
      )
    layers.append(entry)
  meta = dict(metadata or {})
  meta['program'] = {
    'format': GRAPH_FORMAT if is_graph(program) else PROGRAM_FORMAT,
    'kind': program.kind,
    'input_scale': float(program.input_scale),
    'input_range': list(program.input_range),
    'layers': layers,
  }
  return artifact.write_artifact(
    path, packed, floats, meta, overwrite=overwrite
  )


def load_program(path: str) -> IntegerProgram:
  """Reads :func:`save_program`'s artifact (checksums verified)."""
  from fracq.export import artifact

  codes, floats, man = artifact.read_artifact(path)
  prog = man['metadata'].get('program')
  if not prog or prog.get('format') not in (PROGRAM_FORMAT, GRAPH_FORMAT):
    raise artifact.ArtifactError(
      f'{path} holds no integer program (it is a packed-weights artifact; '
      'integer programs are written by save_program / export with an '
      'integer-capable method).'
    )
  layers = []
  for e in prog['layers']:
    p = e['path']
    sq = lambda a: a.reshape(()) if a.size == 1 else a
    if e['type'] == 'Add':
      layers.append(
        IntAdd(
          path=p,
          inputs=list(e['inputs']),
          shifts=[
            sq(_f32_as_i32(floats[f'{p}/add_shift{i}.i32']))
            for i in range(len(e['inputs']))
          ],
          relu=e['relu'],
          pool=e['pool'],
          requant=(
            ('shift', sq(_f32_as_i32(floats[f'{p}/shift.i32'])))
            if e['requant'] == 'shift'
            else None
          ),
          out_range=None if e['out_range'] is None else tuple(e['out_range']),
          out_scale=floats.get(f'{p}/out_scale'),
          maxpool=_maxpool_spec(e.get('maxpool')),
        )
      )
      continue
    if e['requant'] == 'shift':
      rq = ('shift', sq(_f32_as_i32(floats[f'{p}/shift.i32'])))
    elif e['requant'] == 'mult':
      rq = ('mult',) + tuple(
        sq(_f32_as_i32(floats[f'{p}/{n}.i32'])) for n in ('sign', 'm0', 'exp')
      )
    else:
      rq = None
    pad = e['padding']
    if isinstance(pad, list):
      pad = tuple(tuple(q) if isinstance(q, list) else q for q in pad)
    layers.append(
      IntLayer(
        path=p,
        layer_type=e['type'],
        kernel=codes[f'{p}/kernel'].astype(e['kernel_dtype']),
        bias=(
          _f32_as_i32(floats[f'{p}/bias.i32'])
          if f'{p}/bias.i32' in floats
          else None
        ),
        strides=None if e['strides'] is None else tuple(e['strides']),
        padding=pad,
        feature_group_count=e['groups'],
        relu=e['relu'],
        pool=e['pool'],
        requant=rq,
        acc_shift=int(e.get('acc_shift', 0)),
        out_range=None if e['out_range'] is None else tuple(e['out_range']),
        out_scale=floats.get(f'{p}/out_scale'),
        src=e.get('src'),
        maxpool=_maxpool_spec(e.get('maxpool')),
      )
    )
  return IntegerProgram(
    layers=layers,
    input_scale=prog['input_scale'],
    input_range=tuple(prog['input_range']),
    kind=prog['kind'],
  )


def lower(wrapper, variables, sample_x, **kwargs) -> IntegerProgram:
  """:func:`lower_f8net` or :func:`lower_qat`, by the wrapper's method."""
  from fracq.methods.f8net import F8NetModel

  if isinstance(wrapper, F8NetModel):
    return lower_f8net(wrapper, variables, sample_x, **kwargs)
  if hasattr(wrapper, 'facts') and hasattr(wrapper, 'rules'):
    return lower_qat(wrapper, variables, sample_x, **kwargs)
  raise ValueError(
    f'{type(wrapper).__name__} has no integer lowering; use '
    'a quantized model (uniform QAT, FracBits or F8Net).'
  )


def export_integer(
  wrapper,
  variables,
  sample_x,
  path: str,
  *,
  overwrite: bool = False,
  metadata: dict | None = None,
) -> dict:
  """Lowers, writes the integer program to ``path`` and measures it.

  Returns the program's bytes on disk, the theoretical size (kernel codes
  at their bits + int32 biases and requantization parameters) and the
  agreement with the fake-quantized model on ``sample_x`` (prediction
  match rate and max logit difference relative to the logit range).
  """
  x = jnp.asarray(sample_x)
  program = lower(wrapper, variables, x)
  kernel_bits = None
  if program.kind == 'qat':
    from fracq.export.freeze import freeze as freeze_fn

    frozen = freeze_fn(wrapper, variables)
    # Kernel-wise FracBits bits: every output channel at its own width, as
    # in the weights artifact (a pruned channel at 0 bits takes no bytes).
    kernel_bits = {
      p: (f.bits.tolist() if f.bits.ndim else int(f.bits))
      for p, f in frozen.items()
    }
  size = save_program(
    program,
    path,
    overwrite=overwrite,
    metadata=metadata,
    kernel_bits=kernel_bits,
  )
  theo = 0.0
  for l in program.layers:
    if isinstance(l, IntAdd):
      theo += 4 * sum(np.size(v) for v in l.shifts)
      theo += 0 if l.requant is None else 4 * np.size(l.requant[1])
      continue
    b = (kernel_bits or {}).get(l.path)
    if b is None:
      b = _kernel_bits(np.asarray(l.kernel))[0]
    # params x bits / 8, channel by channel (output channels on the last
    # axis).
    theo += l.kernel.size / np.size(b) * float(np.sum(b)) / 8
    theo += 0 if l.bias is None else 4 * l.bias.size
    if l.requant is not None:
      theo += 4 * sum(np.size(v) for v in l.requant[1:])
    if l.out_scale is not None:
      theo += 4 * np.size(l.out_scale)
  ref = np.asarray(wrapper.apply(variables, x, train=False))
  got = np.asarray(program.logits(x))
  return {
    'program_bytes': size,
    'program_theoretical_bytes': theo,
    'integer_prediction_match': float(
      np.mean(got.argmax(-1) == ref.argmax(-1))
    ),
    'integer_max_logit_diff_rel': float(
      np.max(np.abs(got - ref)) / (np.ptp(ref) or 1.0)
    ),
    'summary': program.summary(),
  }
