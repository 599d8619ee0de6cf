"""Integer programs on disk: :func:`save_program` and :func:`load_program`.

A program is written as a packed artifact (:mod:`fracq.export.artifact`,
checksummed safetensors): kernels bit-packed at their storage widths, int32
biases, requantization multipliers and shifts stored exactly (bit-cast into
the float blob, names ending ``.i32``), and the op list in the manifest's
``metadata['program']``. Chain programs keep the original format
(:data:`PROGRAM_FORMAT`); graph programs (named inputs, adds, requantizations) are
:data:`GRAPH_FORMAT`.
"""

from __future__ import annotations

import numpy as np

from fracq.export import artifact
from fracq.export.program import IntAdd
from fracq.export.program import IntConcat
from fracq.export.program import IntegerProgram
from fracq.export.program import IntLayer
from fracq.export.program import IntRequant
from fracq.export.program import is_graph

PROGRAM_FORMAT = 'fracq-integer-program-1'  # chains
GRAPH_FORMAT = 'fracq-integer-program-2'  # graphs (named inputs, adds)
_REQUANT_MULT_PARTS = ('sign', 'm0', 'exp')


def _maxpool_json(spec):
  if spec is None:
    return None
  _, window, strides, pads = spec
  return {
    'window': list(window),
    'strides': list(strides),
    'padding': [list(pad) for pad in pads],
  }


def _maxpool_spec(entry, kind='max'):
  if entry is None:
    return None
  return (
    kind,
    tuple(entry['window']),
    tuple(entry['strides']),
    tuple(tuple(pad) for pad in entry['padding']),
  )


def _i32_as_f32(values):
  """int32 tensors ride in the artifact's float32 blob bit-cast (exact)."""
  return np.ascontiguousarray(np.asarray(values, np.int32)).view(np.float32)


def _f32_as_i32(values):
  return np.ascontiguousarray(np.asarray(values, np.float32)).view(np.int32)


def _scalar_if_single(values):
  return values.reshape(()) if values.size == 1 else values


def kernel_code_bits(kernel: np.ndarray) -> tuple[int, bool]:
  """Smallest two's-complement (or unsigned) width holding every code, and
  whether it is signed."""
  lo, hi = int(kernel.min(initial=0)), int(kernel.max(initial=0))
  if lo >= 0:
    return max(1, hi.bit_length()), False
  return max(2, max((-lo - 1).bit_length(), hi.bit_length()) + 1), True


def storage_bits(layer: IntLayer, kernel_bits: dict | None = None):
  """The width ``layer``'s kernel is stored at: ``kernel_bits[path]``, else
  the layer's own ``kernel_bits``, else the narrowest width of its codes."""
  bits = (kernel_bits or {}).get(layer.path, layer.kernel_bits)
  if bits is None:
    bits = kernel_code_bits(np.asarray(layer.kernel))[0]
  return bits


def theoretical_bytes(
  program: IntegerProgram, kernel_bits: dict | None = None
) -> float:
  """Kernel codes at their storage bits (:func:`storage_bits`) plus the
  int32 biases, requantization parameters and float32 output scales."""
  total = 0.0
  for op in program.layers:
    if isinstance(op, IntConcat):
      continue
    if isinstance(op, IntRequant):
      total += 4 * sum(np.size(part) for part in op.requant[1:])
      total += 0 if op.acc_clip is None else 4 * np.size(op.acc_clip)
      continue
    if isinstance(op, IntAdd):
      total += 4 * sum(np.size(shift) for shift in op.shifts)
      total += 0 if op.requant is None else 4 * np.size(op.requant[1])
      continue
    bits = storage_bits(op, kernel_bits)
    # params x bits / 8, channel by channel (output channels on the last
    # axis).
    total += op.kernel.size / np.size(bits) * float(np.sum(bits)) / 8
    total += 0 if op.bias is None else 4 * op.bias.size
    if op.requant is not None:
      total += 4 * sum(np.size(part) for part in op.requant[1:])
    if op.out_scale is not None:
      total += 4 * np.size(op.out_scale)
  return total


