"""Freeze a trained fracq model into integer codes and measure its real size.

For every layer with a quantized kernel: integer codes, a per-channel (or
per-tensor) scale (plus a zero point or offset for affine grids), the
bit-width (per layer or per channel) and signedness, such that
``(codes - zero_point) * scale + offset`` is the kernel the fake-quantized
model computes with (up to float32 rounding of the affine map). Every kernel
quantizer exports: LSQ, LSQ+, DoReFa, the min/max, moving-average and
percentile observers (symmetric or affine), narrow or full grids, and
FracBits after hard assignment (channels at 0 bits are pruned: all-zero
codes stored in no bytes).

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
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fracq import core

from fracq.export import artifact
from fracq.interception import QuantizedModule


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
  bits (pruned by FracBits) hold only zeros.
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

  @property
  def affine(self) -> bool:
    """Whether the zero point or the offset is non-zero somewhere."""
    return bool(np.any(self.zero_point != 0) or np.any(self.offset != 0))

  def dequantize(self) -> np.ndarray:
    """``(codes - zero_point) * scale + offset`` as float32."""
    n = self.codes.ndim
    zp = _bcast(self.zero_point, n, self.axis)
    return (self.codes.astype(np.float32) - zp) * _bcast(
      self.scale, n, self.axis
    ) + _bcast(self.offset, n, self.axis)


def _bcast(v, ndim, axis):
  v = np.asarray(v, np.float32)
  if v.ndim == 0 or v.size == 1:
    return v.reshape(())
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return v.reshape(shape)


def _jbcast(v, ndim, axis):
  """jnp version of :func:`_bcast` (parameters of the core quantizers)."""
  v = jnp.asarray(v, jnp.float32)
  if v.ndim == 0:
    return v
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return v.reshape(shape)


def grid(spec, *, signed: bool, bits: int) -> tuple[int, int]:
  """``(qmin, qmax)`` of a kernel's ``bits``-bit grid, read from the rule
  (``TensorSpec.int_grid``, the convention training uses)."""
  return spec.int_grid(signed=signed, bits=int(bits), is_kernel=True)


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


def _kernel_signed(spec) -> bool:
  # The provider's rule: kernels are signed unless the spec says otherwise.
  return True if spec.signed is None else bool(spec.signed)


def _uniform_kernel(path, spec, w, q, st, axis):
  """The fake-quantized kernel and its ``(scale, zero_point, offset, bits,
  signed)`` for a fixed-bit rule, computed with the provider's own core
  quantizers so the result is the model's kernel bit for bit."""
  bits = int(spec.bits)
  signed = _kernel_signed(spec)
  qmin, qmax = grid(spec, signed=signed, bits=bits)
  x = jnp.asarray(w, jnp.float32)
  ax = axis if spec.granularity == 'channel' else None
  zeros = jnp.zeros(())
  m = spec.range_method
  if m == 'lsq':
    step = jnp.asarray(q['kernel_step'], jnp.float32)
    fq = core.lsq_quantize(x, _jbcast(step, x.ndim, ax), qmin, qmax)
    return fq, step, zeros, zeros, bits, signed
  if m == 'lsq_plus':
    step = jnp.asarray(q['kernel_step'], jnp.float32)
    off = jnp.asarray(q['kernel_offset'], jnp.float32)
    fq = core.lsq_plus_quantize(
      x, _jbcast(step, x.ndim, ax), _jbcast(off, x.ndim, ax), qmin, qmax
    )
    return fq, step, zeros, off, bits, signed
  if m == 'dorefa':
    # q = round(v n) in [0, n], n = 2^k - 1, value 2 q / n - 1.
    n = grid(spec, signed=False, bits=bits)[1]
    fq = core.dorefa_quantize_weight(x, bits)
    return (
      fq,
      jnp.float32(2.0) / jnp.float32(n),
      zeros,
      jnp.float32(-1.0),
      bits,
      False,
    )
  if m in ('minmax', 'ema_minmax', 'percentile'):
    lo, hi = st['kernel_min'], st['kernel_max']
    scale, zp = core.minmax_to_qparams(
      lo, hi, qmin, qmax, symmetric=spec.symmetric
    )
    fq = core.fake_quant(
      x, _jbcast(scale, x.ndim, ax), _jbcast(zp, x.ndim, ax), qmin, qmax
    )
    return fq, scale, zp, zeros, bits, signed
  raise ValueError(
    f'{path}: range_method={m!r} kernels have no export '
    'rule; use one of lsq, lsq_plus, dorefa, minmax, '
    'ema_minmax, percentile.'
  )


