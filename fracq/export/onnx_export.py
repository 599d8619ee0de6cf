"""ONNX export of integer programs: a QDQ graph that onnxruntime runs.

:func:`program_to_onnx` writes an :class:`~fracq.export.program.
IntegerProgram` as a standard ONNX graph of ``QuantizeLinear`` /
``DequantizeLinear`` (QDQ) nodes around float ``Conv`` / ``Gemm`` nodes, the
form onnxruntime (and TensorRT, OpenVINO) turns into integer kernels:

* Input: float images in fracq's layout, **NHWC** ``(N, H, W, C)``, one
  ``Transpose`` to NCHW, then ``QuantizeLinear`` with the program's input
  step (int8 / uint8; ``Clip`` to a narrower code range).
* Weights: the integer kernel codes are the initializers (OIHW for Conv,
  ``(in, out)`` for Gemm), stored as **INT4 / UINT4** (ONNX opset >= 21,
  two codes a byte) when every code fits in 4 bits and as int8 otherwise,
  each behind a ``DequantizeLinear``. Biases are int32 initializers behind a
  ``DequantizeLinear`` at the accumulator's scale (a Gemm's is added by an
  ``Add`` after it: onnxruntime would fuse it into ``QGemm`` as if it were
  at the kernel's scale).
* Between layers: ``[Mul sign] -> [Relu] -> [GlobalAveragePool] ->
  QuantizeLinear -> DequantizeLinear [-> Clip]``; the requantizing
  ``QuantizeLinear`` carries the layer's per-channel multiplier (``axis=1``).
  The last layer's accumulator is dequantized by a per-channel ``Mul`` into
  the float logits ``(N, classes)``.
* Graph programs: each layer reads its ``src``; a residual add's operands
  (accumulators of layers without requantization, or codes) are multiplied
  by ``2^shift`` (exact) and summed by ``Sum``, then follow the same ReLU /
  pool / requantizing ``QuantizeLinear`` (F8Net). Requantizations
  (``IntRequant``, uniform QAT / FracBits graphs) are ``[Mul sign] ->
  [Relu] -> [Min clip] -> [MaxPool] -> [AveragePool] ->
  [GlobalAveragePool]`` and either the QDQ pair to a reader's codes or, for
  an add's int32 operands, ``Mul`` by the multiplier and ``Round`` (float32:
  the add is not exact in float beyond ``2^24``, so ``exact_accumulation``
  is False there); concatenations are ``Concat`` on the channel axis.

Formulation (chosen so onnxruntime computes the integer program's numbers):
activation codes are dequantized with scale 1 and kernel codes with scale 1
(the bias with ``2^-acc_shift``), so the float32 tensors entering and leaving
every ``Conv`` / ``Gemm`` hold the integer codes and the integer accumulator
itself. A float32 sum of integers is exact while every partial sum stays
below ``2^24``; :func:`program_to_onnx` checks that bound per layer
(``sum |w| * max |x|``) and reports it. All real-valued scaling then happens
in exactly one place per layer, the requantizing ``QuantizeLinear``, whose
``y_scale = 1 / (M * pool * 2^acc_shift)`` (``M``: the program's fixed-point
multiplier, or ``2^-shift`` for F8Net). ONNX ``QuantizeLinear`` rounds half
to even and saturates, like fracq's requantization; the differences are:

* F8Net: every scale is a power of two, so each division is exact and the
  graph reproduces the program bit for bit (logits included).
* Real multipliers (uniform QAT / FracBits): ``x / y_scale`` is one float32
  rounding (relative ``2^-24``) where fracq multiplies exactly by a 31-bit
  ``M0``, and the biased accumulator is rounded to float32 when it exceeds
  ``2^24`` (the program's ``acc_shift`` keeps ~28 bits); a code can move by
  one only within ~``1e-5`` of a rounding tie. :func:`export_onnx` measures
  the effect (prediction match and logit difference) on the sample batch.

``opset`` >= 21 is needed for INT4 / UINT4 tensors; with 13 <= opset < 21
every kernel is stored as int8 (same numbers, twice the bytes for <= 4-bit
layers).

Integer kernels (``integer_kernels=True``, the default): the form above
keeps every Conv / Gemm in float32 inside onnxruntime (its QDQ fusion
needs the scales folded into the kernel's ``DequantizeLinear``, a
per-tensor output ``QuantizeLinear`` and int8 kernels). So a layer whose
accumulator goes straight to one requantization to 8-bit codes (no pool,
no clip before a pool; the layer's own ``requant``, or the single
``IntRequant`` reading it), and the last layer, are written instead as

  ``DequantizeLinear(codes, 1, 0)``, ``DequantizeLinear(int8 kernel, M *
  2^acc_shift per channel, axis 0)``, ``DequantizeLinear(int32 bias, the
  same scale)`` -> ``Conv`` / ``Gemm`` -> ``QuantizeLinear(1, 0)`` (uint8
  after ReLU: the saturation at 0 is the ReLU) [-> ``DequantizeLinear`` ->
  ``Clip`` -> ``QuantizeLinear(1, 0)`` for a narrower range] [-> MaxPool]
  -> ``DequantizeLinear(1, 0)``,

with negative channels' signs folded into their kernel and bias codes, which
onnxruntime runs as ``QLinearConv`` / ``QGemm`` (u8s8 / s8s8 integer GEMM).
The integer-kernel form holds a bias in whole accumulator units only
(``QLinearConv`` adds the int32 bias to the integer accumulator), so it is
used only for layers whose bias has no fractional ``acc_shift`` bits (every
F8Net layer; real-multiplier layers rarely) unless ``round_bias=True``,
which rounds those bits away: the graph then computes the program with
biases rounded to whole accumulator units (at most half a unit before the
requantization; ``report['rounded_bias_layers']`` counts them). Codes read
by an integer kernel are uint8 (non-negative) or int8, never INT4.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fracq.export.lowering import lower
from fracq.export.program import INPUT
from fracq.export.program import IntAdd
from fracq.export.program import IntConcat
from fracq.export.program import IntegerProgram
from fracq.export.program import IntLayer
from fracq.export.program import IntRequant

EXACT_FLOAT_INT = 2**24  # float32 holds every integer below this exactly


def import_onnx():
  """The onnx package, or an ImportError saying how to install it."""
  try:
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      'ONNX export needs the onnx package (pip install onnx; onnxruntime '
      'to run or check the export).'
    ) from e
  return onnx


def checked_model(nodes, name: str, in_info, out_info, inits, opset: int):
  """An ONNX model of one graph (one input, one output), at an IR version
  onnxruntime reads, passed through the ONNX checker (full check)."""
  onnx = import_onnx()
  helper = onnx.helper
  graph = helper.make_graph(
    nodes, name, [in_info], [out_info], initializer=inits
  )
  model = helper.make_model(
    graph,
    opset_imports=[helper.make_opsetid('', opset)],
    producer_name='fracq',
  )
  model.ir_version = min(model.ir_version, 10)  # onnxruntime's supported IR
  onnx.checker.check_model(model, full_check=True)
  return model


def _code_type(lo: int, hi: int, onnx, allow_int4: bool):
  """(ONNX element type, numpy dtype, dtype range) holding codes lo..hi."""
  types = onnx.TensorProto
  candidates = []
  if allow_int4:
    candidates += [(types.INT4, np.int8, -8, 7), (types.UINT4, np.uint8, 0, 15)]
  candidates += [
    (types.INT8, np.int8, -128, 127),
    (types.UINT8, np.uint8, 0, 255),
    (types.INT16, np.int16, -32768, 32767),
    (types.UINT16, np.uint16, 0, 65535),
  ]
  for elem_type, dtype, type_lo, type_hi in candidates:
    if type_lo <= lo and hi <= type_hi:
      return elem_type, dtype, (type_lo, type_hi)
  raise ValueError(f'Codes in [{lo}, {hi}] fit no ONNX quantized type.')


def _act_type(lo, hi, onnx):
  # Activations stay 8-bit (or 16-bit) types: onnxruntime's QDQ kernels are
  # int8 / uint8, and a narrower code range is enforced by a Clip.
  return _code_type(lo, hi, onnx, allow_int4=False)


class _Graph:
  """Accumulates nodes and initializers with unique names."""

  def __init__(
    self, onnx, integer_kernels: bool = False, round_bias: bool = False
  ):
    self.onnx = onnx
    self.integer_kernels = integer_kernels
    self.round_bias = round_bias
    self.nodes, self.inits = [], []
    self.count = 0

  def name(self, base):
    self.count += 1
    return f'{base}_{self.count}'

  def const(self, base, value, elem_type=None):
    """An initializer from a numpy array (``elem_type``: INT4/UINT4)."""
    name = self.name(base)
    value = np.asarray(value)
    if elem_type in (self.onnx.TensorProto.INT4, self.onnx.TensorProto.UINT4):
      import ml_dtypes  # pylint: disable=g-import-not-at-top  (onnx needs it)

      value = value.astype(
        ml_dtypes.int4
        if elem_type == self.onnx.TensorProto.INT4
        else ml_dtypes.uint4
      )
    # raw_data: packed bytes (two 4-bit codes a byte), not varint lists.
    self.inits.append(self.onnx.numpy_helper.from_array(value, name))
    return name

  def node(self, op_type, inputs, base=None, **attrs):
    out = self.name(base or op_type.lower())
    self.nodes.append(
      self.onnx.helper.make_node(
        op_type, inputs, [out], name=self.name(op_type), **attrs
      )
    )
    return out


@dataclasses.dataclass
class _Tensor:
  """A graph tensor holding a program op's integers as float32."""

  name: str
  rank: int
  bound: float  # max |value|
  # the program's integers are the values times 2^acc_shift (a layer's
  # accumulator: its bias is dequantized at 2^-acc_shift)
  acc_shift: int = 0
  # the code range when the tensor is a DequantizeLinear of codes (scale 1,
  # zero point 0): an integer kernel can read it
  codes: tuple[int, int] | None = None


@dataclasses.dataclass
class _Checks:
  """What program_to_onnx reports."""

  int4: int = 0
  exact: bool = True
  integer_kernel_layers: int = 0
  rounded_bias_layers: int = 0


def _kernel_storage(lo: int, hi: int, onnx):
  """(ONNX type, numpy dtype, dtype range) of activation codes an integer
  kernel reads or writes (onnxruntime's QLinearConv / QGemm take uint8 and
  int8), or None when the codes need a wider type."""
  if 0 <= lo and hi <= 255:
    return onnx.TensorProto.UINT8, np.uint8, (0, 255)
  if -128 <= lo and hi <= 127:
    return onnx.TensorProto.INT8, np.int8, (-128, 127)
  return None


def _qdq(
  graph: _Graph,
  tensor,
  y_scale,
  lo,
  hi,
  *,
  axis=None,
  tag='act',
  maxpool=None,
  flatten=False,
):
  """QuantizeLinear(tensor, y_scale) -> codes in [lo, hi] -> float codes.

  ``maxpool``: an op whose ``maxpool`` pools the codes; ``flatten``: the
  codes ``(N, C, 1, 1)`` become ``(N, C)``. Returns the float codes and,
  in integer-kernel graphs, their range (else None): there every reader
  finds a ``DequantizeLinear`` straight after a ``QuantizeLinear`` (the
  pattern onnxruntime fuses into integer kernels), so a narrower range is
  clipped between a ``DequantizeLinear`` and a ``QuantizeLinear`` of scale
  1 (exact on integers) and the max pool and ``Flatten`` act on the
  quantized codes."""
  storage = (
    _kernel_storage(lo, hi, graph.onnx) if graph.integer_kernels else None
  )
  if storage is None:
    _, dtype, (type_lo, type_hi) = _act_type(lo, hi, graph.onnx)
  else:
    _, dtype, (type_lo, type_hi) = storage
  y_scale = np.asarray(y_scale, np.float32)
  zero_point = graph.const(f'{tag}_zp', np.zeros(y_scale.shape, dtype))
  kwargs = {} if axis is None else {'axis': axis}
  codes = graph.node(
    'QuantizeLinear',
    [tensor, graph.const(f'{tag}_scale', y_scale), zero_point],
    f'{tag}_q',
    **kwargs,
  )
  one = graph.const(f'{tag}_one', np.float32(1))
  zero = graph.const(f'{tag}_zp', dtype(0))
  narrow = (lo, hi) != (type_lo, type_hi)  # narrower than the storage type
  clip_range = (
    [
      graph.const(f'{tag}_lo', np.float32(lo)),
      graph.const(f'{tag}_hi', np.float32(hi)),
    ]
    if narrow
    else []
  )
  if storage is None:
    out = graph.node('DequantizeLinear', [codes, one, zero], f'{tag}_dq')
    if narrow:
      out = graph.node('Clip', [out, *clip_range], f'{tag}_clip')
    if flatten:
      out = graph.node('Flatten', [out], f'{tag}_pooled', axis=1)
    if maxpool is not None:
      out = _max_pool(graph, maxpool, out)
    return out, None
  if narrow:
    wide = graph.node('DequantizeLinear', [codes, one, zero], f'{tag}_wide')
    clipped = graph.node('Clip', [wide, *clip_range], f'{tag}_clip')
    codes = graph.node('QuantizeLinear', [clipped, one, zero], f'{tag}_narrow')
  if flatten:
    codes = graph.node('Flatten', [codes], f'{tag}_pooled', axis=1)
  if maxpool is not None:
    codes = _max_pool(graph, maxpool, codes)
  out = graph.node('DequantizeLinear', [codes, one, zero], f'{tag}_dq')
  return out, (int(lo), int(hi))


def _pads(padding, kernel_hw):
  """ONNX Conv padding attributes from the program's padding."""
  if padding is None or (
    isinstance(padding, str) and padding.upper() == 'VALID'
  ):
    return {'pads': [0, 0, 0, 0]}
  if isinstance(padding, str) and padding.upper() == 'SAME':
    return {'auto_pad': 'SAME_UPPER'}  # XLA's SAME: the extra pad at the end
  if isinstance(padding, tuple) and padding and padding[0] == 'INT':
    pad = int(padding[1])
    return {'pads': [pad, pad, pad, pad]}
  pairs = [tuple(int(v) for v in pair) for pair in padding]
  if len(pairs) != len(kernel_hw):
    raise ValueError(
      f'padding={padding} does not match a {len(kernel_hw)}-D kernel.'
    )
  return {'pads': [pair[0] for pair in pairs] + [pair[1] for pair in pairs]}


def _multiplier(op, cout) -> np.ndarray:
  """The real requantization multiplier of ``op`` (f64; per channel
  (``cout``), or a scalar for an add with one shift)."""
  if op.requant[0] == 'shift':
    multiplier = 2.0 ** -np.asarray(op.requant[1], np.float64)
  else:
    _, _, m0, exponent = op.requant
    multiplier = np.asarray(m0, np.float64) * 2.0 ** (
      np.asarray(exponent, np.float64) - 31
    )
  return multiplier if cout is None else np.broadcast_to(multiplier, (cout,))


def _input(graph: _Graph, program: IntegerProgram, input_name: str):
  """The graph input's value info and the quantized input tensor."""
  helper, float_type = graph.onnx.helper, graph.onnx.TensorProto.FLOAT
  first = program.layers[0]
  if first.layer_type == 'Conv':
    if first.kernel.ndim != 4:
      raise ValueError(
        f'{first.path}: only 2-D convolutions are exported '
        f'(kernel {first.kernel.shape}).'
      )
    channels = int(first.kernel.shape[2]) * int(first.feature_group_count)
    info = helper.make_tensor_value_info(
      input_name, float_type, ['N', 'H', 'W', channels]
    )
    tensor = graph.node('Transpose', [input_name], 'nchw', perm=[0, 3, 1, 2])
  else:
    info = helper.make_tensor_value_info(
      input_name, float_type, ['N', int(first.kernel.shape[0])]
    )
    tensor = input_name
  lo, hi = program.input_range
  tensor, code_range = _qdq(
    graph, tensor, np.float32(program.input_scale), lo, hi, tag='input'
  )
  rank = 4 if first.layer_type == 'Conv' else 2
  return info, _Tensor(tensor, rank, max(abs(lo), abs(hi)), codes=code_range)


