"""Reader for the IDX format of the MNIST family (raw bytes, no pickle).

Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian
uint32 sizes and the values in C order, big-endian. Files may be gzip-compressed.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from typing import BinaryIO, Union

import numpy as np

__all__ = ["read_idx", "IDX_TYPES", "MAX_IDX_BYTES"]

IDX_TYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
# A header announcing more than this is treated as corrupt rather than allocated.
MAX_IDX_BYTES = 1 << 32
_CHUNK = 1 << 24


def _read_exact(f: BinaryIO, n: int, path, what: str) -> bytes:
    # in chunks: a header announcing more than the file holds costs no more than the file
    parts, got = [], 0
    while got < n:
        part = f.read(min(n - got, _CHUNK))
        if not part:
            break
        parts.append(part)
        got += len(part)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) != n:
        raise ValueError(f"{path}: truncated IDX file: expected {n} bytes of {what}, "
                         f"got {len(data)}")
    return data


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzip or not), in native byte order.

    Raises ValueError naming the file when the magic number, type code, sizes or length do not
    match the format (truncated files and trailing bytes included)."""
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            head = _read_exact(f, 4, path, "header")
            if head[0] != 0 or head[1] != 0:
                raise ValueError(f"{path}: not an IDX file: expected the magic number to start "
                                 f"with two zero bytes, got {head[:2].hex()}")
            if head[2] not in IDX_TYPES:
                raise ValueError(f"{path}: unknown IDX type code 0x{head[2]:02x} (expected one "
                                 f"of {', '.join(f'0x{k:02x}' for k in IDX_TYPES)})")
            dtype, ndim = IDX_TYPES[head[2]], head[3]
            if ndim == 0:
                raise ValueError(f"{path}: IDX header expected at least one dimension, got 0")
            shape = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "sizes"))
            nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
            if nbytes > MAX_IDX_BYTES:
                raise ValueError(f"{path}: IDX header announces {nbytes} bytes (shape {shape}), "
                                 f"more than the {MAX_IDX_BYTES} accepted")
            if math.prod(max(d, 1) for d in shape) * dtype.itemsize > MAX_IDX_BYTES:
                # no data, but sides whose product numpy cannot hold
                raise ValueError(f"{path}: IDX header announces an empty array whose other sides "
                                 f"(shape {shape}) make more than the {MAX_IDX_BYTES} bytes "
                                 "accepted")
            data = _read_exact(f, nbytes, path, f"data for shape {shape}")
            if f.read(1):
                raise ValueError(f"{path}: IDX file has bytes after the {nbytes} bytes of data "
                                 f"announced for shape {shape}")
    except (OSError, EOFError) as error:  # gzip's CRC, length and format errors
        raise ValueError(f"{path}: cannot read IDX data ({error})") from error
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)
