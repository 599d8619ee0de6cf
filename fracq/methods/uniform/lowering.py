"""Integer lowering of uniform QAT and (hard-assigned) FracBits models.

Both train a :class:`~fracq.methods.qat.QATModel`; after hard assignment a
FracBits model is uniform QAT at per-layer integer bits, so one lowering
(method ``'qat'``) serves both. It registers itself with
:mod:`fracq.export.lowering` when this module is imported, which importing
:mod:`fracq.export` does.

LSQ activation steps and per-channel kernel steps are arbitrary reals.
BatchNorm (running statistics) and the layer bias fold into a per-channel
real multiplier ``M = s_in s_w gamma / (sqrt(var + eps) s_next)`` that
:func:`fracq.core.integer.requantize` applies exactly in integers
(``M0 * 2^(shift - 31)``, 31-bit mantissa), and the folded bias becomes
int32 at the accumulator's scale. Rounding the bias and the multiplier can
move a code by one near ties, so logits agree to a small tolerance.

The kernels' codes, scales and bits come from
:func:`fracq.export.freeze.freeze` and the input steps from
:func:`fracq.export.freeze.freeze_inputs` (the method's export contract);
the lowering folds them, per layer (:func:`fold_layer`), and links the
layers. Chains of ``nn.Conv`` / ``nn.Dense`` layers (each optionally
followed by its BatchNorm, then ReLU when the next input is non-negative,
with an optional global average pool before the last layer) lower to chain
programs (:func:`requantize_to`).

Other data flows lower to *graph* programs (the data flow from
:func:`fracq.graph.structure.probe_structure`; tested on ResNet basic and
bottleneck blocks with identity and projection shortcuts and the 3x3 / 2
stem max pool, MobileNet-V2 inverted residuals, Inception-style
concatenations with 3x3 / 1 average-pool branches):

* Every reader quantizes at its own LSQ step, so each layer keeps its int32
  accumulator and every read is an :class:`~fracq.export.IntRequant`
  (shared by readers of the same view): sign, ReLU, clip, max / average /
  global pool sums, the exact fixed-point multiplier ``unit / (positions *
  step)`` and the clamp to the reader's codes.
* A residual add requantizes each operand (int32 accumulators, or the
  previous add's int32 sum for an identity shortcut, as the fake-quantized
  model adds float values) to one common fixed-point position, the bound of
  the sum at :data:`ADD_BITS` bits, and sums them (an ``IntAdd`` without
  shifts); its ReLU moves into its readers.
* ReLU6 and any other clipped activation (found by
  :func:`fracq.graph.structure.input_clips`) becomes the clamp's top code,
  ``min(qmax, round(clip / step))``, exact because rounding is monotone; a
  clipped activation that is averaged clamps the accumulator before the sum.
* A channel concatenation read by a layer becomes an
  :class:`~fracq.export.IntConcat` of its parts, each requantized to that
  layer's step.

Anything else (a product, reshape or normalisation between layers, an add
outside a module's output) is refused with an error naming the layer that
reads it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from fracq.core import integer as ints
from fracq.export.freeze import FrozenLayer
from fracq.export.freeze import freeze
from fracq.export.freeze import freeze_inputs
from fracq.export.lowering.common import chain_link
from fracq.export.lowering.common import FLIP_RATE
from fracq.export.lowering.common import tree_node
from fracq.export.lowering.common import verify_program
from fracq.export.lowering.registry import register_lowering
from fracq.export.program import INPUT
from fracq.export.program import IntAdd
from fracq.export.program import IntConcat
from fracq.export.program import IntegerProgram
from fracq.export.program import IntLayer
from fracq.export.program import IntRequant
from fracq.graph.structure import Structure
from fracq.graph.structure import clipping_ops
from fracq.graph.structure import input_clips
from fracq.graph.structure import is_avg_pool
from fracq.graph.structure import is_max_pool
from fracq.graph.structure import is_pool_chain
from fracq.graph.structure import probe_structure
from fracq.interception.interceptor import QuantizedModule
from fracq.methods.providers import QATProvider
from fracq.methods.qat import QATModel

__all__ = [
  'InputQuant',
  'fold_layer',
  'input_quantization',
  'lower_qat',
  'reader_codes',
  'requantize_to',
]

ACC_BITS = 28  # the accumulator's target magnitude: 2 spare bits of int32
# Graph programs: the bound of an add's sum at its common fixed-point
# position (one spare bit of int32). The bounds are worst cases (sum |w| *
# max |x|), so the sum keeps well over 16 bits of its actual range: finer
# than any reader's code step by orders of magnitude, so rounding it
# rarely moves a reader's code.
ADD_BITS = 30
INT32_LIMIT = 2**31 - 1  # the clamp of int32 add operands
MAX_ACC_SHIFT = 16


@dataclasses.dataclass(frozen=True)
class InputQuant:
  """How a layer's input is quantized: ``real = code * scale``, codes in
  ``code_range``."""

  scale: float
  code_range: tuple[int, int]


def input_quantization(
  qmodel, variables, structure: Structure
) -> dict[str, InputQuant]:
  """Every layer's input step and code range (from ``freeze_inputs``).

  Any per-tensor input quantizer at fixed bits (learned FracBits bits once
  hard-assigned) whose grid has no zero point or offset (``real = code *
  step``) lowers: LSQ, PACT (step ``alpha / qmax``; its clip is the top
  code) and symmetric observers.

  Raises:
    ValueError: an input quantization the integer program does not model
      (bits not yet hard-assigned, per-channel or group ranges, a zero
      point or offset such as LSQ+'s).
  """
  specs = {
    path: qmodel.rules[qmodel.facts[path].rule_index].act
    for path in structure.order
  }
  for path, spec in specs.items():  # before freezing: the spec alone
    if (
      spec is None
      or spec.quantizer not in ('uniform', 'fracbits')
      or (spec.quantizer == 'fracbits' and not qmodel.hard)
      or spec.granularity != 'tensor'
    ):
      _refuse_input(path, spec, None)
  frozen = freeze_inputs(qmodel, variables)
  out = {}
  for path, spec in specs.items():
    entry = frozen.get(path)
    if (
      entry is None
      or len(entry['scale']) != 1
      or 'zero_point' in entry
      or 'offset' in entry
    ):
      _refuse_input(path, spec, entry)
    # freeze_inputs writes float32 values at 9 significant digits: exact.
    scale = float(np.float32(entry['scale'][0]))
    out[path] = InputQuant(
      scale=scale, code_range=(int(entry['qmin']), int(entry['qmax']))
    )
  return out


def _refuse_input(path: str, spec, entry) -> None:
  """Raises: ``path``'s input quantization (``spec``, frozen ``entry`` or
  None) has no integer form."""
  if spec is None:
    what = 'not quantized'
  else:
    what = f'{spec.quantizer} / {spec.range_method} / {spec.granularity}'
    if spec.quantizer == 'fracbits' and entry is None:
      what += ', bits not hard-assigned yet'
    elif entry is not None and ('zero_point' in entry or 'offset' in entry):
      what += ', with a zero point or offset'
  raise ValueError(
    f'{path}: integer-only inference needs the input quantized per tensor '
    'at fixed bits on a grid without zero point or offset (real = code * '
    'step: act_range=lsq or pact, act_granularity=tensor; learned '
    f'activation bits after hard assignment); this input is {what}.'
  )


def _check_kernels(structure: Structure, frozen: dict) -> None:
  for path, layer in frozen.items():
    if layer.param != 'kernel':
      raise ValueError(
        f'{path}: a quantized Embed table (embedding lookup / attend): the '
        'integer program does not lower embedding ops yet; export the '
        'packed artifact (export_model), which stores it exactly, or keep '
        'the Embed float for integer export.'
      )
    if layer.group_size:
      raise ValueError(
        f'{path}: a group-wise kernel (group_size={layer.group_size}): the '
        'integer program does not lower per-group scales in a Dense/Conv '
        'yet; export the packed artifact (export_model), which stores it '
        "exactly, or quantize this layer with granularity 'tensor' or "
        "'channel' for integer export."
      )
  missing = [path for path in structure.order if path not in frozen]
  if missing:
    raise ValueError(
      f'Integer-only inference needs every Conv/Dense kernel '
      f'quantized; float: {missing}.'
    )
  for path in structure.order:
    if frozen[path].affine:
      raise ValueError(
        f'{path}: its kernel grid is affine (a zero point or offset: '
        'asymmetric observer, LSQ+ or DoReFa), which the integer program '
        'does not lower; quantize kernels symmetrically (lsq, pact, '
        'symmetric observers, FracBits ranges) or export the packed '
        'artifact (export_model), which stores any kernel exactly.'
      )


def _folded_bn(variables, structure: Structure, path: str, bias, cout):
  """``(gain, beta)``: the BatchNorm after ``path`` (if any) and the layer
  bias folded into ``gain * acc_real + beta`` per output channel."""
  bn = structure.pairs.get(path)
  if bn is None:
    return np.ones(cout), bias
  bn_params = tree_node(variables['params'], bn)
  bn_stats = tree_node(variables.get('batch_stats', {}), bn)
  gamma = np.asarray(bn_params.get('scale', np.ones(cout)), np.float64)
  gain = gamma / np.sqrt(
    np.asarray(bn_stats['var'], np.float64) + structure.bn_eps[bn]
  )
  beta = (
    np.asarray(bn_params.get('bias', np.zeros(cout)), np.float64)
    + (bias - np.asarray(bn_stats['mean'], np.float64)) * gain
  )
  return gain, beta


def _storage_bits(frozen: FrozenLayer):
  # Kernel-wise FracBits bits: every output channel at its own width, as in
  # the weights artifact (a pruned channel at 0 bits takes no bytes).
  return frozen.bits.tolist() if frozen.bits.ndim else int(frozen.bits)


def fold_layer(
  qmodel,
  variables,
  structure: Structure,
  path: str,
  frozen: FrozenLayer,
  input_quant: InputQuant,
  *,
  headroom_bits: int = 0,
) -> tuple[IntLayer, np.ndarray]:
  """The integer layer of ``path`` (kernel codes, int32 folded bias) and
  the real value of one unit of its (shifted) accumulator, per channel.

  ``headroom_bits``: keep this many more spare bits in the int32
  accumulator (e.g. ``log2`` of a global-pool sum over its positions)."""
  cout = frozen.codes.shape[-1]
  kernel_scale = np.broadcast_to(
    np.asarray(frozen.scale, np.float64).reshape(-1), (cout,)
  )
  node = tree_node(variables['params'], path)
  bias = np.asarray(node.get('bias', np.zeros(cout)), np.float64)
  gain, beta = _folded_bn(variables, structure, path, bias, cout)
  unit = input_quant.scale * kernel_scale * gain
  if np.any(unit == 0):
    raise ValueError(
      f'{path}: a zero scale (BN gamma or step) makes the '
      'integer requantization degenerate.'
    )
  # Headroom: |acc| <= sum |w| * max |x| per channel; keep 2 spare bits.
  code_lo, code_hi = input_quant.code_range
  reduce_axes = tuple(range(frozen.codes.ndim - 1))
  bound = float(
    np.max(np.sum(np.abs(frozen.codes.astype(np.int64)), axis=reduce_axes))
  ) * max(abs(code_lo), abs(code_hi))
  bound = max(bound + float(np.max(np.abs(beta / unit))), 1.0)
  acc_shift = int(
    np.clip(
      ACC_BITS - headroom_bits - math.ceil(math.log2(bound)), 0, MAX_ACC_SHIFT
    )
  )
  unit = unit / 2.0**acc_shift
  int_bias = np.round(beta / unit)
  if np.any(np.abs(int_bias) >= 2**31):
    raise ValueError(f'{path}: the folded bias overflows int32.')
  codes = frozen.codes
  layer = IntLayer(
    path=path,
    layer_type=qmodel.facts[path].layer_type,
    kernel=codes.astype(
      np.int8
      if codes.min(initial=0) >= -128 and codes.max(initial=0) <= 127
      else np.int16
    ),
    bias=int_bias.astype(np.int32),
    acc_shift=acc_shift,
    kernel_bits=_storage_bits(frozen),
  )
  if layer.layer_type not in ('Conv', 'Dense'):
    raise ValueError(f'{path}: {layer.layer_type} layers are not lowered.')
  if layer.layer_type == 'Conv':
    (layer.strides, layer.padding, layer.feature_group_count) = (
      structure.conv_attrs[path]
    )
  return layer, unit


def requantize_to(layer: IntLayer, unit, reader: InputQuant) -> None:
  """Sets ``layer``'s requantization of its accumulator (one unit worth
  ``unit``, after ``layer.pool`` positions summed) to ``reader``'s codes."""
  sign = np.where(unit < 0, -1, 1).astype(np.int32)
  m0, exponent = ints.quantize_multiplier(
    np.abs(unit) / (layer.pool * reader.scale)
  )
  layer.requant = ('mult', sign, np.atleast_1d(m0), np.atleast_1d(exponent))
  layer.out_range = reader.code_range