def _add_sum(graph: _Graph, add: IntAdd, env: dict, checks: _Checks):
  """The aligned sum of an add's operands: int32 operands aligned by left
  shifts, i.e. exact float products by ``2^shift``."""
  tag = add.path.replace('/', '.')
  terms, bound, rank = [], 0.0, None
  for name, shift in zip(add.inputs, add.shifts):
    operand = env[name]
    rank = operand.rank
    term = operand.name
    shift = np.asarray(shift, np.float64) + operand.acc_shift
    if np.any(shift != 0):
      factor = (2.0**shift).astype(np.float32)
      term = graph.node(
        'Mul',
        [
          term,
          graph.const(
            f'{tag}_align',
            factor.reshape(
              (1, -1, 1, 1) if factor.ndim and rank == 4 else factor.shape
            ),
          ),
        ],
        f'{tag}_aligned',
      )
    terms.append(term)
    bound += operand.bound * float(np.max(2.0**shift))
  checks.exact &= bound < EXACT_FLOAT_INT
  return graph.node('Sum', terms, f'{tag}_sum'), rank


def _layer_acc(
  graph: _Graph, layer: IntLayer, source: _Tensor, opset: int, checks
):
  """The float32 Conv / Gemm computing ``layer``'s integer accumulator;
  returns (tensor, rank, accumulator bound)."""
  onnx = graph.onnx
  tag = layer.path.replace('/', '.')
  tensor, rank = source.name, source.rank
  kernel = np.asarray(layer.kernel)
  kernel_type, kernel_dtype, _ = _code_type(
    int(kernel.min(initial=0)),
    int(kernel.max(initial=0)),
    onnx,
    allow_int4=opset >= 21,
  )
  checks.int4 += kernel_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
  reduce_axes = tuple(range(kernel.ndim - 1))
  acc_bound = (
    float(np.max(np.sum(np.abs(kernel.astype(np.int64)), axis=reduce_axes)))
    * source.bound
  )
  checks.exact &= acc_bound < EXACT_FLOAT_INT
  if layer.layer_type == 'Conv':
    if kernel.ndim != 4 or rank != 4:
      raise ValueError(
        f'{layer.path}: only 2-D convolutions on NCHW inputs '
        f'are exported (kernel {kernel.shape}).'
      )
    codes = np.transpose(kernel, (3, 2, 0, 1))  # HWIO -> OIHW
  elif layer.layer_type == 'Dense':
    if kernel.ndim != 2:
      raise ValueError(f'{layer.path}: Dense kernel {kernel.shape} is not 2-D.')
    codes = kernel
    if rank == 4:  # after a global pool the spatial size is 1 x 1
      tensor = graph.node('Flatten', [tensor], f'{tag}_flat', axis=1)
      rank = 2
  else:
    raise ValueError(
      f'{layer.path}: {layer.layer_type} layers are not exported.'
    )
  weights = graph.node(
    'DequantizeLinear',
    [
      graph.const(f'{tag}_kernel', codes.astype(kernel_dtype), kernel_type),
      graph.const(f'{tag}_kernel_scale', np.float32(1)),
      graph.const(f'{tag}_kernel_zp', np.zeros((), kernel_dtype), kernel_type),
    ],
    f'{tag}_kernel_dq',
  )
  inputs = [tensor, weights]
  bias = None
  if layer.bias is not None:
    bias = graph.node(
      'DequantizeLinear',
      [
        graph.const(
          f'{tag}_bias', np.asarray(layer.bias, np.int32).reshape(-1)
        ),
        graph.const(f'{tag}_bias_scale', np.float32(2.0**-layer.acc_shift)),
        graph.const(f'{tag}_bias_zp', np.int32(0)),
      ],
      f'{tag}_bias_dq',
    )
  if layer.layer_type == 'Conv':
    attrs = _pads(layer.padding, kernel.shape[:2])
    attrs.update(
      strides=list(layer.strides or (1, 1)),
      group=int(layer.feature_group_count),
      kernel_shape=[int(kernel.shape[0]), int(kernel.shape[1])],
    )
    if bias is not None:
      inputs.append(bias)
    return graph.node('Conv', inputs, f'{tag}_acc', **attrs), rank, acc_bound
  acc = graph.node('Gemm', inputs, f'{tag}_acc')
  if bias is not None:
    # Added after the Gemm: onnxruntime fuses a Gemm's DequantizeLinear'd
    # int32 bias into QGemm as if it were at the input scale times the
    # kernel scale, whatever its own scale (a Conv's it checks).
    acc = graph.node('Add', [acc, bias], f'{tag}_biased')
  return acc, rank, acc_bound


def _readers(program: IntegerProgram) -> dict:
  """Op path -> the graph-program ops reading its output."""
  out = {}
  for op in program.layers:
    names = list(getattr(op, 'inputs', None) or [])
    src = getattr(op, 'src', None)
    if src is not None:
      names.append(src)
    for name in names:
      out.setdefault(name, []).append(op)
  return out


def _fusable_tail(layer: IntLayer, readers: dict, is_last: bool):
  """The op requantizing ``layer``'s accumulator to codes, when the pair
  can be one integer kernel (onnxruntime's QLinearConv / QGemm): the layer
  itself (chain programs, F8Net), the one :class:`IntRequant` reading it
  (real-multiplier graph programs), or ``layer`` for the last layer (its
  float output); else None (pools, clips before a pool, several readers,
  add operands)."""
  if layer.requant is None and is_last:
    return layer
  tail = layer
  if layer.requant is None:
    reading = readers.get(layer.path, [])
    if len(reading) != 1 or not isinstance(reading[0], IntRequant):
      return None
    tail = reading[0]
  if tail.requant is None or tail.out_range[1] >= 2**16:
    return None
  if tail.pool > 1 or getattr(tail, 'avgpool', None) is not None:
    return None
  if getattr(tail, 'acc_clip', None) is not None:
    return None
  return tail


