"""Freeze a trained fracq model into integer codes and measure its real size.

For every layer with a quantized kernel: integer codes, a per-channel (or
per-tensor) scale (plus a zero point or offset for affine grids), the
bit-width (per layer or per channel) and signedness, such that
``(codes - zero_point) * scale + offset`` is the kernel the fake-quantized
model computes with (up to float32 rounding of the affine map). Every kernel
quantizer exports: LSQ, LSQ+, DoReFa, the min/max, moving-average and
percentile observers (symmetric or affine), narrow or full grids, and
FracBits after hard assignment (channels at 0 bits are pruned: all-zero
codes stored in no bytes), per tensor, per channel or per group
(``granularity='group'``: a ``(groups, out_channels)`` scale, the group size
and output axes recorded in the manifest's ``groups``). An ``nn.Embed``
table quantized by an ``Embed`` rule is stored like a kernel, under
``<layer>/embedding.packed`` (``.scale``, ...).

:func:`export_model` writes the packed artifact and reports four sizes: the
artifact's bytes on disk, the theoretical size (kernel params x bits / 8 plus
scales and float parts), the same model as an INT8 artifact, and the float32
checkpoint, with their ratios. Pruned and clustered kernels (sparsity- and
cluster-preserving QAT) are stored with the artifact's structure-aware
encodings (nonzero bitmask, codebook + narrow indices); the report says what
they saved relative to the dense theoretical size.

A model with a ``kernel_transform`` (pruning masks, clusters) is frozen from
the transformed kernels (the transform's ``strip``), i.e. the kernels the
fake-quantizer actually sees.

Each tensor is frozen by its method (the export contract,
:class:`fracq.methods.common.Frozen`, dispatched through
:mod:`fracq.methods.quantizers`): this module only gathers the layers and
writes and measures the artifact; it never reads a method's variables.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import numpy as np

from fracq.export import artifact
from fracq.interception import QuantizedModule
from fracq.interception import weight_name
from fracq.methods import common
from fracq.methods import providers
from fracq.methods import quantizers


def _node(tree, path):
  for p in path.split('/'):
    tree = tree[p]
  return tree


def _node_or_empty(tree, path):
  """The layer's variables in a collection ({} when it has none there,
  e.g. observer kernels in ``quant``)."""
  try:
    return _node(tree, path)
  except KeyError:
    return {}


@dataclasses.dataclass(frozen=True)
class FrozenLayer:
  """One quantized kernel as integer codes and the affine map back to reals.

  The kernel the model computes with is ``(codes - zero_point) * scale +
  offset`` (``scale``, ``zero_point`` and ``offset`` are scalars or
  per-channel vectors along ``axis``). Symmetric grids (LSQ, FracBits,
  symmetric observers) have ``zero_point == offset == 0``; affine observers a
  zero point; LSQ+ an offset; DoReFa ``scale = 2 / n`` and ``offset = -1``.
  ``codes`` are ``signed`` (or not) ``bits``-bit integers; channels with 0
  bits (pruned by FracBits) hold only zeros. Group-wise kernels
  (``group_size`` set) have ``(groups, out_channels)`` scales, zero points
  and offsets over their ``out_axes`` (see
  :class:`fracq.methods.common.Frozen`). ``param`` is the parameter frozen
  (``'kernel'``, or ``'embedding'`` for an ``Embed`` table).
  """

  path: str
  codes: np.ndarray
  scale: np.ndarray  # broadcastable against codes along the channel axis
  bits: np.ndarray  # () or (C,)
  axis: int
  signed: bool = True
  zero_point: np.ndarray = dataclasses.field(
    default_factory=lambda: np.zeros((), np.float32)
  )
  offset: np.ndarray = dataclasses.field(
    default_factory=lambda: np.zeros((), np.float32)
  )
  group_size: int | None = None
  out_axes: tuple[int, ...] = ()
  param: str = 'kernel'

  @property
  def affine(self) -> bool:
    """Whether the zero point or the offset is non-zero somewhere."""
    return bool(np.any(self.zero_point != 0) or np.any(self.offset != 0))

  def dequantize(self) -> np.ndarray:
    """``(codes - zero_point) * scale + offset`` as float32."""
    return _dequantize(
      self.codes,
      self.axis,
      self.scale,
      self.zero_point,
      self.offset,
      self.group_size,
      self.out_axes,
    )


def _dequantize(codes, axis, scale, zero_point, offset, group_size, out_axes):
  n = codes.ndim
  if group_size:
    part = lambda v: common.expand_groups(v, codes.shape, out_axes, group_size)
  else:
    part = lambda v: _bcast(v, n, axis)
  return (codes.astype(np.float32) - part(zero_point)) * part(scale) + part(
    offset
  )


def _bcast(v, ndim, axis):
  v = np.asarray(v, np.float32)
  if v.ndim == 0 or v.size == 1:
    return v.reshape(())
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return v.reshape(shape)


def _transformed(qmodel, variables):
  """``variables`` with the model's kernel transform (pruning masks,
  clusters) written into ``params``, so codes are taken from the kernels the
  model computes with."""
  tr = getattr(qmodel, 'kernel_transform', None)
  if tr is None:
    return variables
  if not hasattr(tr, 'strip'):
    raise ValueError(
      f'{type(tr).__name__}: a kernel transform needs a '
      'strip(variables, qmodel, keep_quant) method to be '
      'frozen.'
    )
  return tr.strip(variables, qmodel=qmodel, keep_quant=True)


def _stored(variables, path) -> dict:
  """The layer's quantizer variables per collection."""
  return {
    col: _node_or_empty(variables.get(col, {}), path)
    for col in (common.TRAINABLE, common.STATE)
  }


