"""Dense bit packing of integer codes at 0-16 bits (0: all-zero codes).

Layout: codes are stored as unsigned ``bits``-bit fields, little-endian
within the stream: field ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``,
stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Signed codes are stored
with an offset of ``2^(bits-1)`` (so ``[-2^(b-1), 2^(b-1)-1]`` maps to
``[0, 2^b - 1]``). Only the last byte can hold padding: a tensor of ``n``
codes takes exactly ``ceil(n * bits / 8)`` bytes.

Per-channel bit-widths (kernel-wise FracBits): the tensor is moved so the
channel axis is first, and each channel's codes are packed at its own width
into its own byte-aligned block, blocks concatenated in channel order:
``sum_c ceil(n_c * bits_c / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np


def code_range(bits: int, signed: bool) -> tuple[int, int]:
  """The codes a ``bits``-bit field holds; 0 bits hold only the code 0 (a
  pruned channel, stored in no bytes)."""
  bits = int(bits)
  if not 0 <= bits <= 16:
    raise ValueError(
      f'bits={bits} is out of range: packing supports 0 to 16 bits.'
    )
  if bits == 0:
    return 0, 0
  if signed:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
  return 0, (1 << bits) - 1


def packed_nbytes(n: int, bits: int) -> int:
  return (int(n) * int(bits) + 7) // 8


def pack_codes(codes, bits: int, *, signed: bool) -> np.ndarray:
  """Packs integer ``codes`` (any shape, flattened C-order) into uint8."""
  bits = int(bits)
  lo, hi = code_range(bits, signed)
  c = np.asarray(codes).reshape(-1).astype(np.int64)
  if c.size and (c.min() < lo or c.max() > hi):
    raise ValueError(
      f'codes span [{c.min()}, {c.max()}], outside the '
      f'{bits}-bit {"signed" if signed else "unsigned"} range '
      f'[{lo}, {hi}].'
    )
  u = (c - lo).astype(np.uint32)
  shifts = np.arange(bits, dtype=np.uint32)
  # Bit matrix (n, bits), least significant bit first, flattened; built in
  # chunks of a multiple of 8 codes (whole bytes) to bound temporary memory.
  chunk = 1 << 20
  parts = [
    np.packbits(
      ((u[i : i + chunk, None] >> shifts) & 1).astype(np.uint8).reshape(-1),
      bitorder='little',
    )
    for i in range(0, max(u.size, 1), chunk)
  ]
  return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_codes(buf, bits: int, count: int, *, signed: bool) -> np.ndarray:
  """Inverse of :func:`pack_codes`: ``count`` codes as int32."""
  bits = int(bits)
  lo, _ = code_range(bits, signed)
  buf = np.asarray(buf, np.uint8).reshape(-1)
  need = packed_nbytes(count, bits)
  if buf.size != need:
    raise ValueError(
      f'packed buffer has {buf.size} bytes, expected {need} for '
      f'{count} codes at {bits} bits.'
    )
  shifts = np.arange(bits, dtype=np.uint32)
  chunk = 1 << 20  # codes per chunk: a multiple of 8, so whole bytes
  out = np.empty(count, np.int32)
  for i in range(0, count, chunk):
    n = min(chunk, count - i)
    b0 = i * bits // 8
    stream = np.unpackbits(
      buf[b0 : b0 + packed_nbytes(n, bits)], bitorder='little'
    )[: n * bits]
    u = (stream.reshape(n, bits).astype(np.uint32) << shifts).sum(axis=1)
    out[i : i + n] = u.astype(np.int64) + lo
  return out


def pack_per_channel(codes, bits_per_channel, axis: int, *, signed: bool):
  """Packs each channel (along ``axis``) at its own bit-width.

  Returns:
    ``(buffer, offsets)``: the concatenated blocks and each channel's start
    byte (length ``C + 1``, last entry = total size).
  """
  c = np.moveaxis(np.asarray(codes), axis, 0)
  bits = np.asarray(bits_per_channel).astype(int).reshape(-1)
  if bits.size != c.shape[0]:
    raise ValueError(f'{bits.size} bit-widths for {c.shape[0]} channels.')
  blocks = [pack_codes(c[i], int(b), signed=signed) for i, b in enumerate(bits)]
  offsets = np.cumsum([0] + [b.size for b in blocks])
  return (np.concatenate(blocks) if blocks else np.zeros(0, np.uint8), offsets)


def unpack_per_channel(
  buf, bits_per_channel, shape, axis: int, *, signed: bool
) -> np.ndarray:
  """Inverse of :func:`pack_per_channel` for a tensor of ``shape``."""
  shape = tuple(shape)
  moved = (shape[axis],) + tuple(
    s for i, s in enumerate(shape) if i != axis % len(shape)
  )
  per = int(np.prod(moved[1:]))
  bits = np.asarray(bits_per_channel).astype(int).reshape(-1)
  buf = np.asarray(buf, np.uint8)
  out, start = [], 0
  for b in bits:
    n = packed_nbytes(per, b)
    out.append(unpack_codes(buf[start : start + n], b, per, signed=signed))
    start += n
  if start != buf.size:
    raise ValueError(
      f'per-channel buffer has {buf.size} bytes, expected {start}.'
    )
  arr = np.stack(out).reshape(moved)
  return np.moveaxis(arr, 0, axis)


# -- structure-aware encodings (sparsity, clusters) ---------------------------
#
# A tensor is split into *groups*: the whole tensor (C-order) for one
# bit-width, or its channels (channel axis moved first) for per-channel
# bit-widths; group ``g`` has ``n_g`` codes at ``b_g`` bits. Each encoding is
# a few uint8 *parts*, every group's block in a part byte-aligned and the
# blocks concatenated in group order:
#
# * ``dense``: part ``d``: the groups' codes at ``b_g`` bits (exactly
#   :func:`pack_codes` / :func:`pack_per_channel`).
# * ``codebook``: part ``t``: each group's sorted distinct codes (``K_g`` of
#   them, at ``b_g`` bits, signedness of the tensor); part ``i``: each code's
#   index into its group's table, unsigned at ``index_bits(K_g) =
#   ceil(log2 K_g)`` bits (no bytes at all when ``K_g <= 1``).
# * ``sparse``: part ``m``: the nonzero mask of the whole tensor (group order),
#   one bit per code, LSB first, zero padding; part ``v``: each group's
#   nonzero codes at ``b_g`` bits.
# * ``sparse_codebook``: part ``m`` as for ``sparse``; parts ``t`` and ``i``
#   as for ``codebook`` but over the group's *nonzero* codes only.
#
# ``tables`` (the ``K_g``) are stored with the encoding; everything else
# (block sizes, nonzero counts) follows from the shape, bits and the mask.
# :func:`encode` picks the smallest; a structured encoding only when it is
# strictly smaller than ``dense``.

ENCODINGS = ('dense', 'codebook', 'sparse', 'sparse_codebook')
PARTS = {
  'dense': ('d',),
  'codebook': ('t', 'i'),
  'sparse': ('m', 'v'),
  'sparse_codebook': ('m', 't', 'i'),
}


def index_bits(k: int) -> int:
  """Bits of an index into a table of ``k`` values (0 for ``k <= 1``)."""
  return 0 if int(k) <= 1 else (int(k) - 1).bit_length()


class Encoded:
  """One tensor's encoding: ``kind``, its ``parts`` (name -> uint8 array, in
  :data:`PARTS` order), the table sizes ``tables`` (per group; ``None`` for
  kinds without a table), and ``dense_nbytes`` (its size if stored dense)."""

  __slots__ = ('kind', 'parts', 'tables', 'dense_nbytes')

  def __init__(self, kind, parts, tables, dense_nbytes):
    self.kind = kind
    self.parts = parts
    self.tables = tables
    self.dense_nbytes = int(dense_nbytes)

  @property
  def nbytes(self) -> int:
    return int(sum(p.size for p in self.parts.values()))

  def __repr__(self):
    return (
      f'Encoded({self.kind}, {self.nbytes} bytes (dense '
      f'{self.dense_nbytes}), tables={self.tables})'
    )


def _group_layout(shape, bits, axis):
  """``(moved_shape, per-group bits (G,), codes per group)``."""
  shape = tuple(int(s) for s in shape)
  if np.ndim(bits) == 0:
    n = int(np.prod(shape))
    return shape, np.asarray([int(bits)]), n
  b = np.asarray(bits).astype(int).reshape(-1)
  if not shape:
    raise ValueError('per-channel bits for a scalar tensor.')
  ax = axis % len(shape)
  if b.size != shape[ax]:
    raise ValueError(f'{b.size} bit-widths for {shape[ax]} channels.')
  moved = (shape[ax],) + tuple(s for i, s in enumerate(shape) if i != ax)
  return moved, b, int(np.prod(moved[1:]))


def _blocks(values_per_group, bits_per_group, signed):
  """Each group's values packed at its bits, byte-aligned, concatenated."""
  out = [
    pack_codes(v, int(b), signed=signed)
    if int(b) > 0 and len(v)
    else np.zeros(0, np.uint8)
    for v, b in zip(values_per_group, bits_per_group)
  ]
  return np.concatenate(out) if out else np.zeros(0, np.uint8)


