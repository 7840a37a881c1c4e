"""The SDK side of a paramhub cluster: the ranks (ClusterService), sharded creates, routed
reads that fetch a sharded tensor's parts straight from the ranks that hold them, in parallel,
and assemble it here, and routed writes that send each owner its rows (StageShard) and then ask
the front door to commit them as one write (CommitStagedWrite), and the same for whole state
pulls (every part from its owner, at one model version) and pushes (CommitStagedState): rank
0, the front door, then carries no bulk bytes.

Why ~520 lines: routed reads and writes share the placement cache, the per-rank stubs, the
fallback rule and the part geometry; the state pull/push (the newest ~150 lines) could move out
beside them if it grows."""

from __future__ import annotations

import fnmatch
import json
import os
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import torch

from paramhub import _codec
from paramhub.errors import (ConflictError, FailedPreconditionError, InvalidArgumentError,
                             NotFoundError, ParamhubError, UnavailableError, UnimplementedError,
                             from_rpc_error)
from paramhub.v1 import cluster_pb2 as cpb
from paramhub.v1 import cluster_pb2_grpc as cpb_grpc
from paramhub.common import pb

if TYPE_CHECKING:
    from paramhub.client import Client

#: Call metadata asking CreateModel for a sharded model: "fsdp", or a tensor-parallel plan as a
#: JSON object {"module path": "colwise" | "rowwise"} (keys sorted, no spaces).
SHARD_METADATA = "x-paramhub-shard"
#: The most bytes a plan's JSON may have (gRPC's metadata limit is 8 KiB for all headers; a
#: long plan can name many modules at once with wildcards: "layers.*.w1").
MAX_PLAN_BYTES = 7000


def plan_metadata(shard: str | Mapping[str, str]) -> str:
    """The wire form of a sharding plan (the server checks the styles and paths)."""
    if isinstance(shard, str):
        return shard
    if not isinstance(shard, Mapping):
        raise InvalidArgumentError(f"shard must be 'fsdp' or a {{module path: style}} mapping, "
                                   f"not a {type(shard).__name__}", reason="BAD_SHARD")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in shard.items()):
        raise InvalidArgumentError("a tensor-parallel plan maps module paths (str) to styles "
                                   "(str)", reason="BAD_SHARD")
    text = json.dumps(dict(shard), sort_keys=True, separators=(",", ":"))
    if len(text.encode()) > MAX_PLAN_BYTES:
        raise InvalidArgumentError(
            f"the plan's JSON has {len(text.encode())} bytes, more than {MAX_PLAN_BYTES} (it "
            "travels as call metadata); name modules with wildcards ('layers.*.w1')",
            reason="BAD_SHARD")
    return text


class Placement(tuple):  # noqa: SLOT001 - a 2-tuple that also carries a note
    """(placement, bounds) of one tensor, as `client.describe_placement` returns it, plus
    `.note`: why a tensor the plan would shard is replicated, else ""."""

    note: str
    #: "parameters" or "buffers" ("" from a server that does not say).
    kind: str

    def __new__(cls, placement: str, bounds: tuple[int, ...], note: str = "",
                kind: str = "") -> Placement:
        self = super().__new__(cls, (placement, bounds))
        self.note = note
        self.kind = kind
        return self

    def __getnewargs__(self) -> tuple[str, tuple[int, ...], str, str]:
        return self[0], self[1], self.note, self.kind  # (copy and pickle)

    @property
    def dim(self) -> int | None:
        """The sharded dim, or None (replicated, local)."""
        p = self[0]
        return int(p[len("shard("):-1]) if p.startswith("shard(") else None
#: Attempts of a routed read whose parts came from different versions (a write landed between
#: the parts' copies) before it falls back to one read through the front door.
ROUTED_ATTEMPTS = 3
#: Bytes per StageShard message of a routed write.
STAGE_CHUNK = 1 << 20


@dataclass(frozen=True)
class RankInfo:
    """One rank of a cluster."""

    rank: int
    #: host:port of the rank's gRPC server.
    address: str
    #: Device its tensors live on.
    device: str
    #: Bytes of sharded-model tensors it holds (its parts only).
    held_bytes: int


