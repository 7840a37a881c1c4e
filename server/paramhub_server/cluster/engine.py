"""Sharded models over a torch.distributed process group: the command loop and the commands
(no grpc; a model's spec is a ModelSpec message, as in core/registry.py).

Every rank runs one thread, the command loop, which alone uses the process group. Rank 0 (the
front door) receives every RPC; an RPC on a sharded model becomes one command that rank 0
broadcasts, and then every rank executes it in the same order (SPMD). So creates, reads,
writes and deletes are totally ordered cluster-wide by rank 0, and a reader never runs between
the prepare and the commit of a write.

A sharded tensor is a DTensor over a 1-D CPU DeviceMesh of all ranks: `Shard(d)` (torch's chunk
layout: ceil(n / world) indices of dim d per rank, the last ranks possibly fewer or none) when
the model's plan shards it on d and that dim has at least `world` indices, else `Replicate()`
(sharding.py: "fsdp" puts every tensor on dim 0; a tensor-parallel plan places the tensors of
the modules it names as torch's ColwiseParallel / RowwiseParallel do). Each rank allocates
only its local part.

A write (SetSlice) on a sharded tensor applies the index to the full logical tensor: every rank
computes which of the region's elements fall in its shard (sharding.region_ids: element ids
indexed as torch would index the tensor) and changes only those; a box of step-1 slices that
is one contiguous run of the rank's part (sharding.local_run: a whole tensor, whole rows) is
computed on views and staged as a slice run instead, with no id tensors. Two phases (commit.py): each
rank *prepares* the new values of its part without touching the live tensor, logs the prepare
and votes (all_gather); only when every rank voted yes does every rank log the commit, apply its
part, and confirm (a second all_gather) before rank 0 acknowledges. One version per tensor and
one per model, the same on every rank.

Why ~550 lines: the command loop and its commands are one protocol (every command runs on every
rank in rank 0's order); placement math is in sharding.py and each rank's durability in storage.py.
"""

from __future__ import annotations

import builtins

import logging
import queue
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from paramhub import _spec
from paramhub.common.errors import (AlreadyExistsError, ConflictError, InternalError,
                             InvalidArgumentError, ResourceExhaustedError,
                             NotFoundError, ParamhubError, UnavailableError)
from paramhub.common import pb
from paramhub_server.cluster import commands, commit, storage
from paramhub_server.cluster.sharding import (FSDP, Entry, ShardedModel, Write, entries_of,
                                              local_bounds, local_run, local_shape, numel,
                                              parse_plan, region_ids, select, skeleton_of, to_local)
from paramhub_server.core import indexing, inits, rng
from paramhub_server.core.writes import _combine

log = logging.getLogger(__name__)

#: Seconds between the no-op commands rank 0 sends while idle: they keep the other ranks'
#: blocking receives inside the process group's timeout and find a dead rank without a call.
HEARTBEAT_S = 2.0


def rank_down(rank: int | None, why: str) -> UnavailableError:
    """The error of a call that needs a rank which is gone (UNAVAILABLE, reason RANK_DOWN)."""
    who = f"rank {rank}" if rank is not None else "a rank"
    return UnavailableError(f"{who} of the cluster is down: {why}", reason="RANK_DOWN",
                            metadata={"rank": "" if rank is None else str(rank)})