def _unblocks(buf, counts, bits_per_group, signed, what):
  """Inverse of :func:`_blocks`: a list of int64 arrays."""
  buf = np.asarray(buf, np.uint8).reshape(-1)
  need = sum(packed_nbytes(n, b) for n, b in zip(counts, bits_per_group))
  if buf.size != need:
    raise ValueError(f'part {what!r} has {buf.size} bytes, expected {need}.')
  out, start = [], 0
  for n, b in zip(counts, bits_per_group):
    n, b = int(n), int(b)
    if b == 0 or n == 0:
      out.append(np.zeros(n, np.int64))
      continue
    k = packed_nbytes(n, b)
    out.append(
      unpack_codes(buf[start : start + k], b, n, signed=signed).astype(np.int64)
    )
    start += k
  return out


def _codebook_nbytes(k, n, b):
  return packed_nbytes(k, b) + packed_nbytes(n, index_bits(k))


def encode(
  codes, bits, *, signed: bool, axis: int = -1, structure: bool = True
) -> Encoded:
  """Encodes integer ``codes`` at ``bits`` (an int, or per-channel along
  ``axis``): the smallest of the encodings above (``dense`` unless another is
  strictly smaller, or when ``structure=False``). Exactly reversed by
  :func:`decode`."""
  c = np.asarray(codes)
  moved, gbits, per = _group_layout(c.shape, bits, axis)
  if np.ndim(bits) == 0:
    flat = c.reshape(-1).astype(np.int64)
  else:
    flat = np.moveaxis(c, axis, 0).reshape(-1).astype(np.int64)
  G = gbits.size
  rows = flat.reshape(G, per)
  for g, b in enumerate(gbits):  # range check (and bits in 1..16)
    lo, hi = code_range(int(b), signed)
    if per and (rows[g].min() < lo or rows[g].max() > hi):
      raise ValueError(
        f'codes span [{rows[g].min()}, {rows[g].max()}], '
        f'outside the {b}-bit '
        f'{"signed" if signed else "unsigned"} range '
        f'[{lo}, {hi}].'
      )
  dense_n = sum(packed_nbytes(per, b) for b in gbits)
  kind = 'dense'
  if structure and per > 0:
    srt = np.sort(rows, axis=1)
    new = np.ones_like(srt, bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    k_all = new.sum(axis=1)
    has_zero = (srt == 0).any(axis=1)
    k_nz = k_all - has_zero
    nnz = np.count_nonzero(rows, axis=1)
    mask_n = packed_nbytes(flat.size, 1)
    sizes = {
      'dense': dense_n,
      'codebook': sum(
        _codebook_nbytes(k, per, b) for k, b in zip(k_all, gbits)
      ),
      'sparse': mask_n + sum(packed_nbytes(z, b) for z, b in zip(nnz, gbits)),
      'sparse_codebook': mask_n
      + sum(_codebook_nbytes(k, z, b) for k, z, b in zip(k_nz, nnz, gbits)),
    }
    kind = min(ENCODINGS, key=lambda e: (sizes[e], ENCODINGS.index(e)))
  if kind == 'dense':
    return Encoded('dense', {'d': _blocks(rows, gbits, signed)}, None, dense_n)
  parts = {}
  if kind.startswith('sparse'):
    nzmask = flat != 0
    parts['m'] = np.packbits(nzmask.astype(np.uint8), bitorder='little')
    members = [r[r != 0] for r in rows]
  else:
    members = list(rows)
  if kind == 'sparse':
    parts['v'] = _blocks(members, gbits, signed)
    return Encoded(kind, parts, None, dense_n)
  tables = [np.unique(m) for m in members]
  idx = [np.searchsorted(t, m) for t, m in zip(tables, members)]
  parts['t'] = _blocks(tables, gbits, signed)
  ib = [index_bits(t.size) for t in tables]
  parts['i'] = _blocks(idx, ib, False)
  return Encoded(kind, parts, [int(t.size) for t in tables], dense_n)


def decode(
  kind: str,
  parts: dict,
  shape,
  bits,
  *,
  signed: bool,
  axis: int = -1,
  tables=None,
) -> np.ndarray:
  """Inverse of :func:`encode`: int32 codes of ``shape``. Raises
  ``ValueError`` when the parts do not fit the description."""
  if kind not in ENCODINGS:
    raise ValueError(
      f'unknown encoding {kind!r}; this fracq knows {ENCODINGS}.'
    )
  if set(parts) != set(PARTS[kind]):
    raise ValueError(
      f'encoding {kind!r} needs parts {PARTS[kind]}, got {sorted(parts)}.'
    )
  shape = tuple(int(s) for s in shape)
  moved, gbits, per = _group_layout(shape, bits, axis)
  G = gbits.size
  n = G * per
  for b in gbits:
    code_range(int(b), signed)  # bits in range
  if kind == 'dense':
    vals = _unblocks(parts['d'], [per] * G, gbits, signed, 'd')
    flat = np.concatenate(vals) if vals else np.zeros(0, np.int64)
  else:
    if kind.startswith('sparse'):
      m = np.asarray(parts['m'], np.uint8).reshape(-1)
      if m.size != packed_nbytes(n, 1):
        raise ValueError(
          f"part 'm' has {m.size} bytes, expected "
          f'{packed_nbytes(n, 1)} for {n} codes.'
        )
      bitsv = np.unpackbits(m, bitorder='little')
      if bitsv[n:].any():
        raise ValueError("the mask's padding bits are not zero.")
      nzmask = bitsv[:n].astype(bool)
      counts = nzmask.reshape(G, per).sum(axis=1) if G else np.zeros(0, int)
    else:
      counts = np.full(G, per)
    if kind == 'sparse':
      members = _unblocks(parts['v'], counts, gbits, signed, 'v')
    else:
      if tables is None or len(tables) != G:
        raise ValueError(
          f'encoding {kind!r} needs {G} table sizes, got {tables!r}.'
        )
      ks = [int(k) for k in tables]
      for k, b, z in zip(ks, gbits, counts):
        if not 0 <= k <= (1 << int(b)) or (z > 0 and k == 0):
          raise ValueError(
            f'table size {k} is impossible for {z} codes at {b} bits.'
          )
      tabs = _unblocks(parts['t'], ks, gbits, signed, 't')
      idx = _unblocks(
        parts['i'], counts, [index_bits(k) for k in ks], False, 'i'
      )
      members = []
      for t, i in zip(tabs, idx):
        if t.size > 1 and np.any(np.diff(t) <= 0):
          raise ValueError('a codebook table is not strictly increasing.')
        if i.size and i.max() >= t.size:
          raise ValueError(
            f'an index ({i.max()}) is past its table ({t.size} values).'
          )
        members.append(t[i] if t.size else i)
    vals = np.concatenate(members) if members else np.zeros(0, np.int64)
    if kind.startswith('sparse'):
      if np.any(vals == 0):
        raise ValueError('a code the mask marks nonzero is 0.')
      flat = np.zeros(n, np.int64)
      flat[nzmask] = vals
    else:
      flat = vals
  arr = flat.astype(np.int32).reshape(moved)
  if np.ndim(bits) == 0:
    return arr.reshape(shape)
  return np.moveaxis(arr, 0, axis % len(shape))
