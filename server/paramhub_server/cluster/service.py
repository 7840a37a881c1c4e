"""The gRPC face of a cluster: ClusterService, and ParameterService handlers that serve sharded
models (parse -> cluster engine -> build), falling through to the plain handlers otherwise."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
import torch

from paramhub import _code, _codec
from paramhub.common.errors import (AlreadyExistsError, FailedPreconditionError, InvalidArgumentError,
                             NotFoundError, ResourceExhaustedError)
from paramhub.v1 import cluster_pb2 as cpb
from paramhub.v1 import cluster_pb2_grpc as cpb_grpc
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb
from paramhub.common.dtypes import numel
from paramhub_server.api import framing, serde
from paramhub_server.api.tensors import INLINE_MAX_BYTES
from paramhub_server.core.types import BUFFER, PARAMETER
from paramhub_server.core import rng
from paramhub_server.core.registry import check_model_id
from paramhub_server.errors import rpc
from paramhub_server.transport import names_link
from paramhub_server.api.service import ParameterService
from paramhub_server.cluster.routed import RoutedWriteHandlers
from paramhub_server.cluster.state import StateHandlers
from paramhub_server.cluster.compute_service import ShardedComputeHandlers

if TYPE_CHECKING:  # imported when a cluster starts: torch.distributed.tensor costs ~1 s
    from paramhub_server.cluster.engine import Cluster
    from paramhub_server.cluster.sharding import ShardedModel

log = logging.getLogger(__name__)

#: Call metadata that asks CreateModel for a sharded model: "fsdp", or a tensor-parallel plan
#: as a JSON object {"module path": "colwise" | "rowwise"} (cluster/sharding.py parse_plan).
SHARD_METADATA = "x-paramhub-shard"
_KINDS = {PARAMETER: pb.TENSOR_KIND_PARAMETER, BUFFER: pb.TENSOR_KIND_BUFFER}
_CHUNK = 1 << 20
#: TensorPlacement.kind of each kind of tensor.
_KIND_NAMES = {PARAMETER: "parameters", BUFFER: "buffers"}


def _shard_asked(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == SHARD_METADATA and isinstance(value, str):
            return value
    return None


def _held(registry: Any, model_id: str) -> bool:
    """Whether this rank's registry (its unsharded models) holds `model_id`."""
    try:
        registry.get(model_id)
    except NotFoundError:
        return False
    return True


def _unwrapped(method: Any) -> Any:
    """The plain handler under the error-mapping decorator (called from a handler that is
    itself decorated, so an error is mapped once)."""
    return method.__wrapped__


def model_info(m: ShardedModel, device: str) -> pb.ModelInfo:
    """ModelInfo of a sharded model (bytes: the logical model, over every rank)."""
    count = sum(numel(e.shape) for e in m.entries)
    return pb.ModelInfo(name=m.id, device=device, version=m.version, num_parameters=count,
                        num_bytes=m.logical_bytes(),
                        root_class=type(m.skeleton).__name__, source="spec")


def tensor_infos(m: ShardedModel, device: str, names: list[str] | None = None
                 ) -> list[pb.TensorInfo]:
    out = []
    for name, e in m.by_name.items():
        if names is not None and name not in names:
            continue
        out.append(pb.TensorInfo(name=name, kind=_KINDS[e.kind],
                                 dtype=_codec.dtype_to_proto(e.dtype), shape=list(e.shape),
                                 device=device, requires_grad=e.kind == PARAMETER,
                                 storage_group=e.group, version=e.version, has_grad=False))
    return out


class ClusterParameterService(StateHandlers, ShardedComputeHandlers, ParameterService):
    """ParameterService for a rank of a cluster (or a plain server, where `cluster` is None
    and every call is the plain handler's). On rank 0, a call naming a sharded model is served
    by the cluster engine; RPCs not built for sharded models answer FAILED_PRECONDITION
    (reason SHARDED_UNSUPPORTED)."""

    def __init__(self, *args: Any, cluster: Cluster | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cluster = cluster

    def _sharded(self, model_id: str) -> ShardedModel | None:
        if self.cluster is None:
            return None
        if self.cluster.broken is not None and self.cluster.rank == 0 and \
                not _held(self.registry, model_id):
            raise self.cluster.broken  # every model not held here needs the other ranks
        return self.cluster.get(model_id)

    def _unsupported(self, model_id: str) -> None:
        if self._sharded(model_id) is not None:
            raise FailedPreconditionError(
                f"model {model_id!r} is sharded over the cluster; this call is not built for "
                "sharded models yet", reason="SHARDED_UNSUPPORTED", metadata={"model": model_id})

    # The plain handlers look models up through these two: a sharded id is refused there.
    def _model(self, name: str) -> Any:
        self._unsupported(serde.model_id_of(name))
        return super()._model(name)

    def _tensor(self, name: str) -> Any:
        self._unsupported(serde.tensor_name_of(name)[0])
        return super()._tensor(name)

    @property
    def _device(self) -> str:
        return self.cluster.device if self.cluster is not None else "cpu"

    @rpc
    def CreateModel(self, request_iterator: Iterator[pb.CreateModelRequest],
                    context: grpc.ServicerContext) -> pb.CreateModelResponse:
        shard = _shard_asked(context)
        first = next(request_iterator, None)
        stream = itertools.chain([] if first is None else [first], request_iterator)
        if shard is None:
            if (first is not None and first.WhichOneof("part") == "header"
                    and self._sharded(first.header.model_id) is not None):
                raise AlreadyExistsError(f"model {first.header.model_id!r} already exists",
                                         reason="MODEL_EXISTS",
                                         metadata={"model": first.header.model_id})
            return _unwrapped(ParameterService.CreateModel)(self, stream, context)
        from paramhub_server.cluster.sharding import parse_plan, plan_text

        plan = plan_text(parse_plan(shard))  # BAD_SHARD for a malformed plan
        if self.cluster is None or self.cluster.rank != 0:
            raise FailedPreconditionError(
                "sharded models need a cluster (torchrun ... -m paramhub_server serve), "
                "created through rank 0", reason="NOT_A_CLUSTER")
        header, chunks = framing.header_then_chunks(stream, "CreateModel")
        if header.exported_program or header.module_pickle:
            raise InvalidArgumentError("only models sent as a spec (torch.nn layers) can be "
                                       "sharded", reason="NOT_SHARDABLE")
        check_model_id(header.model_id)
        if _held(self.registry, header.model_id):
            raise AlreadyExistsError(f"model {header.model_id!r} already exists",
                                     reason="MODEL_EXISTS", metadata={"model": header.model_id})
        values = {a.name: a.finish() for a in _codec.assemble_tensors(
            chunks, check=framing.once(), max_elements=self.max_tensor_elements)}
        m = self.cluster.create(header.model_id, header.spec,
                                seed=header.seed if header.HasField("seed") else None,
                                values=values, plan=plan)
        log.info("created sharded model %s over %d ranks", m.id, self.cluster.world)
        return pb.CreateModelResponse(model=model_info(m, self._device))

    @rpc
    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext
                    ) -> pb.DeleteModelResponse:
        model_id = serde.model_id_of(request.name)
        if self._sharded(model_id) is None:
            return _unwrapped(ParameterService.DeleteModel)(self, request, context)
        assert self.cluster is not None
        self.cluster.delete(model_id)
        return pb.DeleteModelResponse()

    @rpc
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext
                   ) -> pb.ListModelsResponse:
        out = _unwrapped(ParameterService.ListModels)(self, request, context)
        if self.cluster is not None and self.cluster.rank == 0:
            out.models.extend(model_info(m, self._device) for m in self.cluster.list())
        return out

    @rpc
    def DescribeModel(self, request: pb.DescribeModelRequest, context: grpc.ServicerContext
                      ) -> pb.DescribeModelResponse:
        m = self._sharded(serde.model_id_of(request.name))
        if m is None:
            return _unwrapped(ParameterService.DescribeModel)(self, request, context)
        groups: dict[int, int] = {}
        assert m.skeleton is not None  # kept by every ShardedModel the engine serves
        modules = [_code.describe_module(path, mod, groups.setdefault(id(mod), len(groups)))
                   for path, mod in m.skeleton.named_modules(remove_duplicate=False)]
        return pb.DescribeModelResponse(model=model_info(m, self._device), spec=m.spec,
                                        modules=modules, tensors=tensor_infos(m, self._device))

    @rpc
    def ListParameters(self, request: pb.ListParametersRequest, context: grpc.ServicerContext
                       ) -> pb.ListParametersResponse:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            return _unwrapped(ParameterService.ListParameters)(self, request, context)
        import fnmatch

        names = [n for n, e in m.by_name.items()
                 if (request.include_buffers or e.kind == PARAMETER)
                 and n.startswith(request.prefix)
                 and (not request.glob or fnmatch.fnmatchcase(n, request.glob))]
        return pb.ListParametersResponse(tensors=tensor_infos(m, self._device, names))

    def _sharded_read(self, name: str, index_msg: Any) -> tuple[str, torch.Tensor, int] | None:
        model_id, kind, tname = serde.tensor_name_of(name)
        if self._sharded(model_id) is None:
            return None
        assert self.cluster is not None
        index = _codec.index_from_proto(index_msg, max_elements=self.max_tensor_elements)
        t, version = self.cluster.read(model_id, tname, kind, index)
        return tname, t, version

    @rpc
    def GetTensor(self, request: pb.GetTensorRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        got = (self._sharded_grad_read if request.field == pb.TENSOR_FIELD_GRAD
               else self._sharded_read)(request.name, request.index)
        if got is None:
            yield from _unwrapped(ParameterService.GetTensor)(self, request, context)
            return
        # Sharded reads come inline (the tokens of shared memory / the data channel stay
        # unused, as for a small local read); the SDK routes big ones to the ranks instead.
        name, t, version = got
        yield from _codec.iter_chunk_frames(t, name=name, version=version,
                                            chunk_bytes=framing.chunk_size(request.chunk_bytes),
                                            wrap=True)

    @rpc
    def GetTensorInline(self, request: pb.GetTensorInlineRequest, context: grpc.ServicerContext
                        ) -> bytes:
        got = (self._sharded_grad_read if request.field == pb.TENSOR_FIELD_GRAD
               else self._sharded_read)(request.name, request.index)
        if got is None:
            return _unwrapped(ParameterService.GetTensorInline)(self, request, context)
        name, t, version = got
        limit = min(INLINE_MAX_BYTES, self.transport.max_message_bytes - 4096)
        nbytes = t.numel() * t.element_size()
        if nbytes > limit:
            raise ResourceExhaustedError(
                f"{name!r}[...] has {nbytes} bytes, more than GetTensorInline's {limit}; use "
                "GetTensor", reason="MESSAGE_TOO_LARGE",
                metadata={"limit": "inline_bytes", "limit_bytes": str(limit),
                          "asked": str(nbytes)})
        header = tpb.TensorHeader(name=name, dtype=_codec.dtype_to_proto(t.dtype),
                                  shape=list(t.shape), version=version)
        return _codec.encode_chunk(header, _codec.tensor_bytes(t))

    @rpc
    def SetSlice(self, request: pb.SetSliceRequest, context: grpc.ServicerContext
                 ) -> pb.SetSliceResponse:
        model_id = serde.tensor_name_of(request.name)[0]
        if self._sharded(model_id) is None:
            return _unwrapped(ParameterService.SetSlice)(self, request, context)
        assert self.cluster is not None
        if names_link(request):
            raise FailedPreconditionError("a sharded model's values travel over gRPC",
                                          reason="SHARDED_UNSUPPORTED")
        value = _codec.tensor_from_proto(request.value, max_elements=self.max_tensor_elements)
        _, w = serde.slice_write(request, value, self.max_tensor_elements)
        from paramhub_server.cluster.sharding import Write

        versions, model_version = self.cluster.write(model_id, [Write(
            w.name, w.kind, w.index, w.op, w.value, w.expected_version)])
        return pb.SetSliceResponse(version=versions[0], model_version=model_version)

    @rpc
    def StreamSetSlice(self, request_iterator: Iterator[Any],
                       context: grpc.ServicerContext) -> pb.StreamSetSliceResponse:
        first = next(request_iterator, None)
        rest = itertools.chain([] if first is None else [first], request_iterator)
        if (first is None or isinstance(first, memoryview)
                or first.WhichOneof("part") != "request"
                or self._sharded(serde.tensor_name_of(first.request.name)[0]) is None):
            return _unwrapped(ParameterService.StreamSetSlice)(self, rest, context)
        assert self.cluster is not None
        req = first.request
        if req.value.data:
            raise InvalidArgumentError("the first StreamSetSlice message carries no value bytes",
                                       reason="BAD_STREAM")
        model_id, w = serde.slice_write(req, None, self.max_tensor_elements)
        value = framing.slice_value(req.value, request_iterator, self.max_tensor_elements)
        from paramhub_server.cluster.sharding import Write

        versions, model_version = self.cluster.write(model_id, [Write(
            w.name, w.kind, w.index, w.op, value, w.expected_version)])
        return pb.StreamSetSliceResponse(version=versions[0], model_version=model_version)

    @rpc
    def ApplyInit(self, request: pb.ApplyInitRequest, context: grpc.ServicerContext
                  ) -> pb.ApplyInitResponse:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            return _unwrapped(ParameterService.ApplyInit)(self, request, context)
        assert self.cluster is not None
        w = serde.init_write(request, self.max_tensor_elements)
        generator = (rng.GeneratorState(request.generator_state)
                     if request.HasField("generator_state") and w.seed is None else None)
        updated, model_version = self.cluster.apply_init(
            m.id, w.targets, w.scheme, w.args, seed=w.seed, generator=generator,
            expected_model_version=w.expected_model_version)
        return pb.ApplyInitResponse(updated=serde.versions(updated), model_version=model_version,
                                    generator_state=generator.state if generator else b"")

    @rpc
    def CheckShared(self, request: pb.CheckSharedRequest, context: grpc.ServicerContext
                    ) -> pb.CheckSharedResponse:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            return _unwrapped(ParameterService.CheckShared)(self, request, context)
        groups: dict[int, list[str]] = {}
        for n in request.names:
            groups.setdefault(m.entry(n).group, []).append(n)
        return pb.CheckSharedResponse(shared=len(groups) <= 1,
                                      groups=[pb.SharedGroup(names=g) for g in groups.values()])


class ClusterServicer(RoutedWriteHandlers, cpb_grpc.ClusterServiceServicer):
    """ClusterService on every rank (a plain server answers as a cluster of one)."""

    def __init__(self, cluster: Cluster | None, address: str, device: str,
                 registry: Any) -> None:
        self.cluster = cluster
        self.registry = registry
        self.address = address
        self.device = device

    @rpc
    def GetClusterInfo(self, request: cpb.GetClusterInfoRequest,
                       context: grpc.ServicerContext) -> cpb.GetClusterInfoResponse:
        if self.cluster is None:
            return cpb.GetClusterInfoResponse(world_size=1, ranks=[cpb.RankInfo(
                rank=0, address=self.address, device=self.device, held_bytes=0)])
        if self.cluster.rank != 0:
            raise FailedPreconditionError("ask rank 0, the cluster's front door",
                                          reason="NOT_FRONT_DOOR",
                                          metadata={"front_door": self.cluster.addresses[0]})
        ranks = self.cluster.info()
        return cpb.GetClusterInfoResponse(world_size=self.cluster.world, ranks=[
            cpb.RankInfo(rank=r["rank"], address=r["address"], device=r["device"],
                         held_bytes=r["held_bytes"]) for r in ranks])

    @rpc
    def ReadShard(self, request: cpb.ReadShardRequest, context: grpc.ServicerContext
                  ) -> Iterator[cpb.ReadShardResponse]:
        model_id, kind, name = serde.tensor_name_of(request.name)
        if self.cluster is None:
            raise FailedPreconditionError("not a cluster", reason="NOT_A_CLUSTER")
        if self.cluster.broken is not None:
            raise self.cluster.broken
        from paramhub_server.cluster.sharding import placement_text

        e, part, start, stop, version, model_version = self.cluster.local_part(model_id, name,
                                                                               kind)
        data = _codec.byte_view(part.contiguous()).numpy().tobytes() if part.numel() else b""
        first = cpb.ReadShardResponse(shape=list(e.shape),
                                      dtype=str(e.dtype).removeprefix("torch."),
                                      row_start=start, row_stop=stop, version=version,
                                      placement=placement_text(e.placement),
                                      model_version=model_version, data=data[:_CHUNK])
        yield first
        for off in range(_CHUNK, len(data), _CHUNK):
            yield cpb.ReadShardResponse(data=data[off:off + _CHUNK])

    @rpc
    def DescribePlacement(self, request: cpb.DescribePlacementRequest,
                          context: grpc.ServicerContext) -> cpb.DescribePlacementResponse:
        model_id = serde.model_id_of(request.name)
        m = self.cluster.get(model_id) if self.cluster is not None else None
        if m is None:  # a model of rank 0 only (NOT_FOUND when there is none)
            local = self.registry.get(model_id)
            return cpb.DescribePlacementResponse(shard="", tensors=[
                cpb.TensorPlacement(name=n, placement="local") for n in local.names()])
        assert self.cluster is not None
        from torch.distributed.tensor import Shard

        from paramhub_server.cluster.sharding import local_rows, placement_text

        out = cpb.DescribePlacementResponse(shard=m.plan)
        for name, e in m.by_name.items():
            bounds: list[int] = []
            if isinstance(e.placement, Shard):
                n = e.shape[e.placement.dim]
                bounds = [local_rows(n, self.cluster.world, r)[0]
                          for r in range(self.cluster.world)] + [n]
            out.tensors.append(cpb.TensorPlacement(name=name,
                                                   placement=placement_text(e.placement),
                                                   row_bounds=bounds, note=e.note,
                                                   kind=_KIND_NAMES[e.kind]))
        return out


def add_cluster_servicer(servicer: ClusterServicer, server: grpc.Server) -> None:
    """Registers ClusterService on `server`."""
    cpb_grpc.add_ClusterServiceServicer_to_server(servicer, server)