class Cluster:
    """Per-client cluster state: the stub, the ranks' channels (opened on first use)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.stub = cpb_grpc.ClusterServiceStub(client.channel)
        self._lock = threading.Lock()
        self._ranks: list[RankInfo] | None = None
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, cpb_grpc.ClusterServiceStub] = {}
        self._routing_off = False
        self._pool: ThreadPoolExecutor | None = None
        #: model id -> {name: (placement, bounds)}, learnt from DescribePlacement.
        self._placements: dict[str, dict[str, Placement]] = {}
        #: Models this client created sharded (a pull asks their placement; other models'
        #: pulls ask nothing more unless their placement is already known).
        self._sharded: set[str] = set()

    def _call(self, fn: Any, request: Any, timeout: float | None = None) -> Any:
        metadata = self.client._count(fn)  # counted in client.rpc_counts like every call
        try:
            return fn(request, timeout=timeout if timeout is not None else self.client.timeout,
                      metadata=metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def info(self) -> list[RankInfo]:
        ranks = [RankInfo(r.rank, r.address, r.device, r.held_bytes)
                 for r in self._call(self.stub.GetClusterInfo,
                                     cpb.GetClusterInfoRequest()).ranks]
        with self._lock:
            self._ranks = ranks
        return ranks

    def placement(self, model_id: str) -> dict[str, Placement]:
        resp = self._call(self.stub.DescribePlacement,
                          cpb.DescribePlacementRequest(name=f"models/{model_id}"))
        out = {t.name: Placement(t.placement, tuple(t.row_bounds), t.note, t.kind)
               for t in resp.tensors}
        with self._lock:
            self._placements[model_id] = out
        return out

    def create(self, model_id: str, spec: pb.ModelSpec, shard: str | Mapping[str, str], *,
               seed: int | None,
               values: Mapping[str, torch.Tensor], timeout: float | None) -> pb.ModelInfo:
        header = pb.CreateModelHeader(model_id=model_id, spec=spec)
        if seed is not None:
            header.seed = seed

        def requests() -> Iterator[pb.CreateModelRequest]:
            yield pb.CreateModelRequest(header=header)
            for name, t in values.items():
                for chunk in _codec.iter_tensor_chunks(t, name=name):
                    yield pb.CreateModelRequest(chunk=chunk)

        metadata = (*self.client._metadata, (SHARD_METADATA, plan_metadata(shard)))
        try:
            info = self.client.stub.CreateModel(
                requests(), timeout=timeout if timeout is not None else self.client.timeout,
                metadata=metadata).model
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        with self._lock:
            self._sharded.add(model_id)
            self._placements.pop(model_id, None)  # a model of that name may have been cached
        return info

    # -- routed reads --------------------------------------------------------------------------

    def read_if_sharded(self, model_id: str, name: str, tensor_name: str,
                        timeout: float | None) -> tuple[torch.Tensor, int] | None:
        """A routed read of a whole tensor when it is sharded (on any dim; the model's
        placement is asked once and cached); None to read through the front door instead."""
        placement, _ = self._placement_of(model_id, name)
        if not placement.startswith("shard"):
            return None
        if self._routing_off:
            return None
        try:
            return self.read_routed(tensor_name, timeout=timeout)
        except (NotFoundError, FailedPreconditionError, ConflictError):
            with self._lock:  # the model changed (deleted, recreated): ask again next time
                self._placements.pop(model_id, None)
            return None
        except UnavailableError:
            # A rank this client cannot reach (a dead rank, an address not routable from
            # here, or a TLS cluster: routed reads are plaintext): from now on this client
            # reads through the front door, which answers RANK_DOWN if a rank is really down.
            self._routing_off = True
            return None

    def _placement_of(self, model_id: str, name: str) -> tuple[str, tuple[int, ...]]:
        """(placement, row bounds) of one tensor, from the model's placement (asked once and
        cached); ("", ()) when unknown here (the front door then answers the call)."""
        with self._lock:
            known = self._placements.get(model_id)
        if known is None:
            try:
                known = self.placement(model_id)
            except NotFoundError:
                return "", ()  # the front door reports it
            except UnimplementedError:  # a server without ClusterService: never sharded
                with self._lock:
                    self._placements[model_id] = known = {}
        return known.get(name, Placement("", ()))

    # -- routed writes -------------------------------------------------------------------------

    def write_if_sharded(self, model_id: str, name: str, tensor_name: str, value: torch.Tensor,
                         expected_version: int | None, timeout: float | None
                         ) -> int | None:
        """A routed write of a whole tensor (`value` has its full shape) when it is sharded
        (Shard(d), any d): each owner is sent its part (its indices along d) in parallel
        (StageShard), then the front door commits them as one write; the tensor's new
        version. None to write through the front door instead (not sharded, a rank not
        reachable from here, a part refused)."""
        known = self._placement_of(model_id, name)
        bounds, dim = known[1], Placement(known[0], ()).dim
        if dim is None or self._routing_off or not bounds:
            return None
        if value.dim() <= dim or value.shape[dim] != bounds[-1]:
            return None  # a broadcast value: the front door expands it
        with self._lock:
            ranks = self._ranks
        if ranks is None:
            ranks = self.info()
        if len(ranks) + 1 != len(bounds):
            return None
        value = value.detach().cpu().contiguous()
        write_id = os.urandom(16).hex()
        pool = self._executor(len(ranks))

        def stage(rank: RankInfo) -> None:
            lo, hi = bounds[rank.rank], bounds[rank.rank + 1]
            if hi > lo:
                part = value.narrow(dim, lo, hi - lo).contiguous()
                self._stage(rank, tensor_name, write_id, part, lo, hi, timeout)

        try:
            list(pool.map(stage, ranks))
        except UnavailableError:
            self._routing_off = True  # as for routed reads: the front door from now on
            return None
        except ParamhubError:
            return None  # a part refused (shape, limit): the front door gives the answer
        request = cpb.CommitStagedWriteRequest(name=tensor_name, write_id=write_id,
                                               expected_version=expected_version)
        try:
            return int(self._call(self.stub.CommitStagedWrite, request, timeout).version)
        except FailedPreconditionError as e:
            if e.reason in ("NOT_STAGED", "NOT_ROUTABLE"):
                return None  # expired or the model changed: written through the front door
            raise

    def _stage(self, rank: RankInfo, tensor_name: str, write_id: str, part: torch.Tensor,
               lo: int, hi: int, timeout: float | None) -> None:
        stub = self._stub(rank.address)
        data = _codec.byte_view(part).view(-1).numpy()
        dtype = str(part.dtype).removeprefix("torch.")

        def requests() -> Iterator[cpb.StageShardRequest]:
            yield cpb.StageShardRequest(name=tensor_name, write_id=write_id, dtype=dtype,
                                        row_start=lo, row_stop=hi, shape=list(part.shape),
                                        data=data[:STAGE_CHUNK].tobytes())
            for off in range(STAGE_CHUNK, len(data), STAGE_CHUNK):
                yield cpb.StageShardRequest(data=data[off:off + STAGE_CHUNK].tobytes())

        try:
            stub.StageShard(requests(), timeout=timeout if timeout is not None
                            else self.client.timeout,
                            metadata=self.client._count(stub.StageShard))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise UnavailableError(f"rank {rank.rank} at {rank.address} cannot be "
                                       "reached", reason="RANK_DOWN",
                                       metadata={"rank": str(rank.rank)}) from None
            raise from_rpc_error(e) from None

    def _executor(self, ranks: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=max(2, ranks),
                                                thread_name_prefix="paramhub-routed")
            return self._pool

    def _stub(self, address: str) -> cpb_grpc.ClusterServiceStub:
        """One channel and stub per rank, made on first use and kept."""
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                ch = self._channels[address] = grpc.insecure_channel(address, options=[
                    ("grpc.max_receive_message_length", 64 << 20)])
                stub = self._stubs[address] = cpb_grpc.ClusterServiceStub(ch)
            return stub

    def read_routed(self, tensor_name: str, *, timeout: float | None = None
                    ) -> tuple[torch.Tensor, int]:
        """A whole sharded tensor, its parts read from every rank in parallel and assembled
        into one preallocated tensor; (tensor, version). Parts from different versions (a write
        between their copies) are read again, then through the front door.

        Raises:
            UnavailableError: a rank cannot be reached (reason RANK_DOWN from the front door).
        """
        with self._lock:
            ranks = self._ranks
        if ranks is None:
            ranks = self.info()
        pool = self._executor(len(ranks))
        for _ in range(ROUTED_ATTEMPTS):
            out: list[torch.Tensor | None] = [None]
            lock = threading.Lock()

            def fetch(rank: RankInfo) -> int:
                return self._read_part(rank, tensor_name, out, lock, timeout)[0]

            versions = list(pool.map(fetch, ranks))
            if len(set(versions)) == 1 and out[0] is not None:
                return out[0], versions[0]
        raise ConflictError("the tensor changed during every routed read",
                            reason="ROUTED_READ_TORN")

    def _read_part(self, rank: RankInfo, tensor_name: str, out: list[torch.Tensor | None],
                   lock: threading.Lock, timeout: float | None) -> tuple[int, int]:
        """Receives `rank`'s part of the tensor into its place in out[0] (allocated by the
        first part to arrive); (the tensor's version, the model's version) of the copy."""
        stub = self._stub(rank.address)
        try:
            stream = stub.ReadShard(cpb.ReadShardRequest(name=tensor_name),
                                    timeout=timeout if timeout is not None
                                    else self.client.timeout,
                                    metadata=self.client._count(stub.ReadShard))
            first = next(stream)
            dtype = getattr(torch, first.dtype)
            shape = tuple(first.shape)
            with lock:
                if out[0] is None:
                    out[0] = torch.empty(shape, dtype=dtype)
                full = out[0]
            assert full is not None
            dim = Placement(first.placement, ()).dim or 0
            rows = (full.narrow(dim, first.row_start, first.row_stop - first.row_start)
                    if shape else full)
            # Shard(0) parts are contiguous in the whole tensor: received in place. Other
            # dims' parts are received whole, then copied into their strided place.
            part = rows if rows.is_contiguous() else torch.empty(rows.shape, dtype=dtype)
            dest = _codec.byte_view(part).view(-1) if part.numel() else None
            pos = 0
            for msg in _chain(first, stream):
                n = len(msg.data)
                if n and dest is not None:
                    dest[pos:pos + n].copy_(torch.frombuffer(bytearray(msg.data),
                                                             dtype=torch.uint8))
                pos += n
            if part is not rows:
                rows.copy_(part)
            return int(first.version), int(first.model_version)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise UnavailableError(f"rank {rank.rank} at {rank.address} cannot be "
                                       "reached", reason="RANK_DOWN",
                                       metadata={"rank": str(rank.rank)}) from None
            raise from_rpc_error(e) from None

    # -- routed state pulls and pushes ----------------------------------------------------------

    def _sharded_placement(self, model_id: str, ask: bool = True
                           ) -> dict[str, Placement] | None:
        """The model's placement when it is sharded (some tensor Shard(d)) and routing is on
        (asked once and cached; with `ask` False only when known or created sharded here);
        else None."""
        if self._routing_off:
            return None
        with self._lock:
            asking = ask or model_id in self._sharded or model_id in self._placements
        if not asking:
            return None
        self._placement_of(model_id, "")
        with self._lock:
            known = self._placements.get(model_id)
        if not known or not any(p.dim is not None for p in known.values()):
            return None
        return known

    def _ranks_now(self) -> list[RankInfo]:
        with self._lock:
            ranks = self._ranks
        return ranks if ranks is not None else self.info()

    def pull_if_sharded(self, model_id: str, names: list[str], prefix: str, glob: str,
                        parameters_only: bool, timeout: float | None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, int]] | None:
        """A routed `pull_state` of a sharded model: each tensor's parts read straight from
        their owners (ReadShard; a replicated tensor from one rank, the ranks taking turns),
        every rank's parts in parallel, all at one model version (parts copied at different
        versions: the whole pull again, ROUTED_ATTEMPTS tries). None to pull through the front
        door instead (not sharded, a name it must refuse, a rank not reachable, torn every
        time)."""
        known = self._sharded_placement(model_id, ask=False)
        if known is None or any(not p.kind for p in known.values()):
            return None
        if names:
            if len(set(names)) != len(names) or any(
                    n not in known or (parameters_only and known[n].kind != "parameters")
                    for n in names):
                return None  # the front door gives the error
            selected = list(names)
        else:
            selected = [n for n, p in known.items()
                        if (not parameters_only or p.kind == "parameters")
                        and n.startswith(prefix) and (not glob or fnmatch.fnmatchcase(n, glob))]
        ranks = self._ranks_now()
        jobs: list[list[tuple[str, str]]] = [[] for _ in ranks]  # per rank: (name, wire name)
        for i, n in enumerate(selected):
            wire = f"models/{model_id}/{known[n].kind}/{n}"
            if known[n].dim is None:  # replicated: any one rank has it whole
                jobs[i % len(ranks)].append((n, wire))
            else:
                for r in range(len(ranks)):
                    jobs[r].append((n, wire))
        pool = self._executor(len(ranks))
        try:
            for _ in range(ROUTED_ATTEMPTS):
                slots: dict[str, list[torch.Tensor | None]] = {n: [None] for n in selected}
                locks = {n: threading.Lock() for n in selected}

                def fetch(rank: RankInfo) -> list[tuple[str, int, int]]:
                    return [(n, *self._read_part(rank, wire, slots[n], locks[n], timeout))
                            for n, wire in jobs[rank.rank]]

                got = [x for xs in pool.map(fetch, ranks) for x in xs]
                if len({mv for _, _, mv in got}) <= 1:
                    versions = {n: v for n, v, _ in got}
                    return {n: slots[n][0] for n in selected}, versions  # type: ignore[misc]
        except (NotFoundError, FailedPreconditionError, ConflictError):
            with self._lock:  # the model changed (deleted, recreated): ask again next time
                self._placements.pop(model_id, None)
            return None
        except UnavailableError:
            self._routing_off = True  # as for routed reads: the front door from now on
            return None
        return None  # a write landed during every try: the front door's one snapshot

    def push_if_sharded(self, model_id: str, names: list[str], tensors: list[torch.Tensor],
                        expected_model_version: int | None, timeout: float | None
                        ) -> dict[str, int] | None:
        """A routed `push_state` of a sharded model: every tensor's parts are staged on their
        owners (StageShard, one write id for the whole push; a replicated tensor whole on
        every rank), the ranks in parallel, then the front door commits them as one two-phase
        write (CommitStagedState: one model version, all or nothing). None to push through the
        front door instead, which gives the answer (not sharded, an unknown name, a value
        whose shape does not match, a part refused, a rank not reachable)."""
        known = self._sharded_placement(model_id)
        if known is None or len(set(names)) != len(names):
            return None
        ranks = self._ranks_now()
        jobs: list[list[tuple[str, torch.Tensor, int, int]]] = [[] for _ in ranks]
        for n, t in zip(names, tensors):
            p = known.get(n)
            if p is None or not p.kind:
                return None
            wire = f"models/{model_id}/{p.kind}/{n}"
            t = t.detach().cpu().contiguous()
            dim, bounds = p.dim, p[1]
            if dim is None:  # replicated: the whole value on every rank
                for r in range(len(ranks)):
                    jobs[r].append((wire, t, 0, t.shape[0] if t.dim() else 0))
                continue
            if len(bounds) != len(ranks) + 1 or t.dim() <= dim or t.shape[dim] != bounds[-1]:
                return None
            for r in range(len(ranks)):
                lo, hi = bounds[r], bounds[r + 1]
                if hi > lo:
                    jobs[r].append((wire, t.narrow(dim, lo, hi - lo).contiguous(), lo, hi))
        write_id = os.urandom(16).hex()
        pool = self._executor(len(ranks))

        def stage(rank: RankInfo) -> None:
            for wire, part, lo, hi in jobs[rank.rank]:
                self._stage(rank, wire, write_id, part, lo, hi, timeout)

        request = cpb.CommitStagedStateRequest(model=f"models/{model_id}", write_id=write_id,
                                               names=names,
                                               expected_model_version=expected_model_version)
        try:
            list(pool.map(stage, ranks))
        except ParamhubError as e:
            if isinstance(e, UnavailableError):
                self._routing_off = True  # as for routed reads: the front door from now on
            try:  # give the staging room back now rather than after its time-to-live
                self._call(self.stub.CommitStagedState, cpb.CommitStagedStateRequest(
                    model=request.model, write_id=write_id, names=names, abort=True), timeout)
            except ParamhubError:
                pass
            return None
        try:
            resp = self._call(self.stub.CommitStagedState, request, timeout)
        except FailedPreconditionError as e:
            if e.reason in ("NOT_STAGED", "NOT_ROUTABLE"):
                return None  # expired or the model changed: pushed through the front door
            raise
        return {u.name: u.version for u in resp.updated}

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
            self._stubs = {}
            pool, self._pool = self._pool, None
        for ch in channels:
            ch.close()
        if pool is not None:
            pool.shutdown(wait=False)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest
