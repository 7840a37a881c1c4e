"""Handlers of the tensor RPCs and their transfers: GetTensor, GetTensorInline, SetSlice,
StreamSetSlice, PullState, PushState, GetTransportInfo, and the size checks done before a value
is allocated."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import torch

from paramhub import _codec
from paramhub.common.dtypes import numel
from paramhub.common.errors import InvalidArgumentError, ResourceExhaustedError
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.api import framing
from paramhub_server.api.serde import slice_write, state_manifest, write_context
from paramhub_server.core.model import ServedModel, SliceWrite
from paramhub_server.transport import POLICY, Admit, TensorRead
from paramhub_server.api.base import Handlers
from paramhub_server.errors import rpc

#: Largest value GetTensorInline answers (the policy's inline limit).
INLINE_MAX_BYTES = POLICY.inline_bytes


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
        # Yields GetTensorResponse wire bytes (transport.add_servicer passes them through), over
        # the transport the request names.
        m, kind, name = self._tensor(request.name)
        index = _codec.index_from_proto(request.index, max_elements=self.max_tensor_elements)
        self._check_index(m, name, kind, index)
        read = TensorRead(m, name, index, request.field == pb.TENSOR_FIELD_GRAD, kind,
                          request.chunk_bytes)
        yield from self.transport.link_for(request).send_tensor(read, request)

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

    @staticmethod
    def _apply_slice(m: ServedModel, w: SliceWrite, request: pb.SetSliceRequest,
                     context: grpc.ServicerContext, volatile: bool = False
                     ) -> pb.SetSliceResponse:
        version, model_version = m.set_slice(w.name, w.index, w.op, w.value, w.expected_version,
                                             kind=w.kind,
                                             ctx=write_context(request.request_id, context),
                                             volatile=volatile)
        return pb.SetSliceResponse(version=version, model_version=model_version)

    def _admit(self, m: ServedModel, w: SliceWrite | None = None) -> Admit:
        """The checks a transport runs before accepting a write's bytes. A SetSlice (`w`)
        keeps a view of the client's memory as it is: set_slice(volatile=True) makes it safe
        (a big value is then copied once, into its value file, instead of twice)."""
        return Admit(
            announced=lambda dtype, shape: self._check_upload(m, w, shape) if w else None,
            inline=lambda value: self._check_index(m, w.name, w.kind, w.index) if w else None,
            owned=(lambda view: view) if w else (lambda view: _owned(m, view)),
            max_elements=self.max_tensor_elements)

    @rpc
    def SetSlice(self, request: pb.SetSliceRequest, context: grpc.ServicerContext
                 ) -> pb.SetSliceResponse:
        # Names, index and op are checked before the transport accepts any byte.
        try:
            model_id, w = slice_write(request, None, self.max_tensor_elements)
            m = self.registry.get(model_id)
            link = self.transport.link_for(request)
        except BaseException:
            self.transport.release(request)
            raise
        w.value = link.receive_value(request, self._admit(m, w))
        return self._apply_slice(m, w, request, context, volatile=link.volatile)

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
        w.value = framing.slice_value(req.value, request_iterator, self.max_tensor_elements)
        done = self._apply_slice(m, w, req, context)
        return pb.StreamSetSliceResponse(version=done.version, model_version=done.model_version)

    @rpc
    def GetTransportInfo(self, request: pb.GetTransportInfoRequest,
                         context: grpc.ServicerContext) -> pb.GetTransportInfoResponse:
        return pb.GetTransportInfoResponse(chunk_bytes=_codec.DEFAULT_CHUNK_BYTES,
                                           **self.transport.info())

    @rpc
    def PullState(self, request: pb.PullStateRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        # Yields PullStateResponse wire bytes: the manifest, then the bytes (raw data frames, or
        # the transport the request names).
        m = self._model(request.model)
        names = m.select_names(list(request.names), prefix=request.prefix, glob=request.glob,
                               parameters_only=request.parameters_only)

        def snapshot(alloc: Any = None) -> tuple[Any, Any]:
            state, buf = m.snapshot_state(names, alloc=alloc)
            return state_manifest(state), buf

        yield from self.transport.link_for(request).send_state(snapshot, request)

    @rpc
    def PushState(self, request_iterator: Iterator[Any], context: grpc.ServicerContext
                  ) -> pb.PushStateResponse:
        # Data messages arrive as memoryviews (transport.add_servicer's raw deserializer).
        first = next(request_iterator, None)
        if first is None or isinstance(first, memoryview) or not first.HasField("header"):
            raise InvalidArgumentError("the first PushState message must carry the header",
                                       reason="BAD_STREAM")
        header = first.header
        try:
            m = self._model(header.model)
            refs = m.check_state(header.tensors)
            _, _, total = _codec.state_layout(header.tensors)
            link = self.transport.link_for(header)
        except BaseException:
            self.transport.release(header)
            raise
        expected = (header.expected_model_version if header.HasField("expected_model_version")
                    else None)
        flat = link.receive_state(header, first, request_iterator, total, self._admit(m))
        values = _codec.unpack_state(flat, header.tensors)
        updated, version = m.load_state(refs, values, expected, ctx=write_context("", context))
        del values, flat
        return pb.PushStateResponse(
            updated=[pb.TensorVersion(name=n, version=v) for n, v in updated],
            model_version=version)
