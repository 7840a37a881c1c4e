"""Reading and writing the safetensors file format, without numpy and without pickle.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}, then the raw little-endian row-major bytes. paramhub writes it
itself (the `safetensors` package's writer needs numpy) straight from tensor memory and reads it
into preallocated tensors, so a snapshot never holds a second copy of the model in bytes.

complex128 has no safetensors dtype: it is stored as F64 with a trailing dimension of 2 (as
torch.view_as_real) and named in the metadata key "paramhub.complex128" (a JSON list of keys).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from paramhub_server.core.wal import disk_full

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
_FROM: dict[str, torch.dtype] = {v: k for k, v in _DTYPES.items()}
_COMPLEX128_KEY = "paramhub.complex128"
#: Bytes written per os.write call.
_PIECE = 8 << 20
#: A header larger than this is treated as a corrupt file.
_MAX_HEADER = 256 << 20


class FormatError(Exception):
    """The file is not a readable safetensors file."""


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.dtype == torch.complex128:
        t = torch.view_as_real(t.resolve_conj())
    return t.contiguous().reshape(-1).view(torch.uint8)


def _write_all(fd: int, t: torch.Tensor) -> None:
    total = t.numel()
    if total == 0:
        return
    mv = memoryview((ctypes.c_char * total).from_address(t.data_ptr())).cast("B")
    off = 0
    while off < total:
        off += os.write(fd, mv[off:off + _PIECE])


def encode_header(entries: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]
                  ) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included) and each entry's byte size, in order."""
    header: dict[str, object] = {}
    sizes: list[int] = []
    complex128: list[str] = []
    offset = 0
    for name, t in entries:
        dtype = t.dtype
        shape = list(t.shape)
        if dtype == torch.complex128:
            complex128.append(name)
            dtype, shape = torch.float64, shape + [2]
        if dtype not in _DTYPES:
            raise FormatError(f"dtype {t.dtype} cannot be stored")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": shape,
                        "data_offsets": [offset, offset + n]}
        sizes.append(n)
        offset += n
    meta = dict(metadata)
    if complex128:
        meta[_COMPLEX128_KEY] = json.dumps(complex128)
    if meta:
        header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, sizes


def write_file(path: Path, entries: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str],
               *, fsync: bool = True) -> int:
    """Writes a safetensors file atomically (temporary file, fsync, rename); returns its size.

    Entries keep their order; names must be unique.
    """
    tmp = write_tmp(path, entries, metadata, fsync=fsync)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
    return os.path.getsize(path)


def write_tmp(path: Path, entries: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str],
              *, fsync: bool = True) -> Path:
    """Writes (and fsyncs) the file as `{path}.tmp`, for the caller to rename into place; the
    temporary file is removed if anything fails (a full disk: ResourceExhaustedError reason
    DISK_FULL)."""
    head, sizes = encode_header(entries, metadata)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all_bytes(fd, head)
            for (_, t), _n in zip(entries, sizes):
                _write_all(fd, _bytes_of(t))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_full(tmp, e) or e from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_all_bytes(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv.nbytes:
        mv = mv[os.write(fd, mv):]


def iter_file_bytes(entries: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str],
                    piece: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a safetensors file holding `entries`, in pieces of at most `piece` bytes."""
    head, _ = encode_header(entries, metadata)
    yield head
    for _, t in entries:
        b = _bytes_of(t)
        total = b.numel()
        if not total:
            continue
        mv = memoryview((ctypes.c_char * total).from_address(b.data_ptr())).cast("B")
        for start in range(0, total, piece):
            yield mv[start:start + piece].tobytes()


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(entries by name, metadata, offset of the data section)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise FormatError(f"{path} is too short")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise FormatError(f"{path} has an implausible header length {n}")
        text = f.read(n)
        if len(text) != n:
            raise FormatError(f"{path} ends inside its header")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise FormatError(f"{path} has a malformed header: {e}") from None
    meta = header.pop("__metadata__", {}) or {}
    return header, meta, 8 + n


def read_file(path: Path, names: Sequence[str] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads (some of) a file's tensors into new CPU tensors; returns (tensors, metadata)."""
    header, meta, base = read_header(path)
    complex128 = set(json.loads(meta.get(_COMPLEX128_KEY, "[]")))
    out: dict[str, torch.Tensor] = {}
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        for name in (names if names is not None else list(header)):
            e = header.get(name)
            if e is None:
                raise FormatError(f"{path} has no tensor {name!r}")
            dtype = _FROM.get(e["dtype"])
            if dtype is None:
                raise FormatError(f"{path}: unsupported dtype {e['dtype']}")
            begin, end = e["data_offsets"]
            t = torch.empty(e["shape"], dtype=dtype)
            n = t.numel() * t.element_size()
            if end - begin != n or base + end > size:
                raise FormatError(f"{path}: tensor {name!r} has inconsistent offsets")
            if n:
                f.seek(base + begin)
                view = memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")
                got = 0
                while got < n:
                    k = f.readinto(view[got:])
                    if not k:
                        raise FormatError(f"{path} ends inside tensor {name!r}")
                    got += k
            if name in complex128:
                t = torch.view_as_complex(t)
            out[name] = t
    meta.pop(_COMPLEX128_KEY, None)
    return out, meta


def fsync_dir(path: Path) -> None:
    """fsyncs a directory so that renames and creations in it survive power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
