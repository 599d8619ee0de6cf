"""F8Net's provider: fixed-point 8-bit-only quantization of Flax models.

Reference: Jin et al., "F8Net: Fixed-Point 8-bit Only Multiplication for
Network Quantization", ICLR 2022 (arXiv 2202.05239). The quantizer math lives
in :mod:`fracq.core.fixed_point`; this module is the transform, a provider
of the one interception mechanism (:mod:`fracq.interception`) with its
optional hooks (``call_layer`` for the layers, ``call_module`` for BatchNorm
folding and residual-module entries):

* every ``nn.Conv`` / ``nn.Dense`` a rule quantizes (see
  :mod:`fracq.methods.f8net.options`) gets its input quantized to 8-bit fixed point
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
  (:mod:`fracq.methods.f8net.lowering`);
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
  and the branch convs (:func:`fracq.methods.f8net.pact.pact_groups`). The model's function is
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
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fracq.core import fixed_point as fxp
from fracq.core import observers
from fracq.methods.f8net.options import LAYER_TYPES

STATS = 'quant_stats'
PACT = 'quant'  # trainable collection of the PACT clips
_RELU_STD = math.sqrt(0.5 * (1.0 - 1.0 / math.pi))  # std of relu(N(0, 1))
ALPHA_MIN = 1e-3  # a PACT clip never reaches 0 (the producer divides by it)
MODES = ('run', 'capture', 'calibrate')


def fl_of(x, signed, fmt, fl_range, axis=None, axis_name=None):
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


def act_range(signed, opts):
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


class F8NetProvider:
  """The F8Net transform, as a provider of the interception mechanism.

  One provider serves one ``init`` / ``apply`` (it keeps per-call state:
  tensors awaiting their BatchNorm, tensors quantized at a module entry,
  PACT clips).

  Args:
    model: the :class:`fracq.methods.f8net.F8NetModel` (its options and the
      probed structure: signs, Conv->BN pairs, shared entries, PACT groups).
    mode: ``'run'`` (the quantized model), ``'capture'`` (``'run'`` plus
      :class:`LayerRecord`s of integer codes; eager only) or ``'calibrate'``
      (eval mode; every activation FL is overwritten from the batch).
    train: training mode (batch statistics; activation FL EMAs updated).
  """

  layer_types = LAYER_TYPES

  def __init__(self, model, mode: str = 'run', train: bool = False):
    if mode not in MODES:
      raise ValueError(f'mode={mode!r}: use one of {MODES}.')
    self.model = model
    self.options = model.options
    self.mode = mode
    self.train = train and mode != 'calibrate'
    self.pending: dict[int, tuple] = {}
    self.records: list[LayerRecord] = []
    # id -> (quantized tensor, FL): tensors quantized once at a residual
    # module's entry and shared by all their readers (convs and the add).
    self.prequant: dict[int, tuple] = {}
    # PACT group (its owner's path) -> its clip, set when the owner (the
    # group's first producer) runs, read by later producers and readers
    self.alphas: dict[str, Any] = {}

  # -- hooks ---------------------------------------------------------------
  def call_module(self, call):
    """BatchNorms (folded into their layer) and residual-module entries."""
    if call.kind == 'BatchNorm':
      return self._batch_norm(call)
    args = call.args
    if call.path in self.model.shared:
      args = self._share_inputs(call)
    return call.proceed(*args, **call.kwargs)

  def call_layer(self, call):
    """A quantized Conv / Dense (folded with its BatchNorm when paired)."""
    return self._layer(call)

  # -- shared tensors ------------------------------------------------------
  def _share_inputs(self, call):
    """Quantizes a residual module's input once, at its entry: its convs
    and its identity shortcut then read the same 8-bit tensor (one FL per
    tensor, on the module's ``quant_stats/input_fl_ema``)."""
    path = call.path
    idxs, signed = self.model.shared[path]
    args = list(call.args)
    opts = self.options
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
      fl = self._input_fl(call, a, signed)
      aq = fxp.fixed_point_quantize(
        a, fl, signed=signed, fl_range=act_range(signed, opts)
      )
      self.prequant[id(aq)] = (aq, fl)
      args[i] = aq
    return tuple(args)

  # -- quantized layers ----------------------------------------------------
  def _q(self, x, fl, **kwargs):
    if not self.options.simulate:
      return x
    return fxp.fixed_point_quantize(x, fl, **kwargs)

  def _qb(self, b, fl):
    return quantize_bias(b, fl) if self.options.simulate else b

  def _input_fl(self, scope, x, signed):
    """The input FL, kept in ``quant_stats/input_fl_ema`` on ``scope`` (a
    layer's site, or a residual module's call)."""
    opts = self.options
    rng = act_range(signed, opts)
    if self.mode == 'calibrate':
      # Inside the calibration shard_map: the global batch's format, as the
      # train step computes it.
      bound = observers.bound_axis_size(opts.axis_name) is not None
      batch = fl_of(
        x,
        signed,
        opts.act_format,
        rng,
        axis_name=opts.axis_name if bound else None,
      )
      v = scope.variable(
        STATS, 'input_fl_ema', lambda: batch.astype(jnp.float32)
      )
      if scope.is_mutable(STATS):
        v.value = batch.astype(jnp.float32)
      return batch
    init = lambda: fl_of(x, signed, opts.act_format, rng).astype(jnp.float32)
    v = scope.variable(STATS, 'input_fl_ema', init)
    if self.train and not scope.is_initializing:
      batch = fl_of(x, signed, opts.act_format, rng, axis_name=opts.axis_name)
      if scope.is_mutable(STATS):
        v.value = fxp.ema_fl_update(v.value, batch, opts.momentum)
      return batch
    return fxp.freeze_fl(v.value, signed=signed, fl_range=rng)

  def _alpha(self, site):
    raw = site.variable(
      PACT,
      'pact_alpha',
      lambda: jnp.asarray(self.options.pact_init, jnp.float32),
    ).value
    return jnp.maximum(raw, ALPHA_MIN)

  def _weight_fl(self, k):
    opts = self.options
    axis = -1 if opts.weight_granularity == 'channel' else None
    return fl_of(k, True, opts.weight_format, opts.weight_fl_range, axis)

  def _quantize_kernel(self, k):
    flw = self._weight_fl(k)
    kq = self._q(
      k,
      flw,
      signed=True,
      axis=-1 if jnp.ndim(flw) else None,
      fl_range=self.options.weight_fl_range,
    )
    return kq, flw

  def _layer(self, call):
    site = call.site
    path = site.path
    signed = self.model.signs.get(path, True)
    bn = self.model.pairs.get(path)
    state = {}
    opts = self.options
    a0 = call.inputs
    pre = self.prequant.get(id(a0))
    pre = pre if pre is not None and pre[0] is a0 else None

    src = self.model.pact_src.get(path)  # PACT: the clip of our input
    out = self.model.pact_out.get(path)  # ... and of our output

    def quant_inputs(x):
      if out == path:  # the group's first producer owns its clip
        self.alphas[path] = self._alpha(site)
      if src is not None:  # PACT's clip(x, 0, alpha), in units of alpha
        x = jnp.minimum(x, 1.0)
      fl = pre[1] if pre is not None else self._input_fl(site, x, signed)
      state['fl_in'] = fl
      return self._q(x, fl, signed=signed, fl_range=act_range(signed, opts))

    def pact_in(k):  # the input is x / alpha: the kernel takes alpha
      return k if src is None else k * self.alphas[src].astype(k.dtype)

    def pact_out(k, b):  # our output becomes x / alpha (the reader clips)
      if out is None:
        return k, b
      a = self.alphas[out].astype(k.dtype)
      return k / a, (None if b is None else b / a)

    if bn is None:  # quantize the kernel as is

      def transform(x, k, b):
        xq = quant_inputs(x)
        k, b = pact_out(pact_in(k), b)
        kq, flw = self._quantize_kernel(k)
        bq = None if b is None else self._qb(b, state['fl_in'] + flw)
        self._capture(site, signed, None, state['fl_in'], flw, kq, bq, x)
        return xq, kq, bq

      return call.run(transform)

    # Folded: float pass for the batch statistics, finished at the BN.
    def first(x, k, b):
      xq = quant_inputs(x)
      state['xq'] = xq
      k = pact_in(k)  # the float pass computes the original conv output
      state['k'], state['b'] = k, b
      return xq, k, b

    y = call.run(first)

    def finish(gamma, beta, mean, var, eps):
      kf, bf = fxp.fold_bn(state['k'], state['b'], gamma, beta, mean, var, eps)
      kf, bf = pact_out(kf, bf)
      kq, flw = self._quantize_kernel(kf)
      bq = self._qb(bf, state['fl_in'] + flw)
      xq = state['xq']

      def second(x, k, b):
        del x, k, b
        return xq, kq, None

      folded = call.run(second)
      self._capture(site, signed, bn, state['fl_in'], flw, kq, bq, a0)
      return folded + bq.astype(folded.dtype).reshape(
        (1,) * (folded.ndim - 1) + (-1,)
      )

    self.pending[id(y)] = (y, finish)
    return y

  def _batch_norm(self, call):
    x = call.inputs
    hit = self.pending.pop(id(x), None)
    if hit is None or hit[0] is not x:
      return call.proceed(*call.args, **call.kwargs)  # an unfolded BN: float
    _, finish = hit
    # The float BN call: creates BN variables at init and updates the
    # running averages in training exactly as the unfolded model would.
    call.proceed(*call.args, **call.kwargs)
    return finish(*call.batch_norm_statistics(x))

  # -- capture -------------------------------------------------------------
  def _capture(self, site, signed, bn, fl_in, flw, kq, bq, x):
    if self.mode != 'capture':
      return
    acc_fl = np.asarray(fl_in) + np.asarray(flw)
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
          jnp.asarray(acc_fl),
          signed=True,
          bits=32,
          axis=0 if np.ndim(acc_fl) else None,
        )
      )
    rec = LayerRecord(
      path=site.path,
      layer_type=site.layer_type,
      signed_input=signed,
      folded_bn=bn,
      input_fl=int(np.asarray(fl_in)),
      weight_fl=np.asarray(flw),
      kernel_codes=codes.astype(np.int8),
      bias_codes=bcodes,
      in_shape=tuple(x.shape),
    )
    if site.path in self.model.pact_src:
      rec.input_code_max = int(
        min(fxp.fixed_point_range(False)[1], 2**rec.input_fl)
      )
    if site.layer_type == 'Conv':
      nsp = codes.ndim - 2
      strides = site.layer_attr('strides')
      rec.strides = strides if strides is not None else (1,) * nsp
      if isinstance(rec.strides, int):
        rec.strides = (rec.strides,) * nsp
      rec.padding = site.layer_attr('padding')
      rec.feature_group_count = site.layer_attr('feature_group_count')
    self.records.append(rec)
