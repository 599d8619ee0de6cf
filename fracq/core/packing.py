"""Dense bit packing of integer codes at 1-16 bits.

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
  if not 1 <= int(bits) <= 16:
    raise ValueError(f'bits={bits} is out of range: packing supports 1 to 16 '
                     'bits.')
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
    raise ValueError(f'codes span [{c.min()}, {c.max()}], outside the '
                     f'{bits}-bit {"signed" if signed else "unsigned"} range '
                     f'[{lo}, {hi}].')
  u = (c - lo).astype(np.uint32)
  shifts = np.arange(bits, dtype=np.uint32)
  # Bit matrix (n, bits), least significant bit first, flattened; built in
  # chunks of a multiple of 8 codes (whole bytes) to bound temporary memory.
  chunk = 1 << 20
  parts = [np.packbits(((u[i:i + chunk, None] >> shifts) & 1).astype(
      np.uint8).reshape(-1), bitorder='little')
           for i in range(0, max(u.size, 1), chunk)]
  return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_codes(buf, bits: int, count: int, *, signed: bool) -> np.ndarray:
  """Inverse of :func:`pack_codes`: ``count`` codes as int32."""
  bits = int(bits)
  lo, _ = code_range(bits, signed)
  buf = np.asarray(buf, np.uint8).reshape(-1)
  need = packed_nbytes(count, bits)
  if buf.size != need:
    raise ValueError(f'packed buffer has {buf.size} bytes, expected {need} for '
                     f'{count} codes at {bits} bits.')
  shifts = np.arange(bits, dtype=np.uint32)
  chunk = 1 << 20  # codes per chunk: a multiple of 8, so whole bytes
  out = np.empty(count, np.int32)
  for i in range(0, count, chunk):
    n = min(chunk, count - i)
    b0 = i * bits // 8
    stream = np.unpackbits(buf[b0:b0 + packed_nbytes(n, bits)],
                           bitorder='little')[:n * bits]
    u = (stream.reshape(n, bits).astype(np.uint32) << shifts).sum(axis=1)
    out[i:i + n] = u.astype(np.int64) + lo
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
  blocks = [pack_codes(c[i], int(b), signed=signed) for i, b in
            enumerate(bits)]
  offsets = np.cumsum([0] + [b.size for b in blocks])
  return (np.concatenate(blocks) if blocks else np.zeros(0, np.uint8),
          offsets)


def unpack_per_channel(buf, bits_per_channel, shape, axis: int, *,
                       signed: bool) -> np.ndarray:
  """Inverse of :func:`pack_per_channel` for a tensor of ``shape``."""
  shape = tuple(shape)
  moved = (shape[axis],) + tuple(s for i, s in enumerate(shape)
                                 if i != axis % len(shape))
  per = int(np.prod(moved[1:]))
  bits = np.asarray(bits_per_channel).astype(int).reshape(-1)
  buf = np.asarray(buf, np.uint8)
  out, start = [], 0
  for b in bits:
    n = packed_nbytes(per, b)
    out.append(unpack_codes(buf[start:start + n], b, per, signed=signed))
    start += n
  if start != buf.size:
    raise ValueError(f'per-channel buffer has {buf.size} bytes, expected '
                     f'{start}.')
  arr = np.stack(out).reshape(moved)
  return np.moveaxis(arr, 0, axis)
