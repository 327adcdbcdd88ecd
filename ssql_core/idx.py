"""Reader for the IDX files of MNIST and Fashion-MNIST (LeCun's format), gzipped or not.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values. Only unsigned bytes (type 0x08) occur in these
datasets. Every problem (missing, truncated, corrupt, wrong shape) is an :class:`IDXError` whose
message names the file, never a numpy error from deep inside.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

UBYTE = 0x08


class IDXError(ValueError):
    """An IDX file that cannot be read; the message names the file and what is wrong with it."""


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except FileNotFoundError:
        raise IDXError(f"{path}: file not found") from None
    except (EOFError, OSError, zlib.error) as e:
        raise IDXError(f"{path}: corrupt or truncated gzip data ({e}); download the file again") from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array stored in ``path``, which must have ``ndim`` dimensions."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: {len(data)} bytes, too short to be an IDX file")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != UBYTE:
        raise IDXError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 0000080{ndim})")
    if dims != ndim:
        raise IDXError(f"{path}: has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise IDXError(f"{path}: truncated header")
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise IDXError(f"{path}: holds {len(data) - header} values after its header, the header says {shape} = {expected}: "
                       "the file is truncated or corrupt; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write a uint8 array as an IDX file (gzipped when ``compress`` or the name ends in .gz)."""
    path = Path(path)
    a = np.ascontiguousarray(array, dtype=np.uint8)
    blob = struct.pack(">HBB", 0, UBYTE, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    if compress or (compress is None and path.suffix == ".gz"):
        blob = gzip.compress(blob, compresslevel=1)
    path.write_bytes(blob)
