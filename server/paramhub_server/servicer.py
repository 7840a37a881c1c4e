"""ParameterService: thin — parse the proto, call the core, build the proto."""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import torch
from torch.utils._pytree import tree_flatten

from paramhub import _code, _codec, _data
from paramhub.errors import (InvalidArgumentError, PermissionDeniedError,
                             ResourceExhaustedError)
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub.v1 import parameter_service_pb2_grpc as pb_grpc
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.core import probe, rng, store, training, watch
from paramhub_server.core.model import (BUFFER, PARAMETER, InitWrite, ServedModel, SliceWrite,
                                        WriteContext)
from paramhub_server.core.registry import Registry
from paramhub_server.errors import rpc
from paramhub_server.logs import current_role
from paramhub_server.transport import ShmSegment, Transport, create_segment

log = logging.getLogger(__name__)

_OPS = {pb.SLICE_OP_ASSIGN: "assign", pb.SLICE_OP_ADD: "add", pb.SLICE_OP_SUB: "sub",
        pb.SLICE_OP_MUL: "mul", pb.SLICE_OP_DIV: "div"}
_KINDS = {PARAMETER: pb.TENSOR_KIND_PARAMETER, BUFFER: pb.TENSOR_KIND_BUFFER}
_COLLECTIONS = {"parameters": PARAMETER, "buffers": BUFFER}
_MODES = {pb.TRAINING_MODE_UNSPECIFIED: training.ASYNC, pb.TRAINING_MODE_ASYNC: training.ASYNC,
          pb.TRAINING_MODE_SYNC: training.SYNC,
          pb.TRAINING_MODE_BOUNDED_STALENESS: training.BOUNDED}
_MODES_PB = {training.ASYNC: pb.TRAINING_MODE_ASYNC, training.SYNC: pb.TRAINING_MODE_SYNC,
             training.BOUNDED: pb.TRAINING_MODE_BOUNDED_STALENESS}
_POLICIES = {pb.STALE_POLICY_UNSPECIFIED: training.REJECT, pb.STALE_POLICY_REJECT: training.REJECT,
             pb.STALE_POLICY_SCALE: training.SCALE}
_POLICIES_PB = {training.REJECT: pb.STALE_POLICY_REJECT, training.SCALE: pb.STALE_POLICY_SCALE}
_OUTCOMES = {training.APPLIED: pb.PUSH_OUTCOME_APPLIED, training.SCALED: pb.PUSH_OUTCOME_SCALED,
             training.REJECTED: pb.PUSH_OUTCOME_REJECTED, training.QUEUED: pb.PUSH_OUTCOME_QUEUED}
MIN_CHUNK, MAX_CHUNK = 4 << 10, 4 << 20
#: Metadata key carrying the client's writer id (shown in watch events).
WRITER_METADATA = "x-paramhub-writer"
_EVENT_KINDS = {watch.STARTED: pb.WATCH_EVENT_KIND_STARTED, watch.WRITE: pb.WATCH_EVENT_KIND_WRITE,
                watch.RESYNC: pb.WATCH_EVENT_KIND_RESYNC}
#: How often a watch stream with no events checks whether its client is still there (seconds).
#: Only a safety net: the call's termination callback closes the watcher at once. Polling each
#: second cost 1,000 parked watchers 1,000 thread wake-ups a second (each taking the GIL).
_WATCH_POLL = 30.0
#: Reads of fewer bytes come inline even when the client offers shared memory: below this, a
#: memfd, a mapping and a descriptor pass cost more than they save.
SHM_MIN_BYTES = 1 << 20
#: Largest value GetTensorInline answers.
INLINE_MAX_BYTES = 4 << 20


def model_id_of(name: str) -> str:
    """"models/{id}" -> id."""
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != "models" or not parts[1]:
        raise InvalidArgumentError(f"model name {name[:200]!r} must look like models/{{model}}",
                                   reason="BAD_NAME")
    return parts[1]


def tensor_name_of(name: str) -> tuple[str, str, str]:
    """"models/{id}/parameters/{p}" -> (id, kind, p)."""
    parts = name.split("/", 3)
    if (len(parts) != 4 or parts[0] != "models" or not parts[1] or parts[2] not in _COLLECTIONS
            or not parts[3]):
        raise InvalidArgumentError(
            f"tensor name {name[:200]!r} must look like models/{{model}}/parameters/{{name}} or "
            "models/{model}/buffers/{name}", reason="BAD_NAME")
    return parts[1], _COLLECTIONS[parts[2]], parts[3]


