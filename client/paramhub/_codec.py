"""The one codec: torch.Tensor, torch indices and Python values <-> paramhub.v1 messages.

Both the SDK and the server use this module, so the two sides cannot drift apart.

Wire format of a tensor: dtype enum + int64 shape + raw little-endian row-major bytes. Bytes are
obtained by viewing the (contiguous, CPU) tensor as uint8, which works for every fixed-width
dtype including bfloat16 and bool; nothing is pickled and numpy is not involved. Large tensors
travel as TensorChunk streams with the header in the first chunk only; the receiver
preallocates the tensor and copies each chunk into place (no b"".join of the whole payload).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from paramhub.errors import InvalidArgumentError, OutOfRangeError, ResourceExhaustedError
from paramhub.v1 import tensor_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "dtype_to_proto",
    "dtype_from_proto",
    "tensor_to_proto",
    "tensor_from_proto",
    "tensor_from_parts",
    "tensor_bytes",
    "iter_tensor_chunks",
    "TensorAssembler",
    "assemble_tensors",
    "encode_chunk",
    "iter_chunk_frames",
    "parse_chunk",
    "parse_inline",
    "parse_wrapped_chunk",
    "RawChunk",
    "data_frame",
    "parse_data_frame",
    "iter_data_frames",
    "STATE_ALIGN",
    "state_layout",
    "full_state_layout",
    "pack_state",
    "unpack_state",
    "byte_view",
    "typed_view",
    "empty",
    "index_to_proto",
    "index_from_proto",
    "value_to_proto",
    "value_from_proto",
]

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for
    raise ImportError("paramhub's wire format is little-endian; big-endian hosts are unsupported")

#: Default size of one streamed chunk. ~1 MiB measured fastest on loopback (STYLE.md §3).
DEFAULT_CHUNK_BYTES = 1 << 20

_DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.complex64: pb.DTYPE_COMPLEX64,
    torch.complex128: pb.DTYPE_COMPLEX128,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int16: pb.DTYPE_INT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.bool: pb.DTYPE_BOOL,
    torch.uint16: pb.DTYPE_UINT16,
    torch.uint32: pb.DTYPE_UINT32,
    torch.uint64: pb.DTYPE_UINT64,
    torch.float8_e4m3fn: pb.DTYPE_FLOAT8_E4M3FN,
    torch.float8_e5m2: pb.DTYPE_FLOAT8_E5M2,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _DTYPES.items()}

#: Hard cap on tensor rank accepted from the wire (torch itself allows at most 64 dims).
MAX_RANK = 64
#: Sizes (and their product, zeros counted as ones) must stay below this: torch's strides are
#: signed 64-bit byte offsets, so the product times the widest element must fit.
_MAX_NUMEL = 1 << 59


def dtype_to_proto(dtype: torch.dtype) -> int:
    """The DType enum value of a torch dtype; InvalidArgumentError for unsupported ones."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidArgumentError(f"dtype {dtype} is not supported on the wire",
                                   reason="UNSUPPORTED_DTYPE") from None


def dtype_from_proto(value: int) -> torch.dtype:
    """The torch dtype of a DType enum value; InvalidArgumentError for unknown values."""
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise InvalidArgumentError(f"unknown or unspecified dtype enum value {value}",
                                   reason="UNSUPPORTED_DTYPE") from None


def check_shape(shape: Sequence[int], *, max_elements: int | None = None) -> tuple[int, ...]:
    """Validates a shape from the wire and returns it as a tuple."""
    shape = tuple(map(int, shape))
    if len(shape) > MAX_RANK:
        raise InvalidArgumentError(f"tensor rank {len(shape)} exceeds the maximum {MAX_RANK}",
                                   reason="BAD_SHAPE")
    numel = 1
    nonzero = 1
    for s in shape:
        if s < 0:
            raise InvalidArgumentError(f"negative size in shape {list(shape)}",
                                       reason="BAD_SHAPE")
        numel *= s
        nonzero *= max(s, 1)
    if nonzero >= _MAX_NUMEL:
        # torch computes strides over the non-zero sizes: even an empty tensor of
        # [0, 2**62, 2**62] overflows them.
        raise InvalidArgumentError(f"shape {list(shape)} is too large to index",
                                   reason="BAD_SHAPE")
    if max_elements is not None and numel > max_elements:
        # A limit, not a malformed shape: the same shape is fine on a server with a higher cap.
        raise ResourceExhaustedError(
            f"shape {list(shape)} has {numel} elements, more than the limit "
            f"max_tensor_elements={max_elements}", reason="TENSOR_TOO_LARGE",
            metadata={"limit": "max_tensor_elements", "limit_value": str(max_elements),
                      "asked": str(numel)})
    return shape


