"""DTensors in and out: a 2-rank torch.distributed client job (gloo, 127.0.0.1; processes of
tests/integration/_dtensor_job.py) reads its own regions of a served model under Shard(0),
Shard(1) and Replicate layouts, and pushes a Shard(0) state as one model version; a push with
a wrong shape changes nothing. Against a plain server and a 2-rank cluster's sharded model
(reads, pushes and bad pushes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _cluster import ClusterProcs, free_port
from torch import nn

import paramhub

pytestmark = pytest.mark.timeout(600)
JOB = Path(__file__).with_name("_dtensor_job.py")
#: Seconds a 2-rank job may take (torch import, process group, the calls).
JOB_TIMEOUT_S = 300


def run_job(target: str, model: str, scenario: str) -> list[dict]:
    """Runs the 2-rank job; every rank's RESULT, rank order. Fails the test if a rank failed."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(JOB), target, model, scenario],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=JOB_TIMEOUT_S)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    results = []
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    return results


def make() -> nn.Module:
    torch.manual_seed(0)
    # Odd sizes: torch's chunk layout gives the two ranks unequal rows and columns.
    return nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ClusterProcs]:
    procs = ClusterProcs(tmp_path_factory.mktemp("cluster") / "data", 2).start()
    try:
        yield procs
    finally:
        procs.stop()


def check_pull(c: paramhub.Client, target: str, model: str) -> None:
    results = run_job(target, model, "pull")
    # 2 two-dim tensors x 3 layouts + 2 biases x 2 layouts, on each rank; one version.
    assert [r["checked"] for r in results] == [10, 10]
    assert results[0]["version"] == results[1]["version"] == c.model_version(model)


def test_get_dtensor_and_pull_dtensors_read_each_rank_region(client: paramhub.Client,
                                                             target: str) -> None:
    client.create_model("net", make())
    check_pull(client, target, "net")


def test_push_dtensors_writes_one_version(client: paramhub.Client, target: str) -> None:
    client.create_model("net", make())
    before = client.model_version("net")
    full, _ = client.pull_state("net")
    results = run_job(target, "net", "push")
    assert results[0]["versions"] == results[1]["versions"]
    assert client.model_version("net") == before + 1
    after, _ = client.pull_state("net")
    g = torch.Generator().manual_seed(1000)  # the job's values (see _dtensor_job.new_state)
    for name, t in full.items():
        assert torch.equal(after[name], torch.randn(t.shape, generator=g, dtype=t.dtype)), name


def test_bad_push_dtensors_changes_nothing(client: paramhub.Client, target: str) -> None:
    client.create_model("net", make())
    before = client.model_version("net")
    full, _ = client.pull_state("net")
    results = run_job(target, "net", "badpush")
    # Every rank raises the same error, not only the one that sent the state.
    assert [(r["error"], r["reason"]) for r in results] == [
        ("InvalidArgumentError", "BAD_SHAPE")] * 2
    assert client.model_version("net") == before
    after, _ = client.pull_state("net")
    assert all(torch.equal(after[n], full[n]) for n in full)


def test_dtensors_out_of_a_sharded_model_on_a_cluster(cluster: ClusterProcs) -> None:
    with paramhub.connect(cluster.target, timeout=60) as c:
        c.create_model("net", make(), shard="fsdp")
        try:
            check_pull(c, cluster.target, "net")
        finally:
            c.delete_model("net")


def test_push_dtensors_into_a_sharded_model_on_a_cluster(cluster: ClusterProcs) -> None:
    """The job's Shard(0) state lands as one version of the cluster's sharded model (each
    server rank keeping its rows); a bad push changes nothing on any rank."""
    with paramhub.connect(cluster.target, timeout=60) as c:
        c.create_model("net", make(), shard="fsdp")
        try:
            assert c.describe_placement("net")["0.weight"][0] == "shard(0)"
            before = c.model_version("net")
            full, _ = c.pull_state("net")
            results = run_job(cluster.target, "net", "badpush")
            assert [(r["error"], r["reason"]) for r in results] == [
                ("InvalidArgumentError", "BAD_SHAPE")] * 2
            assert c.model_version("net") == before
            assert all(torch.equal(c.get_tensor("net", n)[0], full[n]) for n in full)
            results = run_job(cluster.target, "net", "push")
            assert results[0]["versions"] == results[1]["versions"]
            assert c.model_version("net") == before + 1
            after, _ = c.pull_state("net")
            g = torch.Generator().manual_seed(1000)  # the job's values (_dtensor_job.new_state)
            for name, t in full.items():
                want = torch.randn(t.shape, generator=g, dtype=t.dtype)
                assert torch.equal(after[name], want), name
                assert torch.equal(c.get_tensor("net", name)[0], want), name
        finally:
            c.delete_model("net")


def test_pull_dtensors_under_concurrent_writes_is_one_version(client: paramhub.Client,
                                                                target: str) -> None:
    client.create_model("net", make())
    names = list(client.pull_state("net")[0])
    shapes = {n: t.shape for n, t in client.pull_state("net")[0].items()}
    stop = threading.Event()
    written = [0]

    def writer() -> None:  # bounded: stops with the job or after 3000 writes
        for k in range(1, 3001):
            if stop.is_set():
                return
            client.push_state("net", {n: torch.full(shapes[n], float(k)) for n in names})
            written[0] = k
            time.sleep(0.2)

    t = threading.Thread(target=writer)
    t.start()
    try:
        results = run_job(target, "net", "torn")
    finally:
        stop.set()
        t.join(60)
    assert written[0] > 1
    # Every pull that returned held one value in every tensor on both ranks (checked in the
    # job); the job saw the model move on.
    assert all(r["distinct"] >= 1 for r in results), results


def test_weight_sync_example_checks_every_version(client: paramhub.Client, target: str) -> None:
    example = Path(__file__).parents[2] / "examples" / "weight_sync.py"
    done = subprocess.run([sys.executable, str(example), "--target", target, "--steps", "3",
                           "--hidden", "16"], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [ln for ln in done.stdout.splitlines() if ln.startswith("step")] == [
        f"step {k}: model version {k}, 4 tensors ok" for k in (1, 2, 3)]
    # One model version per published step: create is version 0 here.
    assert client.model_version("weight-sync") == 3
