"""Read the metric keys of an offline wandb run file (`run-*.wandb`) record by record.

The file is a LevelDB-style log: 32 KiB blocks, each record split into chunks with a 7-byte header
(crc32, length, type). A key that straddles a block boundary is cut in two by a header, so searching the
raw bytes for a key fails by the luck of where it falls; reassembling the records first does not.
"""
import struct
from pathlib import Path

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """The serialized records of one run file, chunks reassembled."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file (header {data[:7]!r})")
    out, pos, pending = [], _HEADER, b""
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
    return out


def history_keys(path: Path) -> set[str]:
    """Every key logged to the run's history (wandb.log / the Lightning logger's log_metrics)."""
    from wandb.proto import wandb_internal_pb2 as pb

    keys = set()
    for raw in records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys
