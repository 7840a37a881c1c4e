"""serde: proto <-> core. Resource names, enum maps, the info messages built from core objects,
and the core write descriptions built from requests. Handlers call these; nothing here touches
a model's state."""

from __future__ import annotations

import functools
from typing import Any

import grpc
from google.protobuf import json_format

from paramhub import _codec, _spec
from paramhub.common.errors import InvalidArgumentError
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.core import probe, store, training, watch
from paramhub_server.core.registry import ProgramRequest
from paramhub_server.core.model import (BUFFER, PARAMETER, InitWrite, ServedModel, SliceWrite,
                                        StateManifest, WriteContext)

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
#: Metadata key carrying the client's writer id (shown in watch events).
WRITER_METADATA = "x-paramhub-writer"
_EVENT_KINDS = {watch.STARTED: pb.WATCH_EVENT_KIND_STARTED, watch.WRITE: pb.WATCH_EVENT_KIND_WRITE,
                watch.RESYNC: pb.WATCH_EVENT_KIND_RESYNC}



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


def checkpoint_info(c: store.Checkpoint) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(name=c.name, model_version=c.model_version,
                             created_unix_nanos=c.created_unix_nanos, num_bytes=c.num_bytes)


def versions(updated: Any) -> list[pb.TensorVersion]:
    return [pb.TensorVersion(name=n, version=v) for n, v in updated]


def options_to_proto(target: Any, options: dict[str, Any]) -> None:
    for k, v in options.items():
        target[k].CopyFrom(_codec.value_to_proto(v))


def optimizer_info(opt: training.ServedOptimizer) -> pb.OptimizerInfo:
    """OptimizerInfo of a served optimizer (groups with resolved options)."""
    info = pb.OptimizerInfo(type=opt.type, steps=opt.steps)
    options_to_proto(info.defaults, opt.defaults)
    for names, options in opt.resolved_groups():
        group = info.param_groups.add(parameters=names)
        options_to_proto(group.options, options)
    return info


def training_config(cfg: training.TrainingConfig) -> pb.TrainingConfig:
    """TrainingConfig proto of the core's config."""
    return pb.TrainingConfig(mode=_MODES_PB[cfg.mode], sync_workers=cfg.sync_workers,
                             max_staleness=cfg.max_staleness,
                             stale_policy=_POLICIES_PB[cfg.stale_policy])


def stats_to_proto(s: probe.Stats) -> pb.TensorStats:
    """TensorStats of core probe statistics."""
    return pb.TensorStats(
        name=s.name, dtype=_codec.dtype_to_proto(s.dtype) if s.dtype is not None else 0,
        shape=list(s.shape), numel=s.numel, nan_count=s.nan_count, inf_count=s.inf_count,
        min=s.min, max=s.max, mean=s.mean, std=s.std, norm=s.norm,
        histogram_counts=s.histogram_counts, histogram_min=s.histogram_min,
        histogram_max=s.histogram_max, checksum_sha256=s.checksum_sha256, version=s.version)


#: id(StateManifest.headers) -> (those headers, a PullStateResponse holding them): the core keeps
#: one headers object per selection, so each pull copies a template (one C call) and fills in
#: the versions (~6x cheaper than building 1,000 new headers).
_MANIFESTS: dict[int, tuple[Any, pb.PullStateResponse]] = {}


def state_manifest(state: StateManifest) -> pb.PullStateResponse:
    """The PullState manifest of a core state snapshot."""
    cached = _MANIFESTS.get(id(state.headers))
    if cached is None or cached[0] is not state.headers:
        if len(_MANIFESTS) > 256:
            _MANIFESTS.clear()
        template = pb.PullStateResponse(headers=[
            tpb.TensorHeader(name=h.name, dtype=h.dtype, shape=h.shape)  # type: ignore[arg-type]
            for h in state.headers])
        cached = _MANIFESTS[id(state.headers)] = (state.headers, template)
    manifest = pb.PullStateResponse()
    manifest.CopyFrom(cached[1])
    for h, v in zip(manifest.headers, state.versions):
        h.version = v
    manifest.model_version = state.model_version
    return manifest


class WireSpec:
    """A ModelSpec message as the core's registry takes it (core.registry.SpecRequest): limits
    checked on the message as it came, then the graph and classes, then values decoded; the
    order the checks always ran in."""

    def __init__(self, msg: pb.ModelSpec) -> None:
        self.msg = msg

    def check_limits(self, *, max_nodes: int, max_depth: int) -> None:
        """See core.registry.SpecRequest."""
        _spec.check_spec_limits(self.msg, max_nodes=max_nodes, max_depth=max_depth)

    def decode(self) -> _spec.ModelSpec:
        """See core.registry.SpecRequest."""
        _spec.validate_spec(self.msg)  # reads the message like the dataclass
        return _spec.spec_from_proto(self.msg)


def program_request(header: pb.CreateModelHeader) -> ProgramRequest:
    """The exported-program part of a CreateModel header."""
    return ProgramRequest(
        exported_program=header.exported_program,
        module_tree=[json_format.MessageToDict(m) for m in header.module_tree],
        program_ties=[(t.parameter, t.source) for t in header.program_ties],
        program_constants=list(header.program_constants), device=header.device)


def module_infos(tree: list[dict[str, Any]]) -> list[pb.ModuleInfo]:
    """ModuleInfo messages of a program's stored tree (their JSON form)."""
    return [json_format.ParseDict(m, pb.ModuleInfo()) for m in tree]


#: id(spec) -> (spec, its message): DescribeModel builds a model's spec message once.
_SPEC_MESSAGES: dict[int, tuple[Any, pb.ModelSpec]] = {}


def spec_message(spec: _spec.ModelSpec) -> pb.ModelSpec:
    """The ModelSpec message of a served model's spec (cached while the spec object lives)."""
    cached = _SPEC_MESSAGES.get(id(spec))
    if cached is None or cached[0] is not spec:
        if len(_SPEC_MESSAGES) > 256:
            _SPEC_MESSAGES.clear()
        cached = _SPEC_MESSAGES[id(spec)] = (spec, _spec.spec_to_proto(spec))
    return cached[1]