def model_info(m: ServedModel) -> pb.ModelInfo:
    """ModelInfo of a served model."""
    numel, nbytes = m.stats()
    return pb.ModelInfo(name=m.name, device=str(m.device), version=m.version,
                        num_parameters=numel, num_bytes=nbytes,
                        root_class=type(m.module).__name__,
                        source="program" if m.program is not None
                        else "code" if m.source else "spec")


def tensor_info(m: ServedModel, name: str) -> pb.TensorInfo:
    """TensorInfo of one state_dict name."""
    ref = m.ref(name)
    t = ref.get()
    return pb.TensorInfo(name=name, kind=_KINDS[ref.kind], dtype=_codec.dtype_to_proto(t.dtype),
                         shape=list(t.shape), device=str(t.device),
                         requires_grad=bool(t.requires_grad) if ref.kind == PARAMETER else False,
                         storage_group=ref.group, version=m.versions[ref.group],
                         has_grad=ref.kind == PARAMETER and t.grad is not None)


def write_context(request_id: str, context: grpc.ServicerContext) -> WriteContext:
    """The write's request id and its writer: the client's writer id metadata, else its peer."""
    writer = ""
    for key, value in context.invocation_metadata() or ():
        if key == WRITER_METADATA and isinstance(value, str):
            writer = value[:200]
    return WriteContext(request_id=request_id, writer=writer or context.peer())


def slice_write(request: pb.SetSliceRequest, value: Any, max_elements: int | None = None
                ) -> tuple[str, SliceWrite]:
    """(model id, SliceWrite) of a SetSliceRequest whose value is already decoded."""
    model_id, kind, name = tensor_name_of(request.name)
    op = _OPS.get(request.op)
    if op is None:
        raise InvalidArgumentError(f"unknown slice op {request.op}", reason="BAD_OP")
    index = _codec.index_from_proto(request.index, max_elements=max_elements)
    expected = request.expected_version if request.HasField("expected_version") else None
    return model_id, SliceWrite(name, index, op, value, expected, kind)


def init_write(request: pb.ApplyInitRequest, max_elements: int | None = None) -> InitWrite:
    """The InitWrite of an ApplyInitRequest."""
    targets: list[tuple[str, Any]] = []
    for t in request.targets:
        which = t.WhichOneof("selector")
        if which == "module":
            targets.append(("module", (t.module.path, t.module.module_class,
                                       t.module.parameter)))
        elif which is not None:
            targets.append((which, getattr(t, which)))
        else:
            raise InvalidArgumentError("an init target has no selector set",
                                       reason="BAD_ARGUMENT")
    args = {k: _codec.value_from_proto(v, max_elements=max_elements)
            for k, v in request.args.items()}
    return InitWrite(targets, request.scheme, args,
                     seed=request.seed if request.HasField("seed") else None,
                     expected_model_version=(request.expected_model_version
                                             if request.HasField("expected_model_version")
                                             else None))


def event_to_proto(ev: watch.Event) -> pb.WatchModelResponse:
    """A watch event as its proto."""
    return pb.WatchModelResponse(
        kind=_EVENT_KINDS[ev.kind], model_version=ev.model_version, op=ev.op,
        changes=[pb.TensorChange(name=c.name, version=c.version, region=c.region)
                 for c in ev.changes],
        writer=ev.writer, time_unix_nanos=ev.time_ns, request_id=ev.request_id)


@functools.lru_cache(maxsize=256)
def event_bytes(ev: watch.Event) -> bytes:
    """A watch event's wire bytes, built once however many watchers send it (a write watched by
    1,000 streams used to build and serialize its message 1,000 times)."""
    return event_to_proto(ev).SerializeToString()


def _versions(updated: Any) -> list[pb.TensorVersion]:
    return [pb.TensorVersion(name=n, version=v) for n, v in updated]


def _options_to_proto(target: Any, options: dict[str, Any]) -> None:
    for k, v in options.items():
        target[k].CopyFrom(_codec.value_to_proto(v))


def optimizer_info(opt: training.ServedOptimizer) -> pb.OptimizerInfo:
    """OptimizerInfo of a served optimizer (groups with resolved options)."""
    info = pb.OptimizerInfo(type=opt.type, steps=opt.steps)
    _options_to_proto(info.defaults, opt.defaults)
    for names, options in opt.resolved_groups():
        group = info.param_groups.add(parameters=names)
        _options_to_proto(group.options, options)
    return info


