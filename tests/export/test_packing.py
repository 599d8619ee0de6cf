"""Bit packing round-trips exactly (property-based), with exact byte sizes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fracq.core import packing


@settings(max_examples=200, deadline=None)
@given(
  bits=st.integers(1, 8),
  signed=st.booleans(),
  n=st.sampled_from([1, 2, 7, 13, 64, 1023]) | st.integers(1, 300),
  seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_every_width(bits, signed, n, seed):
  lo, hi = packing.code_range(bits, signed)
  codes = np.random.default_rng(seed).integers(lo, hi + 1, size=n)
  buf = packing.pack_codes(codes, bits, signed=signed)
  assert buf.dtype == np.uint8 and buf.size == (n * bits + 7) // 8
  np.testing.assert_array_equal(
    packing.unpack_codes(buf, bits, n, signed=signed), codes
  )


@settings(max_examples=60, deadline=None)
@given(
  shape=st.sampled_from([(3, 3, 5, 7), (13, 4), (1, 1, 1, 9), (6,)]),
  signed=st.booleans(),
  seed=st.integers(0, 2**31 - 1),
)
def test_per_channel_round_trip(shape, signed, seed):
  rng = np.random.default_rng(seed)
  axis = len(shape) - 1
  bits = rng.integers(1, 9, size=shape[axis])
  codes = np.zeros(shape, np.int64)
  for c, b in enumerate(bits):
    lo, hi = packing.code_range(int(b), signed)
    codes[..., c] = rng.integers(lo, hi + 1, size=shape[:-1])
  buf, offsets = packing.pack_per_channel(codes, bits, axis, signed=signed)
  per = int(np.prod(shape)) // shape[axis]
  assert buf.size == sum((per * int(b) + 7) // 8 for b in bits)
  assert offsets[-1] == buf.size
  np.testing.assert_array_equal(
    packing.unpack_per_channel(buf, bits, shape, axis, signed=signed), codes
  )


def test_known_layout():
  # 3-bit unsigned codes 1, 2, 7 -> bits 100 010 111 (LSB first) ->
  # byte0 = 0b11010001 = 0xD1, byte1 = 0b00000001.
  buf = packing.pack_codes([1, 2, 7], 3, signed=False)
  assert buf.tolist() == [0xD1, 0x01]
  # Signed 2-bit: offset 2: -2,-1,0,1 -> 0,1,2,3 -> 0b11100100.
  assert packing.pack_codes([-2, -1, 0, 1], 2, signed=True).tolist() == [0xE4]


def test_errors():
  with pytest.raises(ValueError, match=r'outside the 3-bit signed range'):
    packing.pack_codes([4], 3, signed=True)
  with pytest.raises(ValueError, match='bits=17 is out of range'):
    packing.pack_codes([0], 17, signed=False)
  with pytest.raises(ValueError, match=r'outside the 0-bit signed range'):
    packing.pack_codes([1], 0, signed=True)


def test_zero_bit_channels_take_no_bytes():
  # A pruned (0-bit) channel is all zeros and stores nothing; its neighbours
  # keep their own widths: 2 codes x 3 bits -> 1 byte, 2 x 0 -> 0, 2 x 5 -> 2.
  codes = np.array([[3, -4], [0, 0], [15, -16]]).T  # channels on axis 1
  buf, offsets = packing.pack_per_channel(codes, [3, 0, 5], 1, signed=True)
  assert offsets.tolist() == [0, 1, 1, 3]
  np.testing.assert_array_equal(
    packing.unpack_per_channel(buf, [3, 0, 5], codes.shape, 1, signed=True),
    codes,
  )
  enc = packing.encode(codes, [3, 0, 5], signed=True, axis=1, structure=False)
  assert enc.nbytes == 3
  np.testing.assert_array_equal(
    packing.decode(
      'dense', enc.parts, codes.shape, [3, 0, 5], signed=True, axis=1
    ),
    codes,
  )
  with pytest.raises(ValueError, match='expected 2'):
    packing.unpack_codes(np.zeros(3, np.uint8), 3, 4, signed=False)