def _add_entry(add: IntAdd, floats: dict) -> dict:
  for i, shift in enumerate(add.shifts):
    floats[f'{add.path}/add_shift{i}.i32'] = _i32_as_f32(np.atleast_1d(shift))
  if add.requant is not None:
    floats[f'{add.path}/shift.i32'] = _i32_as_f32(np.atleast_1d(add.requant[1]))
  if add.out_scale is not None:
    floats[f'{add.path}/out_scale'] = np.atleast_1d(
      np.asarray(add.out_scale, np.float32)
    )
  return {
    'path': add.path,
    'type': 'Add',
    'inputs': add.inputs,
    'relu': bool(add.relu),
    'pool': int(add.pool),
    'maxpool': _maxpool_json(add.maxpool),
    'out_range': None if add.out_range is None else list(add.out_range),
    'requant': None if add.requant is None else add.requant[0],
  }


def _requant_entry(op: IntRequant, floats: dict) -> dict:
  for name, values in zip(_REQUANT_MULT_PARTS, op.requant[1:]):
    floats[f'{op.path}/{name}.i32'] = _i32_as_f32(np.atleast_1d(values))
  if op.acc_clip is not None:
    floats[f'{op.path}/acc_clip.i32'] = _i32_as_f32(np.atleast_1d(op.acc_clip))
  return {
    'path': op.path,
    'type': 'Requant',
    'src': op.src,
    'relu': bool(op.relu),
    'pool': int(op.pool),
    'maxpool': _maxpool_json(op.maxpool),
    'avgpool': _maxpool_json(op.avgpool),
    'out_range': list(op.out_range),
    'requant': op.requant[0],
  }


