"""Routed writes: a big write (or state push) of a sharded model goes from the SDK straight to
its owners.

    StageShard (every rank)   the client streams the rank's part (its indices along the sharded
                              dim, any Shard(d), as a contiguous tensor) of a whole-tensor write under
                              a write id; the rank checks the header against what it holds and
                              the staging limit *before* allocating, then keeps the part
    CommitStagedWrite (rank 0) the command "write_staged": every rank takes its staged part and
                              the usual two-phase commit (commit.py) applies every part or none,
                              with one version; the front door carries no bulk bytes
    CommitStagedState (rank 0) the command "write_staged_state": a routed push_state -- parts
                              of many tensors staged under one write id (a replicated tensor
                              whole on every rank) committed as one two-phase write, one
                              model version; or, with `abort`, dropped on every rank

Staged parts are bounded: at most the rank's --max-model-bytes (STAGE_MAX_BYTES without one)
per rank at once, over every write (RESOURCE_EXHAUSTED, STAGING_FULL), checked before the
part's memory is allocated; a part not committed within STAGE_TTL_S is dropped.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch

from paramhub.common.errors import (ConflictError, FailedPreconditionError,
                                    InvalidArgumentError, NotFoundError, ResourceExhaustedError)
from paramhub.common import pb
from paramhub.v1 import cluster_pb2 as cpb
from paramhub_server.api import serde
from paramhub_server.cluster.commands import command
from paramhub_server.errors import rpc

if TYPE_CHECKING:
    from paramhub_server.cluster.engine import Cluster
    from paramhub_server.core.types import WriteContext

#: Bytes one rank keeps staged at once, over every write, when it has no --max-model-bytes.
STAGE_MAX_BYTES = 2 << 30
#: Seconds a staged part waits for its commit before it is dropped.
STAGE_TTL_S = 60.0

_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


class Staging:
    """One rank's staged parts: (write id, model, storage group) -> (deadline, bytes, part)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._parts: dict[tuple[str, str, int], tuple[float, int, torch.Tensor | None]] = {}

    def reserve(self, key: tuple[str, str, int], nbytes: int) -> None:
        """Counts `nbytes` against the limit (after dropping expired parts) before anything is
        allocated; a part staged again under the same key replaces the old one."""
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (deadline, _, _) in self._parts.items() if deadline < now]:
                del self._parts[k]
            self._parts.pop(key, None)
            held = sum(n for _, n, _ in self._parts.values())
            if held + nbytes > self.limit:
                raise ResourceExhaustedError(
                    f"staging {nbytes} more bytes would exceed the rank's {self.limit} "
                    f"({held} staged)", reason="STAGING_FULL",
                    metadata={"limit": "stage_bytes", "asked": str(nbytes),
                              "limit_bytes": str(self.limit)})
            self._parts[key] = (now + STAGE_TTL_S, nbytes, None)

    def put(self, key: tuple[str, str, int], part: torch.Tensor) -> None:
        with self._lock:
            if key in self._parts:  # not replaced or expired meanwhile
                deadline, n, _ = self._parts[key]
                self._parts[key] = (deadline, n, part)

    def drop(self, key: tuple[str, str, int]) -> None:
        with self._lock:
            self._parts.pop(key, None)

    def take(self, key: tuple[str, str, int]) -> torch.Tensor | None:
        with self._lock:
            got = self._parts.pop(key, None)
        if got is None or got[0] < time.monotonic():
            return None
        return got[2]


_STAGING: weakref.WeakKeyDictionary[Any, Staging] = weakref.WeakKeyDictionary()
_STAGING_LOCK = threading.Lock()


def staging_of(cluster: Cluster) -> Staging:
    with _STAGING_LOCK:
        s = _STAGING.get(cluster)
        if s is None:
            s = _STAGING[cluster] = Staging(cluster.max_model_bytes or STAGE_MAX_BYTES)
        return s


def _check_write_id(write_id: str) -> None:
    if not 8 <= len(write_id) <= 64 or not write_id.isascii() or not write_id.isprintable():
        raise InvalidArgumentError("a write id has 8 to 64 printable ASCII characters",
                                   reason="BAD_WRITE_ID")


def _rows(cluster: Cluster, e: Any, replicated: bool = False
          ) -> tuple[int, int, tuple[int, ...]]:
    """(start, stop) along the sharded dim of this rank's part of `e`, and the part's shape
    (any Shard(d); for a replicated tensor the whole dim 0 when `replicated`, else
    NOT_ROUTABLE)."""
    from torch.distributed.tensor import Shard

    from paramhub_server.cluster.sharding import local_bounds, local_shape

    if not isinstance(e.placement, Shard) and not replicated:
        raise FailedPreconditionError(f"{e.names[0][:200]!r} is not sharded; write it "
                                      "through the front door", reason="NOT_ROUTABLE",
                                      metadata={"tensor": e.names[0][:200]})
    start, stop = local_bounds(e.shape, e.placement, cluster.world, cluster.rank)
    return start, stop, local_shape(e.shape, e.placement, cluster.world, cluster.rank)


