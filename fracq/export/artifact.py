"""The packed model artifact: one safetensors file, three blobs, a manifest.

Layout of ``<name>.safetensors`` (little-endian throughout):

* ``packed`` (uint8): every bit-packed kernel (:mod:`fracq.core.packing`)
  back to back;
* ``floats`` (float32): every float tensor (per-channel scales, biases,
  BatchNorm parameters and statistics) back to back;
* ``manifest`` (uint8): zlib-compressed compact JSON ``{"v": version,
  "meta": {...}, "t": {name: entry}}`` where a packed entry is ``["p",
  shape, bits (int or per-channel list), signed, axis, offset, nbytes,
  crc32]`` and a float entry ``["f", shape, offset, count, crc32]``
  (offsets in bytes into ``packed``, in elements into ``floats``);
* safetensors metadata ``{"fracq_format": version}``.

Three tensors keep the container's own header tiny and the compressed
manifest costs a few bytes per tensor, so the file's size is the
theoretical ``params x bits / 8`` plus scales and float parts, plus well
under a kilobyte. Reading verifies the version and every tensor's CRC-32,
so a truncated or corrupt file raises :class:`ArtifactError` naming what is
wrong instead of yielding wrong weights. Writing is atomic and never
replaces an existing artifact unless asked to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any

import numpy as np

from fracq.core import packing

FORMAT_VERSION = 1


class ArtifactError(ValueError):
  """The artifact is missing, truncated, corrupt or of another version."""


@dataclasses.dataclass(frozen=True)
class PackedTensor:
  """Integer codes to store bit-packed (per tensor or per channel bits)."""

  codes: np.ndarray
  bits: Any            # int, or a per-channel sequence of ints
  signed: bool = True
  axis: int = -1       # channel axis for per-channel bits


def _crc(b: bytes) -> int:
  return zlib.crc32(b) & 0xFFFFFFFF


def write_artifact(path: str, packed: dict[str, PackedTensor],
                   floats: dict[str, np.ndarray], metadata: dict, *,
                   overwrite: bool = False) -> int:
  """Writes the artifact atomically; returns its size in bytes."""
  from safetensors.numpy import save_file
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True (or '
                          '--config.overwrite=True) to replace it.')
  entries, pbufs, fbufs, poff, foff = {}, [], [], 0, 0
  for name, t in packed.items():
    if np.ndim(t.bits) > 0:
      buf, _ = packing.pack_per_channel(t.codes, t.bits, t.axis,
                                        signed=t.signed)
      bits = [int(b) for b in np.asarray(t.bits).reshape(-1)]
    else:
      buf = packing.pack_codes(t.codes, int(t.bits), signed=t.signed)
      bits = int(t.bits)
    entries[name] = ['p', list(np.shape(t.codes)), bits, int(t.signed),
                     int(t.axis), poff, int(buf.size), _crc(buf.tobytes())]
    pbufs.append(buf)
    poff += buf.size
  for name, a in floats.items():
    a = np.ascontiguousarray(np.asarray(a, np.float32)).reshape(-1)
    entries[name] = ['f', list(np.shape(floats[name])), foff, int(a.size),
                     _crc(a.tobytes())]
    fbufs.append(a)
    foff += a.size
  manifest = json.dumps({'v': FORMAT_VERSION, 'meta': metadata,
                         't': entries}, separators=(',', ':'))
  tensors = {
      'packed': np.concatenate(pbufs) if pbufs else np.zeros(0, np.uint8),
      'floats': np.concatenate(fbufs) if fbufs else np.zeros(0, np.float32),
      'manifest': np.frombuffer(zlib.compress(manifest.encode(), 9),
                                np.uint8).copy(),
  }
  tmp = path + '.tmp'
  save_file(tensors, tmp, metadata={'fracq_format': str(FORMAT_VERSION)})
  os.replace(tmp, path)
  return os.path.getsize(path)


def read_artifact(path: str):
  """Returns ``(codes, floats, manifest)`` after verifying every tensor.

  ``codes`` maps each packed tensor to its integer codes (logical shape);
  ``manifest['tensors'][name]['axis']`` gives a packed tensor's channel axis.
  """
  from safetensors import safe_open
  if not os.path.exists(path):
    raise ArtifactError(f'No artifact at {path}.')
  try:
    with safe_open(path, framework='numpy') as f:
      meta = f.metadata() or {}
      stored = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # pylint: disable=broad-except
    raise ArtifactError(f'{path} is not a readable safetensors file (truncated '
                        f'or corrupt?): {e}') from e
  if meta.get('fracq_format') != str(FORMAT_VERSION):
    raise ArtifactError(f'{path}: format {meta.get("fracq_format")!r}, this '
                        f'fracq reads {FORMAT_VERSION} (or it is not a fracq '
                        'artifact).')
  missing = {'packed', 'floats', 'manifest'} - set(stored)
  if missing:
    raise ArtifactError(f'{path}: missing blobs {sorted(missing)}.')
  try:
    man = json.loads(zlib.decompress(stored['manifest'].tobytes()))
  except (zlib.error, ValueError) as e:
    raise ArtifactError(f'{path}: the manifest is corrupt ({e}).') from e
  pblob, fblob = stored['packed'], stored['floats']
  codes, floats, tensors = {}, {}, {}
  for name, e in man['t'].items():
    if e[0] == 'p':
      _, shape, bits, signed, axis, off, n, crc = e
      buf = pblob[off:off + n]
      if buf.size != n or _crc(buf.tobytes()) != crc:
        raise ArtifactError(f'{path}: packed tensor {name!r} fails its '
                            'checksum (corrupt or truncated file).')
      try:
        if isinstance(bits, list):
          codes[name] = packing.unpack_per_channel(buf, bits, shape, axis,
                                                   signed=bool(signed))
        else:
          codes[name] = packing.unpack_codes(
              buf, bits, int(np.prod(shape)),
              signed=bool(signed)).reshape(shape)
      except ValueError as err:
        raise ArtifactError(f'{path}: tensor {name!r} does not match its '
                            f'manifest entry: {err}') from err
      tensors[name] = {'shape': shape, 'bits': bits, 'signed': bool(signed),
                       'axis': axis}
    else:
      _, shape, off, n, crc = e
      a = fblob[off:off + n]
      if a.size != n or _crc(a.tobytes()) != crc:
        raise ArtifactError(f'{path}: float tensor {name!r} fails its '
                            'checksum (corrupt or truncated file).')
      if int(np.prod(shape)) != n:
        raise ArtifactError(f'{path}: tensor {name!r} has {n} values but '
                            f'shape {shape}.')
      floats[name] = a.reshape(shape)
      tensors[name] = {'shape': shape}
  return codes, floats, {'version': man['v'], 'metadata': man['meta'],
                         'tensors': tensors}
