"""Little-endian bitstream packing of signed b-bit integers into bytes (b = 2..8).

Safetensors has I8/U8 but no sub-byte types, so a ``b``-bit weight tensor is stored as one U8
bitstream: value ``i`` (in C order) occupies stream bits ``[i*b, (i+1)*b)``, least significant
bit first, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Values are stored in two's
complement truncated to ``b`` bits and sign-extended on unpacking. For b = 4 this is the familiar
"two per byte, low nibble first"; for b = 8 it is the int8 bytes themselves. The last byte is
zero-padded, so a tensor of ``n`` values takes ``ceil(n * b / 8)`` bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MIN_PACK_BITS, MAX_PACK_BITS = 2, 8
#: layout name written into the manifest for every packed tensor
LAYOUT = "bitstream-le"
#: values per chunk (a multiple of 8, so every chunk starts on a byte boundary)
_CHUNK = 1 << 22


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_PACK_BITS <= bits <= MAX_PACK_BITS:
        raise ValueError(f"packed bit-width must be an integer from {MIN_PACK_BITS} to {MAX_PACK_BITS}, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes a stream of ``count`` ``bits``-bit values takes."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack signed integers in ``[-2^(b-1), 2^(b-1) - 1]`` into a flat uint8 bitstream."""
    _check_bits(bits)
    flat = values.detach().reshape(-1).to(torch.int64).cpu()
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f"values outside the signed {bits}-bit range [{lo}, {hi}]")
    codes = (flat.numpy() & ((1 << bits) - 1)).astype(np.uint8)
    out = np.empty(packed_nbytes(codes.size, bits), dtype=np.uint8)
    for start in range(0, codes.size, _CHUNK):
        chunk = codes[start:start + _CHUNK]
        stream = np.unpackbits(chunk[:, None], axis=1, bitorder="little")[:, :bits].reshape(-1)
        packed = np.packbits(stream, bitorder="little")
        first = start * bits // 8
        out[first:first + packed.size] = packed
    return torch.from_numpy(out)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``count`` sign-extended values as int8."""
    _check_bits(bits)
    data = packed.detach().reshape(-1).cpu()
    if data.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {data.dtype}")
    if data.numel() != packed_nbytes(count, bits):
        raise ValueError(f"{count} values at {bits} bits need {packed_nbytes(count, bits)} bytes, got {data.numel()}")
    raw = data.numpy()
    out = np.empty(count, dtype=np.int16)
    sign = 1 << (bits - 1)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * bits // 8
        stream = np.unpackbits(raw[first:first + packed_nbytes(n, bits)], bitorder="little")[: n * bits]
        codes = np.packbits(stream.reshape(n, bits), axis=1, bitorder="little")[:, 0].astype(np.int16)
        out[start:start + n] = (codes ^ sign) - sign  # sign-extend b-bit two's complement
    return torch.from_numpy(out.astype(np.int8))
