"""The gRPC messages themselves: values inline in SetSlice, reads and state as streams of raw
~1 MiB frames, uploads as StreamSetSlice / PushState data frames. Every transfer can travel
this way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from paramhub import _codec
from paramhub.errors import InvalidArgumentError
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.transport.base import Admit, Link, TensorRead
from paramhub_server.api.framing import chunk_size

__all__ = ["StreamLink", "frames_of", "announced"]


def announced(request: Any, link: str, admit: Admit) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of a SetSlice value that travels beside the call (shared memory or the
    data channel), checked and admitted; the message itself must carry no value bytes."""
    dtype = _codec.dtype_from_proto(request.value.dtype)
    shape = _codec.check_shape(request.value.shape, max_elements=admit.max_elements)
    if request.value.data:
        raise InvalidArgumentError(f"a {link} SetSlice carries no value bytes",
                                   reason="BAD_STREAM")
    admit.announced(dtype, shape)
    return dtype, shape


def frames_of(tensor: torch.Tensor, read: TensorRead, version: int) -> Iterator[bytes]:
    """A read's result as wrapped chunk frames on the stream."""
    return _codec.iter_chunk_frames(tensor, name=read.name, version=version,
                                    chunk_bytes=chunk_size(read.chunk_bytes), wrap=True)


class StreamLink(Link):
    """No side link named: everything in gRPC messages."""

    name = "stream"

    def send_tensor(self, read: TensorRead, request: Any) -> Iterator[bytes]:
        result = read.run(share=True)
        yield from frames_of(result.tensor, read, result.version)

    def receive_value(self, request: Any, admit: Admit) -> torch.Tensor:
        value = _codec.tensor_from_proto(request.value, max_elements=admit.max_elements)
        admit.inline(value)
        return value

    def send_state(self, snapshot: Any, request: Any) -> Iterator[bytes]:
        manifest, buf = snapshot()
        yield manifest.SerializeToString()
        yield from _codec.iter_data_frames(buf, 0x1A, chunk_size(request.chunk_bytes))

    def receive_state(self, header: Any, first: Any, rest: Iterator[Any], total: int,
                      admit: Admit) -> torch.Tensor:
        asm = _codec.TensorAssembler(tpb.TensorHeader(dtype=tpb.DTYPE_UINT8, shape=[total]))
        asm.add(first.data)
        for msg in rest:
            if isinstance(msg, memoryview):
                asm.add(msg)
            elif not msg.HasField("header"):
                asm.add(msg.data)
            else:
                raise InvalidArgumentError("only the first PushState message may carry the "
                                           "header", reason="BAD_STREAM")
        return asm.finish()
