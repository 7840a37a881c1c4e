"""Crashes of a 2-rank cluster in the middle of a write (test-only crash points,
PARAMHUB_CLUSTER_CRASH_AT), and restarts: the ranks resolve the write left in doubt together,
so every rank agrees and the model is served, with nothing acknowledged lost; and torchrun's
own restarts (--max-restarts) after kill -9 of a rank."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from _cluster import START_TIMEOUT_S, ClusterProcs, _kill, ready
from torch import nn

import paramhub
from paramhub.errors import UnavailableError

pytestmark = pytest.mark.timeout(600)

CRASH_ENV = "PARAMHUB_CLUSTER_CRASH_AT"


def make(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


@pytest.mark.parametrize("rank0, rank1, applied, told", [
    # Rank 1 logged the commit, rank 0 died before logging it: rank 0 applies its prepare.
    pytest.param("before-commit-log:3", "after-commit-log:3", True, "committed by another rank",
                 id="rank1-committed"),
    # The other way round: rank 1 applies its prepare.
    pytest.param("after-commit-log:3", "before-commit-log:3", True, "committed by another rank",
                 id="rank0-committed"),
    # Rank 1 died after logging its prepare, before the vote: nobody committed, both drop it.
    pytest.param(None, "after-prepare-log:3", False, "committed by no rank", id="none-committed"),
])
def test_write_in_doubt_is_resolved_at_restart(tmp_path, rank0, rank1, applied, told) -> None:
    procs = ClusterProcs(tmp_path / "data", 2, launcher="direct")
    procs.rank_env = {r: {CRASH_ENV: p} for r, p in ((0, rank0), (1, rank1)) if p}
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.create_model("mlp", make(3), shard="fsdp")
            w = net[0].weight  # 10 rows: 5 on each rank
            w.data[:] = 1.0  # write 1: model version 2
            net[2].bias.data[:] += 1.0  # write 2: version 3 (the other layer)
            acked = {k: v.fetch() for k, v in net.state_dict().items()}
            versions = {t.name: t.version for t in c.describe_model("mlp").tensors}
            # Write 3 spans both ranks; a rank dies in the middle of it.
            with pytest.raises(UnavailableError):
                c.set_slice("mlp", "0.weight", (slice(None),), torch.tensor(7.0))
        if rank0 is not None:
            assert procs.wait_exit(60)[0] == 17  # rank 0 died at its crash point
    finally:
        procs.stop(signal.SIGKILL)
    procs.rank_env = {}
    procs.start()  # the same data directories, no crash points
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            assert [m.name for m in c.list_models()] == ["mlp"]  # served, not left out
            net = c.model("mlp")
            expected = dict(acked)
            if applied:
                expected["0.weight"] = torch.full((10, 6), 7.0)
                versions["0.weight"] += 1
            for k, v in net.state_dict().items():
                assert torch.equal(v.fetch(), expected[k]), k
            assert {t.name: t.version for t in c.describe_model("mlp").tensors} == versions
            assert c.describe_model("mlp").model.version == (4 if applied else 3)
            # Both ranks hold the same version: a routed read takes one part from each.
            assert torch.equal(c.get_tensor("mlp", "0.weight")[0], expected["0.weight"])
            net[0].weight.data[9, 0] = 5.0  # and it takes writes again
            assert net[0].weight.fetch()[9, 0].item() == 5.0
            assert c.describe_model("mlp").model.version == (5 if applied else 4)
        assert told in procs.tail(10**7)  # the in-doubt write was resolved, not skipped
    finally:
        procs.stop()
    # The resolution was logged: a second restart needs no resolving and agrees again.
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            assert c.model("mlp")[0].weight.fetch()[9, 0].item() == 5.0
            assert c.describe_model("mlp").model.version == (5 if applied else 4)
    finally:
        procs.stop()


def test_torchrun_max_restarts_brings_the_cluster_back(tmp_path) -> None:
    """Under `torchrun --max-restarts 1`, kill -9 of rank 1 makes torchrun restart both ranks;
    the new attempt forms a cluster again (bounded wait) and every acknowledged write is
    there."""
    procs = ClusterProcs(tmp_path / "data", 2, torchrun_args=("--max-restarts", "1")).start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.create_model("mlp", make(4), shard="fsdp")
            net[0].weight.data[:] = 3.0
            net[2].bias.data[1] = -1.0
            acked = {k: v.fetch() for k, v in net.state_dict().items()}
            versions = {t.name: t.version for t in c.describe_model("mlp").tensors}
            old = [procs.rank_pid(r) for r in range(2)]
            assert None not in old
            os.kill(old[1], signal.SIGKILL)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                now = [procs.rank_pid(r) for r in range(2)]
                if (all(p is not None and p not in old for p in now)
                        and all(ready(procs.address(r)) for r in range(2))):
                    break
                assert procs.procs[0].poll() is None, procs.tail()  # torchrun gave up
                time.sleep(0.5)
            else:
                pytest.fail(f"the cluster did not come back; log:\n{procs.tail()}")
            net = c.model("mlp")
            for k, v in net.state_dict().items():
                assert torch.equal(v.fetch(), acked[k]), k
            assert {t.name: t.version for t in c.describe_model("mlp").tensors} == versions
            net[0].weight.data[9] = 8.0  # rank 1's rows: the new attempt takes writes
            assert torch.equal(net[0].weight.fetch()[9], torch.full((6,), 8.0))
    finally:
        procs.stop()


def test_routed_write_to_a_dead_rank_answers_rank_down(tmp_path) -> None:
    """A routed write whose owner is gone falls back to the front door, which answers
    UNAVAILABLE / RANK_DOWN naming the rank (no hang), and rank 0's part is not changed."""
    procs = ClusterProcs(tmp_path / "data", 2, launcher="direct").start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.create_model("big", nn.Linear(1024, 1024), shard="fsdp")
            before = net.weight.fetch()
            procs.kill(1)
            counts = dict(c.rpc_counts)
            with pytest.raises(UnavailableError) as e:
                net.weight.data[:] = torch.randn(1024, 1024)
            assert (e.value.reason, e.value.metadata["rank"]) == ("RANK_DOWN", "1")
            # The owners were tried first, then the front door.
            assert c.rpc_counts["StageShard"] > counts.get("StageShard", 0)
            assert c.rpc_counts.get("CommitStagedWrite", 0) == 0
            front = ("SetSlice", "StreamSetSlice")
            assert sum(c.rpc_counts.get(k, 0) - counts.get(k, 0) for k in front) == 1
        procs.stop(signal.SIGKILL)
        procs.start()  # and nothing of the write is anywhere
        with paramhub.connect(procs.target, timeout=60) as c:
            assert torch.equal(c.model("big").weight.fetch(), before)
    finally:
        procs.stop(signal.SIGKILL)


def test_ranks_stop_when_their_torchrun_agent_is_killed(tmp_path) -> None:
    """torchrun starts its workers in sessions of their own: a SIGKILL of the agent alone
    must not leave ranks serving (and holding the data directories) without it."""
    procs = ClusterProcs(tmp_path / "data", 2).start()
    workers = procs._workers()
    try:
        assert sorted(workers) == [0, 1]
        os.kill(procs.procs[0].pid, signal.SIGKILL)  # the agent only
        procs.procs[0].wait(timeout=30)
        deadline = time.monotonic() + 60
        alive = list(workers.values())
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [pid for pid in alive if _alive(pid)]
        assert alive == [], "ranks still running without their agent"
    finally:
        _kill(list(workers.values()))
        procs.stop(signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie re-parented to init counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
