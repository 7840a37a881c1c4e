"""Batches, state pulls and pushes, watch, checkpoints and compaction on a sharded model of a
2-rank torchrun cluster, each checked against the same calls on a plain server's model: the
same values, the same version steps, the same events and errors; bad inputs change nothing on
any rank; readers never see half a batch or push; kill -9 keeps what was acknowledged."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _cluster import ClusterProcs
from torch import nn

import paramhub
from paramhub.common import pb
from paramhub.errors import (AlreadyExistsError, ConflictError, InvalidArgumentError,
                             NotFoundError, OutOfRangeError, UnavailableError)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ClusterProcs]:
    procs = ClusterProcs(tmp_path_factory.mktemp("cluster-state") / "data", 2).start()
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


def make(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def both(cc: paramhub.Client, client: paramhub.Client, name: str = "m",
         module: nn.Module | None = None) -> list[tuple[paramhub.Client, str]]:
    """The same model on the cluster (sharded) and on the plain server."""
    module = module if module is not None else make()
    cc.create_model(name, module, shard="fsdp")
    client.create_model(name, module)
    assert cc.describe_placement(name)["0.weight"][0] == "shard(0)"
    return [(cc, name), (client, name)]


def state(c: paramhub.Client, name: str) -> dict[str, torch.Tensor]:
    return {k: c.get_tensor(name, k)[0] for k in ("0.weight", "0.bias", "2.weight", "2.bias")}


def versions(c: paramhub.Client, name: str) -> tuple[int, dict[str, int]]:
    return c.model_version(name), {t.name: t.version for t in c.describe_model(name).tensors}


def held(c: paramhub.Client) -> list[int]:
    return [r.held_bytes for r in c.cluster_info()]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def step(before: tuple[int, dict[str, int]], after: tuple[int, dict[str, int]]
         ) -> tuple[int, dict[str, int]]:
    """How a write moved the versions (model step, per tensor step)."""
    return after[0] - before[0], {k: after[1][k] - before[1][k] for k in after[1]}


# ------------------------------------------------------------------------------- ApplyBatch


def test_batch_on_sharded_model_matches_plain(cc, client) -> None:
    out = []
    for c, name in both(cc, client):
        before = versions(c, name)
        with c.batch(name) as b:
            c.set_slice(name, "0.weight", (slice(2, 9), slice(None)), 1.5, "add")  # both ranks
            b.set_slice("0.weight", (slice(0, 7), 0), torch.arange(7.0), "mul")  # sees the add
            b.apply_init("zeros_", [pb.InitTarget(glob="*.bias")])
            b.assign("2.weight", torch.full((3, 10), 4.0))
        out.append((state(c, name), step(before, versions(c, name)), b.updated))
    (s_state, s_step, s_updated), (p_state, p_step, p_updated) = out
    assert_same(s_state, p_state)
    assert s_step == p_step and s_step[0] == 1
    assert list(s_updated) == list(p_updated)
    assert {k: v - 1 for k, v in s_updated.items()} == p_updated  # sharded versions start at 1


@pytest.mark.parametrize("bad,code,reason", [
    (lambda b: b.set_slice("0.weight", (slice(0, 10), 99), 1.0), OutOfRangeError, None),
    (lambda b: b.set_slice("0.weight", (slice(0, 10),), torch.ones(3, 6)),
     InvalidArgumentError, "BAD_SHAPE"),
    (lambda b: b.set_slice("nope", None, 1.0), NotFoundError, "TENSOR_NOT_FOUND"),
    (lambda b: b.set_slice("0.weight", None, 1.0, expected_version=77), ConflictError,
     "VERSION_MISMATCH"),
    (lambda b: b.apply_init("no_such_", [pb.InitTarget(glob="*")]),
     InvalidArgumentError, None),
])
def test_bad_batch_changes_nothing_on_any_rank(cc, client, bad, code, reason) -> None:
    for c, name in both(cc, client):
        before_state, before_v = state(c, name), versions(c, name)
        with pytest.raises(code) as e:
            with c.batch(name) as b:
                b.set_slice("0.weight", (slice(0, 10), 0), 9.0)  # rows on both ranks: fine
                bad(b)
        if reason:
            assert e.value.reason == reason
        assert_same(state(c, name), before_state)
        assert versions(c, name) == before_v
    # Each rank's part itself is untouched (the routed read fetches them from the ranks).
    parts = cc.get_tensor("m", "0.weight")[0]
    assert not torch.any(parts[:, 0] == 9.0)


def test_batch_expected_model_version_and_retry(cc) -> None:
    cc.create_model("m", make(), shard="fsdp")
    mv = cc.model_version("m")
    with pytest.raises(ConflictError) as e:
        with cc.batch("m", expected_model_version=mv + 1) as b:
            b.assign("0.bias", torch.ones(10))
    assert e.value.reason == "VERSION_MISMATCH"
    with cc.batch("m", expected_model_version=mv, request_id="once") as b:
        b.set_slice("0.bias", None, 1.0, "add")
    with cc.batch("m", request_id="once") as again:  # a retry: applied once
        again.set_slice("0.bias", None, 1.0, "add")
    assert again.model_version == b.model_version == mv + 1
    assert torch.equal(cc.get_tensor("m", "0.bias")[0], make()[0].bias.detach() + 1)


# ------------------------------------------------------------------------ PullState / PushState


def test_pull_and_push_state_match_plain(cc, client) -> None:
    new = {k: torch.randn(v.shape) for k, v in make().state_dict().items()}
    new["0.weight"] = new["0.weight"].double()  # cast to the model's dtype, as load_state_dict
    out = []
    for c, name in both(cc, client):
        pulled, pv = c.pull_state(name)
        sub, _ = c.pull_state(name, glob="0.*")
        assert list(sub) == ["0.weight", "0.bias"]
        before = versions(c, name)
        parts_before = held(c)
        pushed = c.push_state(name, {k: new[k] for k in ("0.weight", "2.bias")})
        after = versions(c, name)
        assert held(c) == parts_before  # each rank keeps only its part
        out.append((pulled, step(before, after), list(pushed), c.pull_state(name)[0]))
    (s_pulled, s_step, s_pushed, s_after), (p_pulled, p_step, p_pushed, p_after) = out
    assert_same(s_pulled, p_pulled)
    assert s_step == p_step and s_step[0] == 1
    assert s_pushed == p_pushed
    assert_same(s_after, p_after)
    assert torch.equal(s_after["0.weight"], new["0.weight"].float())


@pytest.mark.parametrize("bad,code,reason", [
    ({"0.weight": torch.ones(9, 6)}, InvalidArgumentError, "BAD_SHAPE"),
    ({"nope": torch.ones(2)}, NotFoundError, "TENSOR_NOT_FOUND"),
    ({"0.bias": torch.ones(10, dtype=torch.complex64)}, InvalidArgumentError, "BAD_DTYPE"),
])
def test_bad_push_changes_nothing_on_any_rank(cc, client, bad, code, reason) -> None:
    for c, name in both(cc, client):
        before_state, before_v = state(c, name), versions(c, name)
        with pytest.raises(code) as e:
            c.push_state(name, {"2.bias": torch.zeros(3), **bad})
        assert e.value.reason == reason
        assert_same(state(c, name), before_state)
        assert versions(c, name) == before_v


def test_push_expected_model_version(cc) -> None:
    cc.create_model("m", make(), shard="fsdp")
    mv = cc.model_version("m")
    with pytest.raises(ConflictError):
        cc.push_state("m", {"0.bias": torch.ones(10)}, expected_model_version=mv - 1)
    assert cc.model_version("m") == mv
    cc.push_state("m", {"0.bias": torch.ones(10)}, expected_model_version=mv)
    assert cc.model_version("m") == mv + 1


def test_readers_never_see_half_a_push_or_batch(cc, cluster) -> None:
    """Two writers fill the whole model with one value per write (pushes and batches); two
    readers pull the whole state and check that every element of every tensor holds one
    value. Bounded: 20 writes each, readers until the writers are done (at most 120 s)."""
    cc.create_model("m", nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 40)), shard="fsdp")
    names = list(cc.pull_state("m")[0])
    shapes = {k: v.shape for k, v in cc.pull_state("m")[0].items()}
    done = threading.Event()
    errors: list[BaseException] = []
    seen: set[float] = set()
    target = cluster.target

    def writer(kind: str, base: float) -> None:
        try:
            with paramhub.connect(target, timeout=60) as c:
                for i in range(20):
                    v = base + i
                    if kind == "push":
                        c.push_state("m", {k: torch.full(shapes[k], v) for k in names})
                    else:
                        with c.batch("m") as b:
                            for k in names:
                                b.assign(k, torch.full(shapes[k], v))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def reader() -> None:
        try:
            with paramhub.connect(target, timeout=60) as c:
                deadline = time.monotonic() + 120
                while not done.is_set() and time.monotonic() < deadline:
                    got, _ = c.pull_state("m")
                    values = torch.cat([t.reshape(-1) for t in got.values()]).unique()
                    assert values.numel() == 1, values[:5]
                    seen.add(values.item())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    cc.push_state("m", {k: torch.zeros(shapes[k]) for k in names})
    writers = [threading.Thread(target=writer, args=("push", 100.0)),
               threading.Thread(target=writer, args=("batch", 1000.0))]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in writers + readers:
        t.start()
    for t in writers:
        t.join(300)
    done.set()
    for t in readers:
        t.join(300)
    assert not errors, errors[0]
    assert len(seen) > 1  # the readers did see writes land
    assert cc.model_version("m") == 2 + 40 + 0  # created at 1, one push, 40 writes


def test_tied_and_replicated_tensors_match_plain(cc, client) -> None:
    """A tied weight (one storage, two names) and a replicated tensor (too few rows to split):
    pulls, pushes (for tied names pushed twice the last value wins), batches and a checkpoint
    round trip give what a plain model gives."""
    torch.manual_seed(5)
    shared = nn.Linear(4, 4)
    module = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 1))
    out = []
    for c, name in both(cc, client, "t", module):
        got: list[Any] = [c.pull_state(name)[0]]
        c.create_checkpoint(name, "start")
        pushed = c.push_state(name, {"0.weight": torch.ones(4, 4), "2.weight": torch.eye(4),
                                     "3.bias": torch.tensor([7.0])})
        got.append(c.pull_state(name)[0])
        with c.batch(name) as b:
            b.set_slice("2.weight", (slice(1, 3),), 2.0, "add")
            b.set_slice("3.weight", None, 3.0)
        got.append(c.pull_state(name)[0])
        c.restore_checkpoint(name, "start")
        got.append(c.pull_state(name)[0])
        out.append((got, list(pushed), list(b.updated)))
    assert cc.describe_placement("t")["3.bias"][0] == "replicate"
    for s_got, p_got in zip(out[0][0], out[1][0], strict=True):
        assert_same(s_got, p_got)
    assert out[0][1:] == out[1][1:]
    assert torch.equal(out[0][0][1]["0.weight"], torch.eye(4))


# -------------------------------------------------------------------------------- WatchModel


def _events(c: paramhub.Client, name: str, writes: Any, count: int) -> list[Any]:
    events: list[Any] = []
    started = threading.Event()
    got = threading.Event()

    def on_event(ev: Any) -> None:
        events.append(ev)
        if ev.kind == "started":
            started.set()
        if len(events) == count + 1:
            got.set()

    w = c.watch(name, on_event)
    try:
        assert started.wait(30)
        writes(c, name)
        assert got.wait(60), events
    finally:
        w.close()
        w.join(30)
    return events


def test_watch_on_sharded_model_matches_plain(cc, client, cluster) -> None:
    def writes(c: paramhub.Client, name: str) -> None:
        c.set_slice(name, "0.weight", (slice(3, 8), 1), 2.0, "add")
        c.apply_init(name, "zeros_", [pb.InitTarget(glob="*.bias")])
        with c.batch(name) as b:
            b.assign("2.weight", torch.ones(3, 10))
            b.set_slice("0.weight", (0, 0), 5.0)
        c.push_state(name, {"2.bias": torch.ones(3)})
        c.create_checkpoint(name, "ck")
        c.restore_checkpoint(name, "ck")
        for i in range(30):  # in order, none lost
            c.set_slice(name, "0.bias", (i % 10,), 1.0, "add")
        net = c.model(name)
        opt = paramhub.optim.SGD(net.parameters(), lr=0.1)
        net(torch.ones(2, 6)).sum().backward()
        opt.step()

    out = []
    for c, name in both(cc, client):
        evs = _events(c, name, writes, 36)
        v0 = evs[0].model_version
        out.append([(e.kind, e.model_version - v0, e.op,
                     [ch.name for ch in e.changes]) for e in evs])
    assert out[0][:6] == out[1][:6]
    assert out[0] == out[1]


def test_watch_ends_when_the_sharded_model_is_deleted(cc) -> None:
    with pytest.raises(NotFoundError):
        next(iter(cc.watch("missing")))
    cc.create_model("m", make(), shard="fsdp")
    kinds: list[str] = []
    w = cc.watch("m", lambda ev: kinds.append(ev.kind))
    deadline = time.monotonic() + 30
    while not kinds and time.monotonic() < deadline:
        time.sleep(0.05)
    cc.delete_model("m")
    w.join(30)  # the stream ends by itself (the handler checks every 5 s)
    try:
        assert w._thread is not None and not w._thread.is_alive()
        assert kinds == ["started"]
    finally:
        w.close()


# ------------------------------------------------------------------ checkpoints, compaction


def test_checkpoints_on_sharded_model_match_plain(cc, client) -> None:
    out = []
    for c, name in both(cc, client):
        original = state(c, name)
        info = c.create_checkpoint(name, "before")
        assert info.model_version == c.model_version(name) and info.num_bytes > 0
        c.set_slice(name, "0.weight", None, 3.0)
        c.push_state(name, {"2.bias": torch.ones(3)})
        with pytest.raises(AlreadyExistsError) as e:
            c.create_checkpoint(name, "before")
        assert e.value.reason == "CHECKPOINT_EXISTS"
        with pytest.raises(InvalidArgumentError) as e:
            c.create_checkpoint(name, "../x")
        assert e.value.reason == "BAD_CHECKPOINT_NAME"
        c.create_checkpoint(name, "after")
        assert [x.name for x in c.list_checkpoints(name)] == ["before", "after"]
        before_v = versions(c, name)
        with pytest.raises(NotFoundError) as e:
            c.restore_checkpoint(name, "missing")
        assert e.value.reason == "CHECKPOINT_NOT_FOUND"
        with pytest.raises(ConflictError):
            c.restore_checkpoint(name, "before", expected_model_version=before_v[0] - 1)
        assert versions(c, name) == before_v
        r = c.restore_checkpoint(name, "before")
        assert r.model_version == before_v[0] + 1
        assert_same(state(c, name), original)
        after_v = versions(c, name)
        c.delete_checkpoint(name, "before")
        with pytest.raises(NotFoundError):
            c.delete_checkpoint(name, "before")
        assert [x.name for x in c.list_checkpoints(name)] == ["after"]
        c.restore_checkpoint(name, "after")
        folded = c.compact(name)
        assert folded.model_version == c.model_version(name)
        assert_same(state(c, name), {**original, "0.weight": torch.full((10, 6), 3.0),
                                     "2.bias": torch.ones(3)})
        out.append((step(before_v, after_v), [t.name for t in r.updated]))
    assert out[0] == out[1]


def test_export_checkpoint_of_sharded_model_matches_plain(cc, client, tmp_path) -> None:
    """ExportCheckpoint of a sharded model (a checkpoint, or the current values) is the same
    plain safetensors state_dict a plain model exports."""
    from safetensors.torch import load_file

    files = []
    for c, name in both(cc, client):
        c.create_checkpoint(name, "ck")
        c.set_slice(name, "0.weight", None, 2.0)
        files.append((c.export_checkpoint(name, tmp_path / f"{id(c)}-ck.safetensors", "ck"),
                      c.export_checkpoint(name, tmp_path / f"{id(c)}-now.safetensors")))
        with pytest.raises(NotFoundError) as e:
            c.export_checkpoint(name, tmp_path / "x", "missing")
        assert e.value.reason == "CHECKPOINT_NOT_FOUND"
    for s_file, p_file in zip(files[0], files[1], strict=True):
        assert_same(load_file(s_file), load_file(p_file))
    assert torch.equal(load_file(files[0][1])["0.weight"], torch.full((10, 6), 2.0))
    assert torch.equal(load_file(files[0][0])["0.weight"], make()[0].weight.detach())


# ---------------------------------------------------------------------------- kill -9 (last)


def test_acknowledged_state_survives_kill_9(cluster) -> None:
    """Pushes, batches, restores and checkpoints acknowledged before a kill -9 of every rank
    are there after a restart on the same directories."""
    with paramhub.connect(cluster.target, timeout=60) as c:
        c.create_model("k", make(), shard="fsdp")
        c.push_state("k", {"0.weight": torch.full((10, 6), 2.0)})
        c.create_checkpoint("k", "two")
        with c.batch("k") as b:
            b.set_slice("0.weight", (slice(4, 10),), 1.0, "add")
            b.assign("2.bias", torch.ones(3))
        c.compact("k")
        c.set_slice("k", "0.bias", None, 7.0)  # in the log after the compaction
        c.push_state("k", {"2.weight": torch.full((3, 10), 5.0)})  # the last write
        expected, ev = state(c, "k"), versions(c, "k")
        c.create_model("r", make(1), shard="fsdp")
        c.create_checkpoint("r", "start")
        c.set_slice("r", "0.weight", None, 0.0)
        c.restore_checkpoint("r", "start")  # the last write
        restored, rv = state(c, "r"), versions(c, "r")
        checkpoints = [(x.name, x.model_version) for x in c.list_checkpoints("k")]
    cluster.stop(signal.SIGKILL)
    cluster.start()
    with paramhub.connect(cluster.target, timeout=60) as c:
        assert_same(state(c, "k"), expected)
        assert versions(c, "k") == ev
        assert [(x.name, x.model_version) for x in c.list_checkpoints("k")] == checkpoints
        assert_same(state(c, "r"), restored)
        assert versions(c, "r") == rv
        c.delete_model("r")
        c.restore_checkpoint("k", "two")
        assert torch.equal(c.get_tensor("k", "0.weight")[0], torch.full((10, 6), 2.0))
        c.delete_model("k")


def test_push_in_doubt_is_resolved_at_restart(tmp_path) -> None:
    """A push that one rank committed (logged) and the other did not (it died before logging
    its commit) is applied on both ranks at restart: the push's parts are logged as a prepare
    and a commit like any write (crash points: PARAMHUB_CLUSTER_CRASH_AT)."""
    procs = ClusterProcs(tmp_path / "data", 2, launcher="direct")
    procs.rank_env = {0: {"PARAMHUB_CLUSTER_CRASH_AT": "before-commit-log:1"},
                      1: {"PARAMHUB_CLUSTER_CRASH_AT": "after-commit-log:1"}}
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            c.create_model("p", make(), shard="fsdp")
            with pytest.raises(UnavailableError):
                c.push_state("p", {"0.weight": torch.full((10, 6), 4.0)})
        assert procs.wait_exit(60)[0] == 17  # rank 0 died at its crash point
    finally:
        procs.stop(signal.SIGKILL)
    procs.rank_env = {}
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            assert [m.name for m in c.list_models()] == ["p"]  # served, not left out
            assert torch.equal(c.get_tensor("p", "0.weight")[0], torch.full((10, 6), 4.0))
            assert c.model_version("p") == 2
            c.push_state("p", {"0.weight": torch.zeros(10, 6)})  # and it takes pushes again
            assert c.model_version("p") == 3
    finally:
        procs.stop()

