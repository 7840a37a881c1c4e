"""Raw wire frames.

grpc-Python's protobuf path copies every chunk's bytes several times (into the message, out of
it on serialization, and again when the receiver reads the field). The functions below write
and read the *same protobuf wire format* by hand for the few messages that carry bulk bytes
(TensorChunk, StreamSetSliceRequest.data, PullStateResponse.data, PushStateRequest.data): a
frame is built with one copy from the tensor's memory, and read as a memoryview into the
received bytes that is copied once, straight into the preallocated destination. Any peer that
speaks plain protobuf interoperates; anything unexpected falls back to the protobuf parser.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from paramhub.common.buffers import byte_view, memory
from paramhub.common.dtypes import dtype_to_proto
from paramhub.common.errors import InvalidArgumentError
from paramhub.common.tensors import DEFAULT_CHUNK_BYTES
from paramhub.v1 import tensor_pb2 as pb

__all__ = ["encode_chunk", "iter_chunk_frames", "RawChunk", "parse_chunk", "parse_inline",
           "parse_wrapped_chunk", "data_frame", "iter_data_frames", "parse_data_frame"]


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
    mv = memory(flat)
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
    mv = memory(flat)
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