def _fracbits_kernel(path, spec, w, q, st, axis):
  """Like :func:`_uniform_kernel` for a hard-assigned FracBits kernel (bits
  per layer or per channel; 0 bits = pruned channel)."""
  signed = _kernel_signed(spec)
  bits = np.asarray(st['kernel_hard_bits'])
  if np.any(bits < 0):
    raise ValueError(
      f'{path}: the kernel bits are not assigned yet; freeze '
      'after hard assignment.'
    )
  bits = np.round(bits).astype(np.int32)
  x = jnp.asarray(w, jnp.float32)
  ax = axis if spec.granularity == 'channel' else None
  baxis = axis if bits.ndim else None
  b = _jbcast(bits.astype(np.float32), x.ndim, baxis)
  per = np.atleast_1d(bits)
  if spec.range_method == 'dorefa':
    fq = core.hard_quantize(x, b, core.dorefa_branch)
    n = np.array(
      [grid(spec, signed=False, bits=k)[1] if k >= 1 else 0 for k in per],
      np.float32,
    )
    live = n > 0
    scale = np.where(live, np.float32(2.0) / np.maximum(n, 1), 0)
    offset = np.where(live, np.float32(-1.0), 0).astype(np.float32)
    if bits.ndim == 0:
      scale, offset = scale[0], offset[0]
    return fq, scale, np.zeros((), np.float32), offset, bits, False
  r = jnp.asarray(q['kernel_range'], jnp.float32)
  rb = _jbcast(r, x.ndim, ax)
  branch = core.symmetric_range_branch if signed else core.unsigned_range_branch
  fq = core.hard_quantize(x, b, lambda xx, k: branch(xx, rb, k))
  # The branches' step: |r| / levels, levels the grid's qmax at k bits
  # (signed: the symmetric [-qmax, qmax] grid).
  levels = np.array(
    [
      max(grid(spec, signed=signed, bits=k)[1], 1)
      if k >= (2 if signed else 1)
      else 1
      for k in per
    ],
    np.float32,
  )
  levels = levels if bits.ndim else levels[0]
  step = jnp.abs(r) / jnp.maximum(jnp.asarray(levels), 1.0)
  zero = np.zeros((), np.float32)
  return fq, step, zero, zero, bits, signed


