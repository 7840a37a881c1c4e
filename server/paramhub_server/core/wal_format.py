"""What a write-ahead log record says, independent of any wire (protobuf) message.

Frames are wal.py's; this module encodes and decodes what is inside them. Format 2 (magic
b"PHW2", written now):

- a tensor is `{"dtype": "float32", "shape": [..], "data": [begin, end]}` (its little-endian,
  row-major bytes at payload[begin:end]) or, for a big whole-tensor value written to its own
  file, `{"dtype", "shape", "file": "{token}.bin"}` (the file under the model's `values/`
  directory holds exactly its bytes; it was fdatasynced before the record was written);
- an index is a list of items: an int, `null` (a new axis), `"..."`, `[start, stop, step]` (a
  slice, members may be null), or `{"dtype": "int64"|"int32"|"bool", "shape", "data"}` (an
  index tensor whose bytes are in the payload).

Format 1 (b"PHW1", read only) differs in two ways: dtypes are numbers (the wire enum) and an index
holding a tensor was a serialized `SetSliceRequest` in the payload (entry `"idx": [begin, end]`).
`decode_index` and `dtype_of` accept both, so old logs replay unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from paramhub.common import dtypes

#: Every dtype a record may hold, by the name written in format 2.
_DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
    torch.complex128, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2)}
_INDEX_DTYPES = (torch.int64, torch.int32, torch.bool)


class RecordError(ValueError):
    """A record that frames and checksums correctly but says something impossible."""


def dtype_name(dtype: torch.dtype) -> str:
    """The name format 2 writes for a dtype."""
    name = str(dtype).removeprefix("torch.")
    if _DTYPES.get(name) is not dtype:
        raise RecordError(f"dtype {dtype} cannot be logged")
    return name


def dtype_of(value: Any) -> torch.dtype:
    """The dtype of a record's "dtype" field: a name (format 2) or the wire enum number
    (format 1)."""
    if isinstance(value, str):
        try:
            return _DTYPES[value]
        except KeyError:
            raise RecordError(f"unknown dtype {value!r} in a log record") from None
    return dtypes.dtype_from_proto(int(value))


def tensor_entry(t: torch.Tensor, blobs: list[Any], offset: int, data: Any) -> tuple[dict, int]:
    """The entry of tensor `t` whose bytes `data` go into the payload at `offset` (appended to
    `blobs`); returns (entry, offset after it)."""
    n = t.numel() * t.element_size()
    blobs.append(data)
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
            "data": [offset, offset + n]}, offset + n


def tensor_from(entry: dict[str, Any], payload: bytearray) -> torch.Tensor:
    """The tensor an inline entry describes, viewing the payload (no copy)."""
    dtype = dtype_of(entry["dtype"])
    b, end = entry["data"]
    if end > b:
        value = torch.frombuffer(payload, dtype=torch.uint8, offset=b, count=end - b)
        return value.view(dtype).reshape(entry["shape"])
    return torch.empty(entry["shape"], dtype=dtype)


def encode_index(index: tuple[Any, ...], blobs: list[Any], offset: int) -> tuple[list[Any], int]:
    """An index as format 2 items; index tensors' bytes are appended to `blobs` from payload
    `offset`. Returns (items, payload offset after them)."""
    out: list[Any] = []
    for i in index:
        kind = type(i)
        if kind is int or i is None:
            out.append(i)
        elif kind is slice:
            out.append([i.start, i.stop, i.step])
        elif i is Ellipsis:
            out.append("...")
        elif isinstance(i, torch.Tensor):
            t = i.detach().to("cpu").contiguous()
            if t.dtype not in _INDEX_DTYPES:
                raise RecordError(f"index tensors of {t.dtype} cannot be logged")
            item, offset = tensor_entry(t, blobs, offset, t.view(torch.uint8).reshape(-1)
                                        if t.dim() else t.reshape(1).view(torch.uint8))
            out.append(item)
        elif hasattr(i, "__index__"):
            out.append(int(i.__index__()))
        else:
            raise RecordError(f"index item {type(i).__name__} cannot be logged")
    return out, offset


def decode_index(entry: dict[str, Any], payload: bytearray) -> tuple[Any, ...]:
    """The index of a change entry (format 2 "ix" items with tensors, format 1 "ix" or "idx")."""
    if "ix" in entry:
        return tuple(_index_item(i, payload) for i in entry["ix"])
    if entry.get("idx") is None:
        return ()
    # Format 1: the index was a serialized SetSliceRequest (only its `index` field set). Only
    # old logs need protobuf, so it is imported here, not with the module.
    from paramhub.common.index import index_from_proto
    from paramhub.v1 import tensors_pb2 as pb  # SetSliceRequest (tensors.proto)

    b, end = entry["idx"]
    return index_from_proto(pb.SetSliceRequest.FromString(bytes(payload[b:end])).index)


def _index_item(item: Any, payload: bytearray) -> Any:
    if isinstance(item, list):
        return slice(*item)
    if item == "...":
        return Ellipsis
    if isinstance(item, dict):
        t = tensor_from(item, payload)
        if t.dtype not in _INDEX_DTYPES:
            raise RecordError(f"index tensor of {t.dtype} in a log record")
        return t.clone()  # owns its memory: the payload buffer is released after replay
    if item is None or type(item) is int:
        return item
    raise RecordError(f"bad index item {item!r} in a log record")


def whole(index: tuple[Any, ...], value_shape: Sequence[int], shape: Sequence[int]) -> bool:
    """Whether a change with this index replaces a whole tensor of `shape` with a value of
    `value_shape` (`()`, `[...]`, `[:]`, `[:, :]`, ...)."""
    if tuple(value_shape) != tuple(shape):
        return False
    for i in index:
        if i is Ellipsis:
            continue
        if type(i) is slice and i.start is None and i.stop is None and i.step in (None, 1):
            continue
        return False
    return True


def record_files(header: dict[str, Any]) -> list[tuple[str, int]]:
    """(file name, byte size) of every value file a record references."""
    out = []
    for e in header.get("changes", ()) if header.get("t") == "write" else ():
        if "file" in e:
            n = dtype_of(e["dtype"]).itemsize
            for s in e["shape"]:
                n *= int(s)
            out.append((e["file"], n))
    return out