def _lower_chain(qmodel, variables, structure, frozen, inputs):
  """The chain program: each layer requantizes to the next one's codes."""
  layers = []
  for index, path in enumerate(structure.order):
    layer, unit = fold_layer(
      qmodel, variables, structure, path, frozen[path], inputs[path]
    )
    if index + 1 < len(structure.order):
      layer.relu, layer.pool = chain_link(structure, index)
      requantize_to(layer, unit, inputs[structure.order[index + 1]])
    else:
      layer.out_scale = unit.astype(np.float32)
    layers.append(layer)
  first = inputs[structure.order[0]]
  return IntegerProgram(
    layers=layers,
    input_scale=first.scale,
    input_range=first.code_range,
    kind='qat',
  )


def _is_chain(structure: Structure) -> bool:
  """Whether every layer reads the previous one (or the input): no adds,
  max pools or branches (unmatched inputs, e.g. reshapes, count as chain
  links and are checked by :func:`chain_link`)."""
  if structure.adds:
    return False
  previous = INPUT
  for path in structure.order:
    src = structure.srcs.get(path)
    if src is not None and (src[0] != previous or is_max_pool(src[2])):
      return False
    previous = path
  return True


def _pool_bits(pool) -> int:
  """Spare accumulator bits for a global-pool sum over ``pool`` positions."""
  return 0 if is_max_pool(pool) or pool <= 1 else math.ceil(math.log2(pool))