def training_config(cfg: training.TrainingConfig) -> pb.TrainingConfig:
    """TrainingConfig proto of the core's config."""
    return pb.TrainingConfig(mode=_MODES_PB[cfg.mode], sync_workers=cfg.sync_workers,
                             max_staleness=cfg.max_staleness,
                             stale_policy=_POLICIES_PB[cfg.stale_policy])


def _first_header(request_iterator: Iterator[Any], rpc: str) -> Any:
    """The `header` of a request stream's first message; INVALID_ARGUMENT if it has none."""
    first = next(request_iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgumentError(f"the first {rpc} message must carry the header",
                                   reason="BAD_STREAM")
    return first.header


def _header_then_chunks(request_iterator: Iterator[Any], rpc: str
                        ) -> tuple[Any, Iterator[tpb.TensorChunk]]:
    """Splits a stream of one `header` message then `chunk` messages (CreateModel, PushGrads)
    into the header and a lazy iterator over the chunks."""
    header = _first_header(request_iterator, rpc)

    def chunks() -> Iterator[tpb.TensorChunk]:
        for msg in request_iterator:
            if msg.WhichOneof("part") != "chunk":
                raise InvalidArgumentError(f"only the first {rpc} message may carry a header",
                                           reason="BAD_STREAM")
            yield msg.chunk

    return header, chunks()


class ParameterService(pb_grpc.ParameterServiceServicer):
    """The gRPC face of a Registry."""

    def __init__(self, registry: Registry, *, max_tensor_elements: int | None = None,
                 transport: Transport | None = None, max_data_writes: int = 8) -> None:
        self.registry = registry
        #: Data-channel SetSlice calls receiving at once (each holds a unary thread meanwhile).
        self._data_writes = threading.BoundedSemaphore(max_data_writes)
        #: Cap on the elements of any tensor a request carries or announces (--max-tensor-elements).
        self.max_tensor_elements = max_tensor_elements
        self.transport = transport or Transport(max_message_bytes=64 << 20, shm=False)

    def _model(self, name: str) -> ServedModel:
        return self.registry.get(model_id_of(name))

    def _values(self, msgs: Any) -> list[Any]:
        return [_codec.value_from_proto(v, max_elements=self.max_tensor_elements) for v in msgs]

    def _options(self, options: Any) -> dict[str, Any]:
        return {k: _codec.value_from_proto(v, max_elements=self.max_tensor_elements)
                for k, v in options.items()}

    def _tensor(self, name: str) -> tuple[ServedModel, str, str]:
        model_id, kind, tname = tensor_name_of(name)
        return self.registry.get(model_id), kind, tname

    @rpc
    def CreateModel(self, request_iterator: Iterator[pb.CreateModelRequest],
                    context: grpc.ServicerContext) -> pb.CreateModelResponse:
        header, chunks = _header_then_chunks(request_iterator, "CreateModel")

        try:
            # An uploaded tensor larger than the whole model is refused from its header,
            # before it is allocated.
            values = {a.name: a.finish() for a in _codec.assemble_tensors(
                chunks, check=_once(), max_elements=self.max_tensor_elements,
                max_bytes=self.registry.max_model_bytes)}
        except ResourceExhaustedError as e:
            if e.metadata.get("limit") != "max_bytes":
                raise
            raise ResourceExhaustedError(
                f"an uploaded tensor of {e.metadata['asked']} bytes exceeds --max-model-bytes "
                f"{self.registry.max_model_bytes}", reason="MODEL_TOO_LARGE",
                metadata={"limit": "max_model_bytes", "asked": e.metadata["asked"],
                          "limit_value": str(self.registry.max_model_bytes)}) from None
        if header.exported_program:  # a torch.export program: nothing unpickled, no trust
            model = self.registry.create_program(header.model_id, header, values=values)
        elif header.module_pickle:
            if current_role() not in (None, "admin"):  # None: no auth (a loopback server)
                raise PermissionDeniedError("sending module code needs the admin role",
                                            reason="ROLE_TOO_LOW", metadata={"needed": "admin"})
            model = self.registry.create_code(header.model_id, header.module_pickle,
                                              device=header.device, values=values.items())
        else:
            model = self.registry.create(header.model_id, header.spec,
                                         seed=header.seed if header.HasField("seed") else None,
                                         device=header.device, values=values.items())
        log.info("created model %s on %s", model.id, model.device)
        return pb.CreateModelResponse(model=model_info(model))

    @rpc
    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext
                    ) -> pb.DeleteModelResponse:
        self.registry.delete(model_id_of(request.name))
        return pb.DeleteModelResponse()

    @rpc
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext
                   ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.registry.list()])

    @rpc
    def DescribeModel(self, request: pb.DescribeModelRequest, context: grpc.ServicerContext
                      ) -> pb.DescribeModelResponse:
        m = self._model(request.name)
        with m.lock.read():
            groups: dict[int, int] = {}
            modules = []
            if m.program is not None:  # the tree as exported, with the served modes
                training = {p: mod.training
                            for p, mod in m.module.named_modules(remove_duplicate=False)}
                for info in m.program.tree:
                    modules.append(pb.ModuleInfo())
                    modules[-1].CopyFrom(info)
                    modules[-1].training = training.get(info.path, info.training)
            for path, mod in ([] if m.program is not None
                              else m.module.named_modules(remove_duplicate=False)):
                modules.append(_code.describe_module(
                    path, mod, groups.setdefault(id(mod), len(groups))))
            lazy = m.uninitialized
            return pb.DescribeModelResponse(
                model=model_info(m), spec=m.spec, modules=modules,
                tensors=[tensor_info(m, n) for n in m.names()],
                uninitialized_parameters=[n for n, k in lazy if k == PARAMETER],
                uninitialized_buffers=[n for n, k in lazy if k == BUFFER])

    @rpc
    def ListParameters(self, request: pb.ListParametersRequest, context: grpc.ServicerContext
                       ) -> pb.ListParametersResponse:
        m = self._model(request.model)
        names = [n for n in m.names(include_buffers=request.include_buffers)
                 if n.startswith(request.prefix)
                 and (not request.glob or fnmatch.fnmatchcase(n, request.glob))]
        return pb.ListParametersResponse(tensors=[tensor_info(m, n) for n in names])

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
                    nbytes = dtype.itemsize * _numel(shape)
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
                nbytes = dtype.itemsize * _numel(shape)
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
                                                chunk_bytes=_chunk_size(request.chunk_bytes),
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
                                                chunk_bytes=_chunk_size(request.chunk_bytes),
                                                wrap=True)
            return
        result = m.read(name, index, grad=grad, kind=kind, share=True)
        yield from _codec.iter_chunk_frames(result.tensor, name=name, version=result.version,
                                            chunk_bytes=_chunk_size(request.chunk_bytes),
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
            nbytes = dtype.itemsize * _numel(shape)
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

    def _check_index(self, m: ServedModel, name: str, kind: str | None, index: Any, *,
                     inline_bytes: int | None = None) -> tuple[int, ...] | None:
        """Refuses, before anything is built, an index whose region would hold more than
        --max-tensor-elements elements (or, for an inline answer, more than `inline_bytes`):
        index tensors can select far more than the tensor holds ((N,1) and (1,N): N x N).
        Returns the region's shape when it was computed."""
        if not any(isinstance(i, torch.Tensor) for i in index):
            return None  # ints, slices, None and ... never select more than the tensor holds
        shape = m.region_shape(name, index, kind=kind)
        if shape is None:
            return None  # an invalid index: the indexing itself reports it
        numel = _numel(shape)
        limit = self.max_tensor_elements
        if limit is not None and numel > limit:
            raise ResourceExhaustedError(
                f"the index selects {numel} elements of {name!r}, more than "
                f"--max-tensor-elements {limit}", reason="TENSOR_TOO_LARGE",
                metadata={"limit": "max_tensor_elements", "limit_value": str(limit),
                          "asked": str(numel)})
        if inline_bytes is not None:
            nbytes = numel * m.ref(name, kind).get().element_size()
            if nbytes > inline_bytes:
                raise ResourceExhaustedError(
                    f"{name!r}[...] has {nbytes} bytes, more than GetTensorInline's "
                    f"{inline_bytes}; use GetTensor", reason="MESSAGE_TOO_LARGE",
                    metadata={"limit": "inline_bytes", "limit_bytes": str(inline_bytes),
                              "asked": str(nbytes)})
        return shape

    def _check_upload(self, m: ServedModel, w: SliceWrite, shape: tuple[int, ...]) -> None:
        """Refuses an announced value larger than the region it is written to, before its
        memory is allocated (a value broadcasts to the region, so it never holds more
        elements than the region)."""
        region = self._check_index(m, w.name, w.kind, w.index)
        if region is None:
            region = m.region_shape(w.name, w.index, kind=w.kind)
        if region is None:
            return  # an invalid index: the write reports it
        if _numel(shape) > max(_numel(region), 1):
            raise InvalidArgumentError(
                f"a value of shape {list(shape)} cannot be written to a region of shape "
                f"{list(region)} of {w.name!r}", reason="BAD_SHAPE",
                metadata={"tensor": w.name, "asked": str(_numel(shape))})

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
            nbytes = dtype.itemsize * _numel(shape)
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
    def ApplyInit(self, request: pb.ApplyInitRequest, context: grpc.ServicerContext
                  ) -> pb.ApplyInitResponse:
        m = self._model(request.model)
        w = init_write(request, self.max_tensor_elements)
        generator = (rng.GeneratorState(request.generator_state)
                     if request.HasField("generator_state") and w.seed is None else None)
        updated, model_version = m.apply_init(
            w.targets, w.scheme, w.args, seed=w.seed,
            expected_model_version=w.expected_model_version,
            ctx=write_context(request.request_id, context), generator=generator)
        return pb.ApplyInitResponse(updated=_versions(updated), model_version=model_version,
                                    generator_state=generator.state if generator else b"")

    @rpc
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext
                ) -> pb.ForwardResponse:
        m = self._model(request.model)
        args = [_codec.value_from_proto(v, max_elements=self.max_tensor_elements)
                for v in request.args]
        kwargs = {k: _codec.value_from_proto(v, max_elements=self.max_tensor_elements)
                  for k, v in request.kwargs.items()}
        # Without auth every caller may write; with auth a read token may not update buffers.
        generator = (rng.GeneratorState(request.generator_state)
                     if request.HasField("generator_state") else None)
        out, version, materialized = m.forward(
            request.module_path, args, kwargs,
            may_write=current_role() in (None, "write", "admin"),
            seed=request.seed if request.HasField("seed") else None, generator=generator)
        limit = self.transport.max_message_bytes
        # Bounded from the output's tensors before anything is encoded (an encoding of more
        # than 2 GiB is not even possible).
        asked = sum(t.numel() * t.element_size() for t in tree_flatten(out)[0]
                    if isinstance(t, torch.Tensor))
        if asked > limit:
            raise ResourceExhaustedError(
                f"the forward output holds {asked} bytes of tensors, more than the server's "
                f"max_message_bytes {limit} (paramhub serve --max-message-bytes)",
                reason="MESSAGE_TOO_LARGE",
                metadata={"limit": "max_message_bytes", "limit_bytes": str(limit),
                          "asked": str(asked)})
        try:
            encoded = _codec.value_to_proto(out)
        except InvalidArgumentError:
            raise InvalidArgumentError(f"the module returned a {type(out).__name__}, which "
                                       "cannot be sent", reason="BAD_OUTPUT") from None
        response = pb.ForwardResponse(output=encoded, model_version=version,
                                      materialized=materialized,
                                      generator_state=generator.state if generator else b"")
        if response.ByteSize() > limit:
            raise ResourceExhaustedError(
                f"the forward output needs {response.ByteSize()} bytes, more than the server's "
                f"max_message_bytes {limit} (paramhub serve --max-message-bytes)",
                reason="MESSAGE_TOO_LARGE",
                metadata={"limit": "max_message_bytes", "limit_bytes": str(limit),
                          "asked": str(response.ByteSize())})
        return response

    @rpc
    def CheckShared(self, request: pb.CheckSharedRequest, context: grpc.ServicerContext
                    ) -> pb.CheckSharedResponse:
        m = self._model(request.model)
        shared, groups = m.check_shared(list(request.names))
        return pb.CheckSharedResponse(shared=shared,
                                      groups=[pb.SharedGroup(names=g) for g in groups])

    @rpc
    def SetTrainingMode(self, request: pb.SetTrainingModeRequest, context: grpc.ServicerContext
                        ) -> pb.SetTrainingModeResponse:
        self._model(request.model).set_training(request.module_path, request.training)
        return pb.SetTrainingModeResponse()

    @rpc
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext
                 ) -> pb.BackwardResponse:
        m = self._model(request.model)
        grad_outputs = self._values(request.grad_outputs)
        if any(g is not None and not isinstance(g, torch.Tensor) for g in grad_outputs):
            raise InvalidArgumentError("each output gradient must be a tensor or null",
                                       reason="BAD_ARGUMENT")
        grads, version = m.backward(
            request.module_path, self._values(request.args), self._options(request.kwargs),
            seed=request.seed if request.HasField("seed") else None,
            forward_version=request.forward_model_version, grad_outputs=grad_outputs,
            grad_inputs=list(request.grad_inputs))
        return pb.BackwardResponse(input_grads=[_codec.value_to_proto(g) for g in grads],
                                   model_version=version)

    @rpc
    def ZeroGrad(self, request: pb.ZeroGradRequest, context: grpc.ServicerContext
                 ) -> pb.ZeroGradResponse:
        self._model(request.model).zero_grad(request.module_path, list(request.parameters),
                                             request.fill_zeros)
        return pb.ZeroGradResponse()

    @rpc
    def CreateOptimizer(self, request: pb.CreateOptimizerRequest, context: grpc.ServicerContext
                        ) -> pb.CreateOptimizerResponse:
        m = self._model(request.model)
        groups = [(list(g.parameters), self._options(g.options)) for g in request.param_groups]
        opt, created = training.create_optimizer(m, request.type, groups,
                                                 self._options(request.defaults),
                                                 replace=request.replace)
        return pb.CreateOptimizerResponse(optimizer=optimizer_info(opt), created=created)

    @rpc
    def OptimizerStep(self, request: pb.OptimizerStepRequest, context: grpc.ServicerContext
                      ) -> pb.OptimizerStepResponse:
        version, steps = training.step(self._model(request.model))
        return pb.OptimizerStepResponse(model_version=version, steps=steps)

    @rpc
    def GetOptimizerState(self, request: pb.GetOptimizerStateRequest,
                          context: grpc.ServicerContext
                          ) -> Iterator[pb.GetOptimizerStateResponse]:
        m = self._model(request.model)
        opt = training.trainer(m).optimizer
        if request.config_only or opt is None:
            # optimizer_of raises OPTIMIZER_NOT_FOUND when there is none.
            yield pb.GetOptimizerStateResponse(optimizer=optimizer_info(training.optimizer_of(m)))
            return
        _, tensors = training.export_optimizer(m)
        yield pb.GetOptimizerStateResponse(optimizer=optimizer_info(opt))
        for name, t in tensors.items():
            for chunk in _codec.iter_tensor_chunks(t, name=name):
                yield pb.GetOptimizerStateResponse(chunk=chunk)

    @rpc
    def ConfigureTraining(self, request: pb.ConfigureTrainingRequest,
                          context: grpc.ServicerContext) -> pb.ConfigureTrainingResponse:
        m = self._model(request.model)
        c = request.config
        mode = _MODES.get(c.mode)
        policy = _POLICIES.get(c.stale_policy)
        if mode is None or policy is None:
            raise InvalidArgumentError("unknown training mode or stale policy",
                                       reason="BAD_TRAINING_MODE")
        cfg = training.configure(m, mode, sync_workers=c.sync_workers,
                                 max_staleness=c.max_staleness, stale_policy=policy,
                                 max_waiters=self.registry.max_round_waiters)
        return pb.ConfigureTrainingResponse(config=training_config(cfg))

    @rpc
    def PullModel(self, request: pb.PullModelRequest, context: grpc.ServicerContext
                  ) -> Iterator[pb.PullModelResponse]:
        m = self._model(request.model)
        tensors, version = m.snapshot(include_buffers=request.include_buffers)
        yield pb.PullModelResponse(header=pb.PullModelHeader(model_version=version,
                                                             num_tensors=len(tensors)))
        for name, t in tensors:
            for chunk in _codec.iter_tensor_chunks(t, name=name, version=version):
                yield pb.PullModelResponse(chunk=chunk)

    @rpc
    def PushGrads(self, request_iterator: Iterator[pb.PushGradsRequest],
                  context: grpc.ServicerContext) -> pb.PushGradsResponse:
        header, chunks = _header_then_chunks(request_iterator, "PushGrads")
        m = self._model(header.model)

        grads: dict[str, Any] = {}

        def check(header: tpb.TensorHeader) -> None:
            # Before the gradient is allocated: a known parameter, once, of its shape.
            if header.name in grads:
                raise InvalidArgumentError(f"gradient for {header.name!r} sent twice",
                                           reason="DUPLICATE_PARAMETER")
            p = m.ref(header.name, PARAMETER).get()
            shape = _codec.check_shape(header.shape, max_elements=self.max_tensor_elements)
            if shape != tuple(p.shape):
                raise InvalidArgumentError(f"gradient for {header.name!r} is {list(shape)}, "
                                           f"the parameter is {list(p.shape)}",
                                           reason="BAD_SHAPE",
                                           metadata={"parameter": header.name})

        for asm in _codec.assemble_tensors(chunks, check=check,
                                          max_elements=self.max_tensor_elements,
                                          max_bytes=self.registry.max_model_bytes):
            grads[asm.name] = asm.finish()
        result = training.push_grads(m, header.model_version, grads,
                                     timeout=context.time_remaining(), alive=context.is_active)
        return pb.PushGradsResponse(outcome=_OUTCOMES[result.outcome],
                                    staleness=result.staleness, scale=result.scale,
                                    model_version=result.model_version, steps=result.steps)

    @rpc
    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        hmin = request.histogram_min if request.HasField("histogram_min") else None
        hmax = request.histogram_max if request.HasField("histogram_max") else None
        if request.name.count("/") == 1:
            if request.index:
                raise InvalidArgumentError("a whole-model probe takes no index",
                                           reason="BAD_INDEX")
            stats, each, version = probe.probe_model(
                self._model(request.name), include_buffers=request.include_buffers,
                bins=request.histogram_bins, hmin=hmin, hmax=hmax, per_tensor=request.per_tensor)
            return pb.ProbeResponse(stats=stats_to_proto(stats),
                                    tensors=[stats_to_proto(s) for s in each],
                                    model_version=version)
        m, kind, name = self._tensor(request.name)
        index = _codec.index_from_proto(request.index, max_elements=self.max_tensor_elements)
        self._check_index(m, name, kind, index)
        stats, version = probe.probe_tensor(m, name, index, kind=kind,
                                            grad=request.field == pb.TENSOR_FIELD_GRAD,
                                            bins=request.histogram_bins, hmin=hmin, hmax=hmax)
        return pb.ProbeResponse(stats=stats_to_proto(stats), model_version=version)

    @rpc
    def ApplyBatch(self, request_iterator: Iterator[pb.ApplyBatchRequest],
                   context: grpc.ServicerContext) -> pb.ApplyBatchResponse:
        header = _first_header(request_iterator, "ApplyBatch")
        m = self._model(header.model)
        writes: list[SliceWrite | InitWrite] = []
        pending: tuple[SliceWrite, _codec.TensorAssembler] | None = None
        # Value bytes a batch may hold while it arrives: every tensor of the model once, plus
        # one message; counted from each value's announced size, before it is allocated.
        budget = m.stats()[1] + self.transport.max_message_bytes
        held = 0

        def take(nbytes: int) -> None:
            nonlocal held
            held += nbytes
            if held > budget:
                raise ResourceExhaustedError(
                    f"the batch's values exceed {budget} bytes (the model's size plus "
                    f"max_message_bytes)", reason="BATCH_TOO_LARGE",
                    metadata={"limit": "batch_bytes", "limit_bytes": str(budget),
                              "asked": str(held)})

        def finish_pending() -> None:
            nonlocal pending
            if pending is not None:
                w, asm = pending
                w.value = asm.finish()
                writes.append(w)
                pending = None

        for msg in request_iterator:
            part = msg.WhichOneof("part")
            if part == "data":
                if pending is None:
                    raise InvalidArgumentError("value bytes without a preceding streamed write",
                                               reason="BAD_STREAM")
                pending[1].add(msg.data)
                continue
            finish_pending()
            if part != "write":
                raise InvalidArgumentError("only the first ApplyBatch message may carry the "
                                           "header", reason="BAD_STREAM")
            which = msg.write.WhichOneof("write")
            if which == "set_slice":
                req = msg.write.set_slice
                nbytes = _nbytes(req.value, self.max_tensor_elements)
                w = self._batch_slice(m, req, None)
                self._check_upload(m, w, tuple(req.value.shape))
                take(nbytes)
                if nbytes and not req.value.data:
                    pending = (w, _codec.TensorAssembler(
                        tpb.TensorHeader(dtype=req.value.dtype, shape=req.value.shape),
                        max_elements=self.max_tensor_elements))
                else:
                    w.value = _codec.tensor_from_proto(req.value,
                                                       max_elements=self.max_tensor_elements)
                    writes.append(w)
            elif which == "apply_init":
                if request_model := msg.write.apply_init.model:
                    if model_id_of(request_model) != m.id:
                        raise InvalidArgumentError("every write of a batch must target the "
                                                   "batch's model", reason="BAD_BATCH")
                writes.append(init_write(msg.write.apply_init, self.max_tensor_elements))
            else:
                raise InvalidArgumentError("a batch write has no write set", reason="BAD_BATCH")
        finish_pending()
        result = m.apply_batch(
            writes, header.expected_model_version if header.HasField("expected_model_version")
            else None, ctx=write_context(header.request_id, context))
        return pb.ApplyBatchResponse(updated=_versions(result.updated),
                                     model_version=result.model_version)

    def _batch_slice(self, m: ServedModel, req: pb.SetSliceRequest, value: Any) -> SliceWrite:
        model_id, w = slice_write(req, value, self.max_tensor_elements)
        if model_id != m.id:
            raise InvalidArgumentError("every write of a batch must target the batch's model",
                                       reason="BAD_BATCH")
        return w

    @rpc
    def WatchModel(self, request: pb.WatchModelRequest, context: grpc.ServicerContext
                   ) -> Iterator[bytes]:
        # Yields WatchModelResponse wire bytes (transport.add_servicer passes them through).
        m = self._model(request.name)
        if request.max_queue < 0:
            raise InvalidArgumentError("max_queue must be >= 0", reason="BAD_ARGUMENT")
        watcher = m.watch(request.max_queue)
        context.add_callback(watcher.close)  # the client went away: stop queueing for it
        try:
            while True:
                ev = watcher.get(_WATCH_POLL)
                if ev is None:
                    if not context.is_active():
                        return
                    continue
                if ev.kind == watch.CLOSED:
                    return
                yield event_bytes(ev)
        finally:
            watcher.close()

    @rpc
    def CreateCheckpoint(self, request: pb.CreateCheckpointRequest,
                         context: grpc.ServicerContext) -> pb.CreateCheckpointResponse:
        info = store.create_checkpoint(self._model(request.model), request.checkpoint)
        return pb.CreateCheckpointResponse(checkpoint=info)

    @rpc
    def ListCheckpoints(self, request: pb.ListCheckpointsRequest,
                        context: grpc.ServicerContext) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(
            checkpoints=store.journal_of(self._model(request.model)).list_checkpoints())

    @rpc
    def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest,
                          context: grpc.ServicerContext) -> pb.RestoreCheckpointResponse:
        result = store.restore_checkpoint(
            self._model(request.model), store.check_checkpoint_name(request.checkpoint),
            request.expected_model_version if request.HasField("expected_model_version")
            else None, write_context(request.request_id, context))
        return pb.RestoreCheckpointResponse(updated=_versions(result.updated),
                                            model_version=result.model_version)

    @rpc
    def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest,
                         context: grpc.ServicerContext) -> pb.DeleteCheckpointResponse:
        store.journal_of(self._model(request.model)).delete_checkpoint(
            store.check_checkpoint_name(request.checkpoint))
        return pb.DeleteCheckpointResponse()

    @rpc
    def ExportCheckpoint(self, request: pb.ExportCheckpointRequest,
                         context: grpc.ServicerContext) -> Iterator[pb.ExportCheckpointResponse]:
        m = self._model(request.model)
        if request.checkpoint:
            store.check_checkpoint_name(request.checkpoint)
        for data in store.export_bytes(m, request.checkpoint):
            yield pb.ExportCheckpointResponse(data=data)

    @rpc
    def CompactModel(self, request: pb.CompactModelRequest, context: grpc.ServicerContext
                     ) -> pb.CompactModelResponse:
        version, folded = store.compact(self._model(request.model))
        return pb.CompactModelResponse(model_version=version, log_bytes=folded)

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

            manifest, buf = m.snapshot_state(names, alloc=alloc)
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
            manifest, buf = m.snapshot_state(names)
        yield manifest.SerializeToString()
        yield from _codec.iter_data_frames(buf, 0x1A, _chunk_size(request.chunk_bytes))

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