#: Buffers at least this big are allocated by `empty` as prefaulted huge-page mappings.
BIG_BUFFER_BYTES = 4 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty for receive buffers: big ones are anonymous mappings advised to use
    transparent huge pages and populated in one call.

    A fresh torch.empty of hundreds of MiB takes one page fault per 4 KiB page on first touch,
    which on a VM costs more than copying the bytes (measured: 3 GB/s filling a fresh tensor vs
    7-9 GB/s filling a huge-page, prepopulated one). The tensor owns the mapping (it is unmapped
    when the tensor is freed); unlike torch.empty's storage it cannot be resized in place.
    """
    shape = tuple(shape)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if nbytes < BIG_BUFFER_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in (mmap.MADV_HUGEPAGE, _MADV_POPULATE_WRITE):
        try:
            m.madvise(advice)
        except OSError:
            pass  # an older kernel: faults happen on first touch instead
    return torch.frombuffer(m, dtype=torch.uint8).view(dtype).view(shape)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (copying to a contiguous CPU tensor only if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous().reshape(-1)
    if t.numel() <= 1 and t.stride(0) != 1:
        # A one-element or empty tensor counts as contiguous whatever its stride (e.g.
        # w[0, 5::2**40], found by the fuzz suite); view() needs stride 1.
        t = torch.empty(t.numel(), dtype=t.dtype).copy_(t)
    return t.view(torch.uint8)


_byte_view = byte_view


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes as one bytes object (one copy; meant for small tensors). A contiguous
    CPU tensor is read in place, without the views `byte_view` builds."""
    if (t.device.type == "cpu" and t.layout is torch.strided and t.is_contiguous()
            and not t.is_conj() and not t.is_neg()):
        # data_ptr() includes the storage offset; a one-element tensor is contiguous whatever
        # its stride, and its bytes are the element_size() at data_ptr().
        n = t.numel() * t.element_size()
        return ctypes.string_at(t.data_ptr(), n) if n else b""
    flat = byte_view(t)
    return ctypes.string_at(flat.data_ptr(), flat.numel()) if flat.numel() else b""


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Encodes a whole tensor into one Tensor message (use chunks for large ones)."""
    return pb.Tensor(dtype=dtype_to_proto(t.dtype), shape=t.shape, data=tensor_bytes(t))


_SCALAR_FORMATS = {torch.float32: "<f", torch.float64: "<d", torch.float16: "<e"}


def scalar_to_proto(value: Any) -> pb.Tensor | None:
    """A 0-d Tensor message for a Python bool, int or float, encoded with struct (~1 us instead
    of ~15 us through torch.tensor); the dtype is torch.tensor(value)'s. None for anything
    else (or a value struct cannot pack exactly the way torch would), so callers fall back to
    torch."""
    kind = type(value)
    try:
        if kind is bool:
            return pb.Tensor(dtype=_DTYPES[torch.bool], data=b"\x01" if value else b"\x00")
        if kind is int:
            return pb.Tensor(dtype=_DTYPES[torch.int64], data=struct.pack("<q", value))
        if kind is float:
            dtype = torch.get_default_dtype()
            fmt = _SCALAR_FORMATS.get(dtype)
            if fmt is None:
                return None
            return pb.Tensor(dtype=_DTYPES[dtype], data=struct.pack(fmt, value))
    except (struct.error, OverflowError):
        return None  # out of range: torch decides (inf for floats, an error for ints)
    return None


def _expected_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def tensor_from_proto(msg: pb.Tensor, *, max_elements: int | None = None) -> torch.Tensor:
    """Decodes a Tensor message into a new CPU tensor; validates dtype, shape and byte length."""
    return tensor_from_parts(msg.dtype, msg.shape, msg.data, max_elements=max_elements)


def tensor_from_parts(dtype_value: int, shape: Sequence[int], data: bytes | memoryview, *,
                      max_elements: int | None = None) -> torch.Tensor:
    """A new CPU tensor from a dtype enum value, a shape and exactly its bytes (validated)."""
    dtype = dtype_from_proto(dtype_value)
    shape = check_shape(shape, max_elements=max_elements)
    expected = _expected_nbytes(dtype, shape)
    if len(data) != expected:
        raise InvalidArgumentError(
            f"tensor data has {len(data)} bytes but dtype {dtype} and shape {list(shape)} "
            f"need {expected}", reason="BAD_TENSOR_BYTES")
    out = torch.empty(shape, dtype=dtype)
    if expected:
        if isinstance(data, bytes):
            ctypes.memmove(out.data_ptr(), data, expected)
        else:
            copy_into(out.data_ptr(), data)
    return out


def iter_tensor_chunks(t: torch.Tensor, *, name: str = "", version: int = 0,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Streams a tensor as TensorChunk messages, header in the first.

    Reads straight from the tensor's memory: only one chunk's bytes exist as a Python bytes
    object at a time. An empty tensor is one chunk with a header and no data.
    """
    flat = _byte_view(t)
    header = pb.TensorHeader(name=name, dtype=dtype_to_proto(t.dtype), shape=list(t.shape),
                             version=version)
    total = flat.numel()
    if total == 0:
        yield pb.TensorChunk(header=header)
        return
    # A memoryview over the tensor's own memory (no numpy, works for every dtype); `flat`
    # stays referenced for as long as the generator runs.
    mv = memoryview((ctypes.c_char * total).from_address(flat.data_ptr())).cast("B")
    first = True
    for start in range(0, total, chunk_bytes):
        data = mv[start:start + chunk_bytes].tobytes()
        if first:
            yield pb.TensorChunk(header=header, data=data)
            first = False
        else:
            yield pb.TensorChunk(data=data)