def _integer_kernel_layer(
  graph: _Graph, layer: IntLayer, tail, source: _Tensor, rank: int, checks
) -> _Tensor | None:
  """``layer`` and its requantization ``tail`` in the form onnxruntime
  runs as one integer kernel (``DequantizeLinear`` of the input codes,
  int8 kernel and int32 bias -> ``Conv`` / ``Gemm`` -> ``QuantizeLinear``),
  or None where that form cannot hold the layer (then the caller writes the
  float form).

  The accumulator's per-channel sign is folded into the kernel and bias
  codes (negated), its real multiplier ``M * 2^acc_shift`` into the
  kernel's per-channel ``DequantizeLinear`` scale, the bias is dequantized
  at that same scale (the input's is 1: onnxruntime's integer-kernel
  pattern) and the output ``QuantizeLinear`` has scale 1, zero point 0; a
  ReLU is the saturation of uint8 codes at 0. The bias keeps whole
  accumulator units only: its ``acc_shift`` fractional bits are rounded
  away (half an accumulator unit at most, counted in
  ``rounded_bias_layers``). The last layer (``tail is layer`` without
  requantization) folds its output scale instead and writes float logits.
  """
  onnx = graph.onnx
  kernel = np.asarray(layer.kernel, np.int64)
  if source.codes is None or kernel.ndim != (4 if rank == 4 else 2):
    return None
  if layer.layer_type not in ('Conv', 'Dense'):
    return None
  if layer.layer_type == 'Dense' and rank != 2:
    return None
  cout = int(kernel.shape[-1])
  head = tail is layer and layer.requant is None
  if head:
    scale = np.broadcast_to(
      np.asarray(layer.out_scale, np.float64).reshape(-1), (cout,)
    )
    sign = np.where(scale < 0, -1, 1)
    scale = np.abs(scale)
  else:
    scale = _multiplier(tail, cout)
    sign = (
      np.broadcast_to(np.asarray(tail.requant[1], np.int64), (cout,))
      if tail.requant[0] == 'mult'
      else np.ones(cout, np.int64)
    )
  scale = (scale * 2.0**layer.acc_shift).astype(np.float32)
  if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
    return None
  codes = kernel * sign
  if codes.min(initial=0) < -128 or codes.max(initial=0) > 127:
    return None
  out_range = None
  if not head:
    lo, hi = tail.out_range
    out_range = (max(lo, 0) if tail.relu else lo, hi)
    if _kernel_storage(*out_range, onnx) is None:
      return None
  bias = (
    np.zeros(cout, np.int64)
    if layer.bias is None
    else np.asarray(layer.bias, np.int64).reshape(-1) * sign
  )
  int_bias = np.round(bias / 2.0**layer.acc_shift)
  if np.any(np.abs(int_bias) >= 2**31):
    return None
  rounded = bool(np.any(int_bias * 2.0**layer.acc_shift != bias))
  if rounded and not graph.round_bias:
    return None
  checks.rounded_bias_layers += rounded
  checks.integer_kernel_layers += 1
  reduce_axes = tuple(range(kernel.ndim - 1))
  acc_bound = float(np.max(np.sum(np.abs(kernel), axis=reduce_axes))) * max(
    abs(v) for v in source.codes
  ) + float(np.max(np.abs(int_bias)))
  checks.exact &= acc_bound < EXACT_FLOAT_INT
  tag = layer.path.replace('/', '.')
  if layer.layer_type == 'Conv':
    codes, axis = np.transpose(codes, (3, 2, 0, 1)), 0  # HWIO -> OIHW
  else:
    axis = 1  # (in, out)
  weights = graph.node(
    'DequantizeLinear',
    [
      graph.const(f'{tag}_kernel', codes.astype(np.int8)),
      graph.const(f'{tag}_kernel_scale', scale),
      graph.const(f'{tag}_kernel_zp', np.zeros(cout, np.int8)),
    ],
    f'{tag}_kernel_dq',
    axis=axis,
  )
  bias_dq = graph.node(
    'DequantizeLinear',
    [
      graph.const(f'{tag}_bias', int_bias.astype(np.int32)),
      graph.const(f'{tag}_bias_scale', scale),
      graph.const(f'{tag}_bias_zp', np.zeros(cout, np.int32)),
    ],
    f'{tag}_bias_dq',
    axis=0,
  )
  inputs = [source.name, weights, bias_dq]
  if layer.layer_type == 'Conv':
    attrs = _pads(layer.padding, kernel.shape[:2])
    attrs.update(
      strides=list(layer.strides or (1, 1)),
      group=int(layer.feature_group_count),
      kernel_shape=[int(kernel.shape[0]), int(kernel.shape[1])],
    )
    acc = graph.node('Conv', inputs, f'{tag}_acc', **attrs)
  else:
    acc = graph.node('Gemm', inputs, f'{tag}_acc')
  if head:
    return _Tensor(acc, rank, 0.0)
  out, code_range = _qdq(
    graph,
    acc,
    np.float32(1),
    *out_range,
    tag=tail.path.replace('/', '.'),
    maxpool=tail if tail.maxpool is not None else None,
  )
  return _Tensor(out, rank, max(abs(v) for v in out_range), codes=code_range)


