"""Handlers of the tensor RPCs and their transfers: GetTensor, GetTensorInline, SetSlice,
StreamSetSlice, PullState, PushState, GetTransportInfo, and the size checks done before a value
is allocated."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import grpc
import torch

from paramhub import _codec, _data
from paramhub.common.dtypes import numel
from paramhub.common.errors import InvalidArgumentError, ResourceExhaustedError
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.api.framing import chunk_size
from paramhub_server.api.serde import slice_write, state_manifest, write_context
from paramhub_server.core.model import ServedModel, SliceWrite
from paramhub_server.transport import ShmSegment, create_segment
from paramhub_server.api.base import Handlers
from paramhub_server.errors import rpc

#: Reads of fewer bytes come inline even when the client offers shared memory: below this, a
#: memfd, a mapping and a descriptor pass cost more than they save.
SHM_MIN_BYTES = 1 << 20
#: Largest value GetTensorInline answers.
INLINE_MAX_BYTES = 4 << 20


def _owned(m: ServedModel, view: torch.Tensor) -> torch.Tensor:
    """A value received in the client's shared memory, as a write of `m` may use it: copied
    into server memory when the write is logged, since the client still maps the memfd and
    could change the bytes between the log's CRC and its write, or between the log and the
    tensor (a log that disagrees with itself or with what was served). Without a log there is
    nothing to disagree with: the view is used as it is (one copy fewer)."""
    if m.journal is None:
        return view
    out = _codec.empty(tuple(view.shape), view.dtype)
    out.copy_(view)
    return out


class TensorHandlers(Handlers):
    """Reads and writes of tensor values, over whichever transport the client chose."""

    @rpc
    def GetTensor(self, request: pb.GetTensorRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        # Yields GetTensorResponse wire bytes (transport.add_servicer passes them through).
        m, kind, name = self._tensor(request.name)
        index = _codec.index_from_proto(request.index, max_elements=self.max_tensor_elements)
        self._check_index(m, name, kind, index)
        grad = request.field == pb.TENSOR_FIELD_GRAD
        if request.shm_token and request.shm_client_buffer:
            # The client passed a (warm, reusable) buffer: write straight into it. Only the
            # result's bytes of it are mapped (never the whole memfd, never prefaulted).
            channel = self.transport.shm_channel()
            conn = channel.take(request.shm_token)
            client_segment = None
            fd = -1
            try:
                fd, size = channel.receive_open(conn)

                def into_client(dtype: Any, shape: tuple[int, ...]) -> Any:
                    nonlocal client_segment, fd
                    nbytes = dtype.itemsize * numel(shape)
                    if nbytes > size:
                        raise InvalidArgumentError(
                            f"the client's buffer has {size} bytes, the result needs {nbytes}",
                            reason="SHM_BUFFER_TOO_SMALL", metadata={"asked": str(nbytes)})
                    client_segment = ShmSegment(fd, max(nbytes, 1), populate=False)
                    fd = -1
                    return _codec.typed_view(client_segment.tensor, nbytes, dtype, shape)

                result = m.read(name, index, grad=grad, kind=kind, alloc=into_client)
                header = tpb.TensorHeader(
                    name=name, dtype=_codec.dtype_to_proto(result.tensor.dtype),
                    shape=list(result.tensor.shape), version=result.version, shm=True)
                del result
            finally:
                conn.close()
                if client_segment is not None:
                    client_segment.close()
                elif fd >= 0:
                    os.close(fd)
            yield _codec.encode_chunk(header, wrap=True)
            return
        if request.shm_token:
            channel = self.transport.shm_channel()
            segments: list[Any] = []

            def alloc(dtype: Any, shape: tuple[int, ...]) -> Any:
                nbytes = dtype.itemsize * numel(shape)
                if nbytes < SHM_MIN_BYTES:  # small: inline, the token stays unused
                    return torch.empty(shape, dtype=dtype)
                segments.append(create_segment(nbytes))
                return _codec.typed_view(segments[0].tensor, nbytes, dtype, shape)

            result = m.read(name, index, grad=grad, kind=kind, alloc=alloc)
            if segments:
                header = tpb.TensorHeader(
                    name=name, dtype=_codec.dtype_to_proto(result.tensor.dtype),
                    shape=list(result.tensor.shape), version=result.version, shm=True)
                del result
                try:
                    conn = channel.take(request.shm_token)
                except BaseException:
                    segments[0].close()
                    raise
                channel.send(conn, segments[0])
                yield _codec.encode_chunk(header, wrap=True)
                return
            yield from _codec.iter_chunk_frames(result.tensor, name=name, version=result.version,
                                                chunk_bytes=chunk_size(request.chunk_bytes),
                                                wrap=True)
            return
        if request.data_token:
            channel = self.transport.data_channel()
            # The copy is made under the read lock; the bytes are sent after it is released.
            result = m.read(name, index, grad=grad, kind=kind, share=True)
            tensor = result.tensor
            if tensor.numel() * tensor.element_size() >= _data.DATA_MIN_BYTES:
                conn = channel.take(request.data_token)
                try:
                    header = tpb.TensorHeader(
                        name=name, dtype=_codec.dtype_to_proto(tensor.dtype),
                        shape=list(tensor.shape), version=result.version, data_channel=True)
                    del result
                    yield _codec.encode_chunk(header, wrap=True)
                    channel.send_tensor(conn, tensor)
                finally:
                    conn.close()
                return
            # Small: inline, the token stays unused (the client keeps its connection).
            yield from _codec.iter_chunk_frames(tensor, name=name, version=result.version,
                                                chunk_bytes=chunk_size(request.chunk_bytes),
                                                wrap=True)
            return
        result = m.read(name, index, grad=grad, kind=kind, share=True)
        yield from _codec.iter_chunk_frames(result.tensor, name=name, version=result.version,
                                            chunk_bytes=chunk_size(request.chunk_bytes),
                                            wrap=True)

    @rpc
    def GetTensorInline(self, request: pb.GetTensorInlineRequest, context: grpc.ServicerContext
                        ) -> bytes:
        # Returns GetTensorInlineResponse wire bytes (same layout as a TensorChunk).
        m, kind, name = self._tensor(request.name)
        index = _codec.index_from_proto(request.index, max_elements=self.max_tensor_elements)
        limit = min(INLINE_MAX_BYTES, self.transport.max_message_bytes - 4096)
        self._check_index(m, name, kind, index, inline_bytes=limit)

        def check(dtype: Any, shape: tuple[int, ...]) -> None:
            nbytes = dtype.itemsize * numel(shape)
            if nbytes > limit:  # refuse before copying anything
                raise ResourceExhaustedError(
                    f"{name!r}{'[...]' if index else ''} has {nbytes} bytes, more than "
                    f"GetTensorInline's {limit}; use GetTensor", reason="MESSAGE_TOO_LARGE",
                    metadata={"limit": "inline_bytes", "limit_bytes": str(limit),
                              "asked": str(nbytes)})

        data, dtype, shape, version = m.read_bytes(
            name, index, grad=request.field == pb.TENSOR_FIELD_GRAD, kind=kind, check=check)
        header = tpb.TensorHeader(name=name, dtype=_codec.dtype_to_proto(dtype), shape=shape,
                                  version=version)
        return _codec.encode_chunk(header, data)

    def _set_slice(self, request: pb.SetSliceRequest, value: Any,
                   context: grpc.ServicerContext) -> pb.SetSliceResponse:
        model_id, w = slice_write(request, value, self.max_tensor_elements)
        m = self.registry.get(model_id)
        self._check_index(m, w.name, w.kind, w.index)
        return self._apply_slice(m, w, request, context)

    @staticmethod
    def _apply_slice(m: ServedModel, w: SliceWrite, request: pb.SetSliceRequest,
                     context: grpc.ServicerContext) -> pb.SetSliceResponse:
        version, model_version = m.set_slice(w.name, w.index, w.op, w.value, w.expected_version,
                                             kind=w.kind,
                                             ctx=write_context(request.request_id, context))
        return pb.SetSliceResponse(version=version, model_version=model_version)

    def _announced(self, request: pb.SetSliceRequest, link: str
                   ) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of a value that travels beside the call (shared memory or the data
        channel), checked; the message itself must carry no value bytes."""
        dtype = _codec.dtype_from_proto(request.value.dtype)
        shape = _codec.check_shape(request.value.shape, max_elements=self.max_tensor_elements)
        if request.value.data:
            raise InvalidArgumentError(f"a {link} SetSlice carries no value bytes",
                                       reason="BAD_STREAM")
        return dtype, shape

    @rpc
    def SetSlice(self, request: pb.SetSliceRequest, context: grpc.ServicerContext
                 ) -> pb.SetSliceResponse:
        if request.shm_token:
            conn = self.transport.shm_channel().take(request.shm_token)
            try:
                # Names, index, op and sizes are checked before the memfd is mapped.
                model_id, w = slice_write(request, None, self.max_tensor_elements)
                dtype, shape = self._announced(request, "shared-memory")
                m = self.registry.get(model_id)
                self._check_upload(m, w, shape)
            except BaseException:
                conn.close()
                raise
            nbytes = dtype.itemsize * numel(shape)
            segment = self.transport.shm_channel().receive(conn, nbytes)
            try:
                w.value = _owned(m, _codec.typed_view(segment.tensor, nbytes, dtype, shape))
                return self._apply_slice(m, w, request, context)
            finally:
                segment.close()
        if request.data_token:
            # Names, index, op and limits are checked before any byte is accepted.
            model_id, w = slice_write(request, None, self.max_tensor_elements)
            dtype, shape = self._announced(request, "data-channel")
            m = self.registry.get(model_id)
            self._check_upload(m, w, shape)  # NOT_FOUND, or too big, before reading a byte
            channel = self.transport.data_channel()
            # A unary call that waits on its client's bytes: at most half the unary threads
            # may do so, or slow producers would starve every other call. Past that the SDK
            # sends the value over a gRPC stream instead (a transfer, admitted as such).
            if not self._data_writes.acquire(blocking=False):
                raise InvalidArgumentError(
                    "the data channel is busy with other writes; send the value over gRPC",
                    reason="DATA_CHANNEL_UNAVAILABLE", metadata={"busy": "true"})
            try:
                conn = channel.take(request.data_token)
                w.value = channel.receive_tensor(conn, dtype, tuple(shape),
                                                 _data.write_digest(request.data_token, request))
            finally:
                self._data_writes.release()
            return self._apply_slice(m, w, request, context)
        return self._set_slice(request, _codec.tensor_from_proto(
            request.value, max_elements=self.max_tensor_elements), context)

    @rpc
    def StreamSetSlice(self, request_iterator: Iterator[Any],
                       context: grpc.ServicerContext) -> pb.StreamSetSliceResponse:
        # Data messages arrive as memoryviews (transport.add_servicer's raw deserializer).
        first = next(request_iterator, None)
        if (first is None or isinstance(first, memoryview)
                or first.WhichOneof("part") != "request"):
            raise InvalidArgumentError("the first StreamSetSlice message must carry the request",
                                       reason="BAD_STREAM")
        req = first.request
        if req.value.data:
            raise InvalidArgumentError("the first StreamSetSlice message carries no value bytes",
                                       reason="BAD_STREAM")
        # The target is checked, and the announced size against it, before allocating.
        model_id, w = slice_write(req, None, self.max_tensor_elements)
        m = self.registry.get(model_id)
        self._check_upload(m, w, _codec.check_shape(req.value.shape,
                                                    max_elements=self.max_tensor_elements))
        asm = _codec.TensorAssembler(tpb.TensorHeader(dtype=req.value.dtype,
                                                      shape=req.value.shape),
                                     max_elements=self.max_tensor_elements)
        for msg in request_iterator:
            if isinstance(msg, memoryview):
                asm.add(msg)
            elif msg.WhichOneof("part") == "data":
                asm.add(msg.data)
            else:
                raise InvalidArgumentError("only the first StreamSetSlice message may carry the "
                                           "request", reason="BAD_STREAM")
        w.value = asm.finish()
        done = self._apply_slice(m, w, req, context)
        return pb.StreamSetSliceResponse(version=done.version, model_version=done.model_version)

    @rpc
    def GetTransportInfo(self, request: pb.GetTransportInfoRequest,
                         context: grpc.ServicerContext) -> pb.GetTransportInfoResponse:
        shm, data = self.transport.shm, self.transport.data
        return pb.GetTransportInfoResponse(max_message_bytes=self.transport.max_message_bytes,
                                           chunk_bytes=_codec.DEFAULT_CHUNK_BYTES,
                                           shm_address=shm.address if shm else "",
                                           data_port=data.port if data else 0)

    @rpc
    def PullState(self, request: pb.PullStateRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        # Yields PullStateResponse wire bytes: the manifest, then raw data frames.
        m = self._model(request.model)
        names = m.select_names(list(request.names), prefix=request.prefix, glob=request.glob,
                               parameters_only=request.parameters_only)
        if request.shm_token:
            channel = self.transport.shm_channel()
            segments: list[Any] = []

            def alloc(nbytes: int) -> Any:
                if nbytes < SHM_MIN_BYTES:  # small: inline, the token stays unused
                    return torch.empty(nbytes, dtype=torch.uint8)
                segments.append(create_segment(nbytes))
                return segments[0].tensor[:nbytes]

            state, buf = m.snapshot_state(names, alloc=alloc)
            manifest = state_manifest(state)
            if segments:
                del buf
                try:
                    conn = channel.take(request.shm_token)
                except BaseException:
                    segments[0].close()
                    raise
                channel.send(conn, segments[0])
                manifest.shm = True
                yield manifest.SerializeToString()
                return
        else:
            state, buf = m.snapshot_state(names)
            manifest = state_manifest(state)
        yield manifest.SerializeToString()
        yield from _codec.iter_data_frames(buf, 0x1A, chunk_size(request.chunk_bytes))

    @rpc
    def PushState(self, request_iterator: Iterator[Any], context: grpc.ServicerContext
                  ) -> pb.PushStateResponse:
        # Data messages arrive as memoryviews (transport.add_servicer's raw deserializer).
        first = next(request_iterator, None)
        if first is None or isinstance(first, memoryview) or not first.HasField("header"):
            raise InvalidArgumentError("the first PushState message must carry the header",
                                       reason="BAD_STREAM")
        header = first.header
        m = self._model(header.model)
        refs = m.check_state(header.tensors)
        _, _, total = _codec.state_layout(header.tensors)
        expected = (header.expected_model_version if header.HasField("expected_model_version")
                    else None)
        if header.shm_token:
            conn = self.transport.shm_channel().take(header.shm_token)
            if first.data or next(request_iterator, None) is not None:
                conn.close()
                raise InvalidArgumentError("a shared-memory PushState carries no data messages",
                                           reason="BAD_STREAM")
            segment = self.transport.shm_channel().receive(conn, total)
            try:
                values = _codec.unpack_state(_owned(m, segment.tensor[:total]), header.tensors)
                updated, version = m.load_state(refs, values, expected,
                                                ctx=write_context("", context))
                del values
            finally:
                segment.close()
        else:
            asm = _codec.TensorAssembler(tpb.TensorHeader(dtype=tpb.DTYPE_UINT8, shape=[total]))
            asm.add(first.data)
            for msg in request_iterator:
                if isinstance(msg, memoryview):
                    asm.add(msg)
                elif not msg.HasField("header"):
                    asm.add(msg.data)
                else:
                    raise InvalidArgumentError("only the first PushState message may carry the "
                                               "header", reason="BAD_STREAM")
            values = _codec.unpack_state(asm.finish(), header.tensors)
            updated, version = m.load_state(refs, values, expected,
                                                ctx=write_context("", context))
        return pb.PushStateResponse(
            updated=[pb.TensorVersion(name=n, version=v) for n, v in updated],
            model_version=version)