def _tensor(
  qmodel, variables, path, name, spec, signed, channel_axis, out_axes=()
):
  return common.QuantTensor(
    name=name,
    spec=spec,
    signed=signed,
    channel_axis=channel_axis,
    path=path,
    out_axes=tuple(out_axes),
    stored=_stored(variables, path),
    hard=bool(getattr(qmodel, 'hard', False)),
  )


def freeze(qmodel, variables) -> dict[str, FrozenLayer]:
  """Integer codes and the affine map of every quantized kernel.

  Each kernel is frozen by its method's quantizer
  (:mod:`fracq.methods.quantizers`), which reads the codes off the
  fake-quantized kernel computed from the trained variables, so the artifact
  holds exactly the kernel the model computes with, whatever the range
  method, granularity or grid.
  """
  variables = _transformed(qmodel, variables)
  out = {}
  for path, f in qmodel.facts.items():
    if not f.weight_quantized:
      continue
    spec = qmodel.rules[f.rule_index].weight
    param = weight_name(f.layer_type)
    w = np.asarray(_node(variables['params'], path)[param], np.float32)
    # The provider's rule: kernels are signed unless the spec says otherwise.
    signed = True if spec.signed is None else bool(spec.signed)
    axis = f.out_axes[-1] % w.ndim
    tensor = _tensor(
      qmodel, variables, path, 'kernel', spec, signed, axis, f.out_axes
    )
    frozen = quantizers.for_spec(spec).freeze(tensor, w)
    out[path] = FrozenLayer(
      path=path,
      codes=frozen.codes,
      scale=np.asarray(frozen.scale, np.float32),
      bits=np.asarray(frozen.bits).astype(np.int32),
      axis=axis,
      signed=bool(frozen.signed),
      zero_point=np.asarray(frozen.zero_point, np.float32),
      offset=np.asarray(frozen.offset, np.float32),
      group_size=frozen.group_size,
      out_axes=tuple(frozen.out_axes or ()),
      param=param,
    )
  return out


def _act_signed(qmodel, path, spec) -> bool:
  # The provider's rule: the spec's sign, else the sign probed at wrapping.
  if spec.signed is not None:
    return bool(spec.signed)
  return bool(getattr(qmodel, 'signs', {}).get(path, True))


def _list(v) -> list:
  # 9 significant digits: a float32 round-trips exactly, in short JSON.
  return [float(f'{x:.9g}') for x in np.asarray(v, np.float32).reshape(-1)]