class TensorAssembler:
    """Receives one tensor's chunks into a preallocated tensor.

    Usage: `asm = TensorAssembler(header)`, then `asm.add(data)` for each chunk's bytes (the
    first chunk's too), then `asm.finish()` returns the tensor once every byte has arrived.
    """

    def __init__(self, header: pb.TensorHeader, *, max_elements: int | None = None,
                 max_bytes: int | None = None, allocate: bool = True) -> None:
        self.name = header.name
        self.version = header.version
        self.dtype = dtype_from_proto(header.dtype)
        self.shape = check_shape(header.shape, max_elements=max_elements)
        self.nbytes = _expected_nbytes(self.dtype, self.shape)
        if max_bytes is not None and self.nbytes > max_bytes:
            raise ResourceExhaustedError(
                f"tensor {self.name or ''} of {self.nbytes} bytes exceeds the limit "
                f"max_bytes={max_bytes}", reason="TENSOR_TOO_LARGE",
                metadata={"limit": "max_bytes", "limit_value": str(max_bytes),
                          "asked": str(self.nbytes)})
        self.received = 0
        if not allocate:  # only the validated header is wanted (e.g. bytes come via shm)
            return
        self.tensor = empty(self.shape, self.dtype)
        self._ptr = self.tensor.data_ptr()

    def receive_into(self, out: torch.Tensor) -> None:
        """Receives into `out` (a contiguous CPU tensor of the header's dtype and shape)."""
        self.tensor = out
        self._ptr = out.data_ptr()

    @property
    def complete(self) -> bool:
        """Whether every byte has arrived."""
        return self.received == self.nbytes

    def add(self, data: bytes | memoryview) -> None:
        """Copies the next chunk's bytes into place (bytes, or a memoryview from parse_chunk)."""
        n = len(data)
        if n == 0:
            return
        if self.received + n > self.nbytes:
            raise InvalidArgumentError(
                f"tensor {self.name or ''} received more than the {self.nbytes} bytes its header "
                f"announced", reason="BAD_TENSOR_BYTES")
        copy_into(self._ptr + self.received, data)
        self.received += n

    def finish(self) -> torch.Tensor:
        """The received tensor; InvalidArgumentError if bytes are missing."""
        if not self.complete:
            raise InvalidArgumentError(
                f"tensor {self.name or ''} ended after {self.received} of {self.nbytes} bytes",
                reason="BAD_TENSOR_BYTES")
        return self.tensor


def assemble_tensors(chunks: Iterable[pb.TensorChunk],
                     check: Callable[[pb.TensorHeader], None] | None = None, **limits: Any
                     ) -> Iterator[TensorAssembler]:
    """Splits a stream holding one or more chunked tensors; yields each finished assembler.
    `check(header)` may refuse a tensor (raise) before its memory is allocated."""
    current: TensorAssembler | None = None
    for chunk in chunks:
        if chunk.HasField("header"):
            if current is not None:
                current.finish()
                yield current
            current = None
            if check is not None:
                check(chunk.header)
            current = TensorAssembler(chunk.header, **limits)
        elif current is None:
            raise InvalidArgumentError("the first tensor chunk carries no header",
                                       reason="BAD_TENSOR_BYTES")
        current.add(chunk.data)
    if current is not None:
        current.finish()
        yield current