def freeze(qmodel, variables) -> dict[str, FrozenLayer]:
  """Integer codes and the affine map of every quantized kernel.

  The codes are read off the fake-quantized kernel itself (computed with the
  provider's quantizers from the trained variables), so the artifact holds
  exactly the kernel the model computes with, whatever the range method,
  granularity or grid.
  """
  variables = _transformed(qmodel, variables)
  quant = variables.get('quant', {})
  stats = variables.get('quant_stats', {})
  out = {}
  for path, f in qmodel.facts.items():
    if not f.weight_quantized:
      continue
    spec = qmodel.rules[f.rule_index].weight
    w = np.asarray(_node(variables['params'], path)['kernel'], np.float32)
    axis = f.out_axes[-1] % w.ndim
    q, st = _node_or_empty(quant, path), _node_or_empty(stats, path)
    if spec.learn_bits:
      if not getattr(qmodel, 'hard', False):
        raise ValueError(
          'Freeze a FracBits model after hard assignment (its '
          'bits must be integers): use qmodel.for_step(...) and '
          'prepare(variables) first.'
        )
      fq, scale, zp, offset, bits, signed = _fracbits_kernel(
        path, spec, w, q, st, axis
      )
    else:
      fq, scale, zp, offset, bits, signed = _uniform_kernel(
        path, spec, w, q, st, axis
      )
    fq = np.asarray(fq, np.float32)
    scale = np.asarray(scale, np.float32)
    zp = np.asarray(zp, np.float32)
    offset = np.asarray(offset, np.float32)
    s_b = _bcast(scale, w.ndim, axis)
    safe = np.where(s_b == 0, 1, s_b)
    shifted = fq - _bcast(offset, w.ndim, axis)
    codes = np.where(
      s_b == 0, 0, np.round(shifted / safe) + _bcast(zp, w.ndim, axis)
    )
    if np.any(scale < 0) and not np.any(zp != 0):
      # A learned step (LSQ) can cross zero in training; the model's kernel
      # is then s * c with s < 0, which is |s| * (-c): store the positive
      # scale and the mirrored codes where they stay on the grid (always, on
      # the symmetric grid kernels use by default), since integer programs
      # need positive scales. On a full-range grid a mirrored -qmin would
      # leave it: the negative scale is then kept (the artifact stays
      # exact; integer lowering refuses it).
      mirrored = np.where(s_b < 0, -codes, codes)
      qmin, qmax = grid(spec, signed=bool(signed), bits=int(np.max(bits)))
      if mirrored.min() >= qmin and mirrored.max() <= qmax:
        codes, scale = mirrored, np.abs(scale)
    out[path] = FrozenLayer(
      path=path,
      codes=codes.astype(np.int32),
      scale=scale,
      bits=np.asarray(bits).astype(np.int32),
      axis=axis,
      signed=bool(signed),
      zero_point=zp,
      offset=offset,
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
  quant = variables.get('quant', {})
  stats = variables.get('quant_stats', {})
  out = {}
  for path, f in qmodel.facts.items():
    spec = qmodel.rules[f.rule_index].act
    if spec is None or qmodel.rules[f.rule_index].keep_float:
      continue
    q, st = _node_or_empty(quant, path), _node_or_empty(stats, path)
    signed = _act_signed(qmodel, path, spec)
    m = spec.range_method
    entry = {
      'signed': signed,
      'range_method': m,
      'granularity': spec.granularity,
    }
    zero = np.zeros(1)
    offset = zero
    if spec.learn_bits:
      hard = np.asarray(st.get('input_hard_bits', -1))
      if not getattr(qmodel, 'hard', False) or np.any(hard < 0):
        raise ValueError(
          f'{path}: the input bits are learned but not '
          'assigned; freeze after hard assignment '
          '(qmodel.for_step(...), prepare(variables)).'
        )
      bits = int(np.round(hard).reshape(-1)[0])
      r = np.abs(np.asarray(q['input_range'], np.float32))
      levels = (
        max(grid(spec, signed=signed, bits=bits)[1], 1)
        if bits >= (2 if signed else 1)
        else 1
      )
      qmin, qmax = (-levels, levels) if signed else (0, levels)
      if bits == 0:
        qmin = qmax = 0
      scale, zp = r / np.float32(levels), zero
      entry['range'] = _list(r)
    else:
      bits = int(spec.bits)
      qmin, qmax = grid(spec, signed=signed, bits=bits)
      if m in ('lsq', 'lsq_plus'):
        scale, zp = np.abs(np.asarray(q['input_step'], np.float32)), zero
        if m == 'lsq_plus':
          offset = np.asarray(q['input_offset'], np.float32)
      elif m == 'pact':
        clip = np.abs(np.asarray(q['input_clip'], np.float32))
        # PACT's grid: [-qmax, qmax] signed, [0, qmax] unsigned.
        qmin = -qmax if signed else 0
        scale, zp = clip / np.float32(qmax), zero
        entry['clip'] = _list(clip)
      elif m in ('minmax', 'ema_minmax', 'percentile'):
        scale, zp = core.minmax_to_qparams(
          st['input_min'], st['input_max'], qmin, qmax, symmetric=spec.symmetric
        )
        entry['min'], entry['max'] = (
          _list(st['input_min']),
          _list(st['input_max']),
        )
      else:
        raise ValueError(
          f'{path}: input range_method={m!r} has no export rule.'
        )
    entry.update(bits=bits, qmin=int(qmin), qmax=int(qmax), scale=_list(scale))
    if np.any(np.asarray(zp) != 0):
      entry['zero_point'] = _list(zp)
    if np.any(np.asarray(offset) != 0):
      entry['offset'] = _list(offset)
    out[path] = entry
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
      layer = name.rsplit('/', 1)[0]
      if col == 'params' and name.endswith('/kernel') and layer in frozen:
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
  for p, fl in frozen.items():
    packed[f'{p}/kernel.packed'] = artifact.PackedTensor(
      codes=fl.codes,
      bits=fl.bits if fl.bits.ndim else int(fl.bits),
      signed=fl.signed,
      axis=fl.axis,
    )
    scales[f'{p}/kernel.scale'] = np.atleast_1d(fl.scale)
    # Affine kernels only: symmetric ones keep the format they always had.
    if np.any(fl.zero_point != 0):
      scales[f'{p}/kernel.zero_point'] = np.atleast_1d(fl.zero_point)
    if np.any(fl.offset != 0):
      scales[f'{p}/kernel.offset'] = np.atleast_1d(fl.offset)
  meta = dict(metadata or {})
  meta['bits'] = {p: fl.bits.tolist() for p, fl in frozen.items()}
  # The activation side of the quantized model: every quantized input's
  # bits, sign and scale / range.
  meta['inputs'] = freeze_inputs(qmodel, variables)
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
  # The inputs' scales (and zero points / offsets) are scales of the model
  # too, stored as float32 values in the manifest.
  input_scales = sum(
    len(e.get(k, ()))
    for e in meta['inputs'].values()
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
      f'params/{p}/kernel': np.asarray(
        _node(variables['params'], p)['kernel'], np.float32
      )
      for p in frozen
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
  """``(codes - zero_point) * scale + offset`` per packed kernel of a read
  artifact (the zero point and offset are 0 unless stored)."""
  out = {}
  for name, c in codes.items():
    if not name.endswith('/kernel.packed'):
      continue
    layer = name[: -len('/kernel.packed')]
    axis = manifest['tensors'][name]['axis']
    part = lambda n, c=c, axis=axis, layer=layer: _bcast(
      floats.get(f'{layer}/kernel.{n}', np.zeros(1, np.float32)), c.ndim, axis
    )
    out[layer] = (c.astype(np.float32) - part('zero_point')) * part(
      'scale'
    ) + part('offset')
  return out