@command("write_staged")
def write_staged(cluster: Cluster, model_id: str, name: str, kind: str, write_id: str,
                 expected_version: int | None) -> tuple[int, int]:
    """Every rank: takes its staged part of write `write_id` and commits the parts as one
    two-phase write of the whole tensor (all or nothing, one version)."""
    import torch.distributed as dist

    from paramhub_server.cluster import commit

    m = cluster._model(model_id)
    e = m.entry(name, kind)
    start, stop, shape = _rows(cluster, e)
    part = staging_of(cluster).take((write_id, model_id, e.group))
    if part is None and stop == start:
        part = torch.empty(shape, dtype=e.dtype)  # no rows here: nothing to stage
    ok = part is not None and tuple(part.shape) == shape
    have: list[Any] = [None] * cluster.world
    dist.all_gather_object(have, ok)
    if not all(have):  # the same answer on every rank
        missing = have.index(False)
        raise FailedPreconditionError(
            f"rank {missing} has no staged part of write {write_id!r} (never staged, expired "
            f"after {STAGE_TTL_S:.0f} s, or the model changed)", reason="NOT_STAGED",
            metadata={"rank": str(missing), "write_id": write_id})
    assert part is not None
    error = None
    if expected_version is not None and expected_version != e.version:
        error = ConflictError(f"{name[:200]!r} is at version {e.version}, not "
                              f"{expected_version}", reason="VERSION_MISMATCH",
                              metadata={"tensor": name[:200], "version": str(e.version)})
    # The whole part: one run of ids (logged as its bounds, not one id per element).
    commit.two_phase(cluster, m, {e.group: [(slice(0, part.numel()), part.reshape(-1))]},
                     error)
    from paramhub_server.cluster.sharding import Write

    for hook in cluster.on_commit:  # watch events, as for a write through the front door
        hook(m, [Write(name, kind, (), "assign", part)], "")
    return e.version, m.version


@command("write_staged_state")
def write_staged_state(cluster: Cluster, model_id: str, names: list[str], write_id: str,
                       expected_model_version: int | None, ctx: WriteContext, abort: bool
                       ) -> tuple[list[tuple[str, int]], int]:
    """Every rank: takes its staged parts of state push `write_id` (one per storage named)
    and commits them as one two-phase write (all or nothing, one model version); with
    `abort`, only drops them."""
    import torch.distributed as dist

    from paramhub_server.cluster.state import _commit_parts

    m = cluster._model(model_id)
    staging = staging_of(cluster)
    groups = list(dict.fromkeys(m.entry(n).group for n in names))
    parts: dict[int, torch.Tensor] = {}
    missing = None
    for g in groups:
        e = m.entries[g]
        start, stop, shape = _rows(cluster, e, replicated=True)
        part = staging.take((write_id, model_id, g))
        if part is None and stop == start and e.shape:
            part = torch.empty(shape, dtype=e.dtype)  # no rows here: nothing to stage
        if part is None or tuple(part.shape) != shape:
            missing = missing or e.names[0]
        else:
            parts[g] = part
    if abort:
        return [], m.version
    have: list[Any] = [None] * cluster.world
    dist.all_gather_object(have, missing)
    bad = next((r for r, name in enumerate(have) if name is not None), None)
    if bad is not None:  # the same answer on every rank
        raise FailedPreconditionError(
            f"rank {bad} has no staged part of {have[bad][:200]!r} in write {write_id!r} "
            f"(never staged, expired after {STAGE_TTL_S:.0f} s, or the model changed)",
            reason="NOT_STAGED", metadata={"rank": str(bad), "write_id": write_id})
    error = None
    if expected_model_version is not None and expected_model_version != m.version:
        error = ConflictError(f"model {model_id!r} is at version {m.version}, not "
                              f"{expected_model_version}", reason="VERSION_MISMATCH",
                              metadata={"model": model_id, "version": str(m.version)})
    return _commit_parts(cluster, m, parts, "push_state", ctx, error)


