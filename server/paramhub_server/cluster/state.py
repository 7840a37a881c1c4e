"""State and operations on sharded models: ApplyBatch, PullState / PushState, WatchModel,
checkpoints (create, list, restore, delete, export) and compaction -- the cluster commands (every rank runs each, in rank 0's order)
and the ParameterService handlers that call them (StateHandlers, a base of
ClusterParameterService).

Every write here is the engine's two-phase write: each rank prepares its part beside the live
tensors and votes (all_gather); only if every rank voted yes does every rank apply its part,
make it durable and confirm (a second all_gather) before rank 0 answers. So a batch, a state
push or a checkpoint restore is all or nothing across ranks with one new model version.

- ApplyBatch: the batch's slice writes and inits (values drawn on rank 0, as for ApplyInit)
  become one engine write (`Cluster._do_write`), so a later write of a storage sees the earlier.
- PullState: one command reads every selected storage (DTensor's all-gather of the parts) at one
  version; rank 0 packs them as a plain server does and the transport sends them.
- PushState: rank 0 receives and checks the whole state (names, shapes, dtypes: an error changes
  nothing anywhere), then one command scatters each storage's parts (`distribute_tensor`, so
  any placement), and the parts are committed with commit.py's two-phase commit (each rank
  logs its part as a prepare, then the commit).
- WatchModel: rank 0 runs every command, so it publishes the events: the engine calls
  `Cluster.on_commit` after each write, and the commands here publish theirs. A watch
  subscribes through the command loop, so no write falls between its STARTED version and its
  first event.
- Checkpoints: each rank saves its parts under DATA_DIR/rank-{r}/sharded/{model}/checkpoints/
  {name}/ (written to a temporary directory, fsynced, renamed). A checkpoint exists when every
  rank has it: one that some rank lacks (a crash during its create or delete) is neither listed
  nor restored, and a new create of that name replaces it.
- ExportCheckpoint: one command gathers every storage to rank 0 (DTensor's gather of each
  rank's current or saved part), which streams a plain safetensors state_dict.
- CompactModel: every rank folds its log into a new snapshot of its parts.

Why ~790 lines: these six RPCs are the plain server's state surface for sharded models, and they
share the write context, the event publishing and the part-commit helper; checkpoints (about a
third) are the piece to move into a module of their own next.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch
import torch.distributed as dist

from paramhub import _codec
from paramhub.common import pb
from paramhub.common import state as packing
from paramhub.common.dtypes import numel
from paramhub.common.errors import (AlreadyExistsError, ConflictError,
                                    FailedPreconditionError, InvalidArgumentError,
                                    NotFoundError, ParamhubError, ResourceExhaustedError)
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.api import framing
from paramhub_server.api.serde import init_write, model_id_of, slice_write, write_context
from paramhub_server.api.service import ParameterService
from paramhub_server.cluster.commands import command
from paramhub_server.core import indexing, inits, rng, watch
from paramhub_server.core.store import check_checkpoint_name
from paramhub_server.core.types import PARAMETER, WriteContext
from paramhub_server.core.writes import check_op, region_text
from paramhub_server.errors import rpc
from paramhub_server.transport import Admit

if TYPE_CHECKING:
    from paramhub_server.cluster.engine import Cluster
    from paramhub_server.cluster.sharding import Entry, ShardedModel, Write

#: How often a watch stream with no events checks that its model still exists (seconds).
_WATCH_POLL = 5.0
CHECKPOINTS = "checkpoints"
_INFO = "info.json"


# ------------------------------------------------------------------------------------- watch


def hub_of(m: ShardedModel) -> watch.WatchHub:
    """The watchers of a sharded model (rank 0; created with the first watch)."""
    hub = m.__dict__.get("_watchers")
    if hub is None:
        hub = m.__dict__["_watchers"] = watch.WatchHub()
    return hub


def publish(m: ShardedModel, op: str, changed: Sequence[tuple[int, str]],
            ctx: WriteContext | None = None) -> None:
    """A committed write's event: `changed` is (group, region text) in first-touch order."""
    hub = m.__dict__.get("_watchers")
    if not hub:
        return
    regions: dict[int, list[str]] = {}
    for g, text in changed:
        regions.setdefault(g, []).append(text)
    ctx = ctx or WriteContext()
    hub.publish(watch.Event(
        watch.WRITE, m.version, op=op, writer=ctx.writer, request_id=ctx.request_id,
        changes=tuple(watch.Change(m.entries[g].names[0], m.entries[g].version,
                                   texts[0] if len(texts) == 1 else "[...]")
                      for g, texts in regions.items())))


