"""The integer program format and its integer-only runtime.

A *program* is a model as a sequence of integer ops. Each
:class:`IntLayer` reads integer activation codes (uint8 / int8), multiplies
them with integer kernel codes into an int32 accumulator
(``preferred_element_type=jnp.int32``), adds an int32 bias, optionally
applies ReLU and a global-average-pool *sum*, and requantizes the
accumulator to the next op's codes, either by a rounding right shift
(``('shift', shift)``: power-of-two scales, F8Net) or by a fixed-point real
multiplier (``('mult', sign, m0, exponent)``: arbitrary scales, uniform QAT
and FracBits; :func:`fracq.core.integer.requantize` applies
``M0 * 2^(exponent - 31)`` exactly in integers).

A *chain* program's layers each read the previous layer's output. A *graph*
program (residual nets) names each layer's input (``IntLayer.src``: an
earlier op's path, or ``'input'``) and has :class:`IntAdd` ops, which shift
their int32 operands left to a common fixed-point position (exact), add,
and go through the same ReLU / pool / requantization tail as a layer.
Real-multiplier graph programs (uniform QAT and FracBits residual nets,
where every reader quantizes at its own step) keep each layer's and add's
int32 accumulator and read it through :class:`IntRequant` ops: a sign, ReLU,
pool, exact fixed-point multiplier and clamp, to a reader's 8-bit codes or
to an add's common int32 fixed-point position (the add then sums aligned
int32 operands).

Programs are produced by :mod:`fracq.export.lowering`, written and read by
:mod:`fracq.export.serialization` and translated to ONNX by
:mod:`fracq.export.onnx_export`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fracq.core import integer as ints
from fracq.graph.structure import avg_pool_sum
from fracq.graph.structure import max_pool

INPUT = 'input'  # the name of the program's input in graph programs


@dataclasses.dataclass
class IntLayer:
  """One integer Conv / Dense layer of a program.

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
      layer, whose int32 accumulator is the output (and for graph layers
      whose accumulator feeds an add).
    out_range: ``(qmin, qmax)`` of the next layer's input codes.
    out_scale: real value of one accumulator unit of the last layer (per
      channel), for dequantizing the output.
    acc_shift: the accumulator is shifted left by this many bits before the
      bias is added, so the bias (and everything after) keeps ``acc_shift``
      more fractional bits (real-multiplier programs: a bias rounded to
      whole accumulator units would shift every output by up to half a unit).
    src: graph programs: the op whose output this layer reads (``'input'``
      for the program input); None in chain programs.
    maxpool: a max pool of the output codes (graph programs: e.g. the 3x3
      /2 stem pool of ImageNet ResNets), ``('max', window, strides,
      padding)``; max commutes with the monotone requantization, so pooling
      codes equals quantizing the pooled values.
    kernel_bits: the storage width of the kernel codes when written to disk
      (one width, or one per output channel, e.g. kernel-wise FracBits
      bits); None: the narrowest width holding the codes.
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
  kernel_bits: int | list[int] | None = None