def stats_to_proto(s: probe.Stats) -> pb.TensorStats:
    """TensorStats of core probe statistics."""
    return pb.TensorStats(
        name=s.name, dtype=_codec.dtype_to_proto(s.dtype) if s.dtype is not None else 0,
        shape=list(s.shape), numel=s.numel, nan_count=s.nan_count, inf_count=s.inf_count,
        min=s.min, max=s.max, mean=s.mean, std=s.std, norm=s.norm,
        histogram_counts=s.histogram_counts, histogram_min=s.histogram_min,
        histogram_max=s.histogram_max, checksum_sha256=s.checksum_sha256, version=s.version)


def _nbytes(value: tpb.Tensor, max_elements: int | None) -> int:
    dtype = _codec.dtype_from_proto(value.dtype)
    n = 1
    for s in _codec.check_shape(value.shape, max_elements=max_elements):
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


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


def _once() -> Any:
    """A header check refusing a tensor name uploaded twice (CreateModel values)."""
    seen: set[str] = set()

    def check(header: tpb.TensorHeader) -> None:
        if header.name in seen:
            raise InvalidArgumentError(f"value for {header.name[:200]!r} uploaded twice",
                                       reason="DUPLICATE_TENSOR",
                                       metadata={"tensor": header.name[:200]})
        seen.add(header.name)

    return check


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _chunk_size(asked: int) -> int:
    return min(max(asked or _codec.DEFAULT_CHUNK_BYTES, MIN_CHUNK), MAX_CHUNK)