class Cluster:
    """This process's rank of the cluster: the process group, the command loop and the
    sharded models it holds.

    `run(op, **args)` (rank 0 only) executes a command on every rank and returns rank 0's
    result; other ranks only execute what rank 0 sends, from `serve_forever`'s thread.
    """

    def __init__(self, rank: int, world: int, addresses: Sequence[str], *, device: str,
                 data_dir: Path | None, mesh: DeviceMesh | None = None,
                 call_timeout_s: float = 60.0,
                 probe: Callable[[str], bool] | None = None,
                 max_model_bytes: int | None = None) -> None:
        self.rank, self.world = rank, world
        self.addresses = list(addresses)
        self.device = device
        self.mesh = mesh if mesh is not None else init_device_mesh("cpu", (world,))
        self.root = data_dir / "sharded" if data_dir is not None else None
        self.models: dict[str, ShardedModel] = {}
        self.call_timeout_s = call_timeout_s
        #: --max-model-bytes applies to each rank's part of a sharded model.
        self.max_model_bytes = max_model_bytes
        #: probe(address) -> whether that rank still answers (used to name a dead rank).
        self.probe = probe
        self._queue: queue.Queue[tuple[str, dict[str, Any], Future[Any]] | None] = queue.Queue()
        self._broken: UnavailableError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # models dict (the loop writes, handlers read)
        #: fn(model, writes, op) after each committed write, on the loop thread (watch events).
        self.on_commit: list[Callable[[ShardedModel, list[Write], str], None]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Recovers this rank's shards from disk, resolves writes left in doubt with the other
        ranks (every rank agrees afterwards, or the model is left out), starts the loop."""
        commands.load()
        in_doubt: dict[str, storage.Prepared] = {}
        if self.root is not None:
            self.models = storage.recover(self.root, self.world, self.mesh, in_doubt)
            log.info("rank %d recovered %d sharded models", self.rank, len(self.models))
        # A crash between two ranks' commits: the ranks settle it together (commit.py).
        commit.resolve(self, in_doubt)
        for hook in commands.RECOVER_HOOKS:
            hook(self)
        self._thread = threading.Thread(target=self._serve, name="paramhub-cluster",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Rank 0 tells every rank to stop; the others just end their loop."""
        if self.rank == 0 and self._thread is not None and self._broken is None:
            self._queue.put(None)
            self._thread.join(timeout=10)
        self._stop.set()

    @property
    def broken(self) -> UnavailableError | None:
        return self._broken

    # -- the command loop ----------------------------------------------------------------------

    def run(self, op: str, **args: Any) -> Any:
        """Executes one command on every rank (rank 0 only); raises its domain error, or
        UNAVAILABLE/RANK_DOWN when a rank is gone."""
        if self._broken is not None:
            raise self._broken
        fut: Future[Any] = Future()
        self._queue.put((op, args, fut))
        try:
            return fut.result(timeout=self.call_timeout_s)
        except TimeoutError:
            raise rank_down(self._dead_rank(), "the cluster did not answer in time") from None

    def _serve(self) -> None:
        try:
            if self.rank == 0:
                self._lead()
            else:
                self._follow()
        except Exception as e:  # noqa: BLE001 - the process group failed: a rank is gone
            self._fail(e)

    def _lead(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                item = ("ping", {}, Future())
            if item is None:
                dist.broadcast_object_list([("stop", {})], src=0)
                return
            op, args, fut = item
            try:
                dist.broadcast_object_list([(op, args)], src=0)
                result = self._execute(op, args)
            except ParamhubError as e:
                fut.set_exception(e)
                continue
            except BaseException as e:
                fut.set_exception(self._fail(e))
                raise
            fut.set_result(result)

    def _follow(self) -> None:
        while not self._stop.is_set():
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            op, args = box[0]
            if op == "stop":
                return
            try:
                self._execute(op, args)
            except ParamhubError:
                pass  # rank 0 answers the caller; every rank raised the same error

    def _fail(self, e: BaseException) -> UnavailableError:
        if self._broken is None:
            log.error("the cluster's process group failed: %s", str(e).splitlines()[0][:300])
            self._broken = rank_down(self._dead_rank(), "the process group failed")
        # Calls queued behind the failure answer at once.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[2].set_exception(self._broken)
        return self._broken

    def _dead_rank(self) -> int | None:
        if self.probe is None:
            return None
        for r, addr in enumerate(self.addresses):
            if r != self.rank and not self.probe(addr):
                return r
        return None

    def _execute(self, op: str, args: dict[str, Any]) -> Any:
        args = {k: v.value if isinstance(v, _Local) else v for k, v in args.items()}
        try:
            fn = commands.COMMANDS.get(op)
            if fn is not None:
                return fn(self, **args)
            return getattr(self, f"_do_{op}")(**args)
        except (ParamhubError, dist.DistError):
            raise
        except (RuntimeError, OSError, IndexError, TypeError, ValueError, KeyError) as e:
            if _is_comm_error(e):
                raise
            # A bug (the same on every rank, which all run the same code on the same input):
            # the caller gets INTERNAL; the loop goes on.
            log.exception("cluster command %s failed on rank %d", op, self.rank)
            raise InternalError(f"cluster command {op} failed", reason="INTERNAL") from None

    # -- commands (every rank runs each, in rank 0's order) ------------------------------------

    def _do_ping(self) -> None:
        return None

    def _do_info(self) -> list[dict[str, Any]]:
        with self._lock:
            held = sum(m.local_bytes() for m in self.models.values())
        mine = {"rank": self.rank, "address": self.addresses[self.rank],
                "device": self.device, "held_bytes": held}
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine)
        return every

    def _do_create(self, model_id: str, spec: bytes, seed: int | None,
                   values: dict[str, torch.Tensor] | None, plan: str = FSDP) -> ShardedModel:
        # `values` travels only to rank 0's own call (run() keeps it local, see create()).
        spec_pb = pb.ModelSpec.FromString(spec)
        vote: list[Any] = [None] * self.world
        error: ParamhubError | None = None
        skeleton = None
        entries: list[Entry] = []
        full = None
        try:
            if model_id in self.models:
                raise AlreadyExistsError(f"model {model_id!r} already exists",
                                         reason="MODEL_EXISTS", metadata={"model": model_id})
            skeleton = skeleton_of(spec_pb)
            entries = entries_of(skeleton, self.world, parse_plan(plan))
            self._check_size(entries)
            if self.rank == 0:  # every value checked before any rank enters the scatter
                full = self._full_values(spec_pb, entries, seed, values)
        except ParamhubError as e:
            error = e
        dist.all_gather_object(vote, error is None)
        if not all(vote):
            raise error or InvalidArgumentError("another rank refused the model",
                                                reason="NOT_SHARDABLE")
        for ent in entries:
            src = full[ent.group] if full is not None else torch.empty(ent.shape, dtype=ent.dtype)
            ent.dt = distribute_tensor(src, self.mesh, [ent.placement], src_data_rank=0)
        del full
        m = ShardedModel(model_id, spec_pb, entries, skeleton=skeleton, plan=plan)
        if self.root is not None:
            storage.snapshot(self.root, m, [e.group for e in entries])
        self._confirm()
        with self._lock:
            self.models[model_id] = m
        return m

    def _check_size(self, entries: list[Entry]) -> None:
        """Refuses a model whose part on this rank is over --max-model-bytes (the whole model
        may be larger than one rank's limit: that is what sharding is for)."""
        if self.max_model_bytes is None:
            return
        mine = sum(numel(local_shape(e.shape, e.placement, self.world, self.rank))
                   * e.dtype.itemsize for e in entries)
        if mine > self.max_model_bytes:
            raise ResourceExhaustedError(
                f"rank {self.rank}'s part of the model has {mine} bytes, more than "
                f"--max-model-bytes {self.max_model_bytes}", reason="MODEL_TOO_LARGE",
                metadata={"limit": "max_model_bytes", "asked": str(mine),
                          "limit_value": str(self.max_model_bytes), "rank": str(self.rank)})

    def _full_values(self, spec: pb.ModelSpec, entries: list[Entry], seed: int | None,
                     values: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:
        """Rank 0: the full value of every storage, from the upload or built under `seed`.
        (Transient: rank 0 holds one full model during a create, then only its shards.)"""
        values = values or {}
        out: list[torch.Tensor] = []
        built: dict[str, torch.Tensor] | None = None
        for e in entries:
            v = next((values[n] for n in e.names if n in values), None)
            if v is None:
                if built is None:
                    with rng.seeded(seed):
                        built = dict(_spec.build_module(spec).state_dict())
                v = built[e.names[0]]
            if tuple(v.shape) != e.shape:
                raise InvalidArgumentError(
                    f"{e.names[0]!r} has shape {list(e.shape)}; the uploaded value has "
                    f"{list(v.shape)}", reason="BAD_SHAPE", metadata={"tensor": e.names[0]})
            out.append(v.detach().to(e.dtype).contiguous())
        return out

    def _do_delete(self, model_id: str) -> None:
        with self._lock:
            m = self.models.pop(model_id, None)
        if m is None:
            raise NotFoundError(f"model {model_id!r} not found", reason="MODEL_NOT_FOUND",
                                metadata={"model": model_id})
        if self.root is not None:
            shutil.rmtree(self.root / model_id, ignore_errors=True)

    def _do_read(self, model_id: str, group: int) -> torch.Tensor:
        e = self._model(model_id).entries[group]
        assert e.dt is not None
        # All ranks take part in the all-gather; only rank 0's copy is used.
        return e.dt.full_tensor() if isinstance(e.placement, Shard) else e.local.clone()

    def _do_read_versioned(self, model_id: str, group: int, index: tuple[Any, ...]
                           ) -> tuple[torch.Tensor | None, int]:
        out = self._do_read_region(model_id, group, index)
        return out, self._model(model_id).entries[group].version

    def _do_write(self, model_id: str, writes: list[Write],
                  expected_model_version: int | None = None, event_op: str = ""
                  ) -> tuple[list[int], int]:
        """Prepare every write on this rank's part, vote, commit everywhere or nowhere."""
        m = self._model(model_id)
        # group -> [(flat ids into this rank's part, their new values)], in write order.
        staged: storage.Staged = {}
        error: ParamhubError | None = None
        try:
            if expected_model_version is not None and expected_model_version != m.version:
                raise ConflictError(f"model {model_id!r} is at version {m.version}, not "
                                    f"{expected_model_version}", reason="VERSION_MISMATCH",
                                    metadata={"model": model_id, "version": str(m.version)})
            for w in writes:
                e = m.entry(w.name, w.kind)
                if w.expected_version is not None and w.expected_version != e.version:
                    raise ConflictError(
                        f"{w.name!r} is at version {e.version}, not {w.expected_version}",
                        reason="VERSION_MISMATCH",
                        metadata={"tensor": w.name[:200], "version": str(e.version)})
                base = e.local
                if e.group in staged:  # a second write of one storage sees the first
                    base = base.clone()
                    for ids, vals in staged[e.group]:
                        base.view(-1)[ids] = vals
                staged.setdefault(e.group, []).append(self._prepare(e, base, w))
        except ParamhubError as exc:
            error = exc
        commit.two_phase(self, m, staged, error)  # logged prepare, vote, logged commit
        for hook in self.on_commit:
            hook(m, writes, event_op)
        return [m.entries[m.entry(w.name, w.kind).group].version for w in writes], m.version

    def _to_local(self, e: Entry, sel: torch.Tensor, rank: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, local ids): which of the logical flat ids `sel` `rank` holds, and their flat
        ids into its part (any placement: sharding.to_local)."""
        return to_local(e.shape, e.placement, self.world,
                        self.rank if rank is None else rank, sel)

    def _prepare(self, e: Entry, base: torch.Tensor, w: Write
                 ) -> tuple[torch.Tensor | slice, torch.Tensor]:
        """(flat ids into this rank's part, their new values) after `w`: the prepare, computed
        beside the live tensor, in memory proportional to the region written. A box of slices
        that is one contiguous run of this rank's part (a whole tensor, rows of a Shard(0)
        tensor, ...) is computed on views and staged as a slice run (no id tensors)."""
        fast = local_run(e.shape, e.placement, self.world, self.rank, w.index)
        if fast is not None:
            region, box, vsel, run = fast
            value = self._expand(w, region)
            new = _combine(base[box], w.op, value[vsel], w.name)
            return run, new.to(base.dtype).reshape(-1)
        sel = region_ids(e.shape, w.index)  # IndexError/shape errors as torch reports them
        value = self._expand(w, tuple(sel.shape))
        mask, local_ids = self._to_local(e, sel)
        old = base.reshape(-1)[local_ids]
        new = _combine(old, w.op, value[mask], w.name)
        return local_ids, new.to(base.dtype)

    @staticmethod
    def _expand(w: Write, region: tuple[int, ...]) -> torch.Tensor:
        """`w`'s value broadcast to the region's shape (BAD_SHAPE when it cannot be)."""
        try:
            return w.value.expand(region)
        except RuntimeError:
            raise InvalidArgumentError(
                f"a value of shape {list(w.value.shape)} cannot be written to a region of "
                f"shape {list(region)} of {w.name!r}", reason="BAD_SHAPE",
                metadata={"tensor": w.name[:200]}) from None

    def _do_read_region(self, model_id: str, group: int, index: tuple[Any, ...]
                        ) -> torch.Tensor | None:
        """`tensor[index]` assembled on rank 0 from each rank's elements of the region (only
        the region's bytes move); a replicated tensor is read from rank 0's own copy."""
        e = self._model(model_id).entries[group]
        if not isinstance(e.placement, Shard):
            if self.rank != 0:
                return None
            return indexing.apply_index(e.local, index).clone()
        if all(isinstance(i, slice) and i == slice(None) for i in index):
            # The whole tensor: one all-gather of the parts (DTensor's own), no id maps.
            full = e.dt.full_tensor() if e.dt is not None else None
            return full if self.rank == 0 else None
        sel = region_ids(e.shape, index)
        mine = e.local.reshape(-1)[self._to_local(e, sel)[1]]
        parts: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if parts is None:
            return None
        out = torch.empty(sel.shape, dtype=e.dtype)
        for r, part in enumerate(parts):
            out[self._to_local(e, sel, r)[0]] = part
        return out

    def _confirm(self) -> None:
        """Every rank has persisted: only then may rank 0 acknowledge."""
        done: list[Any] = [None] * self.world
        dist.all_gather_object(done, True)

    # -- rank 0's API (called from RPC handler threads) ----------------------------------------

    def _model(self, model_id: str) -> ShardedModel:
        with self._lock:
            m = self.models.get(model_id)
        if m is None:
            raise NotFoundError(f"model {model_id!r} not found", reason="MODEL_NOT_FOUND",
                                metadata={"model": model_id})
        return m

    def local_part(self, model_id: str, name: str, kind: str | None
                   ) -> tuple[Entry, torch.Tensor, int, int, int, int]:
        """(entry, a copy of this rank's part, its first index along the sharded dim (dim 0
        when replicated), the stop, version, the model's version), consistent with respect to
        commits (any rank; no collective)."""
        m = self._model(model_id)
        e = m.entry(name, kind)
        with self._lock:
            part = e.local.clone()
            version, model_version = e.version, m.version
        start, stop = local_bounds(e.shape, e.placement, self.world, self.rank)
        return e, part, start, stop, version, model_version

    def get(self, model_id: str) -> ShardedModel | None:
        with self._lock:
            return self.models.get(model_id)

    def list(self) -> list[ShardedModel]:
        with self._lock:
            return list(self.models.values())

    def create(self, model_id: str, spec: pb.ModelSpec, *, seed: int | None,
               values: dict[str, torch.Tensor], plan: str = FSDP) -> ShardedModel:
        """Creates a sharded model placed by `plan` (its wire form: sharding.plan_text)."""
        parse_plan(plan)  # a malformed plan is refused before any rank works
        # The other ranks receive the command without the values; rank 0 scatters them.
        return self._run_local_extra("create", {"model_id": model_id,
                                                "spec": spec.SerializeToString(),
                                                "seed": seed, "plan": plan},
                                     {"values": values})

    def _run_local_extra(self, op: str, shared: dict[str, Any], local: dict[str, Any]) -> Any:
        """Like run(), but `local` arguments stay on rank 0 (the others get None for them)."""
        if self._broken is not None:
            raise self._broken
        fut: Future[Any] = Future()
        self._queue.put((op, {**shared, **{k: _Local(v) for k, v in local.items()}}, fut))
        try:
            return fut.result(timeout=self.call_timeout_s)
        except TimeoutError:
            raise rank_down(self._dead_rank(), "the cluster did not answer in time") from None

    def read(self, model_id: str, name: str, kind: str | None, index: tuple[Any, ...]
             ) -> tuple[torch.Tensor, int]:
        """`tensor[index]` (a CPU copy) and its version."""
        m = self._model(model_id)
        e = m.entry(name, kind)
        # Refused before any rank works: torch's own error, from a meta stand-in (a boolean
        # mask cannot index a meta tensor: every rank checks it, and raises the same error,
        # before its first collective).
        if not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            indexing.apply_index(torch.empty(e.shape, dtype=e.dtype, device="meta"), index)
        out, version = self.run("read_versioned", model_id=model_id, group=e.group,
                                index=index)
        return out, version

    def write(self, model_id: str, writes: builtins.list[Write]) -> tuple[builtins.list[int], int]:
        return self.run("write", model_id=model_id, writes=writes)

    def apply_init(self, model_id: str, targets: Sequence[tuple[str, Any]], scheme_name: str,
                   args: dict[str, Any], *, seed: int | None,
                   generator: rng.GeneratorState | None,
                   expected_model_version: int | None) -> tuple[builtins.list[tuple[str, int]], int]:
        """An init scheme over the targets, as one all-or-nothing write of whole tensors.
        The values are drawn on rank 0 (from the client's generator state, or `seed`),
        exactly as for a local model, then written to the owners."""
        m = self._model(model_id)
        scheme = inits.get_scheme(scheme_name)
        args = scheme.check_args(args)
        chosen = select(m, targets)
        with rng.drawing_from(generator) if generator is not None else rng.seeded(seed):
            values = [scheme.run(torch.empty(e.shape, dtype=e.dtype, device="meta"), args)
                      for e in chosen]
        writes = [Write(e.names[0], e.kind, (), "assign", v) for e, v in zip(chosen, values)]
        versions, model_version = self.run("write", model_id=model_id, writes=writes,
                                           expected_model_version=expected_model_version,
                                           event_op=f"apply_init.{scheme_name}")
        return [(e.names[0], v) for e, v in zip(chosen, versions)], model_version

    def delete(self, model_id: str) -> None:
        self.run("delete", model_id=model_id)

    def info(self) -> builtins.list[dict[str, Any]]:
        return self.run("info")


class _Local:
    """A command argument that only rank 0 receives (pickled as None for the others)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        return (_Local, (None,))


def _is_comm_error(e: BaseException) -> bool:
    """Whether an error came from the process group (a peer gone) rather than from torch."""
    text = str(e).lower()
    return isinstance(e, (dist.DistError, ConnectionError)) or any(
        w in text for w in ("gloo", "connection", "timed out", "timeout", "socket", "peer"))