@dataclasses.dataclass
class IntAdd:
  """A residual add of a graph program.

  Each input (a previous op's output, by path: int32 accumulators of
  layers without ``requant``, or 8-bit codes) is shifted left by its
  ``shifts`` entry (alignment to the finest operand's fixed-point position,
  exact; saturated to int32) and the int32 sum goes through the same tail as
  a layer: optional ReLU, global-pool sum, rounding right shift ``requant``
  and clamp to ``out_range``.
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
class IntRequant:
  """A requantization of an earlier op's output in a graph program.

  Reads ``src`` (an int32 accumulator, or codes), multiplies each channel by
  its sign, applies ReLU, an optional global-average-pool sum, the exact
  fixed-point multiplier of ``requant`` (``('mult', sign, m0, exponent)``),
  the clamp to ``out_range``, with an optional max pool (before the
  multiplier: max commutes with the monotone requantization): a
  reader's input codes (an 8-bit range, narrowed by a clipped activation
  such as ReLU6) or an add operand at the add's common int32 fixed-point
  position (``out_range`` beyond 16 bits). ``acc_clip`` (per channel, in
  units of the signed input) clamps the input after ReLU, before a pool
  sum: a clipped activation that is then averaged. ``avgpool``
  (``('avg', window, strides, padding)``, zero padding counted) sums each
  window of the input before the multiplier, which includes the division
  by the window size.
  """

  path: str
  src: str
  requant: tuple
  out_range: tuple[int, int]
  relu: bool = False
  pool: int = 1
  maxpool: tuple | None = None
  acc_clip: np.ndarray | None = None
  avgpool: tuple | None = None
  layer_type: str = 'Requant'
  out_scale: np.ndarray | None = None


@dataclasses.dataclass
class IntConcat:
  """A channel concatenation of earlier ops' codes (graph programs): the
  parts are requantized to one scale (the reader's) first."""

  path: str
  inputs: list[str]
  layer_type: str = 'Concat'
  out_scale: np.ndarray | None = None


@dataclasses.dataclass
class IntegerProgram:
  """An integer-only model: input quantization, ops, output scale.

  See the module docstring for chain and graph programs; every op's output
  of a graph program is kept under its path.
  """

  layers: list[IntLayer | IntAdd | IntRequant | IntConcat]
  input_scale: float  # real value of one input code
  input_range: tuple[int, int]
  kind: str  # the lowering that produced it: 'f8net' or 'qat'
  # What the lowering's check measured on its sample batch (a
  # :class:`fracq.export.lowering.Verification`); not written to disk.
  verification: Any = dataclasses.field(default=None, compare=False)

  def quantize_input(self, x) -> jax.Array:
    """Float images -> input codes (the only float op, at the boundary)."""
    lo, hi = self.input_range
    codes = jnp.clip(
      jnp.round(jnp.asarray(x, jnp.float32) / jnp.float32(self.input_scale)),
      lo,
      hi,
    )
    return codes.astype(code_dtype(lo, hi))

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
    return self.dequantize(integer_forward(self, self.quantize_input(x)))

  def dequantize(self, acc) -> jax.Array:
    """The last layer's int32 accumulator -> real-valued logits."""
    scale = np.asarray(self.layers[-1].out_scale, np.float32)
    if scale.size == 1:
      scale = scale.reshape(())
    return acc.astype(jnp.float32) * _along_last(scale, acc.ndim)

  def replay(self, x, teacher: dict) -> tuple[jax.Array, dict]:
    """Runs the program with every layer reading given input codes.

    ``teacher`` maps a layer's path to the input codes it should read (the
    fake-quantized model's own codes of that layer's input). Each layer
    listed reads those codes instead of what the program computed for it,
    so an error cannot propagate from one layer to the next: a lowering
    that models every layer right reproduces each layer's codes up to
    rounding ties, however deep the model.

    Returns:
      The dequantized logits and, per layer in ``teacher``, how the codes
      the program computed for its input compare with the teacher's:
      ``{'max_diff': largest |difference| in codes, 'differing': how many
      codes differ, 'codes': how many there are}``.
    """
    report = {}
    acc = integer_forward(self, self.quantize_input(x), teacher, report)
    return self.dequantize(acc), report

  def summary(self) -> str:
    """One line per op: type, kernel, bias, ReLU, pool, requantization."""
    lines = [
      f'{"layer":<20} {"type":<6} {"kernel":<18} {"bias":<5} '
      f'{"relu":<5} {"pool":>4}  requant'
    ]
    lines += [_summary_line(op) for op in self.layers]
    return '\n'.join(lines)


def _summary_line(op) -> str:
  if isinstance(op, IntConcat):
    return f'{op.path:<20} {"Concat":<6} {"+".join(op.inputs)}'
  if isinstance(op, IntRequant):
    lo, hi = op.out_range
    target = f'[{lo}, {hi}]' if hi < 2**16 else 'int32'
    maxpool = (
      ''
      if op.maxpool is None
      else f', max pool {"x".join(map(str, op.maxpool[1]))} /{op.maxpool[2][0]}'
    )
    return (
      f'{op.path:<20} {"Requant":<6} {op.src:<18} {"-":<5} '
      f'{str(op.relu):<5} {op.pool:>4}  mult -> {target}{maxpool}'
    )
  if isinstance(op, IntAdd):
    return (
      f'{op.path:<20} {"Add":<6} '
      f'{"+".join(op.inputs):<18} {"-":<5} {str(op.relu):<5} '
      f'{op.pool:>4}  '
      f'{"-" if op.requant is None else op.requant[0]}'
    )
  requant = '-' if op.requant is None else op.requant[0]
  if op.requant is not None and op.requant[0] == 'shift':
    shifts = np.unique(np.asarray(op.requant[1]))
    requant = (
      f'>> {shifts[0]}'
      if shifts.size == 1
      else f'>> {shifts.min()}..{shifts.max()}'
    )
  if op.maxpool is not None:
    requant += (
      f', max pool {"x".join(map(str, op.maxpool[1]))} /{op.maxpool[2][0]}'
    )
  return (
    f'{op.path:<20} {op.layer_type:<6} '
    f'{str(op.kernel.dtype) + str(list(op.kernel.shape)):<18} '
    f'{"int32" if op.bias is not None else "-":<5} '
    f'{str(op.relu):<5} {op.pool:>4}  {requant}'
  )


def code_dtype(lo: int, hi: int):
  """The narrowest integer dtype holding codes ``lo..hi``."""
  if lo >= 0 and hi <= 255:
    return jnp.uint8
  if lo >= -128 and hi <= 127:
    return jnp.int8
  return jnp.int16 if -32768 <= lo and hi <= 32767 else jnp.int32


def _along_last(values, ndim):
  values = jnp.asarray(values)
  if values.ndim == 0:
    return values
  return values.reshape((1,) * (ndim - 1) + (values.shape[0],))


def _tail(op: IntLayer | IntAdd | IntRequant, acc):
  """ReLU, pool sum, requantization and clamp of an int32 accumulator."""
  if op.requant is None:
    return acc
  if op.requant[0] == 'mult':  # negative BN scales flip a channel
    acc = acc * _along_last(jnp.asarray(op.requant[1], jnp.int32), acc.ndim)
  if op.relu:
    acc = jnp.maximum(acc, 0)
  acc_clip = getattr(op, 'acc_clip', None)
  if acc_clip is not None:
    acc = jnp.minimum(
      acc, _along_last(jnp.asarray(acc_clip, jnp.int32), acc.ndim)
    )
  requant_op = isinstance(op, IntRequant)
  if requant_op and op.maxpool is not None:  # max commutes with requant
    acc = max_pool(acc, op.maxpool)
  if requant_op and op.avgpool is not None:
    acc = avg_pool_sum(acc, op.avgpool)
  if op.pool > 1:
    acc = jnp.sum(acc, axis=tuple(range(1, acc.ndim - 1)), dtype=jnp.int32)
  lo, hi = op.out_range
  if op.requant[0] == 'shift':
    out = ints.shift_fraclen(acc, jnp.asarray(op.requant[1], jnp.int32))
    out = jnp.clip(out, lo, hi)
  else:
    _, _, m0, exponent = op.requant
    out = ints.requantize(
      acc, jnp.asarray(m0), jnp.asarray(exponent), 0, lo, hi
    )
  out = out.astype(code_dtype(lo, hi))
  return out if op.maxpool is None or requant_op else max_pool(out, op.maxpool)


def _layer_acc(layer: IntLayer, codes):
  """The int32 accumulator of ``layer`` on its input codes (with bias)."""
  if layer.layer_type == 'Conv':
    padding = layer.padding
    if isinstance(padding, tuple) and padding and padding[0] == 'INT':
      padding = ((padding[1], padding[1]),) * (codes.ndim - 2)
    acc = ints.int_conv(
      codes,
      jnp.asarray(layer.kernel),
      layer.strides,
      padding,
      layer.feature_group_count,
    )
  else:
    if codes.ndim > 2 and all(d == 1 for d in codes.shape[1:-1]):
      # A Dense reading a 1 x 1 map: the global pool of one position
      # (pool=1) leaves the codes as they are; drop the unit spatial axes,
      # as the ONNX export's Flatten does.
      codes = codes.reshape(codes.shape[0], codes.shape[-1])
    acc = ints.int_dense(codes, jnp.asarray(layer.kernel))
  if layer.acc_shift:
    acc = acc << layer.acc_shift
  if layer.bias is not None:
    acc = acc + _along_last(jnp.asarray(layer.bias, jnp.int32), acc.ndim)
  return acc


def _add_acc(add: IntAdd, env):
  """The aligned int32 sum of an add's operands."""
  acc = None
  for name, shift in zip(add.inputs, add.shifts):
    term = ints.shift_fraclen(env[name], -jnp.asarray(shift, jnp.int32))
    acc = term if acc is None else acc + term
  return acc


def _taught(path: str, codes, teacher, report):
  """``codes`` (a layer's input), or the teacher's codes for ``path`` with
  the comparison recorded in ``report``."""
  if teacher is None or path not in teacher:
    return codes
  expected = np.asarray(teacher[path])
  if expected.size != codes.size:
    raise ValueError(
      f'{path}: the teacher gives {expected.shape} input codes, the program '
      f'computes {tuple(codes.shape)}.'
    )
  expected = expected.reshape(codes.shape).astype(np.int64)
  diff = np.abs(np.asarray(codes).astype(np.int64) - expected)
  report[path] = {
    'max_diff': int(diff.max(initial=0)),
    'differing': int(np.count_nonzero(diff)),
    'codes': int(diff.size),
  }
  return jnp.asarray(expected).astype(codes.dtype)


def _graph_forward(
  program: IntegerProgram, codes, teacher=None, report=None
) -> jax.Array:
  env = {INPUT: codes}
  out = codes
  for op in program.layers:
    if isinstance(op, IntAdd):
      acc = _add_acc(op, env)
    elif isinstance(op, IntRequant):
      acc = jnp.asarray(env[op.src]).astype(jnp.int32)
    elif isinstance(op, IntConcat):
      env[op.path] = jnp.concatenate([env[name] for name in op.inputs], -1)
      continue
    else:
      src = env[op.src if op.src is not None else INPUT]
      acc = _layer_acc(op, _taught(op.path, src, teacher, report))
    out = _tail(op, acc)
    env[op.path] = out
  return out


def is_graph(program: IntegerProgram) -> bool:
  """Whether ``program`` has adds or named inputs (else it is a chain)."""
  return any(
    isinstance(op, (IntAdd, IntRequant, IntConcat)) or op.src is not None
    for op in program.layers
  )


def integer_forward(
  program: IntegerProgram, codes, teacher=None, report=None
) -> jax.Array:
  """Runs ``program`` on integer input codes; returns the int32 output.

  ``teacher`` / ``report``: see :meth:`IntegerProgram.replay`.
  """
  if is_graph(program):
    return _graph_forward(program, codes, teacher, report)
  out = codes
  for layer in program.layers:
    out = _tail(
      layer, _layer_acc(layer, _taught(layer.path, out, teacher, report))
    )
    if layer.requant is None:  # the int32 accumulator of the last layer
      return out
  return out  # a truncated program (e.g. for debugging) ends in codes