# ---------------------------------------------------------------------------------------------
# Raw wire frames
#
# grpc-Python's protobuf path copies every chunk's bytes several times (into the message, out of
# it on serialization, and again when the receiver reads the field). The functions below write
# and read the *same protobuf wire format* by hand for the few messages that carry bulk bytes
# (TensorChunk, StreamSetSliceRequest.data, PullStateResponse.data, PushStateRequest.data): a
# frame is built with one copy from the tensor's memory, and read as a memoryview into the
# received bytes that is copied once, straight into the preallocated destination. Any peer that
# speaks plain protobuf interoperates; anything unexpected falls back to the protobuf parser.

_ssize_max = sys.maxsize


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end or shift > 63:
            raise InvalidArgumentError("malformed varint in a tensor frame",
                                       reason="BAD_TENSOR_BYTES")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def buffer_address(data: bytes | memoryview) -> int:
    """The address of a bytes object's or a (C-contiguous) memoryview's first byte."""
    if isinstance(data, bytes):
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    obj = data.obj
    if isinstance(obj, bytes) and data.contiguous:
        base = ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0
        # A memoryview slice of a bytes object: recover its start from the buffer pointer.
        return base + _mv_offset(data)
    return ctypes.addressof(ctypes.c_char.from_buffer(data))


def _mv_offset(mv: memoryview) -> int:
    # CPython exposes a memoryview's buffer pointer only through the buffer protocol; for a
    # read-only view of bytes we ask ctypes for the Py_buffer via PyObject_GetBuffer.
    buf = _Py_buffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(mv), ctypes.byref(buf), 0)
    try:
        base = ctypes.cast(ctypes.c_char_p(mv.obj), ctypes.c_void_p).value or 0
        return (buf.buf or 0) - base
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(buf))


class _Py_buffer(ctypes.Structure):  # noqa: N801 - the C name
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def copy_into(address: int, data: bytes | memoryview) -> None:
    """memcpy of `data` to `address` (one copy, no intermediate bytes object)."""
    n = len(data)
    if n:
        ctypes.memmove(address, buffer_address(data), n)


def _memory(flat: torch.Tensor) -> memoryview:
    """A memoryview over a contiguous uint8 CPU tensor's own memory."""
    n = flat.numel()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(flat.data_ptr())).cast("B")


def encode_chunk(header: pb.TensorHeader | None, data: bytes | memoryview = b"", *,
                 wrap: bool = False) -> bytes:
    """The protobuf wire bytes of TensorChunk(header=header, data=data), built with one copy.

    With `wrap`, of a message whose field 1 is that TensorChunk (GetTensorResponse).
    """
    parts: list[bytes | memoryview] = []
    if header is not None:
        hb = header.SerializeToString()
        parts += [b"\x0a", _varint(len(hb)), hb]
    if len(data):
        parts += [b"\x12", _varint(len(data)), data]
    if wrap:
        inner = sum(len(p) for p in parts)
        parts[:0] = [b"\x0a", _varint(inner)]
    return b"".join(parts)


def iter_chunk_frames(t: torch.Tensor, *, name: str = "", version: int = 0,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES, wrap: bool = False
                      ) -> Iterator[bytes]:
    """iter_tensor_chunks, as ready-serialized TensorChunk wire bytes (one copy per chunk);
    with `wrap`, each inside a GetTensorResponse (field 1)."""
    flat = byte_view(t)
    header = pb.TensorHeader(name=name, dtype=dtype_to_proto(t.dtype), shape=list(t.shape),
                             version=version)
    total = flat.numel()
    if total == 0:
        yield encode_chunk(header, wrap=wrap)
        return
    mv = _memory(flat)
    for start in range(0, total, chunk_bytes):
        yield encode_chunk(header if start == 0 else None, mv[start:start + chunk_bytes],
                           wrap=wrap)


class RawChunk:
    """A TensorChunk read from wire bytes without copying its data (see parse_chunk)."""

    __slots__ = ("header", "data")

    def __init__(self, header: pb.TensorHeader | None, data: bytes | memoryview) -> None:
        self.header = header
        self.data = data

    def HasField(self, name: str) -> bool:  # noqa: N802 - mirrors the protobuf API
        """Protobuf-compatible: whether the header is set."""
        if name != "header":
            raise ValueError(f"RawChunk has no optional field {name!r}")
        return self.header is not None


def parse_wrapped_chunk(buf: bytes) -> RawChunk:
    """Reads GetTensorResponse wire bytes (a TensorChunk in field 1) without copying its data."""
    if buf and buf[0] == 0x0A:
        length, pos = _read_varint(buf, 1)
        if pos + length == len(buf):
            return parse_chunk(memoryview(buf)[pos:])
    # Anything else (e.g. unknown extra fields): the protobuf parser.
    from paramhub.v1 import parameter_service_pb2 as spb

    chunk = spb.GetTensorResponse.FromString(bytes(buf)).chunk
    return RawChunk(chunk.header if chunk.HasField("header") else None, chunk.data)


