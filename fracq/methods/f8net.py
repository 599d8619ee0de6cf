"""F8Net: fixed-point 8-bit-only quantization of unmodified Flax models.

Reference: Jin et al., "F8Net: Fixed-Point 8-bit Only Multiplication for
Network Quantization", ICLR 2022 (arXiv 2202.05239). The quantizer math lives
in :mod:`fracq.core.fixed_point`; this module is the transform:

* every ``nn.Conv`` / ``nn.Dense`` input is quantized to 8-bit fixed point
  (unsigned ``[0, 255]`` when the sign probe saw it non-negative, e.g. after
  a ReLU; signed ``[-127, 127]`` otherwise) with a power-of-two scale
  ``2^-FL``; the activation FL follows an EMA (momentum 0.1) of the batch
  statistics in training and is frozen (rounded) at eval;
* a Conv/Dense whose output feeds a ``nn.BatchNorm`` directly is *folded*:
  in training the layer runs once in float for the batch statistics (which
  also update the BN running averages, as the unfolded model would), the BN
  is folded into the kernel and bias (``fracq.core.fixed_point.fold_bn``),
  the folded kernel is quantized with an FL from its own statistics, and the
  layer runs again with it; at eval the running statistics fold instead.
  The BN call then returns the folded layer's output. Pairs are found by
  tracing the model once and matching the *same array object* leaving the
  conv and entering the BN, so any model code works unmodified; a BN fed by
  anything else stays a float BN and is listed in ``unfolded`` (with the
  reason) so users can see which layers are not integer-only;
* the bias is quantized to int32 at ``FL_in + FL_w`` (the accumulator's
  format), so the simulated model equals the integer-only one bit for bit
  (:mod:`fracq.export.integer_model`);
* residual modules (found by the structure probe: a submodule returning
  ``[relu](its branch outputs [+ its input])``, e.g. a ResNet block) get
  their input quantized once, at the module's entry, with one FL on the
  module's scope (``<block>/quant_stats/input_fl_ema``): the convs reading
  it and the identity shortcut then all read the same 8-bit fixed-point
  tensor (one FL per tensor, shared by its readers), so the add can be done
  in int32 by the integer model (FL alignment by left shifts);
* fixed-point PACT (``pact=True``): every tensor read after a ReLU by
  quantized layers (and identity shortcuts) gets a learned clip ``alpha``
  (``quant/<owner>/pact_alpha``, trainable). It is folded, never applied:
  the layers producing the tensor divide their (BN-folded) kernel and bias
  by ``alpha`` before quantization, so the tensor is ``x / alpha``; its
  readers clip it to ``[0, 1]`` (PACT's ``clip(x, 0, alpha)`` in those
  units) before the fixed-point quantizer and multiply their kernels by
  ``alpha``. Layers that read the same tensor share its clip (the convs and
  the shortcut of a residual block, which is clipped once at the block
  entry), and a residual add's output shares the clip of the tensor its
  identity shortcut carries, so the add stays a sum of shifted integers: one
  clip per identity-connected trunk, produced by the stem / projection block
  and the branch convs (:func:`pact_groups`). The model's function is
  PACT's, the integer model needs nothing beyond shifts (the clip is the
  requantization clamp ``min(255, 2^FL)``), and ``alpha`` gets PACT's
  gradient (from the clipped entries, through the readers' kernels).

Formats. ``format='std'`` picks ``FL = floor(log2(C / std))`` (``C`` = 40
signed, 70 unsigned, F8Net's fit); for an unsigned input (seen after its
ReLU) the pre-ReLU std is estimated as ``std / 0.5838`` (the std of
``relu(N(0, s^2))`` is ``0.5838 s``). ``format='grid'`` picks the FL that
minimizes the RMS quantization error. Weight FL ranges are wider than the
paper's ``0..7`` by default (``weight_fl_range=(0, 15)``): BN-folded kernels
of wide layers have std well below ``40 / 2^7``, and an FL is only a shift in
the integer model, so nothing but precision changes.

Variables (on each quantized layer's scope):
  ``quant_stats/input_fl_ema``: the EMA of the per-batch activation FL
  (float; -inf-free: initialised from the ``init`` batch); eval uses
  ``round(input_fl_ema)``.
  ``quant/pact_alpha`` (``pact=True``, on the clip's producer): the clip,
  trained with the parameters; a separate collection, so a float checkpoint
  (``params``, ``batch_stats``) initialises the rest of the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fracq.core import fixed_point as fxp
from fracq.core import observers
from fracq.interception.interceptor import layer_type_of
from fracq.interception.structure import clipping_ops
from fracq.interception.structure import is_max_pool
from fracq.interception.structure import probe_structure

STATS = 'quant_stats'
PACT = 'quant'  # trainable collection of the PACT clips
_RELU_STD = math.sqrt(0.5 * (1.0 - 1.0 / math.pi))  # std of relu(N(0, 1))
_SUPPORTED = ('Conv', 'Dense')
_ALPHA_MIN = 1e-3  # a PACT clip never reaches 0 (the producer divides by it)


@dataclasses.dataclass(frozen=True)
class F8NetOptions:
  """How F8Net quantizes.

  Attributes:
    weight_format: ``'std'`` (FL from the folded kernel's std) or ``'grid'``
      (RMS-optimal FL).
    act_format: same choice for activations (per batch, then EMA).
    weight_granularity: ``'layer'`` (one FL per kernel, as the paper) or
      ``'channel'`` (one FL per output channel).
    momentum: EMA momentum of the activation FL (PyTorch convention).
    weight_fl_range: allowed weight FLs.
    act_fl_range: allowed activation FLs (``None``: 0..7 signed, 0..8
      unsigned, as the paper).
    keep_float: regex of layer paths left float (their inputs too).
    fold_bn: fold Conv/Dense -> BatchNorm pairs (else BNs stay float).
    axis_name: the data-parallel mesh axis (the module's BN axis): training
      activation statistics are averaged over it.
    simulate: quantize (default). False runs the transform with identity
      quantizers: the BN-folded float model, which equals the original one
      (a check of the folding itself).
    pact: fixed-point PACT clips folded into the producing layer (see the
      module docstring).
    pact_init: initial clip, in the producer's output units. 4 suits
      BN-normalized ReLU outputs: its grid ``4 / 256`` is the ``2^-6`` the
      statistics rule picks for unit std; training then moves it.
  """

  weight_format: str = 'std'
  act_format: str = 'std'
  weight_granularity: str = 'layer'
  momentum: float = 0.1
  weight_fl_range: tuple[int, int] = (0, 15)
  act_fl_range: tuple[int, int] | None = None
  keep_float: str = ''
  fold_bn: bool = True
  simulate: bool = True
  axis_name: str | None = None
  pact: bool = False
  pact_init: float = 4.0

  def __post_init__(self):
    for name in ('weight_format', 'act_format'):
      if getattr(self, name) not in ('std', 'grid'):
        raise ValueError(
          f"{name}={getattr(self, name)!r}: use 'std' "
          "(F8Net's floor(log2(C/std))) or 'grid' (RMS search)."
        )
    if self.weight_granularity not in ('layer', 'channel'):
      raise ValueError(
        f'weight_granularity={self.weight_granularity!r}: use '
        "'layer' or 'channel'."
      )
    if not 0 < self.momentum <= 1:
      raise ValueError(f'momentum={self.momentum} must be in (0, 1].')
    if self.keep_float:
      re.compile(self.keep_float)
    if not self.pact_init > 0:
      raise ValueError(
        f'pact_init={self.pact_init} must be > 0 (the initial '
        'clip of a ReLU output).'
      )


def _fl_of(x, signed, fmt, fl_range, axis=None, axis_name=None):
  """Integer FL of ``x`` (no gradient).

  ``axis_name``: a data-parallel mesh axis; the statistics (std, or each
  candidate's mean square error) are then averaged over it, so every
  replica picks the FL of the global batch.
  """
  x = jax.lax.stop_gradient(x.astype(jnp.float32))
  lo, hi = fl_range
  red = tuple(a for a in range(x.ndim) if axis is None or a != axis % x.ndim)
  pmean = (
    (lambda v: jax.lax.pmean(v, axis_name))
    if axis_name is not None
    else (lambda v: v)
  )
  if fmt == 'grid':
    if axis_name is None:
      return fxp.fl_grid_search(x, signed, range(lo, hi + 1), axis=axis)
    cands = jnp.arange(lo, hi + 1, dtype=jnp.int32)
    errs = jnp.stack(
      [
        pmean(
          jnp.mean(
            jnp.square(
              x
              - fxp.fixed_point_quantize(
                x, int(f), signed=signed, fl_range=fl_range
              )
            ),
            axis=red,
          )
        )
        for f in range(lo, hi + 1)
      ]
    )
    return cands[jnp.argmin(errs, axis=0)]
  m1 = pmean(jnp.mean(x, axis=red))
  m2 = pmean(jnp.mean(jnp.square(x), axis=red))
  std = jnp.sqrt(jnp.maximum(m2 - jnp.square(m1), 0.0))
  if not signed:
    std = std / _RELU_STD
  std = jnp.maximum(std, 1e-12)
  return fxp.fl_from_std(std, signed, fl_range=fl_range)


def _act_range(signed, opts):
  return opts.act_fl_range or fxp.default_fl_range(signed)


def quantize_bias(b, fl):
  """``b`` on the int32 grid ``2^-fl``, straight-through gradient."""
  q = fxp.fixed_point_to_int(
    jax.lax.stop_gradient(b),
    fl,
    signed=True,
    bits=32,
    axis=0 if jnp.ndim(fl) else None,
  )
  q = q.astype(jnp.float32) * fxp.pow2(-fl)
  return b + jax.lax.stop_gradient(q - b)


class _Hook:
  """A ``promote_dtype`` replacement: promote, then ``fn(inputs, kernel,
  bias)`` returns the arrays the layer computes with."""

  def __init__(self, orig, fn):
    self.orig = orig
    self.fn = fn

  def __call__(self, *arrays, dtype=None, **kwargs):
    inputs, kernel, *rest = self.orig(*arrays, dtype=dtype, **kwargs)
    bias = rest[0] if rest else None
    inputs, kernel, bias = self.fn(inputs, kernel, bias)
    return (inputs, kernel, bias, *rest[1:]) if rest else (inputs, kernel)


def _run_with(module, fn, args, kwargs):
  clone = module.clone(parent=module.scope)
  object.__setattr__(clone, 'promote_dtype', _Hook(module.promote_dtype, fn))
  object.__setattr__(clone, '_f8net_clone', True)
  return clone(*args, **kwargs), clone


@dataclasses.dataclass
class LayerRecord:
  """What one quantized layer did (filled in eager ``capture`` runs)."""

  path: str
  layer_type: str
  signed_input: bool
  folded_bn: str | None = None
  input_fl: Any = None
  weight_fl: Any = None
  kernel_codes: Any = None
  bias_codes: Any = None
  strides: Any = None
  padding: Any = None
  feature_group_count: int = 1
  in_shape: tuple = ()
  out_shape: tuple = ()
  # PACT: the largest input code (the clip at 1 = 2^input_fl), else None
  input_code_max: int | None = None


class _Interceptor:
  """The F8Net transform as a flax method interceptor.

  mode: ``'run'`` (the quantized model) or ``'capture'`` (``'run'`` +
  records of integer codes, eager only).
  """

  def __init__(self, model: 'F8NetModel', mode: str, train: bool = False):
    self.model = model
    self.mode = mode
    self.train = train
    self.pending: dict[int, tuple] = {}
    self.records: list[LayerRecord] = []
    # id -> (quantized tensor, FL): tensors quantized once at a residual
    # module's entry and shared by all their readers (convs and the add).
    self.prequant: dict[int, tuple] = {}
    # PACT group (its owner's path) -> its clip, set when the owner (the
    # group's first producer) runs, read by later producers and readers
    self.alphas: dict[str, Any] = {}

  def __call__(self, next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != '__call__' or getattr(m, '_f8net_clone', False):
      return next_fun(*args, **kwargs)
    if isinstance(m, nn.BatchNorm):
      return self._bn(m, next_fun, args, kwargs)
    lt = layer_type_of(m)
    if lt is None:
      path = '/'.join(m.path)
      if path in self.model.shared:
        args = self._share_inputs(m, path, args)
      return next_fun(*args, **kwargs)
    path = '/'.join(m.path)
    opts = self.model.options
    if lt not in _SUPPORTED or (
      opts.keep_float and re.search(opts.keep_float, path)
    ):
      return next_fun(*args, **kwargs)
    return self._layer(m, path, lt, args, kwargs)

  # -- shared tensors ------------------------------------------------------
  def _share_inputs(self, m, path, args):
    """Quantizes a residual module's input once, at its entry: its convs
    and its identity shortcut then read the same 8-bit tensor (one FL per
    tensor, on the module's ``quant_stats/input_fl_ema``)."""
    idxs, signed = self.model.shared[path]
    args = list(args)
    opts = self.model.options
    clip = path in self.model.pact_entry
    for i in idxs:
      a = args[i]
      hit = self.prequant.get(id(a))
      if hit is not None and hit[0] is a:
        continue
      if clip:  # PACT: the block input (convs and shortcut) is clipped once
        a = jnp.minimum(a, 1.0)
      if not opts.simulate:
        args[i] = a
        continue
      fl = self._input_fl(m, path, a, signed)
      aq = fxp.fixed_point_quantize(
        a, fl, signed=signed, fl_range=_act_range(signed, opts)
      )
      self.prequant[id(aq)] = (aq, fl)
      args[i] = aq
    return tuple(args)

  # -- quantized layers ----------------------------------------------------
  def _q(self, x, fl, **kwargs):
    if not self.model.options.simulate:
      return x
    return fxp.fixed_point_quantize(x, fl, **kwargs)

  def _qb(self, b, fl):
    return quantize_bias(b, fl) if self.model.options.simulate else b

  def _input_fl(self, clone, path, x, signed):
    opts = self.model.options
    rng = _act_range(signed, opts)
    init = lambda: _fl_of(x, signed, opts.act_format, rng).astype(jnp.float32)
    v = clone.variable(STATS, 'input_fl_ema', init)
    if self.train and not clone.is_initializing():
      batch = _fl_of(x, signed, opts.act_format, rng, axis_name=opts.axis_name)
      if clone.is_mutable_collection(STATS):
        v.value = fxp.ema_fl_update(v.value, batch, opts.momentum)
      return batch
    return fxp.freeze_fl(v.value, signed=signed, fl_range=rng)

  def _alpha(self, clone):
    raw = clone.variable(
      PACT,
      'pact_alpha',
      lambda: jnp.asarray(self.model.options.pact_init, jnp.float32),
    ).value
    return jnp.maximum(raw, _ALPHA_MIN)

  def _weight_fl(self, k):
    opts = self.model.options
    axis = -1 if opts.weight_granularity == 'channel' else None
    return _fl_of(k, True, opts.weight_format, opts.weight_fl_range, axis)

  def _layer(self, m, path, lt, args, kwargs):
    signed = self.model.signs.get(path, True)
    bn = self.model.pairs.get(path)
    state = {}
    opts = self.model.options
    a0 = args[0] if args else kwargs['inputs']
    pre = self.prequant.get(id(a0))
    pre = pre if pre is not None and pre[0] is a0 else None

    src = self.model.pact_src.get(path)  # PACT: the clip of our input
    out = self.model.pact_out.get(path)  # ... and of our output

    def quant_inputs(clone, x):
      if out == path:  # the group's first producer owns its clip
        self.alphas[path] = self._alpha(clone)
      if src is not None:  # PACT's clip(x, 0, alpha), in units of alpha
        x = jnp.minimum(x, 1.0)
      fl = pre[1] if pre is not None else self._input_fl(clone, path, x, signed)
      state['fl_in'] = fl
      xq = self._q(x, fl, signed=signed, fl_range=_act_range(signed, opts))
      state['xq'] = xq
      return xq

    def pact_in(k):  # the input is x / alpha: the kernel takes alpha
      return k if src is None else k * self.alphas[src].astype(k.dtype)

    def pact_out(k, b):  # our output becomes x / alpha (the reader clips)
      if out is None:
        return k, b
      a = self.alphas[out].astype(k.dtype)
      return k / a, (None if b is None else b / a)

    if bn is None:  # quantize the kernel as is

      def fn(x, k, b):
        xq = quant_inputs(state['clone'], x)
        k, b = pact_out(pact_in(k), b)
        flw = self._weight_fl(k)
        kq = self._q(
          k,
          flw,
          signed=True,
          axis=-1 if jnp.ndim(flw) else None,
          fl_range=opts.weight_fl_range,
        )
        bq = None if b is None else self._qb(b, state['fl_in'] + flw)
        self._capture(m, path, lt, signed, None, state['fl_in'], flw, kq, bq, x)
        return xq, kq, bq

      clone = m.clone(parent=m.scope)
      state['clone'] = clone
      object.__setattr__(clone, 'promote_dtype', _Hook(m.promote_dtype, fn))
      object.__setattr__(clone, '_f8net_clone', True)
      return clone(*args, **kwargs)

    # Folded: float pass for the batch statistics, finished at the BN.
    def first(x, k, b):
      xq = quant_inputs(state['clone'], x)
      k = pact_in(k)  # the float pass computes the original conv output
      state['k'], state['b'] = k, b
      return xq, k, b

    clone = m.clone(parent=m.scope)
    state['clone'] = clone
    object.__setattr__(clone, 'promote_dtype', _Hook(m.promote_dtype, first))
    object.__setattr__(clone, '_f8net_clone', True)
    y = clone(*args, **kwargs)

    def finish(gamma, beta, mean, var, eps):
      kf, bf = fxp.fold_bn(state['k'], state['b'], gamma, beta, mean, var, eps)
      kf, bf = pact_out(kf, bf)
      flw = self._weight_fl(kf)
      kq = self._q(
        kf,
        flw,
        signed=True,
        axis=-1 if jnp.ndim(flw) else None,
        fl_range=opts.weight_fl_range,
      )
      bq = self._qb(bf, state['fl_in'] + flw)
      xq = state['xq']

      def second(x, k, b):
        del x, k, b
        return xq, kq, None

      out, _ = _run_with(m, second, args, kwargs)
      self._capture(
        m,
        path,
        lt,
        signed,
        bn,
        state['fl_in'],
        flw,
        kq,
        bq,
        args[0] if args else kwargs['inputs'],
      )
      return out + bq.astype(out.dtype).reshape((1,) * (out.ndim - 1) + (-1,))

    self.pending[id(y)] = (y, finish)
    return y

  def _bn(self, m, next_fun, args, kwargs):
    x = args[0] if args else kwargs['x']
    hit = self.pending.pop(id(x), None)
    if hit is None or hit[0] is not x:
      return next_fun(*args, **kwargs)  # an unfolded BN: float
    _, finish = hit
    # The float BN call: creates BN variables at init and updates the
    # running averages in training exactly as the unfolded model would.
    next_fun(*args, **kwargs)
    use_ra = nn.merge_param(
      'use_running_average',
      m.use_running_average,
      kwargs.get('use_running_average'),
    )
    gamma = m.get_variable('params', 'scale') if m.use_scale else None
    beta = m.get_variable('params', 'bias') if m.use_bias else None
    if use_ra or m.is_initializing():
      mean = m.get_variable('batch_stats', 'mean')
      var = m.get_variable('batch_stats', 'var')
      if m.is_initializing():  # as the BN does at init: batch statistics
        mean, var = fxp.bn_batch_stats(x.astype(jnp.float32))
    else:
      xf = x.astype(jnp.float32)
      red = tuple(range(xf.ndim - 1))
      mean = jnp.mean(xf, axis=red)
      mean2 = jnp.mean(jnp.square(xf), axis=red)
      if m.axis_name is not None:
        mean, mean2 = jax.lax.pmean((mean, mean2), m.axis_name)
      var = jnp.maximum(mean2 - jnp.square(mean), 0.0)
    return finish(gamma, beta, mean, var, m.epsilon)

  # -- capture -------------------------------------------------------------
  def _capture(self, m, path, lt, signed, bn, fl_in, flw, kq, bq, x):
    if self.mode != 'capture':
      return
    S = np.asarray(fl_in) + np.asarray(flw)
    codes = np.asarray(
      fxp.fixed_point_to_int(
        kq, flw, signed=True, axis=-1 if np.ndim(flw) else None
      )
    )
    bcodes = None
    if bq is not None:
      bcodes = np.asarray(
        fxp.fixed_point_to_int(
          bq,
          jnp.asarray(S),
          signed=True,
          bits=32,
          axis=0 if np.ndim(S) else None,
        )
      )
    rec = LayerRecord(
      path=path,
      layer_type=lt,
      signed_input=signed,
      folded_bn=bn,
      input_fl=int(np.asarray(fl_in)),
      weight_fl=np.asarray(flw),
      kernel_codes=codes.astype(np.int8),
      bias_codes=bcodes,
      in_shape=tuple(x.shape),
    )
    if path in self.model.pact_src:
      rec.input_code_max = int(
        min(fxp.fixed_point_range(False)[1], 2**rec.input_fl)
      )
    if lt == 'Conv':
      nsp = codes.ndim - 2
      rec.strides = m.strides if m.strides is not None else (1,) * nsp
      if isinstance(rec.strides, int):
        rec.strides = (rec.strides,) * nsp
      rec.padding = m.padding
      rec.feature_group_count = m.feature_group_count
    self.records.append(rec)


def pact_groups(st, folded_pairs) -> tuple[dict, dict, dict]:
  """Where fixed-point PACT clips can be folded: ``(readers, producers,
  entries)``, each mapping a layer (reader: its input is clipped; producer:
  its output is divided by the clip) or a residual module (entry: its input
  is clipped once, for its convs and its shortcut) to a clip *group*, named
  by the group's first producer (which owns ``quant/<it>/pact_alpha``).

  A group is a set of tensors sharing one clip: a layer's (post-BN) output,
  or a residual add's output together with the tensor its identity shortcut
  carries (the add sums them in one unit, so their scales must agree). A
  group is used only if every tensor in it is non-negative where read (after
  a ReLU) and read only by quantized layers and identity shortcuts, and if
  its producers are layers (the tensor's layer, or the add's branch layers)
  with any BatchNorm folded (a float BN would undo the scaling).
  """
  parent = {}

  def find(t):
    while parent.setdefault(t, t) != t:
      t = parent[t]
    return t

  reads = {}  # tensor -> [(reader, relu)]; reader: a layer or ('id', add)
  for layer, src in st.srcs.items():
    if src is not None:
      reads.setdefault(src[0], []).append((layer, src[1]))
  operand_of = {}
  for add, a in st.adds.items():
    for l in a['operands']:
      operand_of[l] = add
    if a['identity'] is not None:
      ident, relu, pool = a['identity']
      # a max pool on the way commutes with the scaling and the clip
      reads.setdefault(ident, []).append(
        (('id', add), relu and (pool == 1 or is_max_pool(pool)))
      )
      parent[find(ident)] = find(add)
  tensors = [t for t in st.order if t in reads and t not in operand_of]
  tensors += list(st.adds)

  def producers_of(t):
    return list(st.adds[t]['operands']) if t in st.adds else [t]

  def foldable(t):
    if t not in reads:  # the model's output: its scale cannot change
      return False
    non_negative = t in st.adds and st.adds[t]['relu']
    readers_ok = all(
      (relu or non_negative)
      and (
        isinstance(r, tuple) or (r in st.order and not st.signs.get(r, True))
      )
      for r, relu in reads[t]
    )
    producers_ok = all(
      p in st.order
      and (p not in st.pairs or p in folded_pairs)
      and (p == t or not reads.get(p))  # a branch output feeds its add only
      for p in producers_of(t)
    )
    return readers_ok and producers_ok

  ok = {}
  for t in set(tensors) | set(parent):  # e.g. the model input: not foldable
    ok[find(t)] = ok.get(find(t), True) and t in tensors and foldable(t)
  rank = {p: i for i, p in enumerate(st.order)}
  readers, producers, entries = {}, {}, {}
  for g in [g for g, good in ok.items() if good]:
    ts = [t for t in tensors if find(t) == g]
    prods = [p for t in ts for p in producers_of(t)]
    owner = min(prods, key=rank.__getitem__)
    for p in prods:
      producers[p] = owner
    for t in ts:
      for r, _ in reads[t]:
        if isinstance(r, tuple):  # an identity shortcut: its block's input
          entries[r[1]] = owner
        else:
          readers[r] = owner
  # A projection block (no identity) quantizes its input once at entry too:
  # clip it there when its convs read a clipped tensor.
  for mod in st.shared:
    ins = {
      readers[l]
      for l, src in st.srcs.items()
      if l.startswith(mod + '/')
      and l in readers
      and src is not None
      and not src[0].startswith(mod + '/')
    }
    if mod not in entries and len(ins) == 1:
      entries[mod] = ins.pop()
  return readers, producers, entries


class F8NetModel:
  """An unmodified Flax module under F8Net (a ``ModelWrapper``).

  Args:
    module: any ``flax.linen`` module whose quantizable layers are
      ``nn.Conv`` / ``nn.Dense``.
    sample_input: an example batch; one example is run eagerly to find input
      signs and Conv->BatchNorm pairs.
    options: :class:`F8NetOptions`.
    call_kwargs: keywords of the module call for the probe (e.g.
      ``{'train': False}``).
  """

  trainable_collections = ('params',)

  def __init__(
    self,
    module: nn.Module,
    sample_input,
    *,
    options: F8NetOptions | None = None,
    call_kwargs: dict | None = None,
  ):
    self.module = module
    self.options = options or F8NetOptions()
    self.call_kwargs = dict(call_kwargs or {'train': False})
    self.structure = probe_structure(
      module,
      None,
      sample_input,
      skip=self.options.keep_float,
      **self.call_kwargs,
    )
    st = self.structure
    if not st.order:
      raise ValueError(
        'F8Net found no nn.Conv / nn.Dense layer to quantize '
        f'in {type(module).__name__} (keep_float='
        f'{self.options.keep_float!r} may exclude them all).'
      )
    self.signs, self.order = st.signs, st.order
    self.pairs, self.unfolded = dict(st.pairs), dict(st.unfolded)
    # residual modules whose input is quantized once at entry (see
    # _Interceptor._share_inputs)
    self.shared = dict(st.shared)
    if not self.options.fold_bn:
      self.unfolded.update({bn: 'fold_bn=False' for bn in self.pairs.values()})
      self.pairs = {}
    # PACT clip groups (see pact_groups): reader layer / producer layer /
    # residual module (its input) -> the group's owner
    self.pact_src, self.pact_out, self.pact_entry = (
      pact_groups(st, self.pairs) if self.options.pact else ({}, {}, {})
    )
    if self.pact_src:
      self.trainable_collections = ('params', PACT)
    if self.options.pact and clipping_ops(
      module, None, sample_input, **self.call_kwargs
    ):
      raise ValueError(
        f'pact=True: {type(module).__name__} clips activations (ReLU6 or '
        'another min/clamp), and a PACT clip folds into the producing '
        'layer only through ReLU (relu6(x / alpha) != relu6(x) / alpha). '
        'Set pact=False for this model.'
      )
    if self.options.pact and not self.pact_src:
      raise ValueError(
        'pact=True but no layer feeds exactly one quantized '
        'layer through a ReLU (conv -> [BN] -> ReLU -> conv); '
        'nothing to clip. Set pact=False.'
      )
    if self.unfolded:
      logging.warning(
        'F8Net: BatchNorm layers left float (not folded): %s',
        '; '.join(f'{k}: {v}' for k, v in self.unfolded.items()),
      )

  # -- ModelWrapper protocol ---------------------------------------------
  def init(self, rngs, x, *, train: bool = False, **kwargs):
    with nn.intercept_methods(_Interceptor(self, 'run', train)):
      return self.module.init(rngs, x, train=train, **kwargs)

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
    with nn.intercept_methods(_Interceptor(self, 'run', train)):
      return self.module.apply(
        variables, x, train=train, mutable=mutable, rngs=rngs, **kwargs
      )

  def calibrate(self, variables, x, **kwargs):
    """Sets each activation FL from ``x`` (e.g. after loading weights)."""
    del kwargs
    with nn.intercept_methods(_Calibrator(self)):
      _, upd = self.module.apply(variables, x, train=False, mutable=[STATS])
    return {**variables, **upd}

  def penalty(self, variables, step):
    del variables, step
    return jnp.zeros((), jnp.float32), {}

  def metrics(self, variables):
    del variables
    return {}

  def for_step(self, step: int):
    del step
    return self

  def prepare(self, variables):
    return variables

  def capture(self, variables, x) -> list[LayerRecord]:
    """Integer codes and formats of every quantized layer, in call order
    (eval mode, eager)."""
    inter = _Interceptor(self, 'capture', train=False)
    with jax.disable_jit(), nn.intercept_methods(inter):
      self.module.apply(variables, x, train=False)
    return inter.records

  def report(self, variables, workdir: str | None, step: int, writer=None):
    """Per-layer formats (logged, returned, written as JSON)."""
    del writer
    stats = variables.get(STATS, {})
    rows = []
    for path in self.order:
      node = stats
      for p in path.split('/'):
        node = node.get(p, {}) if isinstance(node, dict) else {}
      ema = node.get('input_fl_ema') if isinstance(node, dict) else None
      parts = path.split('/')
      for k in range(len(parts) - 1, 0, -1):  # a shared (block) input
        if ema is not None:
          break
        if '/'.join(parts[:k]) in self.shared:
          blk = stats
          for p in parts[:k]:
            blk = blk.get(p, {}) if isinstance(blk, dict) else {}
          ema = blk.get('input_fl_ema') if isinstance(blk, dict) else None
      clip = None
      if path in self.pact_src:  # the producer's learned clip
        node = variables.get(PACT, {})
        for p in self.pact_src[path].split('/'):
          node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and 'pact_alpha' in node:
          clip = float(max(float(np.asarray(node['pact_alpha'])), _ALPHA_MIN))
      rows.append(
        {
          'layer': path,
          'input': 'int8' if self.signs.get(path, True) else 'uint8',
          'input_fl': None if ema is None else float(np.round(ema)),
          'folded_bn': self.pairs.get(path),
          'pact_clip': clip,
        }
      )
    lines = [f'{"layer":<24} {"input":<6} {"FL_in":>6} {"clip":>7}  folded BN']
    for r in rows:
      fl = '-' if r['input_fl'] is None else f'{r["input_fl"]:.0f}'
      clip = '-' if r['pact_clip'] is None else f'{r["pact_clip"]:.3g}'
      lines.append(
        f'{r["layer"]:<24} {r["input"]:<6} {fl:>6} {clip:>7}  '
        f'{r["folded_bn"] or "-"}'
      )
    for bn, why in self.unfolded.items():
      lines.append(f'unfolded {bn}: {why}')
    text = '\n'.join(lines)
    logging.info('F8Net formats at step %d:\n%s', step, text)
    if workdir:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, f'f8net_step{step}.json'), 'w') as f:
        json.dump({'rows': rows, 'unfolded': self.unfolded}, f, indent=1)
    return text


class _Calibrator(_Interceptor):
  """Eval-mode run that overwrites ``input_fl_ema`` from the current batch."""

  def __init__(self, model):
    super().__init__(model, 'run', train=False)

  def _input_fl(self, clone, path, x, signed):
    opts = self.model.options
    rng = _act_range(signed, opts)
    # Inside the calibration shard_map: the global batch's format, as the
    # train step computes it.
    bound = observers.bound_axis_size(opts.axis_name) is not None
    batch = _fl_of(
      x,
      signed,
      opts.act_format,
      rng,
      axis_name=opts.axis_name if bound else None,
    )
    v = clone.variable(STATS, 'input_fl_ema', lambda: batch.astype(jnp.float32))
    if clone.is_mutable_collection(STATS):
      v.value = batch.astype(jnp.float32)
    return batch


def build(quant_cfg, module, sample_x) -> F8NetModel:
  """``F8NetModel`` from ``config.quant`` (method ``'f8net'``)."""
  opts = F8NetOptions(
    weight_format=quant_cfg.f8_weight_format,
    act_format=quant_cfg.f8_act_format,
    weight_granularity=quant_cfg.f8_weight_granularity,
    momentum=quant_cfg.f8_momentum,
    weight_fl_range=tuple(int(v) for v in quant_cfg.f8_weight_fl_range),
    keep_float=quant_cfg.keep_float,
    fold_bn=quant_cfg.f8_fold_bn,
    pact=bool(quant_cfg.f8_pact),
    pact_init=float(quant_cfg.f8_pact_init),
    axis_name=getattr(module, 'bn_axis_name', None),
  )
  return F8NetModel(
    module, sample_x, options=opts, call_kwargs={'train': False}
  )
