"""The packed model artifact: one safetensors file, three blobs, a manifest.

Layout of ``<name>.safetensors`` (little-endian throughout):

* ``packed`` (uint8): every bit-packed kernel (:mod:`fracq.core.packing`)
  back to back;
* ``floats`` (float32): every float tensor (per-channel scales, biases,
  BatchNorm parameters and statistics) back to back;
* ``manifest`` (uint8): zlib-compressed compact JSON ``{"v": version,
  "meta": {...}, "t": {name: entry}}`` where a packed entry is ``["p",
  shape, bits (int or per-channel list), signed, axis, offset, nbytes,
  crc32]`` (dense bit packing), an encoded packed entry ``["e", shape,
  bits, signed, axis, encoding, tables, {part: [offset, nbytes, crc32]}]``
  (``encoding`` one of ``codebook``, ``sparse``, ``sparse_codebook``; its
  parts and ``tables`` as in :func:`fracq.core.packing.encode`) and a float
  entry ``["f", shape, offset, count, crc32]`` (offsets in bytes into
  ``packed``, in elements into ``floats``);
* safetensors metadata ``{"fracq_format": version}``.

Structure-aware encodings (``encode_structure=True``, the default): a
kernel whose codes are mostly zeros (pruned) and/or take few distinct values
(clustered) is stored as a nonzero bitmask and/or a small codebook plus
narrow indices, whichever is smallest, only when strictly smaller than dense
packing; reading gives back exactly the same codes. Version 2 files may hold
``"e"`` entries; a file without any is written as version 1 (readable by
older fracq); both versions are read.

Three tensors keep the container's own header tiny and the compressed
manifest costs a few bytes per tensor, so the file's size is the
theoretical ``params x bits / 8`` plus scales and float parts, plus well
under a kilobyte (minus what the structure-aware encodings save). Reading verifies the version and every tensor's CRC-32,
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

FORMAT_VERSION = 2  # written when a tensor uses an "e" encoding
READABLE_VERSIONS = (1, 2)  # version 1: dense "p" entries only


class ArtifactError(ValueError):
  """The artifact is missing, truncated, corrupt or of another version."""


@dataclasses.dataclass(frozen=True)
class PackedTensor:
  """Integer codes to store bit-packed (per tensor or per channel bits)."""

  codes: np.ndarray
  bits: Any  # int, or a per-channel sequence of ints
  signed: bool = True
  axis: int = -1  # channel axis for per-channel bits


def _crc(b: bytes) -> int:
  return zlib.crc32(b) & 0xFFFFFFFF


def publish(tmp: str, path: str) -> None:
  """Moves the finished temporary file ``tmp`` onto ``path`` with the mode
  ``open(path, 'w')`` would give it (0666 minus the umask): safetensors
  writes through a private 0600 temporary file, which would otherwise make
  the artifact unreadable to other users next to a 0644 report."""
  # The umask can only be read by setting it; restore it at once.
  umask = os.umask(0o022)
  os.umask(umask)
  os.chmod(tmp, 0o666 & ~umask)
  os.replace(tmp, path)


def write_artifact(
  path: str,
  packed: dict[str, PackedTensor],
  floats: dict[str, np.ndarray],
  metadata: dict,
  *,
  overwrite: bool = False,
  encode_structure: bool = True,
  encodings: dict | None = None,
) -> int:
  """Writes the artifact atomically; returns its size in bytes.

  Args:
    encode_structure: store a packed tensor as ``codebook`` / ``sparse`` /
      ``sparse_codebook`` when that is strictly smaller than dense packing
      (``False``: every tensor dense, as version 1 wrote them).
    encodings: if given, filled with ``name -> (encoding, nbytes,
      dense_nbytes)`` for every packed tensor.
  """
  from safetensors.numpy import save_file

  if os.path.exists(path) and not overwrite:
    raise FileExistsError(
      f'{path} exists; pass overwrite=True (or '
      '--config.overwrite=True) to replace it.'
    )
  entries, pbufs, fbufs, poff, foff = {}, [], [], 0, 0
  version = 1
  for name, t in packed.items():
    if np.ndim(t.bits) > 0:
      bits = [int(b) for b in np.asarray(t.bits).reshape(-1)]
    else:
      bits = int(t.bits)
    enc = packing.encode(
      t.codes, bits, signed=t.signed, axis=t.axis, structure=encode_structure
    )
    if encodings is not None:
      encodings[name] = (enc.kind, enc.nbytes, enc.dense_nbytes)
    head = [list(np.shape(t.codes)), bits, int(t.signed), int(t.axis)]
    if enc.kind == 'dense':
      buf = enc.parts['d']
      entries[name] = ['p'] + head + [poff, int(buf.size), _crc(buf.tobytes())]
      pbufs.append(buf)
      poff += buf.size
      continue
    version = FORMAT_VERSION
    parts = {}
    for part, buf in enc.parts.items():
      parts[part] = [poff, int(buf.size), _crc(buf.tobytes())]
      pbufs.append(buf)
      poff += buf.size
    entries[name] = ['e'] + head + [enc.kind, enc.tables, parts]
  for name, a in floats.items():
    a = np.ascontiguousarray(np.asarray(a, np.float32)).reshape(-1)
    entries[name] = [
      'f',
      list(np.shape(floats[name])),
      foff,
      int(a.size),
      _crc(a.tobytes()),
    ]
    fbufs.append(a)
    foff += a.size
  manifest = json.dumps(
    {'v': version, 'meta': metadata, 't': entries}, separators=(',', ':')
  )
  tensors = {
    'packed': np.concatenate(pbufs) if pbufs else np.zeros(0, np.uint8),
    'floats': np.concatenate(fbufs) if fbufs else np.zeros(0, np.float32),
    'manifest': np.frombuffer(
      zlib.compress(manifest.encode(), 9), np.uint8
    ).copy(),
  }
  tmp = path + '.tmp'
  save_file(tensors, tmp, metadata={'fracq_format': str(version)})
  publish(tmp, path)
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
    raise ArtifactError(
      f'{path} is not a readable safetensors file (truncated or corrupt?): {e}'
    ) from e
  if meta.get('fracq_format') not in [str(v) for v in READABLE_VERSIONS]:
    raise ArtifactError(
      f'{path}: format {meta.get("fracq_format")!r}, this '
      f'fracq reads versions {list(READABLE_VERSIONS)} (a '
      'newer fracq wrote it, or it is not a fracq '
      'artifact).'
    )
  missing = {'packed', 'floats', 'manifest'} - set(stored)
  if missing:
    raise ArtifactError(f'{path}: missing blobs {sorted(missing)}.')
  try:
    man = json.loads(zlib.decompress(stored['manifest'].tobytes()))
  except (zlib.error, ValueError) as e:
    raise ArtifactError(f'{path}: the manifest is corrupt ({e}).') from e
  if not isinstance(man, dict) or str(man.get('v')) != meta['fracq_format']:
    raise ArtifactError(
      f"{path}: the manifest's version does not match the "
      "file's (corrupt file)."
    )
  pblob, fblob = stored['packed'], stored['floats']
  codes, floats, tensors = {}, {}, {}
  for name, e in man['t'].items():
    if e[0] == 'e' and man['v'] >= 2:
      _, shape, bits, signed, axis, kind, tables, parts = e
      bufs = {}
      for part, (off, n, crc) in parts.items():
        buf = pblob[off : off + n]
        if buf.size != n or _crc(buf.tobytes()) != crc:
          raise ArtifactError(
            f'{path}: part {part!r} of packed tensor '
            f'{name!r} ({kind}) fails its checksum '
            '(corrupt or truncated file).'
          )
        bufs[part] = buf
      try:
        codes[name] = packing.decode(
          kind, bufs, shape, bits, signed=bool(signed), axis=axis, tables=tables
        )
      except ValueError as err:
        raise ArtifactError(
          f'{path}: tensor {name!r} does not match its '
          f'manifest entry ({kind}): {err}'
        ) from err
      tensors[name] = {
        'shape': shape,
        'bits': bits,
        'signed': bool(signed),
        'axis': axis,
        'encoding': kind,
      }
    elif e[0] == 'p':
      _, shape, bits, signed, axis, off, n, crc = e
      buf = pblob[off : off + n]
      if buf.size != n or _crc(buf.tobytes()) != crc:
        raise ArtifactError(
          f'{path}: packed tensor {name!r} fails its '
          'checksum (corrupt or truncated file).'
        )
      try:
        if isinstance(bits, list):
          codes[name] = packing.unpack_per_channel(
            buf, bits, shape, axis, signed=bool(signed)
          )
        else:
          codes[name] = packing.unpack_codes(
            buf, bits, int(np.prod(shape)), signed=bool(signed)
          ).reshape(shape)
      except ValueError as err:
        raise ArtifactError(
          f'{path}: tensor {name!r} does not match its manifest entry: {err}'
        ) from err
      tensors[name] = {
        'shape': shape,
        'bits': bits,
        'signed': bool(signed),
        'axis': axis,
        'encoding': 'dense',
      }
    elif e[0] == 'f':
      _, shape, off, n, crc = e
      a = fblob[off : off + n]
      if a.size != n or _crc(a.tobytes()) != crc:
        raise ArtifactError(
          f'{path}: float tensor {name!r} fails its '
          'checksum (corrupt or truncated file).'
        )
      if int(np.prod(shape)) != n:
        raise ArtifactError(
          f'{path}: tensor {name!r} has {n} values but shape {shape}.'
        )
      floats[name] = a.reshape(shape)
      tensors[name] = {'shape': shape}
    else:
      raise ArtifactError(
        f'{path}: tensor {name!r} has an unknown entry '
        f'kind {e[0]!r} for format {man["v"]}.'
      )
  return (
    codes,
    floats,
    {'version': man['v'], 'metadata': man['meta'], 'tensors': tensors},
  )