def parse_chunk(buf: bytes | memoryview) -> RawChunk:
    """Reads TensorChunk wire bytes; `data` is a memoryview into `buf` (no copy).

    Usable as a grpc response_deserializer. Falls back to the protobuf parser on anything but the
    two known fields.
    """
    mv = memoryview(buf)
    header: pb.TensorHeader | None = None
    data: bytes | memoryview = b""
    pos, n = 0, len(buf)
    while pos < n:
        tag = buf[pos]
        if tag not in (0x0A, 0x12):
            msg = pb.TensorChunk.FromString(bytes(buf))
            return RawChunk(msg.header if msg.HasField("header") else None, msg.data)
        length, pos = _read_varint(buf, pos + 1)
        if pos + length > n:
            raise InvalidArgumentError("truncated tensor frame", reason="BAD_TENSOR_BYTES")
        if tag == 0x0A:
            header = pb.TensorHeader.FromString(bytes(mv[pos:pos + length]))
        else:
            data = mv[pos:pos + length]
        pos += length
    return RawChunk(header, data)


def parse_inline(buf: bytes | memoryview) -> RawChunk:
    """Reads GetTensorInlineResponse wire bytes (TensorChunk's field numbers): small responses
    through the protobuf parser (faster than `parse_chunk`'s Python loop below a few KiB, at
    the price of one copy of the data), bigger ones with `parse_chunk` (no copy)."""
    if len(buf) > _PARSE_INLINE_MAX:
        return parse_chunk(buf)
    msg = pb.TensorChunk.FromString(buf)
    return RawChunk(msg.header if msg.HasField("header") else None, msg.data)


_PARSE_INLINE_MAX = 16 << 10


def data_frame(tag: int, data: bytes | memoryview) -> bytes:
    """Wire bytes of a message whose only set field is the bytes field with this tag byte
    ((field number << 3) | 2), built with one copy."""
    return b"".join((bytes((tag,)), _varint(len(data)), data))


def iter_data_frames(flat: torch.Tensor, tag: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                     ) -> Iterator[bytes]:
    """data_frame()s covering a contiguous uint8 tensor, `chunk_bytes` at a time."""
    mv = _memory(flat)
    for start in range(0, len(mv), chunk_bytes):
        yield data_frame(tag, mv[start:start + chunk_bytes])


def parse_data_frame(buf: bytes, tag: int) -> memoryview | None:
    """The bytes field of a message whose only field is `tag`, as a memoryview into `buf`; None
    when `buf` holds anything else (parse it with protobuf then)."""
    if not buf or buf[0] != tag:
        return None
    length, pos = _read_varint(buf, 1)
    if pos + length != len(buf):
        return None
    return memoryview(buf)[pos:]


# ---------------------------------------------------------------------------------------------
# Many tensors in one buffer (PullState / PushState)

#: Each tensor of a state transfer starts at a multiple of this many bytes.
STATE_ALIGN = 64