def _layer_entry(
  layer: IntLayer, packed: dict, floats: dict, kernel_bits: dict
) -> dict:
  kernel = np.asarray(layer.kernel)
  signed = kernel_code_bits(kernel)[1]
  bits = storage_bits(layer, kernel_bits)
  if np.ndim(bits):
    # Per-channel widths: signed like the kernel's grid (a channel may
    # hold only non-negative codes).
    signed = True
  packed[f'{layer.path}/kernel'] = artifact.PackedTensor(
    codes=kernel.astype(np.int32), bits=bits, signed=signed, axis=-1
  )
  if layer.bias is not None:
    floats[f'{layer.path}/bias.i32'] = _i32_as_f32(layer.bias)
  entry = {
    'path': layer.path,
    'type': layer.layer_type,
    'relu': bool(layer.relu),
    'acc_shift': int(layer.acc_shift),
    'pool': int(layer.pool),
    'groups': int(layer.feature_group_count),
    'strides': None if layer.strides is None else list(layer.strides),
    'padding': layer.padding
    if not isinstance(layer.padding, tuple)
    else [
      list(pad) if isinstance(pad, tuple) else pad for pad in layer.padding
    ],
    'out_range': None if layer.out_range is None else list(layer.out_range),
    'requant': None if layer.requant is None else layer.requant[0],
    'kernel_dtype': str(kernel.dtype),
  }
  if layer.src is not None:
    entry['src'] = layer.src
  if layer.maxpool is not None:
    entry['maxpool'] = _maxpool_json(layer.maxpool)
  if layer.requant is not None and layer.requant[0] == 'shift':
    floats[f'{layer.path}/shift.i32'] = _i32_as_f32(
      np.atleast_1d(layer.requant[1])
    )
  elif layer.requant is not None:
    for name, values in zip(_REQUANT_MULT_PARTS, layer.requant[1:]):
      floats[f'{layer.path}/{name}.i32'] = _i32_as_f32(np.atleast_1d(values))
  if layer.out_scale is not None:
    floats[f'{layer.path}/out_scale'] = np.atleast_1d(
      np.asarray(layer.out_scale, np.float32)
    )
  return entry


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
  per-output-channel widths; default: the layer's ``kernel_bits``, set by
  lowerings that know the trained widths, else the narrowest width holding
  its codes, 8 for F8Net); int32 biases, requantization multipliers and
  shifts are stored exactly (int32 bit-cast into the float blob, names
  ending ``.i32``); the op list is in the manifest. Returns the file size in
  bytes.
  """
  packed, floats, entries = {}, {}, []
  kernel_bits = dict(kernel_bits or {})
  for op in program.layers:
    if isinstance(op, IntConcat):
      entries.append({'path': op.path, 'type': 'Concat', 'inputs': op.inputs})
    elif isinstance(op, IntRequant):
      entries.append(_requant_entry(op, floats))
    elif isinstance(op, IntAdd):
      entries.append(_add_entry(op, floats))
    else:
      entries.append(_layer_entry(op, packed, floats, kernel_bits))
  meta = dict(metadata or {})
  meta['program'] = {
    'format': GRAPH_FORMAT if is_graph(program) else PROGRAM_FORMAT,
    'kind': program.kind,
    'input_scale': float(program.input_scale),
    'input_range': list(program.input_range),
    'layers': entries,
  }
  return artifact.write_artifact(
    path, packed, floats, meta, overwrite=overwrite
  )


def _load_add(entry: dict, floats: dict) -> IntAdd:
  path = entry['path']
  return IntAdd(
    path=path,
    inputs=list(entry['inputs']),
    shifts=[
      _scalar_if_single(_f32_as_i32(floats[f'{path}/add_shift{i}.i32']))
      for i in range(len(entry['inputs']))
    ],
    relu=entry['relu'],
    pool=entry['pool'],
    requant=(
      ('shift', _scalar_if_single(_f32_as_i32(floats[f'{path}/shift.i32'])))
      if entry['requant'] == 'shift'
      else None
    ),
    out_range=None if entry['out_range'] is None else tuple(entry['out_range']),
    out_scale=floats.get(f'{path}/out_scale'),
    maxpool=_maxpool_spec(entry.get('maxpool')),
  )


def _load_requant(entry: dict, floats: dict) -> IntRequant:
  path = entry['path']
  return IntRequant(
    path=path,
    src=entry['src'],
    requant=('mult',)
    + tuple(
      _scalar_if_single(_f32_as_i32(floats[f'{path}/{name}.i32']))
      for name in _REQUANT_MULT_PARTS
    ),
    out_range=tuple(entry['out_range']),
    relu=entry['relu'],
    pool=entry['pool'],
    maxpool=_maxpool_spec(entry.get('maxpool')),
    avgpool=_maxpool_spec(entry.get('avgpool'), 'avg'),
    acc_clip=(
      _f32_as_i32(floats[f'{path}/acc_clip.i32'])
      if f'{path}/acc_clip.i32' in floats
      else None
    ),
  )


def _load_layer(entry: dict, codes: dict, floats: dict, tensors: dict):
  path = entry['path']
  if entry['requant'] == 'shift':
    requant = (
      'shift',
      _scalar_if_single(_f32_as_i32(floats[f'{path}/shift.i32'])),
    )
  elif entry['requant'] == 'mult':
    requant = ('mult',) + tuple(
      _scalar_if_single(_f32_as_i32(floats[f'{path}/{name}.i32']))
      for name in _REQUANT_MULT_PARTS
    )
  else:
    requant = None
  padding = entry['padding']
  if isinstance(padding, list):
    padding = tuple(
      tuple(pad) if isinstance(pad, list) else pad for pad in padding
    )
  return IntLayer(
    path=path,
    layer_type=entry['type'],
    kernel=codes[f'{path}/kernel'].astype(entry['kernel_dtype']),
    bias=(
      _f32_as_i32(floats[f'{path}/bias.i32'])
      if f'{path}/bias.i32' in floats
      else None
    ),
    strides=None if entry['strides'] is None else tuple(entry['strides']),
    padding=padding,
    feature_group_count=entry['groups'],
    relu=entry['relu'],
    pool=entry['pool'],
    requant=requant,
    acc_shift=int(entry.get('acc_shift', 0)),
    out_range=None if entry['out_range'] is None else tuple(entry['out_range']),
    out_scale=floats.get(f'{path}/out_scale'),
    src=entry.get('src'),
    maxpool=_maxpool_spec(entry.get('maxpool')),
    kernel_bits=tensors.get(f'{path}/kernel', {}).get('bits'),
  )


def load_program(path: str) -> IntegerProgram:
  """Reads :func:`save_program`'s artifact (checksums verified)."""
  codes, floats, manifest = artifact.read_artifact(path)
  program = manifest['metadata'].get('program')
  if not program or program.get('format') not in (
    PROGRAM_FORMAT,
    GRAPH_FORMAT,
  ):
    raise artifact.ArtifactError(
      f'{path} holds no integer program (it is a packed-weights artifact; '
      'integer programs are written by save_program / export with an '
      'integer-capable method).'
    )
  tensors = manifest.get('tensors', {})
  loaders = {
    'Add': lambda entry: _load_add(entry, floats),
    'Requant': lambda entry: _load_requant(entry, floats),
    'Concat': lambda entry: IntConcat(entry['path'], list(entry['inputs'])),
  }
  ops = [
    loaders[entry['type']](entry)
    if entry['type'] in loaders
    else _load_layer(entry, codes, floats, tensors)
    for entry in program['layers']
  ]
  return IntegerProgram(
    layers=ops,
    input_scale=program['input_scale'],
    input_range=tuple(program['input_range']),
    kind=program['kind'],
  )