def _layer_bound(layer: IntLayer, unit, code_range) -> np.ndarray:
  """Per-channel bound of ``|real output|`` of a folded layer."""
  kernel = np.asarray(layer.kernel, np.int64)
  per_channel = np.sum(np.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
  acc = per_channel * float(max(abs(code_range[0]), abs(code_range[1])))
  return (acc * 2.0**layer.acc_shift + np.abs(layer.bias)) * np.abs(unit)


class _GraphBuilder:
  """Builds a real-multiplier graph program (see :func:`_lower_graph`)."""

  def __init__(self, qmodel, variables, structure, frozen, inputs, clips):
    self.qmodel, self.variables = qmodel, variables
    self.clips = clips  # layer -> the clip of its input (ReLU6: 6.0)
    self.structure, self.frozen, self.inputs = structure, frozen, inputs
    self.ops = []
    # tensor -> real value of one unit of its int32 output, per channel
    # (signed for layers: negative BN scales), and a bound of |real value|
    self.units, self.bounds = {}, {}
    self.post_relu = {}  # add -> whether its module applies ReLU
    self.views = {}  # (src, relu, pool, target, range) -> requant op path
    self.pooled = self._pooled_reads()
    first = inputs[structure.order[0]]
    # The program input: codes at the first layer's input step.
    self.input_quant = first
    self.units[INPUT] = np.float64(first.scale)
    self.bounds[INPUT] = np.float64(
      first.scale * max(abs(first.code_range[0]), abs(first.code_range[1]))
    )

  def _pooled_reads(self) -> dict:
    """Tensor -> the largest global-pool window any reader sums it over."""
    pooled = {}
    reads = [src for src in self.structure.srcs.values() if src is not None]
    reads += [
      add['identity']
      for add in self.structure.adds.values()
      if add['identity'] is not None
    ]
    reads += [
      part for parts in self.structure.concats.values() for part in parts
    ]
    for name, _, pool in reads:
      if is_pool_chain(pool):
        pool = pool[1]
      if is_avg_pool(pool):
        pool = math.prod(pool[1])
      if not is_max_pool(pool):
        pooled[name] = max(pooled.get(name, 1), int(pool))
    return pooled

  def _requant(self, reader: str, src, target, out_range, clip=None) -> str:
    """The op reading tensor ``src = (name, relu, pool)`` at ``target``
    (real value of one output unit, per tensor or channel) in
    ``out_range``; ops are shared by readers of the same view."""
    name, relu, pool = src
    relu = bool(relu) or self.post_relu.get(name, False)
    maxpool = pool if is_max_pool(pool) else None
    avgpool = pool if is_avg_pool(pool) else None
    if is_pool_chain(pool):  # a max pool, then an average pool
      maxpool, avgpool = pool
    pool = 1 if maxpool is not None or avgpool is not None else int(pool)
    # positions summed before the multiplier (global or window pool)
    summed = pool * (1 if avgpool is None else math.prod(avgpool[1]))
    lo, hi = out_range
    target = np.asarray(target, np.float64)
    unit = np.asarray(self.units[name], np.float64)
    acc_clip = None
    if clip is not None and summed == 1 and target.size == 1:
      # A clipped activation read as codes: min(round(v / s), round(c / s))
      # = round(min(v, c) / s), so the clip is the clamp's top code.
      hi = min(hi, int(np.round(clip / float(target))))
    elif clip is not None:  # clipped before a pool sum: clamp the input
      acc_clip = np.minimum(
        np.floor(clip / np.abs(unit)), float(INT32_LIMIT)
      ).astype(np.int32)
    if (
      name == INPUT
      and not relu
      and pool == 1
      and maxpool is None
      and target.size == 1
      and float(target) == self.input_quant.scale
      and (lo, hi) == tuple(self.input_quant.code_range)
    ):
      return INPUT
    key = (name, relu, pool, maxpool, avgpool, target.tobytes(), (lo, hi), clip)
    if key in self.views:
      return self.views[key]
    sign = np.where(unit < 0, -1, 1).astype(np.int32)
    m0, exponent = ints.quantize_multiplier(np.abs(unit) / (summed * target))
    path = f'{name}@{reader}'
    self.ops.append(
      IntRequant(
        path=path,
        src=name,
        requant=(
          'mult',
          np.atleast_1d(sign),
          np.atleast_1d(m0),
          np.atleast_1d(exponent),
        ),
        out_range=(int(lo), int(hi)),
        relu=relu,
        pool=pool,
        maxpool=maxpool,
        avgpool=avgpool,
        acc_clip=None if acc_clip is None else np.atleast_1d(acc_clip),
      )
    )
    self.views[key] = path
    return path

  def _concat(self, reader: str, parts, quant: InputQuant) -> str:
    inputs = [
      self._requant(reader, part, quant.scale, quant.code_range)
      for part in parts
    ]
    key = ('concat', tuple(inputs))
    if key not in self.views:
      self.views[key] = f'concat@{reader}'
      self.ops.append(IntConcat(path=self.views[key], inputs=inputs))
    return self.views[key]

  def layer(self, path: str) -> None:
    src = self.structure.srcs.get(path)
    parts = self.structure.concats.get(path)
    if src is None and parts is None:
      raise ValueError(
        f'{path}: its input is not the model input, an earlier Conv/Dense '
        '(after its BatchNorm, ReLU, a max, average or global pool), a '
        'residual add or a channel concatenation of those; the integer '
        'lowering cannot follow this data flow (a product, reshape, '
        'normalisation or another op between layers). '
        'Export the packed artifact (export_model) instead.'
      )
    reader = self.inputs[path]
    layer, unit = fold_layer(
      self.qmodel,
      self.variables,
      self.structure,
      path,
      self.frozen[path],
      reader,
      headroom_bits=_pool_bits(self.pooled.get(path, 1)),
    )
    if parts is not None and len(parts) == 1:  # an average pool
      layer.src = self._requant(path, parts[0], reader.scale, reader.code_range)
    elif parts is not None:  # each part at this reader's step, concatenated
      layer.src = self._concat(path, parts, reader)
    else:
      layer.src = self._requant(
        path, src, reader.scale, reader.code_range, self.clips.get(path)
      )
    self.units[path] = unit
    self.bounds[path] = _layer_bound(layer, unit, reader.code_range)
    self.ops.append(layer)

  def add(self, path: str) -> None:
    add = self.structure.adds[path]
    operands = [(name, False, 1) for name in add['operands']]
    if add['identity'] is not None:
      operands.append(tuple(add['identity']))
    for name, _, pool in operands:
      if not is_max_pool(pool) and pool != 1:
        raise ValueError(
          f'{path}: a residual add of a globally pooled tensor ({name}).'
        )
    bound = sum(np.abs(self.bounds[name]) for name, _, _ in operands)
    bound = np.maximum(np.asarray(bound, np.float64), 1e-30)
    # The common fixed-point position: the bound of the sum at ADD_BITS
    # bits (fewer when a reader sums it over a global pool).
    add_bits = min(ADD_BITS, 30 - _pool_bits(self.pooled.get(path, 1)))
    common = bound / 2.0**add_bits
    inputs = [
      self._requant(path, operand, common, (-INT32_LIMIT, INT32_LIMIT))
      for operand in operands
    ]
    self.ops.append(
      IntAdd(
        path=path,
        inputs=inputs,
        shifts=[np.int32(0)] * len(inputs),
      )
    )
    self.units[path], self.bounds[path] = common, bound
    self.post_relu[path] = bool(add['relu'])

  def program(self) -> IntegerProgram:
    structure = self.structure
    for kind, path in structure.ops:
      if kind == 'layer':
        self.layer(path)
      else:
        self.add(path)
    last = self.ops[-1]
    if not isinstance(last, IntLayer) or any(
      getattr(op, 'src', None) == last.path for op in self.ops
    ):
      raise ValueError(
        'The integer lowering needs the model to end in a Conv/Dense '
        f'layer whose output is the model output; it ends in {last.path}.'
      )
    last.out_scale = np.asarray(self.units[last.path], np.float32)
    return IntegerProgram(
      layers=self.ops,
      input_scale=self.input_quant.scale,
      input_range=tuple(self.input_quant.code_range),
      kind='qat',
    )


def _refuse_token_models(qmodel, batch) -> None:
  """Raises for models the integer program cannot express: integer
  (token) inputs, which an embedding lookup reads, and attention."""
  attention = sorted(getattr(qmodel, 'attention_facts', None) or {})
  if attention:
    raise ValueError(
      f'Integer-program lowering does not lower attention ({attention[0]}: '
      'its q.k and probs.v matmuls, softmax and LayerNorm have no integer '
      'op here). Export the packed artifact (fracq.export.export_model), '
      'which stores every quantized tensor and the attention ranges.'
    )
  if jnp.issubdtype(batch.dtype, jnp.integer):
    raise ValueError(
      f'Integer-program lowering takes models that read a real-valued input '
      f'(images, features); this one reads {batch.dtype} tokens (an '
      "embedding lookup, as in the zoo's GPT). Token models (embeddings, "
      'attention, LayerNorm) are not lowered: export the packed artifact '
      '(fracq.export.export_model) instead.'
    )


@register_lowering('qat', QATModel)
def lower_qat(
  qmodel,
  variables,
  sample_x,
  *,
  verify: bool = True,
  tolerance: float = 0.05,
  flip_rate: float = FLIP_RATE,
) -> IntegerProgram:
  """The integer-only program of a uniform-QAT or (hard-assigned) FracBits
  :class:`~fracq.methods.qat.QATModel`.

  Needs every Conv/Dense quantized with LSQ kernel steps (or FracBits shared
  ranges) and fixed-bit LSQ per-tensor input steps. BatchNorm (running
  statistics) and the layer bias fold into a per-channel real multiplier and
  an int32 bias.

  ``verify`` checks the program on ``sample_x`` layer by layer
  (:func:`~fracq.export.lowering.common.verify_program` with teacher
  forcing): every layer, reading the fake-quantized model's own input codes,
  must reproduce the next layers' input codes up to rounding ties (at most
  ``flip_rate`` of them off by one). The free-running logits are compared
  too, within ``tolerance`` of the logit range; beyond it (ties grown
  through a deep model) a warning says so. The measurements are in
  ``program.verification``.

  A model trained in bfloat16 (a module ``dtype`` other than float32) is
  lowered and checked through its float32 copy, with the same variables.
  """
  batch = jnp.asarray(sample_x)
  _refuse_token_models(qmodel, batch)
  qmodel = _float32_model(qmodel)
  batch = batch.astype(jnp.float32)
  structure = probe_structure(
    qmodel.module, variables, batch, **qmodel.call_kwargs
  )
  clips = {}
  if clipping_ops(qmodel.module, variables, batch, **qmodel.call_kwargs):
    clips = input_clips(
      qmodel.module, variables, batch, structure, **qmodel.call_kwargs
    )
  frozen = freeze(qmodel, variables)
  _check_kernels(structure, frozen)
  inputs = input_quantization(qmodel, variables, structure)
  if _is_chain(structure) and not clips:
    program = _lower_chain(qmodel, variables, structure, frozen, inputs)
  else:
    program = _GraphBuilder(
      qmodel, variables, structure, frozen, inputs, clips
    ).program()
  if verify:
    ref, teacher = reader_codes(qmodel, variables, batch, inputs)
    missed = [path for path in structure.order if path not in teacher]
    if missed:
      raise ValueError(
        f'{missed[0]}: its quantized input was not seen when running the '
        'model, so the program cannot be checked layer by layer (a layer '
        'called under another name or not at all in eval mode?). Pass '
        'verify=False to skip the check.'
      )
    program.verification = verify_program(
      program,
      ref,
      batch,
      exact=False,
      atol=tolerance,
      teacher=teacher,
      flip_rate=flip_rate,
    )
  return program


def _float32_model(qmodel):
  """``qmodel``, or, for a model that computes in a half-precision dtype
  (``half_precision=True`` training), the same model computing in float32:
  the integer program deploys the trained variables, and the float32
  fake-quantized model is the reference it is checked against (bfloat16
  rounds the quantized values themselves)."""
  dtype = getattr(qmodel.module, 'dtype', None)
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return qmodel
  return qmodel.with_module(qmodel.module.clone(dtype=jnp.float32))


class _Recorder(QATProvider):
  """The QAT provider, keeping every layer's quantized input (quantized
  directly: the deferred path, a training-memory saving with the same
  values, is off)."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.inputs = {}

  def quantize_input(self, site, x):
    quantized = super().quantize_input(site, x)
    self.inputs[site.path] = quantized
    return quantized

  def deferred_input(self, site, x):
    del site, x
    return None


def reader_codes(
  qmodel, variables, x, inputs: dict[str, InputQuant]
) -> tuple[jax.Array, dict[str, np.ndarray]]:
  """The fake-quantized model's logits on ``x`` (eval mode) and every
  layer's input codes in that run (its quantized input over its step
  ``inputs[path].scale``), the teacher of
  :meth:`~fracq.export.IntegerProgram.replay`."""
  recorder = _Recorder(
    hard=qmodel.hard,
    signs=qmodel.signs,
    kernel_transform=qmodel.kernel_transform,
  )
  module = QuantizedModule(
    qmodel.module, qmodel.rules, recorder, on_unused='warn'
  )
  logits = module.apply(variables, x, **{**qmodel.call_kwargs, 'train': False})
  codes = {
    path: np.rint(
      np.asarray(recorder.inputs[path], np.float64) / quant.scale
    ).astype(np.int64)
    for path, quant in inputs.items()
    if path in recorder.inputs
  }
  return logits, codes