def freeze_inputs(qmodel, variables) -> dict[str, dict]:
  """How every quantized layer input is quantized, as plain JSON values.

  Per layer path: ``bits`` (the hard-assigned bits of a learned input),
  ``signed``, ``range_method``, ``granularity``, the grid ``qmin`` /
  ``qmax`` and the affine map ``real = (code - zero_point) * scale +
  offset`` (lists: one entry, or one per channel; ``zero_point`` and
  ``offset`` only when non-zero), plus the trained range parameter when it
  is not the scale itself (``clip``, ``range`` or ``min`` / ``max``).
  """
  out = {}
  for path, f in qmodel.facts.items():
    if f.rule_index is None:  # a layer no rule matched: float
      continue
    spec = qmodel.rules[f.rule_index].act
    if spec is None or qmodel.rules[f.rule_index].keep_float:
      continue
    signed = _act_signed(qmodel, path, spec)
    tensor = _tensor(qmodel, variables, path, 'input', spec, signed, -1)
    out[path] = _input_entry(spec, quantizers.for_spec(spec), tensor)
  return out


def _input_entry(spec, quantizer, tensor) -> dict:
  """The JSON entry of one activation tensor quantized at run time."""
  frozen = quantizer.freeze(tensor)
  entry = {
    'signed': bool(frozen.signed),
    'range_method': spec.range_method,
    'granularity': spec.granularity,
  }
  entry.update({key: _list(v) for key, v in (frozen.extras or {}).items()})
  entry.update(
    bits=int(frozen.bits),
    qmin=int(frozen.qmin),
    qmax=int(frozen.qmax),
    scale=_list(frozen.scale),
  )
  if np.any(np.asarray(frozen.zero_point) != 0):
    entry['zero_point'] = _list(frozen.zero_point)
  if np.any(np.asarray(frozen.offset) != 0):
    entry['offset'] = _list(frozen.offset)
  return entry


def freeze_attention(qmodel, variables) -> dict[str, dict]:
  """How the operands of every quantized attention matmul are quantized,
  as plain JSON values: per attention module path and operand (``query``,
  ``key``, ``probs``, ``value``), the entry :func:`freeze_inputs` gives a
  layer input (bits, sign, grid, affine map, trained range parameter)."""
  out = {}
  for path, f in getattr(qmodel, 'attention_facts', {}).items():
    spec = qmodel.rules[f.rule_index].attention
    if not f.quantized or spec is None:
      continue
    entries = {}
    for operand in providers.ATTENTION_OPERANDS:
      grid, signed = providers.attention_operand(spec, operand)
      tensor = _tensor(qmodel, variables, path, operand, grid, signed, -1)
      entries[operand] = _input_entry(grid, quantizers.for_spec(grid), tensor)
    out[path] = entries
  return out