def _shape_numel(shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
    shape = tuple(shape)
    if len(shape) > MAX_RANK or (shape and min(shape) < 0):
        check_shape(shape)  # raises with the precise reason
    return shape, math.prod(shape)


def state_layout(headers: Sequence[pb.TensorHeader], *, max_bytes: int | None = None
                 ) -> tuple[list[int], list[int], int]:
    """(offsets, byte sizes, total bytes) of tensors laid out back to back.

    Each tensor starts at a multiple of STATE_ALIGN, and the total is rounded up to one too, so
    every tensor's span is a whole number of elements of any dtype.
    """
    offsets, sizes, _, _, total = full_state_layout(headers)
    if max_bytes is not None and total > max_bytes:
        raise InvalidArgumentError(f"the tensors need {total} bytes, more than the limit "
                                   f"{max_bytes}", reason="TENSOR_TOO_LARGE")
    return offsets, sizes, total


def full_state_layout(headers: Sequence[pb.TensorHeader]
                      ) -> tuple[list[int], list[int], list[torch.dtype],
                                 list[tuple[int, ...]], int]:
    """(offsets, byte sizes, dtypes, shapes, total bytes): `state_layout` plus what
    `unpack_state` needs, so a receiver reads its manifest's 1,000 headers once, not twice."""
    offsets, sizes, dtypes, shapes = [], [], [], []
    off = 0
    align = STATE_ALIGN
    from_proto = _FROM_PROTO
    for h in headers:
        shape, numel = _shape_numel(h.shape)
        dtype = from_proto.get(h.dtype) or dtype_from_proto(h.dtype)
        nbytes = numel * dtype.itemsize
        offsets.append(off)
        sizes.append(nbytes)
        dtypes.append(dtype)
        shapes.append(shape)
        off += -(-nbytes // align) * align
    return offsets, sizes, dtypes, shapes, off


def _typed_view(flat: torch.Tensor, off: int, nbytes: int, dtype: torch.dtype,
                shape: Sequence[int]) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return flat[off:off + nbytes].view(dtype).view(tuple(shape))


def typed_view(flat: torch.Tensor, nbytes: int, dtype: torch.dtype, shape: Sequence[int]
               ) -> torch.Tensor:
    """The first `nbytes` of a flat uint8 buffer viewed as a tensor of dtype and shape."""
    return _typed_view(flat, 0, nbytes, dtype, shape)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)


def pack_state(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None,
               headers: Sequence[pb.TensorHeader] | None = None,
               layout: tuple[list[int], list[int], int] | None = None) -> torch.Tensor:
    """Copies tensors into one uint8 buffer laid out by state_layout (`out`, or a new one).

    Handles any device, stride, conj/neg bit: each tensor is copied exactly once. Padding is
    zeroed, so no stale memory is ever sent.
    """
    if layout is None:
        if headers is None:
            headers = [pb.TensorHeader(dtype=dtype_to_proto(t.dtype), shape=list(t.shape))
                       for t in tensors]
        layout = state_layout(headers)
    offsets, sizes, total = layout
    if out is None:
        out = empty((total,), torch.uint8)
    elif out.numel() < total:
        raise InvalidArgumentError("state buffer is too small", reason="BAD_TENSOR_BYTES")
    if tensors and sum(sizes) == total:
        # No padding anywhere (every size a multiple of STATE_ALIGN): with one dtype on one
        # device, the tensors are flattened into one buffer by a single torch call (its loop
        # is C++; conj/neg bits are resolved by it) and copied once into place, instead of a
        # strided view per tensor (measured ~0.8 ms less for 1,000 small tensors).
        first = tensors[0]
        dtype, device = first.dtype, first.device
        if all(t.dtype is dtype and t.device == device for t in tensors):
            with torch.no_grad():
                flat = torch._utils._flatten_dense_tensors(list(tensors))
                out[:total].view(dtype).copy_(flat)
            return out
    typed: dict[torch.dtype, torch.Tensor] = {}
    dsts, srcs = [], []
    prev_end = 0
    body = out[:total]
    for t, off, nbytes in zip(tensors, offsets, sizes):
        if off > prev_end:
            out[prev_end:off].zero_()
        if nbytes:
            dtype = t.dtype
            view = typed.get(dtype)
            if view is None:
                view = typed[dtype] = body.view(dtype)
            shape = t.shape
            if len(shape) == 2:
                strides: tuple[int, ...] = (shape[1], 1)
            elif len(shape) == 1:
                strides = (1,)
            else:
                strides = _contiguous_strides(tuple(shape))
            dsts.append(view.as_strided(shape, strides, off // dtype.itemsize))
            srcs.append(t)  # not detached: no_grad below (a detach per tensor cost ~4 us)
        prev_end = off + nbytes
    if total > prev_end:
        out[prev_end:total].zero_()
    same_device = all(s.device.type == "cpu" and not s.is_conj() and not s.is_neg()
                      for s in srcs)
    with torch.no_grad():
        if same_device and srcs:
            torch._foreach_copy_(dsts, srcs)
        else:
            for d, s_ in zip(dsts, srcs):
                d.copy_(s_)
    return out


def unpack_state(flat: torch.Tensor, headers: Sequence[pb.TensorHeader],
                 layout: Any = None) -> list[torch.Tensor]:
    """Views of a state buffer as the tensors its headers describe (no copy); `layout` is
    `full_state_layout(headers)` when the caller has it already."""
    offsets, sizes, dtypes, shapes, total = layout or full_state_layout(headers)
    if flat.numel() != total:
        raise InvalidArgumentError(f"state data has {flat.numel()} bytes, the headers describe "
                                   f"{total}", reason="BAD_TENSOR_BYTES")
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = []
    for off, nbytes, dtype, shape in zip(offsets, sizes, dtypes, shapes):
        if not nbytes:
            out.append(torch.empty(shape, dtype=dtype))
            continue
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = flat.view(dtype)
        if len(shape) == 2:
            strides: tuple[int, ...] = (shape[1], 1)
        elif len(shape) == 1:
            strides = (1,)
        else:
            strides = _contiguous_strides(shape)
        out.append(view.as_strided(shape, strides, off // dtype.itemsize))
    return out


# ---------------------------------------------------------------------------------------------
# Indices


def index_to_proto(index: Any) -> list[pb.IndexItem]:
    """Encodes a torch index (int, slice, Ellipsis, None, tensors, lists, or a tuple of these)."""
    if not isinstance(index, tuple):
        index = (index,)
    items = []
    for it in index:
        if it is Ellipsis:
            items.append(pb.IndexItem(ellipsis=pb.Ellipsis()))
        elif it is None:
            items.append(pb.IndexItem(new_axis=pb.NewAxis()))
        elif isinstance(it, bool):
            items.append(pb.IndexItem(tensor=tensor_to_proto(torch.tensor(it))))
        elif isinstance(it, int) or (hasattr(it, "__index__") and not isinstance(it, torch.Tensor)):
            items.append(pb.IndexItem(integer=int(it.__index__())))
        elif isinstance(it, slice):
            s = pb.Slice()
            if it.start is not None:
                s.start = int(it.start)
            if it.stop is not None:
                s.stop = int(it.stop)
            if it.step is not None:
                s.step = int(it.step)
            items.append(pb.IndexItem(slice=s))
        elif isinstance(it, torch.Tensor):
            if it.dtype not in (torch.bool, torch.int64, torch.int32, torch.uint8):
                raise InvalidArgumentError(f"index tensors must be bool or integer, not {it.dtype}",
                                           reason="BAD_INDEX")
            if it.dtype is torch.uint8:
                it = it.bool()
            items.append(pb.IndexItem(tensor=tensor_to_proto(it)))
        elif isinstance(it, (list, tuple)):
            items.append(pb.IndexItem(tensor=tensor_to_proto(torch.as_tensor(it))))
        else:
            raise InvalidArgumentError(f"unsupported index element {it!r}", reason="BAD_INDEX")
    return items


def index_from_proto(items: Sequence[pb.IndexItem], *, max_elements: int | None = None
                     ) -> tuple[Any, ...]:
    """Decodes index items into a tuple usable as `tensor[...]`; validates every item."""
    out: list[Any] = []
    ellipses = 0
    for item in items:
        kind = item.WhichOneof("item")
        if kind == "integer":
            out.append(int(item.integer))
        elif kind == "slice":
            s = item.slice
            step = s.step if s.HasField("step") else None
            if step is not None and step <= 0:
                raise InvalidArgumentError(f"slice step must be positive, got {step}",
                                           reason="BAD_INDEX")
            out.append(slice(s.start if s.HasField("start") else None,
                             s.stop if s.HasField("stop") else None, step))
        elif kind == "ellipsis":
            ellipses += 1
            if ellipses > 1:
                raise InvalidArgumentError("an index can only have a single ellipsis",
                                           reason="BAD_INDEX")
            out.append(Ellipsis)
        elif kind == "new_axis":
            out.append(None)
        elif kind == "tensor":
            t = tensor_from_proto(item.tensor, max_elements=max_elements)
            if t.dtype not in (torch.bool, torch.int64, torch.int32):
                raise InvalidArgumentError(
                    f"index tensors must be bool, int32 or int64, not {t.dtype}",
                    reason="BAD_INDEX")
            out.append(t)
        else:
            raise InvalidArgumentError("index item has no value set", reason="BAD_INDEX")
    return tuple(out)


def check_index_tensor_bounds(shape: Sequence[int], index: tuple[Any, ...]) -> None:
    """Raises IndexError for an integer index tensor with an element outside its dimension.

    torch checks this on the host for CPU tensors, but on CUDA the check is a device-side
    assert, which aborts every later CUDA call of the whole server process. So integer index
    tensors (which arrive on the CPU) are checked here before they go near a device.
    """
    consumed = [0 if i is None or i is Ellipsis else
                (i.dim() if isinstance(i, torch.Tensor) and i.dtype is torch.bool else 1)
                for i in index]
    if Ellipsis in [i for i in index if not isinstance(i, torch.Tensor)]:
        at = next(k for k, i in enumerate(index)
                  if not isinstance(i, torch.Tensor) and i is Ellipsis)
        consumed[at] = max(0, len(shape) - sum(consumed))
    dim = 0
    for item, n in zip(index, consumed):
        if (isinstance(item, torch.Tensor) and item.dtype is not torch.bool and item.numel()
                and dim < len(shape)):
            size = shape[dim]
            low, high = int(item.min()), int(item.max())
            if low < -size or high >= size:
                bad = low if low < -size else high
                raise IndexError(f"index {bad} is out of bounds for dimension {dim} with size "
                                 f"{size}")
        dim += n


def index_result_shape(shape: Sequence[int], index: tuple[Any, ...]
                       ) -> tuple[int, ...] | None:
    """The shape `tensor[index]` would have, computed on the meta device (no memory), for a
    tensor of `shape`: an index tensor can make a region far larger than the tensor (index
    tensors of shapes (N, 1) and (1, N) select N x N elements). A boolean mask counts as all
    True (an upper bound). None if torch rejects the index (the real indexing reports it)."""
    items: list[Any] = []
    for i in index:
        if isinstance(i, torch.Tensor):
            if i.dtype is torch.bool:
                if i.dim() == 0:
                    items.append(None)  # a size-1 (or 0) new dimension
                else:
                    items.extend(torch.empty(i.numel(), dtype=torch.int64, device="meta")
                                 for _ in range(i.dim()))
            else:
                items.append(torch.empty(i.shape, dtype=torch.int64, device="meta"))
        else:
            items.append(i)
    try:
        return tuple(torch.empty(tuple(shape), dtype=torch.uint8, device="meta")
                     [tuple(items)].shape)
    except (IndexError, RuntimeError, TypeError, ValueError):
        return None


def apply_index(t: torch.Tensor, index: tuple[Any, ...]) -> torch.Tensor:
    """`t[index]` with torch's errors mapped: bounds -> OutOfRangeError, others -> InvalidArgument."""
    if not index:
        return t
    try:
        if any(isinstance(i, torch.Tensor) for i in index):
            check_index_tensor_bounds(t.shape, index)
            index = tuple(i.to(t.device) if isinstance(i, torch.Tensor) else i for i in index)
        return t[index]
    except IndexError as e:
        text = str(e)
        if "out of bounds" in text or "out of range" in text:
            raise OutOfRangeError(text, reason="INDEX_OUT_OF_RANGE") from None
        raise InvalidArgumentError(text, reason="BAD_INDEX") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidArgumentError(str(e).splitlines()[0], reason="BAD_INDEX") from None


# ---------------------------------------------------------------------------------------------
# Values (constructor args, init args, Forward inputs/outputs)


def value_to_proto(v: Any) -> pb.Value:
    """Encodes None/bool/int/float/str/list/tuple/torch.dtype/torch.Tensor into a Value."""
    if isinstance(v, torch.Tensor):  # the common case (Forward inputs and outputs) first
        return pb.Value(tensor_value=tensor_to_proto(v))
    if v is None:
        return pb.Value(null_value=pb.NULL_VALUE_UNSPECIFIED)
    if isinstance(v, bool):
        return pb.Value(bool_value=v)
    if isinstance(v, int):
        return pb.Value(int_value=v)
    if isinstance(v, float):
        return pb.Value(float_value=v)
    if isinstance(v, str):
        return pb.Value(string_value=v)
    if isinstance(v, torch.dtype):
        return pb.Value(dtype_value=dtype_to_proto(v))
    if isinstance(v, torch.Size):
        return pb.Value(tuple_value=pb.ValueList(values=[value_to_proto(x) for x in v]))
    if isinstance(v, tuple):
        return pb.Value(tuple_value=pb.ValueList(values=[value_to_proto(x) for x in v]))
    if isinstance(v, list):
        return pb.Value(list_value=pb.ValueList(values=[value_to_proto(x) for x in v]))
    raise InvalidArgumentError(f"cannot encode a value of type {type(v).__name__}",
                               reason="BAD_VALUE")


def value_from_proto(msg: pb.Value, *, max_depth: int = 16,
                     max_elements: int | None = None) -> Any:
    """Decodes a Value; rejects unset values and nesting deeper than max_depth."""
    if max_depth < 0:
        raise InvalidArgumentError("value nesting is too deep", reason="BAD_VALUE")
    kind = msg.WhichOneof("kind")
    if kind == "tensor_value":
        return tensor_from_proto(msg.tensor_value, max_elements=max_elements)
    if kind == "null_value":
        return None
    if kind == "bool_value":
        return msg.bool_value
    if kind == "int_value":
        return msg.int_value
    if kind == "float_value":
        return msg.float_value
    if kind == "string_value":
        return msg.string_value
    if kind == "dtype_value":
        return dtype_from_proto(msg.dtype_value)
    if kind in ("list_value", "tuple_value"):
        items = [value_from_proto(x, max_depth=max_depth - 1, max_elements=max_elements)
                 for x in getattr(msg, kind).values]
        return items if kind == "list_value" else tuple(items)
    raise InvalidArgumentError("a value has no kind set", reason="BAD_VALUE")
