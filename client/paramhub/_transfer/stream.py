"""gRPC streams: every transfer can travel this way (the fallback of every other transport).

Reads arrive as GetTensor chunks received straight into the result (raw-frame deserializer, no
protobuf object per chunk); writes go out as StreamSetSlice / PushState data frames cut from
the value's own memory. `read_tensor_stream` also finishes a read that named a side link: the
server's first header says whether the bytes follow on the stream, in shared memory or on the
data channel.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import torch

from paramhub import _codec, _data, _shm
from paramhub._progress import progress_for
from paramhub._transfer.base import GetJob, PullJob, PushJob, SetJob, Transport
from paramhub.errors import InvalidArgumentError, from_rpc_error
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub.v1 import tensor_pb2 as tpb

__all__ = ["StreamTransport", "read_tensor_stream", "read_state_stream", "check_out"]


def check_out(out: torch.Tensor, asm: _codec.TensorAssembler) -> None:
    """`out` must match the announced result exactly."""
    if out.dtype != asm.dtype or tuple(out.shape) != tuple(asm.shape):
        raise InvalidArgumentError(
            f"out is {out.dtype} {tuple(out.shape)}, the result is {asm.dtype} "
            f"{tuple(asm.shape)}", reason="BAD_OUT")


def _asm_bytes(header: tpb.TensorHeader) -> int:
    return _codec.TensorAssembler(header, allocate=False).nbytes


def _fit(buffer: torch.Tensor, header: tpb.TensorHeader) -> torch.Tensor | None:
    """The preallocated flat byte buffer viewed as the announced result, or None when the
    result is not what was expected (then a buffer is allocated for it as usual)."""
    if header.shm:
        return None
    asm = _codec.TensorAssembler(header, allocate=False)
    if asm.nbytes != buffer.numel():
        return None
    return buffer.view(asm.dtype).view(asm.shape)


def started(client: Any, fn: Any, request: Any, timeout: float | None) -> Iterator[Any]:
    """A server-streaming call started now (not on first iteration), so that the caller can
    prepare while the server works; errors surface as SDK exceptions while iterating."""
    metadata = client._count(fn)
    try:
        call = fn(request, timeout=timeout if timeout is not None else client.timeout,
                  metadata=metadata)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None

    def messages() -> Iterator[Any]:
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    return messages()


def read_tensor_stream(client: Any, job: GetJob, *, shm: Any = None, data: Any = None,
                       keep_shm: Any = None, keep_data: Any = None
                       ) -> tuple[torch.Tensor, int, str]:
    """Runs job.request (carrying any link token already) and receives the result: from the
    stream, or from the greeted shm / data connection the server chose to use. A connection the
    server did not use is handed to `keep_shm` / `keep_data` for the next call."""
    request, out = job.request, job.out
    chunks = started(client, client._get_tensor_raw, request, job.timeout)
    if out is None and shm is None and job.exact is not None and (
            job.exact >= _codec.BIG_BUFFER_BYTES):
        # The call is on its way: fault in the destination while the server copies the
        # region, instead of after its header arrives (a fresh process's first big read).
        out = _codec.empty((job.exact,), torch.uint8)
    first = next(chunks, None)
    if first is None or first.header is None:
        raise InvalidArgumentError("the server sent no tensor header", reason="BAD_STREAM")
    header = first.header
    if out is not None and job.out is None:
        out = _fit(out, header)
    if header.data_channel:
        if data is None:
            raise InvalidArgumentError("the server used the data channel unasked",
                                       reason="BAD_STREAM")
        asm = _codec.TensorAssembler(header, allocate=False)
        if out is None:
            out = _codec.empty(asm.shape, asm.dtype)
        else:
            check_out(out, asm)
        with progress_for(client.progress, f"GET {request.name}", asm.nbytes):
            _data.recv_length(data.conn, asm.nbytes)
            _data.recv_into(data.conn, _codec._memory(_codec.byte_view(out)))
        data.close()
        for _ in chunks:  # the stream ends here; drain it so the call completes
            pass
        if not request.index:
            client._note_size(request.name, request.field, asm.nbytes)
        return out, header.version, "data"
    if data is not None:  # small: came inline, the connection is kept for next time
        keep_data(data)
    if header.shm:
        if shm is None:
            raise InvalidArgumentError("the server sent shared memory unasked",
                                       reason="BAD_STREAM")
        asm = _codec.TensorAssembler(header, allocate=False)
        if not request.index:
            client._note_size(request.name, request.field, asm.nbytes)
        segment = _shm.receive_segment(shm.conn, asm.nbytes)
        shm.close()
        for _ in chunks:
            pass
        value = _codec.typed_view(segment.flat, asm.nbytes, asm.dtype, asm.shape)
        if out is not None:
            check_out(out, asm)
            out.copy_(value)
            value = out
        return value, header.version, "shm"
    if shm is not None:
        keep_shm(shm)
    if not request.index:
        client._note_size(request.name, request.field, _asm_bytes(header))
    asm = _codec.TensorAssembler(header, allocate=out is None)
    if out is not None:
        check_out(out, asm)
        asm.receive_into(out)
    with progress_for(client.progress, f"GET {request.name}", asm.nbytes) as bar:
        asm.add(first.data)
        bar.advance(len(first.data))
        for chunk in chunks:
            if chunk.header is not None:
                raise InvalidArgumentError("GetTensor sent a second tensor", reason="BAD_STREAM")
            asm.add(chunk.data)
            bar.advance(len(chunk.data))
    return asm.finish(), asm.version, "stream"


def read_state_stream(client: Any, job: PullJob, *, shm: Any = None, keep_shm: Any = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, int], str]:
    """Runs a PullState (carrying any shm token already) and unpacks the tensors."""
    request = job.request
    messages = client._stream(client._pull_state_raw, request, job.timeout)
    first = next(messages, None)
    if first is None or isinstance(first, memoryview):
        raise InvalidArgumentError("the server sent no state manifest", reason="BAD_STREAM")
    headers = list(first.headers)
    layout = _codec.full_state_layout(headers)
    total = layout[4]
    if first.shm:
        if shm is None:
            raise InvalidArgumentError("the server sent shared memory unasked",
                                       reason="BAD_STREAM")
        segment = _shm.receive_segment(shm.conn, total)
        shm.close()
        for _ in messages:
            pass
        flat = segment.flat[:total]
        moved = "shm"
    else:
        if shm is not None:
            keep_shm(shm)
        asm = _codec.TensorAssembler(tpb.TensorHeader(dtype=tpb.DTYPE_UINT8, shape=[total]))
        with progress_for(client.progress, f"PULL {request.model}", total) as bar:
            asm.add(first.data)
            for msg in messages:
                data = msg if isinstance(msg, memoryview) else msg.data
                asm.add(data)
                bar.advance(len(data))
        flat = asm.finish()
        moved = "stream"
    tensors = _codec.unpack_state(flat, headers, layout)
    names = [h.name for h in headers]
    return dict(zip(names, tensors)), {n: h.version for n, h in zip(names, headers)}, moved


def upload(client: Any, first: bytes, flat: torch.Tensor, tag: int, label: str
           ) -> Iterator[bytes]:
    """A client stream: `first` (serialized), then `flat`'s bytes as data frames of the bytes
    field with this tag byte, with a progress bar over them."""
    with progress_for(client.progress, label, flat.numel()) as bar:
        yield first
        for frame in _codec.iter_data_frames(flat, tag):
            yield frame
            bar.advance(len(frame))


class StreamTransport(Transport):
    """gRPC server and client streams, in raw ~1 MiB frames."""

    name = "stream"

    def get(self, job: GetJob) -> Any:
        return read_tensor_stream(self.client, job)

    def set(self, job: SetJob) -> Any:
        value, request = job.value, job.request
        assert value is not None
        request.value.dtype = _codec.dtype_to_proto(value.dtype)
        request.value.shape.extend(value.shape)
        first = pb.StreamSetSliceRequest(request=request).SerializeToString()
        # StreamSetSliceRequest.data is field 2 (tag 0x12).
        frames = upload(self.client, first, _codec.byte_view(value), 0x12,
                        f"SET {request.name}")
        return self.client._call(self.client._stream_set_slice_raw, frames, job.timeout).version

    def pull(self, job: PullJob) -> Any:
        return read_state_stream(self.client, job)

    def push(self, job: PushJob) -> Any:
        flat = _codec.pack_state(job.tensors, headers=job.headers)
        # PushStateRequest.data is field 2 (tag 0x12).
        frames = upload(self.client, pb.PushStateRequest(header=job.header).SerializeToString(),
                        flat, 0x12, f"PUSH {job.header.model}")
        response = self.client._call(self.client._push_state_raw, frames, job.timeout)
        return {u.name: u.version for u in response.updated}