class RoutedWriteHandlers:
    """ClusterService's routed-write RPCs (a base of service.ClusterServicer)."""

    cluster: Cluster | None

    def _live(self) -> Cluster:
        if self.cluster is None:
            raise FailedPreconditionError("not a cluster", reason="NOT_A_CLUSTER")
        if self.cluster.broken is not None:
            raise self.cluster.broken
        return self.cluster

    @rpc
    def StageShard(self, request_iterator: Iterator[cpb.StageShardRequest],
                   context: grpc.ServicerContext) -> cpb.StageShardResponse:
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgumentError("StageShard needs a header message", reason="BAD_STREAM")
        cluster = self._live()
        model_id, kind, name = serde.tensor_name_of(first.name)
        _check_write_id(first.write_id)
        m = cluster.get(model_id)
        if m is None:
            raise NotFoundError(f"no sharded model {model_id!r}", reason="MODEL_NOT_FOUND",
                                metadata={"model": model_id})
        e = m.entry(name, kind)
        start, stop, shape = _rows(cluster, e, replicated=True)
        if (first.row_start, first.row_stop) != (start, stop):
            raise FailedPreconditionError(
                f"rank {cluster.rank} holds [{start}, {stop}) of {name[:200]!r} along its "
                f"sharded dim, not [{first.row_start}, {first.row_stop})", reason="NOT_OWNER",
                metadata={"rank": str(cluster.rank)})
        if tuple(first.shape) != shape:
            raise InvalidArgumentError(f"the part has shape {list(first.shape)[:8]}, the rank "
                                       f"holds {list(shape)}", reason="BAD_SHAPE",
                                       metadata={"tensor": name[:200]})
        dtype = _DTYPES.get(first.dtype)
        if dtype is None:
            raise InvalidArgumentError(f"unknown dtype {first.dtype[:50]!r}",
                                       reason="BAD_DTYPE")
        count = 1
        for s in shape:
            count *= s
        nbytes = count * dtype.itemsize
        key = (first.write_id, model_id, e.group)
        staging = staging_of(cluster)
        # The limit first; memory only once it is granted (the sent bytes, and the tensor's
        # dtype when they differ).
        extra = count * e.dtype.itemsize if dtype != e.dtype else 0
        staging.reserve(key, nbytes + extra)
        try:
            buf = np.empty(nbytes, dtype=np.uint8)
            pos = 0
            for msg in itertools.chain([first], request_iterator):
                n = len(msg.data)
                if pos + n > nbytes:
                    raise InvalidArgumentError(f"more than the part's {nbytes} bytes",
                                               reason="BAD_SIZE")
                buf[pos:pos + n] = np.frombuffer(msg.data, dtype=np.uint8)
                pos += n
            if pos != nbytes:
                raise InvalidArgumentError(f"{pos} bytes sent; the part has {nbytes}",
                                           reason="BAD_SIZE")
            part = torch.from_numpy(buf).view(dtype).view(shape)
            staging.put(key, part.to(e.dtype) if dtype != e.dtype else part)
        except BaseException:
            staging.drop(key)
            raise
        return cpb.StageShardResponse(staged_bytes=nbytes)

    @rpc
    def CommitStagedWrite(self, request: cpb.CommitStagedWriteRequest,
                          context: grpc.ServicerContext) -> cpb.CommitStagedWriteResponse:
        cluster = self._live()
        if cluster.rank != 0:
            raise FailedPreconditionError("ask rank 0, the cluster's front door",
                                          reason="NOT_FRONT_DOOR",
                                          metadata={"front_door": cluster.addresses[0]})
        model_id, kind, name = serde.tensor_name_of(request.name)
        _check_write_id(request.write_id)
        cluster._model(model_id).entry(name, kind)  # NOT_FOUND before any rank works
        version, model_version = cluster.run(
            "write_staged", model_id=model_id, name=name, kind=kind, write_id=request.write_id,
            expected_version=(request.expected_version
                              if request.HasField("expected_version") else None))
        return cpb.CommitStagedWriteResponse(version=version, model_version=model_version)

    @rpc
    def CommitStagedState(self, request: cpb.CommitStagedStateRequest,
                          context: grpc.ServicerContext) -> cpb.CommitStagedStateResponse:
        cluster = self._live()
        if cluster.rank != 0:
            raise FailedPreconditionError("ask rank 0, the cluster's front door",
                                          reason="NOT_FRONT_DOOR",
                                          metadata={"front_door": cluster.addresses[0]})
        model_id = serde.model_id_of(request.model)
        _check_write_id(request.write_id)
        m = cluster._model(model_id)
        names = list(request.names)
        for n in names:  # NOT_FOUND before any rank works
            m.entry(n)
        if not names:
            return cpb.CommitStagedStateResponse(model_version=m.version)
        updated, version = cluster.run(
            "write_staged_state", model_id=model_id, names=names, write_id=request.write_id,
            expected_model_version=(request.expected_model_version
                                    if request.HasField("expected_model_version") else None),
            ctx=serde.write_context("", context), abort=request.abort)
        return cpb.CommitStagedStateResponse(
            updated=[pb.TensorVersion(name=n, version=v) for n, v in updated],
            model_version=version)
