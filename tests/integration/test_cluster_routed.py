"""Routed writes on a 2-rank cluster: a big whole-tensor write of a sharded tensor is sent
straight to its owners (ClusterService.StageShard) and committed by the front door as one
write (CommitStagedWrite); bad parts, missing parts and the staging limit change nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from _cluster import ClusterProcs
from torch import nn

import paramhub
from paramhub.errors import ConflictError
from paramhub.v1 import cluster_pb2 as cpb
from paramhub.v1 import cluster_pb2_grpc as cpb_grpc

pytestmark = pytest.mark.timeout(600)
#: Each rank may hold (and stage) 3 MB: one 2 MiB part of the 4 MiB weight, not two.
MAX_MODEL_BYTES = 3_000_000
NAME = "models/big/parameters/weight"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ClusterProcs]:
    procs = ClusterProcs(tmp_path_factory.mktemp("routed") / "data", 2,
                         extra=("--max-model-bytes", str(MAX_MODEL_BYTES))).start()
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def cc(cluster: ClusterProcs) -> Iterator[paramhub.Client]:
    with paramhub.connect(cluster.target, timeout=60) as c:
        yield c
        for m in c.list_models():
            c.delete_model(m.name)


def big(c: paramhub.Client) -> nn.Module:
    torch.manual_seed(7)
    local = nn.Linear(1024, 1024)  # a 4 MiB weight, rows [0, 512) on rank 0, the rest on 1
    return c.create_model("big", local, shard="fsdp")


def stage(cluster: ClusterProcs, rank: int, write_id: str, value: torch.Tensor, *,
          rows: tuple[int, int] | None = None, name: str = NAME, extra: bytes = b""
          ) -> cpb.StageShardResponse:
    """One StageShard call to `rank` with `value` as the part (rows: the header's), in 1 MiB
    messages (`extra` bytes after it)."""
    lo, hi = rows if rows is not None else (512 * rank, 512 * rank + value.shape[0])
    data = value.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() + extra
    chunk = 1 << 20

    def requests() -> Iterator[cpb.StageShardRequest]:
        yield cpb.StageShardRequest(name=name, write_id=write_id,
                                    dtype=str(value.dtype).removeprefix("torch."),
                                    row_start=lo, row_stop=hi, shape=list(value.shape),
                                    data=data[:chunk])
        for off in range(chunk, len(data), chunk):
            yield cpb.StageShardRequest(data=data[off:off + chunk])

    with grpc.insecure_channel(cluster.address(rank)) as ch:
        return cpb_grpc.ClusterServiceStub(ch).StageShard(requests(), timeout=60)


def commit(cluster: ClusterProcs, write_id: str, rank: int = 0, **kw) -> Any:
    with grpc.insecure_channel(cluster.address(rank)) as ch:
        return cpb_grpc.ClusterServiceStub(ch).CommitStagedWrite(
            cpb.CommitStagedWriteRequest(name=NAME, write_id=write_id, **kw), timeout=60)


def reason(e: grpc.RpcError) -> str:
    return paramhub.errors.from_rpc_error(e).reason


def test_big_write_goes_straight_to_the_owners(cc: paramhub.Client) -> None:
    net = big(cc)
    v0 = cc.describe_model("big")
    value = torch.randn(1024, 1024)
    before = dict(cc.rpc_counts)
    net.weight.data[:] = value
    counts = {k: cc.rpc_counts.get(k, 0) - before.get(k, 0) for k in cc.rpc_counts}
    assert counts.get("StageShard") == 2  # one per owner
    assert counts.get("CommitStagedWrite") == 1
    assert not counts.get("SetSlice") and not counts.get("StreamSetSlice")  # no bulk via rank 0
    assert torch.equal(net.weight.fetch(), value)
    after = cc.describe_model("big")
    assert after.model.version == v0.model.version + 1  # one write, one version
    assert after.tensors[0].version == v0.tensors[0].version + 1
    assert after.tensors[1].version == v0.tensors[1].version  # the bias is untouched
    # Another dtype is cast as the front door would; `...` is the whole tensor too.
    value64 = torch.randn(1024, 1024, dtype=torch.float64)
    version = cc.set_slice("big", "weight", ..., value64)
    assert version == after.tensors[0].version + 1
    assert torch.equal(net.weight.fetch(), value64.float())
    # A stale expected_version is refused and changes nothing.
    with pytest.raises(ConflictError) as e:
        cc.set_slice("big", "weight", None, value, expected_version=1)
    assert e.value.reason == "VERSION_MISMATCH"
    assert torch.equal(net.weight.fetch(), value64.float())
    assert cc.describe_model("big").tensors[0].version == version
    # A value that broadcasts: the owners refuse its parts, the front door expands it.
    row = torch.arange(1024.0).expand(1024, 1024).contiguous()[:1].reshape(1024)
    net.weight.data[:] = row
    assert torch.equal(net.weight.fetch(), row.expand(1024, 1024))


def test_routed_write_is_one_watch_event(cc: paramhub.Client) -> None:
    """A watcher sees a routed write as one event of the whole tensor, as for a write through
    the front door."""
    net = big(cc)
    events: list[Any] = []
    started, got = threading.Event(), threading.Event()

    def on_event(ev: Any) -> None:
        events.append(ev)
        (started if ev.kind == "started" else got).set()

    w = cc.watch("big", on_event)
    try:
        assert started.wait(30)
        before = dict(cc.rpc_counts)
        net.weight.data[:] = torch.randn(1024, 1024)
        assert cc.rpc_counts["CommitStagedWrite"] == before.get("CommitStagedWrite", 0) + 1
        assert got.wait(60), events
    finally:
        w.close()
        w.join(30)
    ev = events[-1]
    assert ev.model_version == 2 and [ch.name for ch in ev.changes] == ["weight"]


def test_staged_parts_commit_as_one_write(cc: paramhub.Client, cluster: ClusterProcs) -> None:
    net = big(cc)
    value = torch.randn(1024, 1024)
    assert stage(cluster, 0, "write-0001", value[:512]).staged_bytes == 512 * 1024 * 4
    assert stage(cluster, 1, "write-0001", value[512:]).staged_bytes == 512 * 1024 * 4
    resp = commit(cluster, "write-0001", expected_version=1)
    assert (resp.version, resp.model_version) == (2, 2)
    assert torch.equal(net.weight.fetch(), value)
    # A committed write id is gone: committing it again finds no parts.
    with pytest.raises(grpc.RpcError) as e:
        commit(cluster, "write-0001")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(e.value) == "NOT_STAGED"


def test_a_missing_part_changes_nothing(cc: paramhub.Client, cluster: ClusterProcs) -> None:
    """Only rank 0's part staged: the commit is refused on every rank (NOT_STAGED, rank 1
    named) and neither part is applied."""
    net = big(cc)
    before = net.weight.fetch()
    stage(cluster, 0, "write-0002", torch.zeros(512, 1024))
    with pytest.raises(grpc.RpcError) as e:
        commit(cluster, "write-0002")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = paramhub.errors.from_rpc_error(e.value)
    assert (err.reason, err.metadata["rank"]) == ("NOT_STAGED", "1")
    assert torch.equal(net.weight.fetch(), before)
    assert cc.describe_model("big").model.version == 1


@pytest.mark.parametrize("bad, code, why", [
    (dict(rows=(0, 512), rank=1), "FAILED_PRECONDITION", "NOT_OWNER"),
    (dict(value=torch.zeros(512, 1000)), "INVALID_ARGUMENT", "BAD_SHAPE"),
    (dict(write_id="short"), "INVALID_ARGUMENT", "BAD_WRITE_ID"),
    (dict(name="models/nope/parameters/weight"), "NOT_FOUND", "MODEL_NOT_FOUND"),
    (dict(name="models/big/parameters/nope"), "NOT_FOUND", "TENSOR_NOT_FOUND"),
    (dict(name="models/big/parameters/bias", value=torch.zeros(512, 2), rows=(0, 512)),
     "INVALID_ARGUMENT", "BAD_SHAPE"),
])
def test_bad_parts_are_refused(cc: paramhub.Client, cluster: ClusterProcs, bad, code,
                               why) -> None:
    net = big(cc)
    before = net.weight.fetch()
    args = {"rank": 0, "write_id": "write-0003", "value": torch.zeros(512, 1024), **bad}
    with pytest.raises(grpc.RpcError) as e:
        stage(cluster, args.pop("rank"), args.pop("write_id"), args.pop("value"), **args)
    assert e.value.code().name == code
    assert reason(e.value) == why
    assert torch.equal(net.weight.fetch(), before)
    assert cc.describe_model("big").model.version == 1


def test_staging_is_bounded(cc: paramhub.Client, cluster: ClusterProcs) -> None:
    """A rank stages at most --max-model-bytes at once: a second 2 MiB part is refused
    (RESOURCE_EXHAUSTED, STAGING_FULL) before it is allocated; the first one still commits."""
    net = big(cc)
    value = torch.randn(1024, 1024)
    stage(cluster, 1, "write-0004", value[512:])
    with pytest.raises(grpc.RpcError) as e:
        stage(cluster, 1, "write-0005", value[512:])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(e.value) == "STAGING_FULL"
    stage(cluster, 0, "write-0004", value[:512])
    assert commit(cluster, "write-0004").version == 2
    assert torch.equal(net.weight.fetch(), value)
    # More bytes than the header's shape, or fewer: refused, the reservation given back.
    with pytest.raises(grpc.RpcError) as e:
        stage(cluster, 1, "write-0006", torch.zeros(512, 1024), extra=b"\0" * 4)
    assert reason(e.value) == "BAD_SIZE"
    with pytest.raises(grpc.RpcError) as e:
        stage(cluster, 1, "write-0006", torch.zeros(511, 1024), rows=(512, 1024),
              name=NAME)
    assert reason(e.value) == "BAD_SHAPE"
    stage(cluster, 1, "write-0007", value[512:] * 2)  # fits again
    stage(cluster, 0, "write-0007", value[:512] * 2)
    assert commit(cluster, "write-0007").version == 3
    assert torch.equal(net.weight.fetch(), value * 2)


def test_commit_needs_the_front_door(cc: paramhub.Client, cluster: ClusterProcs) -> None:
    big(cc)
    with pytest.raises(grpc.RpcError) as e:
        commit(cluster, "write-0008", rank=1)
    assert reason(e.value) == "NOT_FRONT_DOOR"


# ------------------------------------------------------------------- routed state pull / push


def state_model(c: paramhub.Client) -> nn.Module:
    """Shard(0) weights and biases (one uneven: 3 rows as 2 + 1), BatchNorm buffers and a
    replicated int64 scalar buffer; 2 MiB of float32 in the first weight."""
    torch.manual_seed(3)
    local = nn.Sequential(nn.Linear(512, 1024), nn.BatchNorm1d(1024), nn.Linear(1024, 3))
    return c.create_model("st", local, shard="fsdp")


def filled(c: paramhub.Client, value: float) -> dict[str, torch.Tensor]:
    """Every tensor of "st" filled with `value` (the int64 buffer with int(value))."""
    state, _ = c.pull_state("st")
    return {n: torch.full_like(t, value) for n, t in state.items()}


def calls(c: paramhub.Client, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in c.rpc_counts.items() if v != before.get(k, 0)}


def test_routed_push_and_pull_match_the_front_door(cc: paramhub.Client,
                                                   cluster: ClusterProcs) -> None:
    state_model(cc)
    v0 = cc.describe_model("st").model.version
    torch.manual_seed(11)
    ref, _ = cc.pull_state("st")
    new = {n: (torch.randn_like(t) if t.is_floating_point() else t + 5) for n, t in ref.items()}
    before = dict(cc.rpc_counts)
    updated = cc.push_state("st", new)
    got = calls(cc, before)
    # Each rank is sent its parts (and the replicated scalar) straight; one commit.
    assert got.get("StageShard", 0) >= 2 * len(new) - 1 and got["CommitStagedState"] == 1
    assert "PushState" not in got
    assert cc.describe_model("st").model.version == v0 + 1  # one write, one version
    before = dict(cc.rpc_counts)
    pulled, versions = cc.pull_state("st")
    got = calls(cc, before)
    assert got.get("ReadShard", 0) >= len(new) and "PullState" not in got
    assert list(pulled) == list(new)
    assert all(torch.equal(pulled[n], new[n]) for n in new)
    assert {n: versions[n] for n in updated} == updated
    # The same answers through the front door (a client with routing off).
    with paramhub.connect(cluster.target, timeout=60) as fd:
        fd._cluster()._routing_off = True
        before = dict(fd.rpc_counts)
        front, front_versions = fd.pull_state("st")
        assert calls(fd, before).get("PullState") == 1 and "ReadShard" not in fd.rpc_counts
        assert list(front) == list(pulled) and front_versions == versions
        assert all(torch.equal(front[n], pulled[n]) for n in new)
        # Selections as the front door makes them.
        for kw in ({"prefix": "1."}, {"glob": "*.weight"}, {"parameters_only": True},
                   {"names": ["2.bias", "0.weight"]}):
            a, av = cc.pull_state("st", **kw)
            b, bv = fd.pull_state("st", **kw)
            assert list(a) == list(b) and av == bv, kw
            assert all(torch.equal(a[n], b[n]) for n in a), kw
        # A push through the front door reads back the same through the routes.
        twice = {n: t * 2 for n, t in new.items()}
        before = dict(fd.rpc_counts)
        fd.push_state("st", twice)
        assert calls(fd, before).get("PushState") == 1 and "StageShard" not in fd.rpc_counts
    pulled, _ = cc.pull_state("st")
    assert all(torch.equal(pulled[n], twice[n]) for n in new)


@pytest.mark.parametrize("bad, code, why", [
    (lambda s: {**s, "0.weight": torch.zeros(1024, 511)}, "INVALID_ARGUMENT", "BAD_SHAPE"),
    (lambda s: {**s, "1.num_batches_tracked": torch.zeros(2, dtype=torch.int64)},
     "INVALID_ARGUMENT", "BAD_SHAPE"),  # staged weights first, then refused: dropped
    (lambda s: {**s, "nope": torch.zeros(3)}, "NOT_FOUND", "TENSOR_NOT_FOUND"),
    (lambda s: {**s, "0.weight": torch.zeros(1024, 512, dtype=torch.complex64)},
     "INVALID_ARGUMENT", "BAD_DTYPE"),
])
def test_a_bad_routed_push_changes_nothing(cc: paramhub.Client, bad, code, why) -> None:
    state_model(cc)
    before_state, before_versions = cc.pull_state("st")
    version = cc.describe_model("st").model.version
    with pytest.raises(paramhub.errors.ParamhubError) as e:
        cc.push_state("st", bad(filled(cc, 1.0)))
    assert (e.value.code, e.value.reason) == (code, why)
    after, after_versions = cc.pull_state("st")
    assert after_versions == before_versions
    assert all(torch.equal(after[n], before_state[n]) for n in after)
    assert cc.describe_model("st").model.version == version
    # A stale expected_model_version: refused by the commit, nothing changes.
    before = dict(cc.rpc_counts)
    with pytest.raises(ConflictError) as c:
        cc.push_state("st", filled(cc, 2.0), expected_model_version=version - 1)
    assert c.value.reason == "VERSION_MISMATCH"
    assert calls(cc, before).get("CommitStagedState") == 1
    after, _ = cc.pull_state("st")
    assert all(torch.equal(after[n], before_state[n]) for n in after)
    # The refused pushes' parts were dropped or taken: a full push still fits the staging.
    cc.push_state("st", filled(cc, 3.0), expected_model_version=version)
    assert all(bool((t == 3).all()) for t in cc.pull_state("st")[0].values())


def test_routed_pulls_never_see_half_a_push(cc: paramhub.Client,
                                            cluster: ClusterProcs) -> None:
    """A writer pushes states filled with one value each (routed), while a reader's routed
    pulls must each hold one value and matching versions."""
    state_model(cc)
    cc.push_state("st", filled(cc, 0.0))
    stop = threading.Event()
    errors: list[BaseException] = []
    pushes = [0]

    def writer() -> None:
        try:
            with paramhub.connect(cluster.target, timeout=60) as w:
                template, _ = w.pull_state("st")
                for k in range(1, 30):
                    if stop.is_set():
                        break
                    w.push_state("st", {n: torch.full_like(t, k) for n, t in template.items()})
                    pushes[0] = k
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    seen = set()
    try:
        before = dict(cc.rpc_counts)
        for _ in range(25):
            state, versions = cc.pull_state("st")
            values = {float(v.flatten()[0]) for v in state.values()}
            assert all(bool((v == v.flatten()[0]).all()) for v in state.values())
            assert len(values) == 1, values  # one push's values, never two
            assert len(set(versions[n] for n in versions if not n.startswith("1.num"))) <= 2
            seen |= values
            if len(seen) > 3 and not t.is_alive():
                break
        assert "PullState" not in calls(cc, before)  # every pull was routed
    finally:
        stop.set()
        t.join(120)
    assert not errors, errors
    assert len(seen) > 1  # the pulls overlapped the pushes