def _write_op(writes: Sequence[Write]) -> str:
    return f"set_slice.{writes[0].op}" if len(writes) == 1 else "batch"


def install(cluster: Cluster) -> None:
    """Hooks this module into a cluster's rank 0 (once): every write the engine commits
    publishes its watch event, with the writer of the command running now (`_event_ctx`)."""
    if cluster.__dict__.get("_state_hooked"):
        return
    cluster.__dict__["_state_hooked"] = True

    def hook(m: ShardedModel, writes: list[Write], op: str) -> None:
        publish(m, op or _write_op(writes),
                [(m.entry(w.name, w.kind).group, region_text(w.index)) for w in writes],
                cluster.__dict__.get("_event_ctx"))

    cluster.on_commit.append(hook)


@command("state.watch")
def _watch(cluster: Cluster, model_id: str, max_queue: int) -> watch.Watcher | None:
    m = cluster._model(model_id)
    if cluster.rank != 0:
        return None
    install(cluster)
    return hub_of(m).subscribe(m.version, max_queue)


# ------------------------------------------------------------------------------------- batch


@command("state.batch")
def _batch(cluster: Cluster, model_id: str, writes: list[Write],
           expected_model_versions: list[int], ctx: WriteContext
           ) -> tuple[list[tuple[str, int]], int]:
    m = cluster._model(model_id)
    seen = _recall(m, ctx, "batch")
    if seen is not None:  # a retry of an applied batch: its result again, nothing written
        return seen
    for v in expected_model_versions:  # the same check on every rank: no collective yet
        if v != m.version:
            raise ConflictError(f"model {model_id!r} is at version {m.version}, not {v}",
                                reason="VERSION_MISMATCH",
                                metadata={"model": model_id, "version": str(m.version)})
    cluster.__dict__["_event_ctx"] = ctx  # the engine's commit hook names the writer
    try:
        cluster._do_write(model_id, writes, event_op="batch")
    finally:
        cluster.__dict__["_event_ctx"] = None
    groups = list(dict.fromkeys(m.entry(w.name, w.kind).group for w in writes))
    result = [(m.entries[g].names[0], m.entries[g].version) for g in groups], m.version
    _remember(m, ctx, "batch", result)
    return result


#: Request ids remembered per sharded model (each rank keeps the same ones).
_MAX_RECENT = 1024


def _recall(m: ShardedModel, ctx: WriteContext, rpc_name: str) -> Any:
    """The result of a write already applied under this request id (a client's retry)."""
    recent = m.__dict__.get("_recent")
    if not ctx.request_id or recent is None or ctx.request_id not in recent:
        return None
    used, result = recent[ctx.request_id]
    if used != rpc_name:
        raise InvalidArgumentError(f"request id {ctx.request_id!r} was already used by a "
                                   f"{used} write", reason="REQUEST_ID_REUSED",
                                   metadata={"request_id": ctx.request_id})
    return result


def _remember(m: ShardedModel, ctx: WriteContext, rpc_name: str, result: Any) -> None:
    if not ctx.request_id:
        return
    recent = m.__dict__.setdefault("_recent", OrderedDict())
    recent[ctx.request_id] = (rpc_name, result)
    while len(recent) > _MAX_RECENT:
        recent.popitem(last=False)


# ------------------------------------------------------------------------------ pull / push


@command("state.pull")
def _pull(cluster: Cluster, model_id: str, groups: list[int]
          ) -> tuple[dict[int, torch.Tensor], dict[int, int], int]:
    """Every rank joins the gathers; rank 0 gets each storage whole, at one model version."""
    m = cluster._model(model_id)
    out = {g: cluster._do_read(model_id, g) for g in groups}
    return out, {g: m.entries[g].version for g in groups}, m.version


