"""idx files (the MNIST format), read into numpy arrays."""
from __future__ import annotations

import gzip
import struct

import numpy as np

# idx type byte -> numpy dtype (multi-byte types are big-endian).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not, into an array of its declared shape.

    The header is two zero bytes, a type byte, a rank byte, then one big-endian uint32 per dimension.
    Gzip is detected from the file's first bytes, not its name, so renamed files still load.
    """
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file: its magic number is {data[:4].hex() or 'empty'}, expected "
                         f"00 00 <type> <rank> (e.g. 00000803 for images, 00000801 for labels)")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise ValueError(f"{path} is truncated: its header declares {rank} dimensions but the file ends first")
    shape = struct.unpack(f">{rank}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape))
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(f"{path} holds {len(data) - header} bytes of data but its header declares shape "
                         f"{shape} of {dtype} ({count * dtype.itemsize} bytes); the file is truncated or corrupt")
    return np.frombuffer(data, dtype, count=count, offset=header).reshape(shape)
