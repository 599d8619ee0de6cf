"""Freeze a trained fracq model into integer codes and measure its real size.

For every layer with a quantized kernel: integer codes, a per-channel (or
per-tensor) scale, and the bit-width (per layer or per channel), such that
``codes * scale`` is exactly the kernel the fake-quantized model computes
with. Supported kernel quantizers: LSQ (uniform QAT) and the FracBits shared
range after hard assignment; others raise a clear error.

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
import numpy as np

from fracq.export import artifact
from fracq.interception import QuantizedModule


def _node(tree, path):
  for p in path.split('/'):
    tree = tree[p]
  return tree


@dataclasses.dataclass(frozen=True)
class FrozenLayer:
  path: str
  codes: np.ndarray
  scale: np.ndarray      # broadcastable against codes along the channel axis
  bits: np.ndarray       # () or (C,)
  axis: int


def _bcast(v, ndim, axis):
  v = np.asarray(v, np.float32)
  if v.ndim == 0:
    return v
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
    raise ValueError(f'{type(tr).__name__}: a kernel transform needs a '
                     'strip(variables, qmodel, keep_quant) method to be '
                     'frozen.')
  return tr.strip(variables, qmodel=qmodel, keep_quant=True)


def freeze(qmodel, variables) -> dict[str, FrozenLayer]:
  """Integer codes and scales of every quantized kernel of ``qmodel``."""
  variables = _transformed(qmodel, variables)
  quant = variables.get('quant', {})
  stats = variables.get('quant_stats', {})
  out = {}
  for path, f in qmodel.facts.items():
    if not f.weight_quantized:
      continue
    spec = qmodel.rules[f.rule_index].weight
    w = np.asarray(_node(variables['params'], path)['kernel'], np.float32)
    axis = f.out_axes[-1]
    q = _node(quant, path)
    if spec.learn_bits:
      if not getattr(qmodel, 'hard', False):
        raise ValueError('Freeze a FracBits model after hard assignment (its '
                         'bits must be integers): use qmodel.for_step(...) and '
                         'prepare(variables) first.')
      if spec.range_method == 'dorefa':
        raise ValueError(f'{path}: DoReFa kernels are not exportable yet; use '
                         "range_method='lsq'.")
      bits = np.asarray(_node(stats, path)['kernel_hard_bits'])
      if np.any(bits < 2):
        raise ValueError(f'{path}: bits {bits.min()} < 2 (pruned channels) are '
                         'not exportable yet.')
      r = np.abs(np.asarray(q['kernel_range'], np.float32))
      qp = 2.0 ** (bits - 1) - 1
      step = r / qp if r.ndim else np.float32(r / qp)
      step_b = _bcast(step, w.ndim, axis)
      qp_b = _bcast(qp, w.ndim, axis)
      codes = np.round(np.clip(w / step_b, -qp_b, qp_b))
    elif spec.range_method == 'lsq':
      bits = np.asarray(int(spec.bits))
      step = np.asarray(q['kernel_step'], np.float32)
      step_b = _bcast(step, w.ndim, axis)
      lo, hi = spec.int_grid(signed=True, is_kernel=True)
      codes = np.round(np.clip(w / step_b, lo, hi))
    else:
      raise ValueError(f'{path}: range_method={spec.range_method!r} kernels '
                       "are not exportable yet; use 'lsq' (or FracBits).")
    out[path] = FrozenLayer(path=path, codes=codes.astype(np.int32),
                            scale=np.asarray(step, np.float32),
                            bits=np.asarray(bits).astype(np.int32),
                            axis=axis % w.ndim)
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

  qm = QuantizedModule(qmodel.module, qmodel.rules, Capture(),
                       on_unused='warn')
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
  encodings: tuple = ()            # ((encoding, count), ...)
  encode_structure: bool = True

  @property
  def overhead(self) -> float:
    """Container overhead: the file over what its encodings should take,
    ``artifact / (theoretical - structure saved) - 1`` (without structure
    encodings simply ``artifact / theoretical - 1``)."""
    return self.artifact_bytes / (self.theoretical_bytes -
                                  self.structure_saved_bytes) - 1

  @property
  def actual_over_theoretical(self) -> float:
    """The file over the dense theoretical size (< 1 when the structure
    encodings saved more than the container costs)."""
    return self.artifact_bytes / self.theoretical_bytes

  def encoding_counts(self) -> dict:
    return dict(self.encodings)

  def format(self) -> str:
    rows = [('packed artifact (on disk)', self.artifact_bytes),
            ('theoretical (params x bits / 8 + scales + float parts)',
             self.theoretical_bytes),
            ('structure (sparsity/clusters) saved',
             self.structure_saved_bytes),
            ('INT8 artifact (on disk)', self.int8_artifact_bytes),
            ('float32 checkpoint', self.float32_bytes)]
    lines = [f'{n:<58} {v / 1024:>10.1f} KiB' for n, v in rows]
    counts = self.encoding_counts()
    if self.encode_structure:
      lines[2] += (f': {counts.get("codebook", 0)} tensors codebook, '
                   f'{counts.get("sparse", 0)} sparse, '
                   f'{counts.get("sparse_codebook", 0)} sparse+codebook, '
                   f'{counts.get("dense", 0)} dense')
    else:
      lines[2] += ' (structure encodings disabled)'
    ratio = self.actual_over_theoretical
    if self.structure_saved_bytes:
      lines.append(f'actual / theoretical: {ratio:.4f} '
                   f'({100 * (ratio - 1):+.2f}%); container overhead over '
                   f'theoretical - structure saved: {100 * self.overhead:+.2f}%')
    else:
      lines.append(f'actual / theoretical: {ratio:.4f} '
                   f'({100 * (ratio - 1):+.2f}%)')
    lines.append(f'compression over INT8 (actual bytes): '
                 f'{self.int8_artifact_bytes / self.artifact_bytes:.2f}x; '
                 f'over float32: {self.float32_bytes / self.artifact_bytes:.2f}x'
                 f'; mean kernel bits {self.mean_kernel_bits:.2f}')
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


def export_model(qmodel, variables, path: str, *, overwrite: bool = False,
                 metadata: dict | None = None,
                 encode_structure: bool = True) -> SizeReport:
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
        codes=fl.codes, bits=fl.bits if fl.bits.ndim else int(fl.bits),
        signed=True, axis=fl.axis)
    scales[f'{p}/kernel.scale'] = np.atleast_1d(fl.scale)
  meta = dict(metadata or {})
  meta['bits'] = {p: fl.bits.tolist() for p, fl in frozen.items()}
  encodings = {}
  size = artifact.write_artifact(path, packed, {**floats, **scales}, meta,
                                 overwrite=overwrite,
                                 encode_structure=encode_structure,
                                 encodings=encodings)
  saved = sum(dense - n for _, n, dense in encodings.values())
  counts = {}
  for kind, _, _ in encodings.values():
    counts[kind] = counts.get(kind, 0) + 1
  kernel_params = sum(fl.codes.size for fl in frozen.values())
  kernel_bits = sum(
      float(np.sum(fl.bits) * fl.codes.size / max(np.size(fl.bits), 1))
      if fl.bits.ndim else float(fl.bits) * fl.codes.size
      for fl in frozen.values())
  theoretical = (kernel_bits / 8 + sum(s.nbytes for s in scales.values()) +
                 sum(a.nbytes for a in floats.values()))
  with tempfile.TemporaryDirectory() as tmp:
    int8 = {k: dataclasses.replace(v, bits=8) for k, v in packed.items()}
    int8_size = artifact.write_artifact(os.path.join(tmp, 'int8'), int8,
                                        {**floats, **scales}, meta,
                                        encode_structure=False)
    f32 = {f'params/{p}/kernel': np.asarray(
        _node(variables['params'], p)['kernel'], np.float32) for p in frozen}
    f32_size = artifact.write_artifact(os.path.join(tmp, 'f32'), {},
                                       {**floats, **f32}, {})
  return SizeReport(artifact_bytes=size, theoretical_bytes=theoretical,
                    int8_artifact_bytes=int8_size, float32_bytes=f32_size,
                    kernel_params=kernel_params,
                    mean_kernel_bits=kernel_bits / max(kernel_params, 1),
                    structure_saved_bytes=int(saved),
                    encodings=tuple(sorted(counts.items())),
                    encode_structure=bool(encode_structure))


def dequantized_kernels(codes: dict, floats: dict, manifest: dict) -> dict:
  """``codes * scale`` per packed kernel of a read artifact."""
  out = {}
  for name, c in codes.items():
    layer = name[:-len('/kernel.packed')]
    s = floats[f'{layer}/kernel.scale']
    axis = manifest['tensors'][name]['axis']
    out[layer] = c.astype(np.float32) * (
        _bcast(s, c.ndim, axis) if s.size > 1 else s.reshape(()))
  return out