@command("state.push")
def _push(cluster: Cluster, model_id: str, groups: list[int],
          values: dict[int, torch.Tensor] | None, expected_model_version: int | None,
          ctx: WriteContext) -> tuple[list[tuple[str, int]], int]:
    """`values` (whole storages, already cast) exist on rank 0 only; each rank receives its
    parts by `distribute_tensor` (any placement), votes, and swaps them in."""
    from torch.distributed.tensor import distribute_tensor

    m = cluster._model(model_id)
    if expected_model_version is not None and expected_model_version != m.version:
        raise ConflictError(f"model {model_id!r} is at version {m.version}, not "
                            f"{expected_model_version}", reason="VERSION_MISMATCH",
                            metadata={"model": model_id, "version": str(m.version)})
    staged: dict[int, torch.Tensor] = {}
    for g in groups:
        e = m.entries[g]
        src = values[g] if values is not None else torch.empty(e.shape, dtype=e.dtype)
        staged[g] = distribute_tensor(src, cluster.mesh, [e.placement],
                                      src_data_rank=0).to_local()
    return _commit_parts(cluster, m, staged, "push_state", ctx)


def _commit_parts(cluster: Cluster, m: ShardedModel, staged: dict[int, torch.Tensor],
                  op: str, ctx: WriteContext, error: ParamhubError | None = None
                  ) -> tuple[list[tuple[str, int]], int]:
    """The commit of whole-part writes: the two-phase commit of commit.py (each rank logs its
    part as a prepare, votes, logs the commit, swaps the part in, confirms; a crash between
    two ranks' commits is resolved at start), then publish."""
    from paramhub_server.cluster import commit

    commit.two_phase(cluster, m, {g: [(slice(0, part.numel()), part.reshape(-1))]
                                  for g, part in staged.items()}, error)
    if cluster.rank == 0:
        publish(m, op, [(g, "[...]") for g in staged], ctx)
    return [(m.entries[g].names[0], m.entries[g].version) for g in staged], m.version


# ------------------------------------------------------------------------------- checkpoints


def _ckpt_root(cluster: Cluster, m: ShardedModel) -> Path:
    if cluster.root is None:
        raise FailedPreconditionError("this cluster keeps models in memory only (no "
                                      "--data-dir): it has no checkpoints or log",
                                      reason="NO_DATA_DIR")
    return cluster.root / m.id / CHECKPOINTS


def _everyone(cluster: Cluster, mine: Any) -> list[Any]:
    every: list[Any] = [None] * cluster.world
    dist.all_gather_object(every, mine)
    return every


def _not_found(m: ShardedModel, name: str) -> NotFoundError:
    return NotFoundError(f"checkpoint {name!r} of {m.id!r} does not exist",
                         reason="CHECKPOINT_NOT_FOUND",
                         metadata={"model": m.id, "checkpoint": name})


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@command("state.checkpoint_create")
def _checkpoint_create(cluster: Cluster, model_id: str, name: str) -> dict[str, Any]:
    from safetensors.torch import save_file

    m = cluster._model(model_id)
    root = _ckpt_root(cluster, m)
    d = root / name
    held = _everyone(cluster, (d / _INFO).exists())
    if all(held):
        raise AlreadyExistsError(f"checkpoint {name!r} of {m.id!r} exists",
                                 reason="CHECKPOINT_EXISTS",
                                 metadata={"model": m.id, "checkpoint": name})
    # Parts of a checkpoint some rank lacks (a crash during its create or delete) are junk.
    shutil.rmtree(d, ignore_errors=True)
    tmp = root / f".{name}.tmp"
    with cluster._lock:  # no commit between the parts (the loop is the only writer anyway)
        parts = {e.group: e.local.contiguous().clone() for e in m.entries}
        versions = [e.version for e in m.entries]
    created_ns = _everyone(cluster, time.time_ns())[0]
    info = {"model_version": m.version, "versions": versions, "created_ns": created_ns,
            "num_bytes": 0}
    failed = ""
    try:  # a disk error on one rank is voted on, not left for the others to wait on
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for g, part in parts.items():
            p = tmp / f"{g}.safetensors"
            save_file({"t": part}, str(p))
            _fsync(p)
            info["num_bytes"] += p.stat().st_size
        (tmp / _INFO).write_text(json.dumps(info))
        _fsync(tmp / _INFO)
        _fsync(tmp)
    except OSError as e:
        failed = f"rank {cluster.rank}: {e.strerror or e}"
    votes = _everyone(cluster, failed)
    if any(votes):
        shutil.rmtree(tmp, ignore_errors=True)
        raise ResourceExhaustedError(f"checkpoint {name!r} could not be written "
                                     f"({next(v for v in votes if v)})",
                                     reason="CHECKPOINT_WRITE_FAILED",
                                     metadata={"checkpoint": name})
    os.replace(tmp, d)
    _fsync(root)
    sizes = _everyone(cluster, info["num_bytes"])  # also the confirm: every rank has it
    return {**info, "name": name, "num_bytes": sum(sizes)}


