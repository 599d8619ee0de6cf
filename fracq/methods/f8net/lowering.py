"""Integer lowering of F8Net models: power-of-two scales, bit-exact.

Every F8Net scale is a power of two, so the requantization is a rounding
right shift (``FL_in + FL_w - FL_next``, plus ``log2(k)`` after a k-element
pool sum) and a clamp. The simulated fixed-point model computes exactly the
same numbers, so predictions *and* logits agree bit for bit (checked at
lowering time).

Chains lower to chain programs. Models with residual adds (ResNet basic and
bottleneck blocks with identity or 1x1-conv/BN projection shortcuts, and
max pools such as the ImageNet stem's, which run on the codes; tested on
ResNet-20, ``resnet_tiny`` and ``resnet_tiny_bottleneck``) lower to *graph*
programs: each layer names its input, and an :class:`IntAdd` shifts its
int32 operands left to the finest operand's FL (exact), adds, applies ReLU
and requantizes with a rounding right shift. The data flow comes from the
probe (:func:`probe_structure`: a module whose output is ``[relu](its
dangling branch outputs [+ its input])``), and the F8Net simulation
quantizes such a module's input once, so the shortcut reads the same 8-bit
tensor as the convs and the program stays bit-exact. The structure is read
from one probe of the model and then *verified*: lowering runs the program
next to the fake-quantized model on the sample batch and raises if they
disagree, so an unsupported model gets an error, never a silently wrong
integer model.

The lowering registers itself with :mod:`fracq.export.lowering` (method
``'f8net'``, wrapper :class:`~fracq.methods.f8net.F8NetModel`) when this
module is imported, which importing :mod:`fracq.export` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from fracq.core import fixed_point as fxp
from fracq.export.lowering.common import chain_link
from fracq.export.lowering.common import refuse_clipping
from fracq.export.lowering.common import verify_program
from fracq.export.lowering.registry import register_lowering
from fracq.export.program import INPUT
from fracq.export.program import IntAdd
from fracq.export.program import IntegerProgram
from fracq.export.program import IntLayer
from fracq.graph.structure import Structure
from fracq.graph.structure import conv_padding
from fracq.graph.structure import is_max_pool
from fracq.graph.structure import probe_structure
from fracq.methods.f8net.model import F8NetModel

if TYPE_CHECKING:
  from fracq.methods.f8net.provider import LayerRecord

__all__ = ['lower_f8net']


def _input_range(signed: bool, code_max: int | None) -> tuple[int, int]:
  """Code range of a layer's 8-bit fixed-point input; a PACT clip (folded
  into the producer, see fracq.methods.f8net) lowers the top code to
  ``code_max = min(255, 2^FL)``."""
  lo, hi = fxp.fixed_point_range(signed)
  return (lo, hi if code_max is None else min(hi, int(code_max)))


def _pool_shift(path: str, pool: int) -> int:
  """``log2(pool)``: the shift of a global-average-pool sum."""
  shift = int(round(math.log2(pool)))
  if 2**shift != pool:
    raise ValueError(
      f'{path}: a {pool}-element average pool is not a power-of-two shift; '
      'F8Net folds its correction into the next layer, which the simulated '
      'model does not do yet.'
    )
  return shift


def _layer(record: LayerRecord, src: str | None = None) -> IntLayer:
  """The integer layer of a captured record (no requantization yet)."""
  return IntLayer(
    path=record.path,
    layer_type=record.layer_type,
    kernel=np.asarray(record.kernel_codes, np.int8),
    bias=None
    if record.bias_codes is None
    else np.asarray(record.bias_codes, np.int32).reshape(-1),
    strides=None if record.strides is None else tuple(record.strides),
    padding=conv_padding(record.padding),
    feature_group_count=int(record.feature_group_count),
    src=src,
  )


def _acc_fl(record: LayerRecord) -> np.ndarray:
  """The fractional length of a layer's int32 accumulator (per channel)."""
  return np.asarray(record.input_fl) + np.asarray(record.weight_fl)


def _out_scale(acc_fl) -> np.ndarray:
  return (2.0 ** (-np.asarray(acc_fl).astype(np.float64))).astype(np.float32)


@register_lowering('f8net', F8NetModel)
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
  batch = jnp.asarray(sample_x)
  records = f8model.capture(variables, batch[:1])
  structure = probe_structure(f8model.module, variables, batch, train=False)
  refuse_clipping(f8model.module, variables, batch, {'train': False})
  if [record.path for record in records] != structure.order:
    raise ValueError(
      'Every Conv/Dense must be quantized for integer-only '
      f'inference; quantized {[record.path for record in records]}, model '
      f'has {structure.order} (check keep_float).'
    )
  if structure.adds or any(
    src is not None and is_max_pool(src[2]) for src in structure.srcs.values()
  ):
    program = _lower_graph(records, structure)
  else:
    program = _lower_chain(records, structure)
  if verify:
    ref = f8model.apply(variables, batch, train=False)
    verify_program(program, ref, batch, exact=True, atol=0.0)
  return program


def _lower_chain(records: list[LayerRecord], structure: Structure):
  layers = []
  for index, record in enumerate(records):
    layer = _layer(record)
    if index + 1 < len(records):
      reader = records[index + 1]
      layer.relu, layer.pool = chain_link(structure, index)
      pool_shift = _pool_shift(record.path, layer.pool) if layer.pool > 1 else 0
      layer.requant = (
        'shift',
        (_acc_fl(record) + pool_shift - reader.input_fl).astype(np.int32),
      )
      layer.out_range = _input_range(reader.signed_input, reader.input_code_max)
    else:
      layer.out_scale = _out_scale(_acc_fl(record))
    layers.append(layer)
  first = records[0]
  return IntegerProgram(
    layers=layers,
    input_scale=2.0**-first.input_fl,
    input_range=fxp.fixed_point_range(first.signed_input),
    kind='f8net',
  )


@dataclasses.dataclass(frozen=True)
class _Read:
  """How a tensor is read by layers: every reader of one tensor must read
  the same quantized codes."""

  fl: int
  relu: bool
  pool: object  # int (global-pool size) or a max-pool spec
  signed: bool
  code_max: int | None


def _reads(structure: Structure, records: dict[str, LayerRecord]):
  """Tensor name -> :class:`_Read` of its layer readers."""
  reads = {}
  for kind, path in structure.ops:
    if kind != 'layer':
      continue
    src = structure.srcs.get(path)
    if src is None:
      raise ValueError(
        f'{path}: its input is not an earlier layer, add or the '
        'model input (possibly after ReLU / global average '
        'pool); the model is neither a chain nor a residual '
        'graph the integer lowering supports (max pooling, '
        'concatenation, ...).'
      )
    name, relu, pool = src
    record = records[path]
    read = _Read(
      fl=int(record.input_fl),
      relu=bool(relu),
      pool=pool,
      signed=bool(record.signed_input),
      code_max=record.input_code_max,
    )
    if reads.setdefault(name, read) != read:
      raise ValueError(
        f'{name} is read as {dataclasses.astuple(reads[name])} and as '
        f'{dataclasses.astuple(read)} (FL, relu, pool, signed, clip): its '
        'readers do not share one quantized tensor.'
      )
  return reads


def _lower_graph(records: list[LayerRecord], structure: Structure):
  """Graph program of an F8Net model with residual adds (see
  :class:`IntAdd`): the data flow comes from the probe (``structure.srcs``,
  ``structure.adds``); every tensor has one FL shared by its readers, so
  each op requantizes once, to that FL."""
  by_path = {record.path: record for record in records}
  acc_fl = {path: _acc_fl(record) for path, record in by_path.items()}
  reads = _reads(structure, by_path)
  operands = {
    operand for add in structure.adds.values() for operand in add['operands']
  }
  both = operands & set(reads)
  if both:
    raise ValueError(
      f'{sorted(both)} feed both an add and a layer; not '
      'supported by the integer lowering.'
    )
  ops, sequence = {}, []
  for kind, path in structure.ops:
    if kind == 'layer':
      op = _layer(by_path[path], src=structure.srcs[path][0])
    else:
      op, acc_fl[path] = _add(path, structure.adds[path], acc_fl, reads)
    ops[path] = op
    sequence.append(op)
  for name, read in reads.items():
    if name == INPUT:
      continue
    op, pool = ops[name], read.pool
    if is_max_pool(pool):
      op.maxpool, pool = pool, 1
    op.relu = op.relu or read.relu
    op.pool = pool
    op.requant = (
      'shift',
      np.asarray(acc_fl[name] + _pool_shift(name, pool) - read.fl, np.int32),
    )
    op.out_range = _input_range(read.signed, read.code_max)
  last = sequence[-1]
  if last.path in reads or not isinstance(last, IntLayer):
    raise ValueError('The program must end in a Conv/Dense layer.')
  last.out_scale = _out_scale(acc_fl[last.path])
  if INPUT not in reads:
    raise ValueError('No layer reads the model input directly.')
  first = reads[INPUT]
  return IntegerProgram(
    layers=sequence,
    input_scale=2.0**-first.fl,
    input_range=fxp.fixed_point_range(first.signed),
    kind='f8net',
  )


def _add(path: str, add: dict, acc_fl: dict, reads: dict):
  """The :class:`IntAdd` of a residual module and its output's FL (the
  finest operand's)."""
  names = list(add['operands'])
  fls = [acc_fl[name] for name in names]
  if add['identity'] is not None:
    shortcut = add['identity'][0]
    if shortcut not in reads or add['identity'][2] != reads[shortcut].pool:
      raise ValueError(
        f'{path}: its shortcut {shortcut} is not a quantized '
        'tensor read by a layer.'
      )
    names.append(shortcut)
    fls.append(np.asarray(reads[shortcut].fl))
  top = fls[0]
  for fl in fls[1:]:
    top = np.maximum(top, fl)
  op = IntAdd(
    path=path,
    inputs=names,
    shifts=[np.asarray(top - fl, np.int32) for fl in fls],
    relu=bool(add['relu']),
  )
  return op, top