def _requantize(
  graph: _Graph, op, acc, rank: int, width, acc_shift: int
) -> _Tensor:
  """``[Mul sign] -> [Relu] -> [GlobalAveragePool] -> QDQ [-> MaxPool]``:
  the op's output codes (as float32)."""
  tag = op.path.replace('/', '.')
  channel_shape = (1, -1, 1, 1) if rank == 4 else (1, -1)
  if op.requant[0] == 'mult' and np.any(np.asarray(op.requant[1]) < 0):
    sign = np.broadcast_to(np.asarray(op.requant[1], np.float32), (width,))
    acc = graph.node(
      'Mul',
      [acc, graph.const(f'{tag}_sign', sign.reshape(channel_shape))],
      f'{tag}_signed',
    )
  if op.relu:
    acc = graph.node('Relu', [acc], f'{tag}_relu')
  acc = _acc_clip(graph, op, acc, rank, acc_shift)
  pre_max = isinstance(op, IntRequant) and op.maxpool is not None
  if pre_max:  # before an average pool (max commutes with requantization)
    acc = _max_pool(graph, op, acc)
  acc = _avg_pool(graph, op, acc)
  if op.pool > 1:
    if rank != 4:
      raise ValueError(f'{op.path}: a global pool after a Dense layer.')
    acc = graph.node('GlobalAveragePool', [acc], f'{tag}_pool')
  y_scale = 1.0 / (
    _multiplier(op, width) * op.pool * _window(op) * 2.0**acc_shift
  )
  out_lo, out_hi = op.out_range
  codes, code_range = _qdq(
    graph,
    acc,
    y_scale.astype(np.float32),
    out_lo,
    out_hi,
    axis=1 if y_scale.ndim else None,
    tag=tag,
    # max pool on the codes; (N, C, 1, 1) -> (N, C): what a Dense reader takes
    maxpool=op if op.maxpool is not None and not pre_max else None,
    flatten=op.pool > 1,
  )
  if op.pool > 1:
    rank = 2
  return _Tensor(codes, rank, max(abs(out_lo), abs(out_hi)), codes=code_range)


def _window(op) -> int:
  """Positions an average pool of ``op`` sums (1: none)."""
  avgpool = getattr(op, 'avgpool', None)
  return 1 if avgpool is None else int(np.prod(avgpool[1]))


def _avg_pool(graph: _Graph, op, tensor):
  """``AveragePool`` (zero padding counted) of a requantization's input."""
  avgpool = getattr(op, 'avgpool', None)
  if avgpool is None:
    return tensor
  _, window, strides, pads = avgpool
  return graph.node(
    'AveragePool',
    [tensor],
    f'{op.path.replace("/", ".")}_avgpool',
    kernel_shape=list(window),
    strides=list(strides),
    pads=[pad[0] for pad in pads] + [pad[1] for pad in pads],
    count_include_pad=1,
  )


def _acc_clip(graph: _Graph, op, acc, rank: int, acc_shift: int):
  """``Min`` with a requantization's per-channel accumulator clip (a
  clipped activation before a pool), in the tensor's units."""
  acc_clip = getattr(op, 'acc_clip', None)
  if acc_clip is None:
    return acc
  channel_shape = (1, -1, 1, 1) if rank == 4 else (1, -1)
  top = (np.asarray(acc_clip, np.float64) / 2.0**acc_shift).astype(np.float32)
  return graph.node(
    'Min',
    [
      acc,
      graph.const(
        f'{op.path.replace("/", ".")}_clip', top.reshape(channel_shape)
      ),
    ],
    f'{op.path.replace("/", ".")}_clipped',
  )


def _concat(graph: _Graph, op: IntConcat, env: dict) -> _Tensor:
  """A channel concatenation of codes; in integer-kernel graphs followed by
  a ``QuantizeLinear`` / ``DequantizeLinear`` pair of scale 1 (exact on
  codes) so that a reader finds the pattern of an integer kernel."""
  parts = [env[name] for name in op.inputs]
  tag = op.path.replace('/', '.')
  out = graph.node('Concat', [part.name for part in parts], tag, axis=1)
  bound = max(part.bound for part in parts)
  if not graph.integer_kernels or any(p.codes is None for p in parts):
    return _Tensor(out, parts[0].rank, bound)
  lo = min(part.codes[0] for part in parts)
  hi = max(part.codes[1] for part in parts)
  out, code_range = _qdq(graph, out, np.float32(1), lo, hi, tag=tag)
  return _Tensor(out, parts[0].rank, bound, codes=code_range)


def _requant_op(graph: _Graph, op: IntRequant, source: _Tensor) -> _Tensor:
  """An :class:`IntRequant`: to 8-bit codes like a layer's tail, or to an
  add operand's int32 fixed-point position (``[Mul sign] -> [Relu] ->
  [GlobalAveragePool] -> Mul M -> Round [-> MaxPool]``)."""
  width = int(np.size(op.requant[2]))
  width = width if width > 1 else None
  if op.out_range[1] < 2**16:
    return _requantize(
      graph, op, source.name, source.rank, width, source.acc_shift
    )
  tag = op.path.replace('/', '.')
  if op.avgpool is not None:
    raise ValueError(f'{op.path}: an average pool of an add operand.')
  rank = source.rank
  channel_shape = (1, -1, 1, 1) if rank == 4 else (1, -1)
  acc = source.name
  sign = np.asarray(op.requant[1], np.float32)
  factor = _multiplier(op, width) * op.pool * 2.0**source.acc_shift
  if op.relu:
    if np.any(sign < 0):
      acc = graph.node(
        'Mul',
        [acc, graph.const(f'{tag}_sign', sign.reshape(channel_shape))],
        f'{tag}_signed',
      )
      acc = graph.node('Relu', [acc], f'{tag}_relu')
    else:
      acc = graph.node('Relu', [acc], f'{tag}_relu')
    acc = _acc_clip(graph, op, acc, rank, source.acc_shift)
  else:
    if op.acc_clip is not None:
      raise ValueError(f'{op.path}: a clip without ReLU is not exported.')
    factor = factor * np.broadcast_to(sign, np.shape(factor))
  if op.pool > 1:
    if rank != 4:
      raise ValueError(f'{op.path}: a global pool of a 2-D tensor.')
    acc = graph.node('GlobalAveragePool', [acc], f'{tag}_pool')
  factor = np.asarray(factor, np.float32)
  scaled = graph.node(
    'Mul',
    [
      acc,
      graph.const(
        f'{tag}_mult',
        factor.reshape(channel_shape) if factor.ndim else factor,
      ),
    ],
    f'{tag}_scaled',
  )
  out = graph.node('Round', [scaled], f'{tag}_int')
  if op.pool > 1:
    out = graph.node('Flatten', [out], f'{tag}_pooled', axis=1)
    rank = 2
  if op.maxpool is not None:
    out = _max_pool(graph, op, out)
  bound = source.bound * float(np.max(np.abs(factor)))
  return _Tensor(out, rank, min(bound, float(op.out_range[1])))


def _max_pool(graph: _Graph, op, tensor):
  _, window, strides, pads = op.maxpool
  return graph.node(
    'MaxPool',
    [tensor],
    f'{op.path.replace("/", ".")}_maxpool',
    kernel_shape=list(window),
    strides=list(strides),
    pads=[pad[0] for pad in pads] + [pad[1] for pad in pads],
  )


def _dequantize_output(graph: _Graph, layer: IntLayer, acc, rank, width):
  """The last layer's accumulator times its per-channel output scale."""
  tag = layer.path.replace('/', '.')
  channel_shape = (1, -1, 1, 1) if rank == 4 else (1, -1)
  scale = (
    np.broadcast_to(
      np.asarray(layer.out_scale, np.float64).reshape(-1), (width,)
    )
    * 2.0**layer.acc_shift
  )
  return graph.node(
    'Mul',
    [
      acc,
      graph.const(
        f'{tag}_out_scale', scale.astype(np.float32).reshape(channel_shape)
      ),
    ],
    f'{tag}_out',
  )


def program_to_onnx(
  program: IntegerProgram,
  path: str | None = None,
  *,
  opset: int = 21,
  input_name: str = 'images',
  output_name: str = 'logits',
  report: dict | None = None,
  integer_kernels: bool = True,
  round_bias: bool = False,
):
  """The ONNX QDQ model of ``program`` (see the module docstring).

  Args:
    program: an integer program (:func:`fracq.export.lowering.lower`).
    path: if given, the model is written there.
    opset: ONNX opset (>= 13; >= 21 stores <= 4-bit kernels as INT4/UINT4).
    input_name: the graph input: float32 ``(N, H, W, C)`` images (NHWC, as
      fracq models take them) or ``(N, features)`` for a Dense-first model.
    output_name: the graph output: float32 logits ``(N, classes)``
      (``(N, H, W, C)`` if the program ends with a Conv).
    report: if a dict, filled with ``int4_initializers``,
      ``exact_accumulation`` (every layer's ``sum |w| * max |x|`` is below
      ``2^24``, so the float32 Conv/Gemm sums are exact),
      ``integer_kernel_layers`` (layers in the integer-kernel form) and
      ``rounded_bias_layers`` (of those, layers whose bias was rounded).
    integer_kernels: write the layers that allow it in the form onnxruntime
      runs as integer kernels (``QLinearConv`` / ``QGemm``; see the module
      docstring); False: every layer a float Conv / Gemm on integer values.
    round_bias: with ``integer_kernels``, also write layers whose bias has
      fractional accumulator bits in that form, rounding the bias to whole
      accumulator units (then the graph differs from the program by that
      rounding); False: such layers stay float (exact).
  Returns:
    The ``onnx.ModelProto`` (checked with ``onnx.checker``).
  Raises:
    ImportError: onnx is not installed.
    ValueError: an unsupported layer (non-2-D Conv), opset < 13, or an
      empty program.
  """
  onnx = import_onnx()
  helper = onnx.helper
  if opset < 13:
    raise ValueError(
      f'opset={opset}: per-channel QuantizeLinear needs opset '
      '>= 13 (INT4 kernels need >= 21).'
    )
  if not program.layers:
    raise ValueError('The integer program has no layers.')
  graph = _Graph(onnx, integer_kernels=integer_kernels, round_bias=round_bias)
  in_info, current = _input(graph, program, input_name)
  # op path -> the tensor holding its integers
  env = {INPUT: current}
  checks = _Checks()
  last = len(program.layers) - 1
  readers = _readers(program)
  fused_tails = set()  # requantizations written inside an integer kernel
  for index, op in enumerate(program.layers):
    if isinstance(op, IntConcat):
      current = env[op.path] = _concat(graph, op, env)
      continue
    if op.path in fused_tails:
      current = env[op.path]
      continue
    if isinstance(op, IntLayer) and integer_kernels:
      tail = _fusable_tail(op, readers, index == last)
      source = env[op.src] if op.src is not None else current
      fused = (
        None
        if tail is None
        else _integer_kernel_layer(graph, op, tail, source, source.rank, checks)
      )
      if fused is not None:
        current = env[tail.path] = fused
        if tail is not op:
          fused_tails.add(tail.path)
        if index == last:
          break
        continue
    if isinstance(op, IntRequant):
      current = env[op.path] = _requant_op(graph, op, env[op.src])
      continue
    if isinstance(op, IntAdd):
      acc, rank = _add_sum(graph, op, env, checks)
      width, acc_shift = None, 0
      if op.requant is None:  # read by requantizations: the int32 sum
        bound = sum(env[name].bound for name in op.inputs)
        current = env[op.path] = _Tensor(acc, rank, bound)
        continue
    else:
      source = env[op.src] if op.src is not None else current
      acc, rank, acc_bound = _layer_acc(graph, op, source, opset, checks)
      width, acc_shift = op.kernel.shape[-1], op.acc_shift
      if op.requant is None and index < last:  # read by adds/requants
        current = env[op.path] = _Tensor(
          acc, rank, acc_bound, acc_shift=op.acc_shift
        )
        continue
      if op.requant is None:  # the last layer: dequantize the accumulator
        current = _Tensor(
          _dequantize_output(graph, op, acc, rank, width), rank, 0.0
        )
        break
    current = env[op.path] = _requantize(graph, op, acc, rank, width, acc_shift)
  rank = current.rank
  if rank == 4:  # a Conv-final program: back to channel-last
    graph.node('Transpose', [current.name], 'nhwc', perm=[0, 2, 3, 1])
  graph.nodes[-1].output[0] = output_name
  cout = int(program.layers[-1].kernel.shape[-1])
  out_info = helper.make_tensor_value_info(
    output_name,
    onnx.TensorProto.FLOAT,
    ['N', 'H_out', 'W_out', cout] if rank == 4 else ['N', cout],
  )
  model = checked_model(
    graph.nodes, f'fracq_{program.kind}', in_info, out_info, graph.inits, opset
  )
  if report is not None:
    report.update(
      int4_initializers=int(checks.int4),
      exact_accumulation=bool(checks.exact),
      integer_kernel_layers=int(checks.integer_kernel_layers),
      rounded_bias_layers=int(checks.rounded_bias_layers),
    )
  if path is not None:
    onnx.save(model, path)
  return model