def fake_quant_kernels(qmodel, variables, x, **kwargs) -> dict:
  """The kernels the fake-quantized model actually computes with."""
  seen = {}

  class Capture:
    def quantize_kernel(self, site, k):
      out = qmodel.provider.quantize_kernel(site, k)
      seen[site.path] = np.asarray(out)
      return out

    def quantize_input(self, site, a):
      return qmodel.provider.quantize_input(site, a)

  qm = QuantizedModule(qmodel.module, qmodel.rules, Capture(), on_unused='warn')
  with jax.disable_jit():
    qm.apply(variables, x, **{**qmodel.call_kwargs, **kwargs})
  return seen


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Sizes of an exported model.

  ``theoretical_bytes`` is always the *dense* size at the learned bits
  (kernel params x bits / 8 + scales + float parts). ``structure_saved_bytes``
  is what the structure-aware encodings saved on the kernels (their dense
  packed bytes minus their stored bytes); ``encodings`` counts the packed
  kernels per encoding (``dense``, ``codebook``, ``sparse``,
  ``sparse_codebook``); ``encode_structure`` says whether those encodings were
  allowed.
  """

  artifact_bytes: int
  theoretical_bytes: float
  int8_artifact_bytes: int
  float32_bytes: int
  kernel_params: int
  mean_kernel_bits: float
  structure_saved_bytes: int = 0
  encodings: tuple = ()  # ((encoding, count), ...)
  encode_structure: bool = True

  @property
  def overhead(self) -> float:
    """Container overhead: the file over what its encodings should take,
    ``artifact / (theoretical - structure saved) - 1`` (without structure
    encodings simply ``artifact / theoretical - 1``)."""
    return (
      self.artifact_bytes
      / (self.theoretical_bytes - self.structure_saved_bytes)
      - 1
    )

  @property
  def actual_over_theoretical(self) -> float:
    """The file over the dense theoretical size (< 1 when the structure
    encodings saved more than the container costs)."""
    return self.artifact_bytes / self.theoretical_bytes

  def encoding_counts(self) -> dict:
    return dict(self.encodings)

  def format(self) -> str:
    rows = [
      ('packed artifact (on disk)', self.artifact_bytes),
      (
        'theoretical (params x bits / 8 + scales + float parts)',
        self.theoretical_bytes,
      ),
      ('structure (sparsity/clusters) saved', self.structure_saved_bytes),
      ('INT8 artifact (on disk)', self.int8_artifact_bytes),
      ('float32 checkpoint', self.float32_bytes),
    ]
    lines = [f'{n:<58} {v / 1024:>10.1f} KiB' for n, v in rows]
    counts = self.encoding_counts()
    if self.encode_structure:
      lines[2] += (
        f': {counts.get("codebook", 0)} tensors codebook, '
        f'{counts.get("sparse", 0)} sparse, '
        f'{counts.get("sparse_codebook", 0)} sparse+codebook, '
        f'{counts.get("dense", 0)} dense'
      )
    else:
      lines[2] += ' (structure encodings disabled)'
    ratio = self.actual_over_theoretical
    if self.structure_saved_bytes:
      lines.append(
        f'actual / theoretical: {ratio:.4f} '
        f'({100 * (ratio - 1):+.2f}%); container overhead over '
        f'theoretical - structure saved: {100 * self.overhead:+.2f}%'
      )
    else:
      lines.append(
        f'actual / theoretical: {ratio:.4f} ({100 * (ratio - 1):+.2f}%)'
      )
    lines.append(
      f'compression over INT8 (actual bytes): '
      f'{self.int8_artifact_bytes / self.artifact_bytes:.2f}x; '
      f'over float32: {self.float32_bytes / self.artifact_bytes:.2f}x'
      f'; mean kernel bits {self.mean_kernel_bits:.2f}'
    )
    return '\n'.join(lines)


def _float_parts(variables, frozen):
  out = {}
  for col in ('params', 'batch_stats'):
    for kp, v in jax.tree_util.tree_leaves_with_path(variables.get(col, {})):
      name = '/'.join(str(getattr(k, 'key', k)) for k in kp)
      layer, leaf = name.rsplit('/', 1) if '/' in name else ('', name)
      if col == 'params' and layer in frozen and leaf == frozen[layer].param:
        continue
      out[f'{col}/{name}'] = np.asarray(v, np.float32)
  return out


def export_model(
  qmodel,
  variables,
  path: str,
  *,
  overwrite: bool = False,
  metadata: dict | None = None,
  encode_structure: bool = True,
) -> SizeReport:
  """Writes the packed artifact to ``path`` and measures the four sizes.

  ``encode_structure=False`` stores every kernel dense (to measure the size
  without the sparsity/cluster encodings). The INT8 comparison artifact is
  always dense INT8.
  """
  frozen = freeze(qmodel, variables)
  floats = _float_parts(variables, frozen)
  packed, scales = {}, {}
  groups = {}
  for p, fl in frozen.items():
    packed[f'{p}/{fl.param}.packed'] = artifact.PackedTensor(
      codes=fl.codes,
      bits=fl.bits if fl.bits.ndim else int(fl.bits),
      signed=fl.signed,
      axis=fl.axis,
    )
    scales[f'{p}/{fl.param}.scale'] = np.atleast_1d(fl.scale)
    # Affine kernels only: symmetric ones keep the format they always had.
    if np.any(fl.zero_point != 0):
      scales[f'{p}/{fl.param}.zero_point'] = np.atleast_1d(fl.zero_point)
    if np.any(fl.offset != 0):
      scales[f'{p}/{fl.param}.offset'] = np.atleast_1d(fl.offset)
    if fl.group_size:
      groups[p] = {'group_size': fl.group_size, 'out_axes': list(fl.out_axes)}
  meta = dict(metadata or {})
  meta['bits'] = {p: fl.bits.tolist() for p, fl in frozen.items()}
  if groups:  # group-wise kernels only: other artifacts keep their manifest
    meta['groups'] = groups
  # The activation side of the quantized model: every quantized input's
  # bits, sign and scale / range.
  meta['inputs'] = freeze_inputs(qmodel, variables)
  # The operands of quantized attention matmuls (only when there are some:
  # other artifacts keep their manifest).
  attention = freeze_attention(qmodel, variables)
  if attention:
    meta['attention'] = attention
  encodings = {}
  size = artifact.write_artifact(
    path,
    packed,
    {**floats, **scales},
    meta,
    overwrite=overwrite,
    encode_structure=encode_structure,
    encodings=encodings,
  )
  saved = sum(dense - n for _, n, dense in encodings.values())
  counts = {}
  for kind, _, _ in encodings.values():
    counts[kind] = counts.get(kind, 0) + 1
  kernel_params = sum(fl.codes.size for fl in frozen.values())
  kernel_bits = sum(
    float(np.sum(fl.bits) * fl.codes.size / max(np.size(fl.bits), 1))
    if fl.bits.ndim
    else float(fl.bits) * fl.codes.size
    for fl in frozen.values()
  )
  # The inputs' and attention operands' scales (and zero points / offsets)
  # are scales of the model too, stored as float32 values in the manifest.
  runtime = list(meta['inputs'].values())
  runtime += [e for entries in attention.values() for e in entries.values()]
  input_scales = sum(
    len(e.get(k, ()))
    for e in runtime
    for k in ('scale', 'zero_point', 'offset')
  )
  theoretical = (
    kernel_bits / 8
    + sum(s.nbytes for s in scales.values())
    + 4 * input_scales
    + sum(a.nbytes for a in floats.values())
  )
  with tempfile.TemporaryDirectory() as tmp:
    int8 = {k: dataclasses.replace(v, bits=8) for k, v in packed.items()}
    int8_size = artifact.write_artifact(
      os.path.join(tmp, 'int8'),
      int8,
      {**floats, **scales},
      meta,
      encode_structure=False,
    )
    f32 = {
      f'params/{p}/{fl.param}': np.asarray(
        _node(variables['params'], p)[fl.param], np.float32
      )
      for p, fl in frozen.items()
    }
    f32_size = artifact.write_artifact(
      os.path.join(tmp, 'f32'), {}, {**floats, **f32}, {}
    )
  return SizeReport(
    artifact_bytes=size,
    theoretical_bytes=theoretical,
    int8_artifact_bytes=int8_size,
    float32_bytes=f32_size,
    kernel_params=kernel_params,
    mean_kernel_bits=kernel_bits / max(kernel_params, 1),
    structure_saved_bytes=int(saved),
    encodings=tuple(sorted(counts.items())),
    encode_structure=bool(encode_structure),
  )


def dequantized_kernels(codes: dict, floats: dict, manifest: dict) -> dict:
  """``(codes - zero_point) * scale + offset`` per packed kernel (and
  embedding table) of a read artifact, keyed by layer (the zero point and
  offset are 0 unless stored; group-wise kernels per the manifest's
  ``groups``)."""
  groups = manifest.get('metadata', {}).get('groups', {})
  out = {}
  for name, c in codes.items():
    layer, leaf = name.rsplit('/', 1)
    if leaf not in ('kernel.packed', 'embedding.packed'):
      continue
    param = leaf[: -len('.packed')]
    part = lambda n, layer=layer, param=param: floats.get(
      f'{layer}/{param}.{n}', np.zeros(1, np.float32)
    )
    group = groups.get(layer, {})
    out[layer] = _dequantize(
      c,
      manifest['tensors'][name]['axis'],
      part('scale'),
      part('zero_point'),
      part('offset'),
      group.get('group_size'),
      tuple(group.get('out_axes', ())),
    )
  return out
