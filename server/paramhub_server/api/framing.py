"""Stream framing shared by the handlers: a header message then chunks, chunk sizes, and the
once-per-name check of uploaded tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from paramhub import _codec
from paramhub.common.errors import InvalidArgumentError
from paramhub.v1 import tensor_pb2 as tpb

MIN_CHUNK, MAX_CHUNK = 4 << 10, 4 << 20


def first_header(request_iterator: Iterator[Any], rpc: str) -> Any:
    """The `header` of a request stream's first message; INVALID_ARGUMENT if it has none."""
    first = next(request_iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgumentError(f"the first {rpc} message must carry the header",
                                   reason="BAD_STREAM")
    return first.header


def header_then_chunks(request_iterator: Iterator[Any], rpc: str
                        ) -> tuple[Any, Iterator[tpb.TensorChunk]]:
    """Splits a stream of one `header` message then `chunk` messages (CreateModel, PushGrads)
    into the header and a lazy iterator over the chunks."""
    header = first_header(request_iterator, rpc)

    def chunks() -> Iterator[tpb.TensorChunk]:
        for msg in request_iterator:
            if msg.WhichOneof("part") != "chunk":
                raise InvalidArgumentError(f"only the first {rpc} message may carry a header",
                                           reason="BAD_STREAM")
            yield msg.chunk

    return header, chunks()


def slice_value(value: tpb.Tensor, request_iterator: Iterator[Any],
                max_elements: int | None) -> Any:
    """The value of a StreamSetSlice: the data messages after the request, assembled into the
    dtype and shape the request's `value` announced (which carries no bytes itself). Data
    messages arrive as memoryviews (the raw deserializer) or parsed messages."""
    asm = _codec.TensorAssembler(tpb.TensorHeader(dtype=value.dtype, shape=value.shape),
                                 max_elements=max_elements)
    for msg in request_iterator:
        if isinstance(msg, memoryview):
            asm.add(msg)
        elif msg.WhichOneof("part") == "data":
            asm.add(msg.data)
        else:
            raise InvalidArgumentError("only the first StreamSetSlice message may carry the "
                                       "request", reason="BAD_STREAM")
    return asm.finish()


def once() -> Any:
    """A header check refusing a tensor name uploaded twice (CreateModel values)."""
    seen: set[str] = set()

    def check(header: tpb.TensorHeader) -> None:
        if header.name in seen:
            raise InvalidArgumentError(f"value for {header.name[:200]!r} uploaded twice",
                                       reason="DUPLICATE_TENSOR",
                                       metadata={"tensor": header.name[:200]})
        seen.add(header.name)

    return check


def chunk_size(asked: int) -> int:
    """The chunk size a stream uses: what the client asked, clamped to [MIN_CHUNK, MAX_CHUNK]."""
    return min(max(asked or _codec.DEFAULT_CHUNK_BYTES, MIN_CHUNK), MAX_CHUNK)