def run_onnx(model, x) -> np.ndarray:
  """Runs an ONNX model (proto or path) on ``x`` with onnxruntime's CPU."""
  try:
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
      'Running the ONNX export needs onnxruntime (pip install onnxruntime).'
    ) from e
  blob = model if isinstance(model, str) else model.SerializeToString()
  sess = ort.InferenceSession(blob, providers=['CPUExecutionProvider'])
  name = sess.get_inputs()[0].name
  return sess.run(None, {name: np.asarray(x, np.float32)})[0]


def export_onnx(
  wrapper,
  variables,
  sample_x,
  path: str,
  *,
  opset: int = 21,
  overwrite: bool = False,
  check: bool = True,
  program: IntegerProgram | None = None,
  integer_kernels: bool = True,
  round_bias: bool = False,
) -> dict:
  """Lowers a trained model, writes its ONNX QDQ export and measures it.

  Args:
    wrapper: a quantized model wrapper (uniform QAT, FracBits or F8Net).
    variables: its variables.
    sample_x: a batch (NHWC) used to verify the lowering and, with ``check``,
      to compare onnxruntime's output with the integer program's.
    path: the ``.onnx`` file to write.
    opset: ONNX opset (21 for INT4 kernels).
    overwrite: replace an existing file.
    check: run the export in onnxruntime (needs onnxruntime).
    program: an already lowered program of this model (skips lowering).
    integer_kernels: see :func:`program_to_onnx`.
    round_bias: see :func:`program_to_onnx`.
  Returns:
    ``onnx_bytes`` (on disk), ``onnx_opset``, ``onnx_int4_initializers``,
    ``onnx_exact_accumulation``, ``onnx_integer_kernel_layers``,
    ``onnx_rounded_bias_layers`` and, with ``check``,
    ``onnx_prediction_match`` (fraction of ``sample_x`` where onnxruntime's
    argmax equals the integer program's) and ``onnx_max_logit_diff_rel``
    (max |logit difference| / the program's logit range) and
    ``onnx_fake_quant_prediction_match`` / ``..._max_logit_diff_rel`` (the
    same against the fake-quantized model).
  Raises:
    ImportError: onnx (or, with ``check``, onnxruntime) is not installed.
    ValueError: the model has no integer lowering (the error of
      :func:`fracq.export.lowering.lower`).
    FileExistsError: ``path`` exists and not ``overwrite``.
  """
  import_onnx()
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it.')
  batch = np.asarray(sample_x, np.float32)
  if program is None:
    program = lower(wrapper, variables, batch)
  info = {}
  program_to_onnx(
    program,
    path,
    opset=opset,
    report=info,
    integer_kernels=integer_kernels,
    round_bias=round_bias,
  )
  rep = {
    'onnx_bytes': os.path.getsize(path),
    'onnx_opset': opset,
    'onnx_int4_initializers': info['int4_initializers'],
    'onnx_exact_accumulation': info['exact_accumulation'],
    'onnx_integer_kernel_layers': info['integer_kernel_layers'],
    'onnx_rounded_bias_layers': info['rounded_bias_layers'],
  }
  if check:
    got = run_onnx(path, batch)
    ref = np.asarray(program.logits(batch))
    span = float(np.ptp(ref)) or 1.0
    rep['onnx_prediction_match'] = float(
      np.mean(got.argmax(-1) == ref.argmax(-1))
    )
    rep['onnx_max_logit_diff_rel'] = (
      float(np.max(np.abs(got - ref)) / span) if got.size else 0.0
    )
    sim = np.asarray(wrapper.apply(variables, batch, train=False))
    rep['onnx_fake_quant_prediction_match'] = float(
      np.mean(got.argmax(-1) == sim.argmax(-1))
    )
    rep['onnx_fake_quant_max_logit_diff_rel'] = (
      float(np.max(np.abs(got - sim)) / (float(np.ptp(sim)) or 1.0))
      if got.size
      else 0.0
    )
  return rep