def _infos(root: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if root.exists():
        for p in root.iterdir():
            if not p.name.startswith(".") and (p / _INFO).exists():
                try:
                    out[p.name] = json.loads((p / _INFO).read_text())
                except (OSError, ValueError):
                    continue
    return out


@command("state.checkpoint_list")
def _checkpoint_list(cluster: Cluster, model_id: str) -> list[dict[str, Any]]:
    m = cluster._model(model_id)
    every = _everyone(cluster, _infos(_ckpt_root(cluster, m)))
    names = set(every[0]).intersection(*every[1:])
    out = [{**every[0][n], "name": n, "num_bytes": sum(r[n]["num_bytes"] for r in every)}
           for n in names]
    return sorted(out, key=lambda i: (i["created_ns"], i["name"]))


@command("state.checkpoint_delete")
def _checkpoint_delete(cluster: Cluster, model_id: str, name: str) -> None:
    m = cluster._model(model_id)
    d = _ckpt_root(cluster, m) / name
    held = _everyone(cluster, (d / _INFO).exists())
    if not all(held):
        if any(held):  # a leftover part (never listed): removed, and the answer is the same
            shutil.rmtree(d, ignore_errors=True)
        raise _not_found(m, name)
    # The info file is the commit point: once one rank has none, the checkpoint is gone.
    (d / _INFO).unlink()
    _fsync(d)
    shutil.rmtree(d, ignore_errors=True)
    cluster._confirm()


@command("state.checkpoint_restore")
def _checkpoint_restore(cluster: Cluster, model_id: str, name: str,
                        expected_model_version: int | None, ctx: WriteContext
                        ) -> tuple[list[tuple[str, int]], int]:
    from safetensors.torch import load_file

    m = cluster._model(model_id)
    d = _ckpt_root(cluster, m) / name
    if not all(_everyone(cluster, (d / _INFO).exists())):
        raise _not_found(m, name)
    if expected_model_version is not None and expected_model_version != m.version:
        raise ConflictError(f"model {model_id!r} is at version {m.version}, not "
                            f"{expected_model_version}", reason="VERSION_MISMATCH",
                            metadata={"model": model_id, "version": str(m.version)})
    staged: dict[int, torch.Tensor] = {}
    error: ParamhubError | None = None
    try:
        for e in m.entries:
            try:
                part = load_file(str(d / f"{e.group}.safetensors"))["t"]
            except (OSError, KeyError, ValueError, RuntimeError):
                part = None
            if part is None or part.shape != e.local.shape or part.dtype != e.local.dtype:
                raise InvalidArgumentError(f"checkpoint {name!r} does not match the model's "
                                           f"part on rank {cluster.rank}",
                                           reason="CHECKPOINT_MISMATCH",
                                           metadata={"checkpoint": name})
            staged[e.group] = part
    except ParamhubError as exc:
        error = exc
    return _commit_parts(cluster, m, staged, "restore_checkpoint", ctx, error)


@command("state.export")
def _export(cluster: Cluster, model_id: str, name: str
            ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Every storage whole on rank 0, from checkpoint `name` (each rank's saved parts) or
    from the current values: each rank's part joins DTensor's own gather (any placement)."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    from paramhub_server.cluster.sharding import contiguous_strides

    m = cluster._model(model_id)
    if name:
        d = _ckpt_root(cluster, m) / name
        if not all(_everyone(cluster, (d / _INFO).exists())):
            raise _not_found(m, name)
        info = json.loads((d / _INFO).read_text())
        parts = {e.group: load_file(str(d / f"{e.group}.safetensors"))["t"] for e in m.entries}
    else:
        with cluster._lock:
            parts = {e.group: e.local.clone() for e in m.entries}
            info = {"model_version": m.version, "created_ns": time.time_ns()}
    out = {}
    for e in m.entries:
        dt = DTensor.from_local(parts[e.group], cluster.mesh, [e.placement], run_check=False,
                                shape=torch.Size(e.shape), stride=contiguous_strides(e.shape))
        out[e.group] = dt.full_tensor()
    return out, {"model_version": info["model_version"], "created_ns": info["created_ns"],
                 "model_id": m.id}


@command("state.compact")
def _compact(cluster: Cluster, model_id: str) -> tuple[int, int]:
    from paramhub_server.cluster import storage

    m = cluster._model(model_id)
    if cluster.root is None:
        raise FailedPreconditionError("this cluster keeps models in memory only (no "
                                      "--data-dir): it has no checkpoints or log",
                                      reason="NO_DATA_DIR")
    log = cluster.root / m.id / storage.LOG_NAME
    folded = log.stat().st_size if log.exists() else 0
    storage.snapshot(cluster.root, m, [e.group for e in m.entries])
    return m.version, sum(_everyone(cluster, folded))


# ---------------------------------------------------------------------------------- handlers


def _select_names(m: ShardedModel, names: Sequence[str], prefix: str, glob: str,
                  parameters_only: bool) -> list[str]:
    """A PullState's selection, as a plain model makes it (core.model.select_names)."""
    if names:
        if len(set(names)) != len(names):
            raise InvalidArgumentError("a name is repeated", reason="DUPLICATE_TENSOR")
        for n in names:
            m.entry(n, PARAMETER if parameters_only else None)
        return list(names)
    return [n for n, e in m.by_name.items()
            if (not parameters_only or e.kind == PARAMETER)
            and n.startswith(prefix) and (not glob or fnmatch.fnmatchcase(n, glob))]


def _check_state(m: ShardedModel, headers: Sequence[Any]) -> list[Entry]:
    """A PushState's manifest against the model, before any byte is received."""
    seen: set[str] = set()
    out = []
    for h in headers:
        if h.name in seen:
            raise InvalidArgumentError(f"{h.name[:200]!r} is pushed twice",
                                       reason="DUPLICATE_TENSOR",
                                       metadata={"tensor": h.name[:200]})
        seen.add(h.name)
        dtype = _codec.dtype_from_proto(h.dtype)
        shape = _codec.check_shape(h.shape)
        e = m.entry(h.name)
        if tuple(shape) != e.shape:
            raise InvalidArgumentError(
                f"value for {h.name!r} has shape {list(shape)}, the model's is "
                f"{list(e.shape)}", reason="BAD_SHAPE", metadata={"tensor": h.name})
        if dtype.is_complex and not e.dtype.is_complex:
            raise InvalidArgumentError(f"cannot copy {dtype} values into {h.name!r} of dtype "
                                       f"{e.dtype}", reason="BAD_DTYPE",
                                       metadata={"tensor": h.name})
        out.append(e)
    return out


def _unwrapped(method: Any) -> Any:
    return method.__wrapped__


class StateHandlers:
    """ApplyBatch, PullState, PushState, WatchModel, checkpoints and CompactModel on sharded
    models (a base of ClusterParameterService; other models go to the plain handlers)."""

    cluster: Cluster | None

    def _sharded_model(self, model_id: str) -> ShardedModel | None:
        return self._sharded(model_id)  # type: ignore[attr-defined]

    def _ctx(self, request_id: str, context: grpc.ServicerContext) -> WriteContext:
        return write_context(request_id, context)

    # -- ApplyBatch ------------------------------------------------------------------------

    @rpc
    def ApplyBatch(self, request_iterator: Iterator[pb.ApplyBatchRequest],
                   context: grpc.ServicerContext) -> pb.ApplyBatchResponse:
        first = next(request_iterator, None)
        rest = itertools.chain([] if first is None else [first], request_iterator)
        if (first is None or first.WhichOneof("part") != "header"
                or self._sharded_model(model_id_of(first.header.model)) is None):
            return _unwrapped(ParameterService.ApplyBatch)(self, rest, context)
        assert self.cluster is not None
        header = first.header
        m = self._sharded_model(model_id_of(header.model))
        assert m is not None
        writes, expected = self._batch_writes(m, request_iterator)
        if header.HasField("expected_model_version"):
            expected.append(header.expected_model_version)
        updated, version = self.cluster.run("state.batch", model_id=m.id, writes=writes,
                                            expected_model_versions=expected,
                                            ctx=self._ctx(header.request_id, context))
        return pb.ApplyBatchResponse(updated=[pb.TensorVersion(name=n, version=v)
                                              for n, v in updated], model_version=version)

    def _batch_writes(self, m: ShardedModel, messages: Iterator[pb.ApplyBatchRequest]
                      ) -> tuple[list[Write], list[int]]:
        """The batch's writes as the engine's (init values drawn here, on rank 0, as for
        ApplyInit) and the inits' expected model versions. A value may not exceed its region
        (checked from its announced shape, before it is allocated); all of them together
        may hold the model's logical bytes plus one message."""
        from paramhub_server.cluster.sharding import Write, select

        max_elements = self.max_tensor_elements  # type: ignore[attr-defined]
        budget = m.logical_bytes() + self.transport.max_message_bytes  # type: ignore[attr-defined]
        held = 0
        writes: list[Write] = []
        expected: list[int] = []
        pending: tuple[Write, _codec.TensorAssembler] | None = None

        def finish() -> None:
            nonlocal pending
            if pending is not None:
                pending[0].value = pending[1].finish()
                writes.append(pending[0])
                pending = None

        for msg in messages:
            part = msg.WhichOneof("part")
            if part == "data":
                if pending is None:
                    raise InvalidArgumentError("value bytes without a preceding streamed write",
                                               reason="BAD_STREAM")
                pending[1].add(msg.data)
                continue
            finish()
            if part != "write":
                raise InvalidArgumentError("only the first ApplyBatch message may carry the "
                                           "header", reason="BAD_STREAM")
            which = msg.write.WhichOneof("write")
            if which == "set_slice":
                req = msg.write.set_slice
                model_id, sw = slice_write(req, None, max_elements)
                if model_id != m.id:
                    raise InvalidArgumentError("every write of a batch must target the "
                                               "batch's model", reason="BAD_BATCH")
                check_op(sw.op)
                e = m.entry(sw.name, sw.kind)
                region = indexing.index_result_shape(e.shape, sw.index)
                shape = _codec.check_shape(req.value.shape, max_elements=max_elements)
                if region is not None and numel(shape) > max(numel(region), 1):
                    raise InvalidArgumentError(
                        f"a value of shape {list(shape)} cannot be written to a region of "
                        f"shape {list(region)} of {sw.name!r}", reason="BAD_SHAPE",
                        metadata={"tensor": sw.name})
                dtype = _codec.dtype_from_proto(req.value.dtype)
                held += numel(shape) * dtype.itemsize
                if held > budget:
                    raise ResourceExhaustedError(
                        f"the batch's values exceed {budget} bytes (the model's size plus "
                        "max_message_bytes)", reason="BATCH_TOO_LARGE",
                        metadata={"limit": "batch_bytes", "limit_bytes": str(budget),
                                  "asked": str(held)})
                w = Write(sw.name, sw.kind, sw.index, sw.op, torch.empty(0),
                          sw.expected_version)
                if numel(shape) and not req.value.data:
                    pending = (w, _codec.TensorAssembler(
                        tpb.TensorHeader(dtype=req.value.dtype, shape=req.value.shape),
                        max_elements=max_elements))
                else:
                    w.value = _codec.tensor_from_proto(req.value, max_elements=max_elements)
                    writes.append(w)
            elif which == "apply_init":
                init = msg.write.apply_init
                if init.model and model_id_of(init.model) != m.id:
                    raise InvalidArgumentError("every write of a batch must target the "
                                               "batch's model", reason="BAD_BATCH")
                iw = init_write(init, max_elements)
                scheme = inits.get_scheme(iw.scheme)
                args = scheme.check_args(iw.args)
                chosen = select(m, iw.targets)
                with rng.seeded(iw.seed):
                    values = [scheme.run(torch.empty(e.shape, dtype=e.dtype, device="meta"),
                                         args) for e in chosen]
                writes.extend(Write(e.names[0], e.kind, (), "assign", v)
                              for e, v in zip(chosen, values))
                if iw.expected_model_version is not None:
                    expected.append(iw.expected_model_version)
            else:
                raise InvalidArgumentError("a batch write has no write set", reason="BAD_BATCH")
        finish()
        if not writes:
            raise InvalidArgumentError("a batch needs at least one write", reason="EMPTY_BATCH")
        return writes, expected

    # -- PullState / PushState ---------------------------------------------------------------

    @rpc
    def PullState(self, request: pb.PullStateRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        m = self._sharded_model(model_id_of(request.model))
        if m is None:
            yield from _unwrapped(ParameterService.PullState)(self, request, context)
            return
        assert self.cluster is not None
        names = _select_names(m, list(request.names), request.prefix, request.glob,
                              request.parameters_only)
        entries = [m.entry(n) for n in names]
        groups = list(dict.fromkeys(e.group for e in entries))
        full, versions, model_version = self.cluster.run("state.pull", model_id=m.id,
                                                         groups=groups)

        def snapshot(alloc: Any = None) -> tuple[Any, torch.Tensor]:
            headers = [tpb.TensorHeader(name=n, dtype=_codec.dtype_to_proto(e.dtype),
                                        shape=list(e.shape), version=versions[e.group])
                       for n, e in zip(names, entries)]
            layout = packing.state_layout(headers)
            buf = alloc(layout[2]) if alloc is not None else None
            buf = packing.pack_state([full[e.group] for e in entries], out=buf, layout=layout)
            return pb.PullStateResponse(headers=headers, model_version=model_version), buf

        yield from self.transport.link_for(request).send_state(  # type: ignore[attr-defined]
            snapshot, request)

    @rpc
    def PushState(self, request_iterator: Iterator[Any], context: grpc.ServicerContext
                  ) -> pb.PushStateResponse:
        first = next(request_iterator, None)
        rest = itertools.chain([] if first is None else [first], request_iterator)
        if (first is None or isinstance(first, memoryview) or not first.HasField("header")
                or self._sharded_model(model_id_of(first.header.model)) is None):
            return _unwrapped(ParameterService.PushState)(self, rest, context)
        assert self.cluster is not None
        header = first.header
        transport = self.transport  # type: ignore[attr-defined]
        try:
            m = self._sharded_model(model_id_of(header.model))
            assert m is not None
            entries = _check_state(m, header.tensors)
            _, _, total = _codec.state_layout(header.tensors)
            link = transport.link_for(header)
        except BaseException:
            transport.release(header)
            raise
        admit = Admit(announced=lambda dtype, shape: None, inline=lambda value: None,
                      owned=lambda view: view.clone(),
                      max_elements=self.max_tensor_elements)  # type: ignore[attr-defined]
        flat = link.receive_state(header, first, request_iterator, total, admit)
        values: dict[int, torch.Tensor] = {}
        for e, v in zip(entries, _codec.unpack_state(flat, header.tensors)):
            try:  # cast here, so that a bad value changes nothing anywhere
                values.pop(e.group, None)  # tied names pushed twice: the last one wins
                values[e.group] = v.to(dtype=e.dtype, copy=True).contiguous()
            except RuntimeError as exc:
                raise InvalidArgumentError(f"value for {e.names[0]!r}: "
                                           f"{str(exc).splitlines()[0]}", reason="BAD_DTYPE",
                                           metadata={"tensor": e.names[0]}) from None
        del flat
        expected = (header.expected_model_version if header.HasField("expected_model_version")
                    else None)
        if not values:
            return pb.PushStateResponse(model_version=m.version)
        updated, version = self.cluster._run_local_extra(
            "state.push", {"model_id": m.id, "groups": list(values),
                           "expected_model_version": expected,
                           "ctx": self._ctx("", context)}, {"values": values})
        return pb.PushStateResponse(updated=[pb.TensorVersion(name=n, version=v)
                                             for n, v in updated], model_version=version)

    # -- WatchModel ------------------------------------------------------------------------

    @rpc
    def WatchModel(self, request: pb.WatchModelRequest, context: grpc.ServicerContext
                   ) -> Iterator[bytes]:
        from paramhub_server.api.serde import event_bytes

        m = self._sharded_model(model_id_of(request.name))
        if m is None:
            yield from _unwrapped(ParameterService.WatchModel)(self, request, context)
            return
        assert self.cluster is not None
        if request.max_queue < 0:
            raise InvalidArgumentError("max_queue must be >= 0", reason="BAD_ARGUMENT")
        watcher = self.cluster.run("state.watch", model_id=m.id, max_queue=request.max_queue)
        context.add_callback(watcher.close)
        try:
            while True:
                ev = watcher.get(_WATCH_POLL)
                if ev is None:
                    # The model was deleted (or replaced by a new one of that name): done.
                    if not context.is_active() or self.cluster.get(m.id) is not m:
                        return
                    continue
                if ev.kind == watch.CLOSED:
                    return
                yield event_bytes(ev)
        finally:
            watcher.close()

    # -- checkpoints and compaction -----------------------------------------------------------

    @rpc
    def CreateCheckpoint(self, request: pb.CreateCheckpointRequest,
                         context: grpc.ServicerContext) -> pb.CreateCheckpointResponse:
        m = self._sharded_model(model_id_of(request.model))
        if m is None:
            return _unwrapped(ParameterService.CreateCheckpoint)(self, request, context)
        assert self.cluster is not None
        info = self.cluster.run("state.checkpoint_create", model_id=m.id,
                                name=check_checkpoint_name(request.checkpoint))
        return pb.CreateCheckpointResponse(checkpoint=_checkpoint_info(info))

    @rpc
    def ListCheckpoints(self, request: pb.ListCheckpointsRequest,
                        context: grpc.ServicerContext) -> pb.ListCheckpointsResponse:
        m = self._sharded_model(model_id_of(request.model))
        if m is None:
            return _unwrapped(ParameterService.ListCheckpoints)(self, request, context)
        assert self.cluster is not None
        infos = self.cluster.run("state.checkpoint_list", model_id=m.id)
        return pb.ListCheckpointsResponse(checkpoints=[_checkpoint_info(i) for i in infos])

    @rpc
    def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest,
                          context: grpc.ServicerContext) -> pb.RestoreCheckpointResponse:
        m = self._sharded_model(model_id_of(request.model))
        if m is None:
            return _unwrapped(ParameterService.RestoreCheckpoint)(self, request, context)
        assert self.cluster is not None
        updated, version = self.cluster.run(
            "state.checkpoint_restore", model_id=m.id,
            name=check_checkpoint_name(request.checkpoint),
            expected_model_version=(request.expected_model_version
                                    if request.HasField("expected_model_version") else None),
            ctx=self._ctx(request.request_id, context))
        return pb.RestoreCheckpointResponse(
            updated=[pb.TensorVersion(name=n, version=v) for n, v in updated],
            model_version=version)

    @rpc
    def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest,
                         context: grpc.ServicerContext) -> pb.DeleteCheckpointResponse:
        m = self._sharded_model(model_id_of(request.model))
        if m is None:
            return _unwrapped(ParameterService.DeleteCheckpoint)(self, request, context)
        assert self.cluster is not None
        self.cluster.run("state.checkpoint_delete", model_id=m.id,
                         name=check_checkpoint_name(request.checkpoint))
        return pb.DeleteCheckpointResponse()

    @rpc
    def ExportCheckpoint(self, request: pb.ExportCheckpointRequest,
                         context: grpc.ServicerContext) -> Iterator[pb.ExportCheckpointResponse]:
        from paramhub_server.core import safetensors_io as st
        from paramhub_server.core.store import _CHECKPOINT_KEY

        m = self._sharded_model(model_id_of(request.model))
        if m is None:
            yield from _unwrapped(ParameterService.ExportCheckpoint)(self, request, context)
            return
        assert self.cluster is not None
        if request.checkpoint:
            check_checkpoint_name(request.checkpoint)
        full, info = self.cluster.run("state.export", model_id=m.id, name=request.checkpoint)
        entries = [(n, full[e.group]) for n, e in m.by_name.items()]
        for data in st.iter_file_bytes(entries, {_CHECKPOINT_KEY: json.dumps(info)}):
            yield pb.ExportCheckpointResponse(data=data)

    @rpc
    def CompactModel(self, request: pb.CompactModelRequest, context: grpc.ServicerContext
                     ) -> pb.CompactModelResponse:
        m = self._sharded_model(model_id_of(request.model))
        if m is None:
            return _unwrapped(ParameterService.CompactModel)(self, request, context)
        assert self.cluster is not None
        version, folded = self.cluster.run("state.compact", model_id=m.id)
        return pb.CompactModelResponse(model_version=version, log_bytes=folded)


def _checkpoint_info(info: dict[str, Any]) -> pb.CheckpointInfo:
    return pb.CheckpointInfo(name=info["name"], model_version=info["model_version"],
                             created_unix_nanos=info["created_ns"], num_bytes=info["num_bytes"])

