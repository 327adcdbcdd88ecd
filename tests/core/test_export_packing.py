"""Bitstream packing of b-bit integers (b = 2..8): exact inverse, documented byte layout, size."""

from __future__ import annotations

import pytest
import torch

from ssql_core.export.packing import pack_bits, packed_nbytes, unpack_bits


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_identical(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for n in (1, 7, 8, 9, 1001):
        v = torch.randint(lo, hi + 1, (n,), generator=g)
        v[0], v[-1] = lo, hi  # both extremes present
        packed = pack_bits(v, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8 == packed_nbytes(n, bits)
        assert torch.equal(unpack_bits(packed, bits, n).long(), v)


def test_byte_layout_is_little_endian_bitstream() -> None:
    # 4 bits: low nibble first, two's complement; 2 bits: four per byte, first value in bits 0-1
    assert pack_bits(torch.tensor([1, -1, -8, 7]), 4).tolist() == [0xF1, 0x78]
    assert pack_bits(torch.tensor([1, -2, 0, -1]), 2).tolist() == [0b11_00_10_01]
    # 3 bits: the second value straddles nothing, the third crosses the byte boundary
    assert pack_bits(torch.tensor([3, -4, 2]), 3).tolist() == [0b10_100_011, 0b0]
    assert pack_bits(torch.tensor([-128, 127]), 8).tolist() == [0x80, 0x7F]


def test_out_of_range_and_wrong_length_refused() -> None:
    with pytest.raises(ValueError, match="range"):
        pack_bits(torch.tensor([4]), 3)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="bit-width"):
        pack_bits(torch.tensor([0]), 9)
