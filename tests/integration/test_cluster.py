"""A 2-rank paramhub cluster (torchrun, gloo, 127.0.0.1) serving sharded models through the
unchanged SDK: cluster info, placement, reads and writes against local torch, atomicity under
concurrent writers, the seed walkthrough, durability across a kill -9 restart, and RANK_DOWN."""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Iterator

import pytest
import torch
from _cluster import ClusterProcs, run_writers_and_readers
from test_seed_walkthrough import CELLS, run_cell, shown, tensors_in
from torch import nn

import paramhub
from paramhub.errors import (ConflictError, FailedPreconditionError, InvalidArgumentError,
                             OutOfRangeError, UnavailableError)

pytestmark = pytest.mark.timeout(600)
MAX_MODEL_BYTES = 3_000_000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ClusterProcs]:
    # Each rank may hold 3 MB of a model: the 4.2 MB model of the routed-read test fits only
    # because it is sharded.
    procs = ClusterProcs(tmp_path_factory.mktemp("cluster") / "data", 2,
                         extra=("--max-model-bytes", str(MAX_MODEL_BYTES))).start()
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture
def cc(cluster: ClusterProcs) -> Iterator[paramhub.Client]:
    """A client of the cluster's front door; the models it made are deleted after."""
    with paramhub.connect(cluster.target, timeout=60) as c:
        yield c
        for m in c.list_models():
            c.delete_model(m.name)


def make(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


def test_cluster_info_names_every_rank(cc: paramhub.Client, cluster: ClusterProcs) -> None:
    ranks = cc.cluster_info()
    assert [r.rank for r in ranks] == [0, 1]
    assert [r.address for r in ranks] == [cluster.address(0), cluster.address(1)]
    assert all(r.device == "cpu" and r.held_bytes == 0 for r in ranks)


def test_plain_server_is_a_cluster_of_one(client: paramhub.Client, target: str) -> None:
    (only,) = client.cluster_info()
    assert (only.rank, only.address, only.held_bytes) == (0, target, 0)
    with pytest.raises(FailedPreconditionError) as e:
        client.create_model("mlp", make(), shard="fsdp")
    assert e.value.reason == "NOT_A_CLUSTER"
    assert client.list_models() == []


def test_sharded_create_splits_rows_over_ranks(cc: paramhub.Client) -> None:
    local = make()
    net = cc.create_model("mlp", local, shard="fsdp")
    placement = cc.describe_placement("mlp")
    assert placement["0.weight"] == ("shard(0)", (0, 5, 10))
    assert placement["0.bias"] == ("shard(0)", (0, 5, 10))
    assert placement["2.weight"] == ("shard(0)", (0, 2, 3))
    assert placement["2.bias"] == ("shard(0)", (0, 2, 3))
    for (n, p), (ln, lp) in zip(net.named_parameters(), local.named_parameters(), strict=True):
        assert n == ln and torch.equal(p.fetch(), lp.detach())
    held = [r.held_bytes for r in cc.cluster_info()]
    total = sum(p.numel() * 4 for p in local.parameters())
    assert sum(held) == total and all(0 < h < total for h in held)
    X = torch.rand(4, 6)
    assert torch.allclose(net(X).detach(), local(X).detach())
    info = cc.describe_model("mlp")
    assert [t.name for t in info.tensors] == list(local.state_dict())
    # A tensor with fewer rows than ranks is replicated.
    cc.create_model("tiny", nn.Linear(4, 1), shard="fsdp")
    assert cc.describe_placement("tiny")["weight"] == ("replicate", ())
    assert cc.describe_placement("tiny")["bias"] == ("replicate", ())


def test_sharded_create_refusals_leave_nothing(cc: paramhub.Client) -> None:
    cc.create_model("mlp", make(), shard="fsdp")
    with pytest.raises(paramhub.errors.AlreadyExistsError):
        cc.create_model("mlp", make(), shard="fsdp")
    with pytest.raises(paramhub.errors.AlreadyExistsError):
        cc.create_model("mlp", make())  # a local twin of a sharded id
    with pytest.raises(InvalidArgumentError) as e:
        cc.create_model("other", make(), shard="rowwise-everything")
    assert e.value.reason == "BAD_SHARD"
    with pytest.raises(InvalidArgumentError) as e:
        cc.create_model("lazy", nn.Sequential(nn.LazyLinear(3)), shard="fsdp")
    assert e.value.reason == "NOT_SHARDABLE"
    assert sorted(m.name for m in cc.list_models()) == ["mlp"]


def test_sharded_writes_match_local_torch(cc: paramhub.Client) -> None:
    local = make()
    net = cc.create_model("mlp", local, shard="fsdp")
    w, lw = net[0].weight, local[0].weight.detach()
    steps = [
        lambda t: t.__setitem__((0, 0), 42.0),                         # rank 0 only
        lambda t: t.__setitem__((9, slice(None)), -1.0),               # rank 1 only
        lambda t: t.__setitem__((slice(3, 8), slice(1, 4)), 7.0),      # spans both ranks
        lambda t: t.__setitem__(slice(None, None, 3), torch.arange(6.0)),  # step, broadcast
        lambda t: t.__setitem__((torch.tensor([1, 8, 8]), torch.tensor([0, 5, 5])), 3.0),
        lambda t: t.__setitem__(t > 2.5, 0.5),                         # a boolean mask
        lambda t: t.__setitem__((..., 2), torch.linspace(0, 1, 10)),
    ]
    version = cc.describe_model("mlp").tensors[0].version
    for i, step in enumerate(steps):
        step(w.data)
        step(lw)
        assert torch.equal(w.fetch(), lw), i
        now = cc.describe_model("mlp").tensors[0].version
        assert now == version + 1, i
        version = now
    w.data[:] += 1
    lw += 1
    w.data[4:6] *= 2
    lw[4:6] *= 2
    assert torch.equal(w.fetch(), lw)
    assert torch.equal(w.data[2:9, 1:3], lw[2:9, 1:3])
    assert torch.equal(w.data[torch.tensor([9, 0])], lw[torch.tensor([9, 0])])


@pytest.mark.parametrize("bad, code, reason", [
    (lambda t: t.__setitem__((10, 0), 1.0), OutOfRangeError, "INDEX_OUT_OF_RANGE"),
    (lambda t: t.__setitem__(slice(0, 4), torch.ones(3, 6)), InvalidArgumentError, "BAD_SHAPE"),
    (lambda t: t.__setitem__((torch.tensor([0, 12]),), 1.0), OutOfRangeError,
     "INDEX_OUT_OF_RANGE"),
])
def test_sharded_bad_write_changes_nothing(cc: paramhub.Client, bad, code, reason) -> None:
    net = cc.create_model("mlp", make(), shard="fsdp")
    before = net[0].weight.fetch()
    version = cc.describe_model("mlp").model.version
    with pytest.raises(code) as e:
        bad(net[0].weight.data)
    assert e.value.reason == reason
    assert torch.equal(net[0].weight.fetch(), before)
    assert cc.describe_model("mlp").model.version == version


def test_sharded_expected_version_conflict(cc: paramhub.Client) -> None:
    cc.create_model("mlp", make(), shard="fsdp")
    v = cc.describe_model("mlp").tensors[0].version
    cc.set_slice("mlp", "0.weight", (slice(None),), torch.zeros(10, 6), expected_version=v)
    with pytest.raises(ConflictError) as e:
        cc.set_slice("mlp", "0.weight", (slice(None),), torch.ones(10, 6), expected_version=v)
    assert e.value.reason == "VERSION_MISMATCH"
    assert torch.equal(cc.get_tensor("mlp", "0.weight")[0], torch.zeros(10, 6))


def test_sharded_concurrent_writers_are_atomic(cc: paramhub.Client,
                                               cluster: ClusterProcs) -> None:
    """Writers fill the whole tensor (both ranks' rows) with one value, adders add 1 to a
    region spanning both ranks; readers must never see two values in the filled tensor, and
    no add is lost."""
    cc.create_model("mlp", make(), shard="fsdp")
    cc.set_slice("mlp", "0.weight", (), torch.zeros(10, 6))
    stop = threading.Event()
    torn: list[torch.Tensor] = []
    rounds = 15

    def filler(k: int) -> None:
        with paramhub.connect(cluster.target, timeout=60) as c:
            for i in range(rounds):
                c.set_slice("mlp", "0.bias", (), torch.full((10,), float(k * 100 + i)))

    def adder() -> None:
        with paramhub.connect(cluster.target, timeout=60) as c:
            for _ in range(rounds):
                c.set_slice("mlp", "0.weight", (slice(2, 8),), torch.ones(1), op="add")

    def reader() -> None:
        with paramhub.connect(cluster.target, timeout=60) as c:
            for _ in range(200):
                if stop.is_set():
                    return
                b = c.get_tensor("mlp", "0.bias")[0]
                if not torch.all(b == b[0]):
                    torn.append(b)

    errors = run_writers_and_readers(
        [functools.partial(filler, 0), functools.partial(filler, 1), adder, adder],
        [reader, reader], stop)
    assert not errors, errors
    assert not torn, torn[:2]
    w = cc.get_tensor("mlp", "0.weight")[0]
    assert torch.equal(w[2:8], torch.full((6, 6), float(2 * rounds)))
    assert torch.equal(w[:2], torch.zeros(2, 6)) and torch.equal(w[8:], torch.zeros(2, 6))


def test_seed_walkthrough_on_sharded_models(cc: paramhub.Client) -> None:
    """The seed walkthrough, unchanged except that MAKE serves each net sharded."""
    def make_local(name, build):
        torch.manual_seed(0)
        return build()

    def make_remote(name, build):
        torch.manual_seed(0)
        return cc.create_model(name, build(), shard="fsdp")

    local_ns = {"MAKE": make_local}
    remote_ns = {"MAKE": make_remote}
    for label, code in CELLS:
        torch.manual_seed(1234)
        local_out, local_val = run_cell(code, local_ns)
        torch.manual_seed(1234)
        remote_out, remote_val = run_cell(code, remote_ns)
        assert shown(remote_out, remote_val) == shown(local_out, local_val), label
        for a, b in zip(tensors_in(remote_val), tensors_in(local_val), strict=True):
            assert torch.equal(a, b), label
    for name in ("mlp", "rgnet", "shared"):
        assert cc.describe_placement(name)  # every walkthrough model is sharded
        assert any(p == "shard(0)" for p, _ in cc.describe_placement(name).values())


def test_sharded_model_survives_kill_9(tmp_path) -> None:
    """Every acknowledged write is on disk on every rank: after kill -9 of the whole cluster
    and a restart on the same data directory, the values and versions are there."""
    procs = ClusterProcs(tmp_path / "data", 2).start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            local = make(3)
            net = c.create_model("mlp", local, shard="fsdp")
            net[0].weight.data[1:9] += 5
            net[2].bias.data[0] = 11.0
            expected = {k: v.fetch() for k, v in net.state_dict().items()}
            versions = {t.name: t.version for t in c.describe_model("mlp").tensors}
            # A whole write of a 2 MiB weight outgrows each rank's log (folded into a new
            # snapshot); the write after it lives in the log again.
            big = c.create_model("big", nn.Linear(512, 1024), shard="fsdp")
            big.weight.data[:] = 2.0
            big.weight.data[1020:, :4] = 3.0
            big_expected = big.weight.fetch()
    finally:
        procs.stop(signal.SIGKILL)
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.model("mlp")
            for k, v in net.state_dict().items():
                assert torch.equal(v.fetch(), expected[k]), k
            assert {t.name: t.version for t in c.describe_model("mlp").tensors} == versions
            assert c.describe_placement("mlp")["0.weight"] == ("shard(0)", (0, 5, 10))
            assert torch.equal(c.model("big").weight.fetch(), big_expected)
            assert c.describe_model("big").tensors[0].version == 3
            net[0].weight.data[0, 0] = 1.5  # and it takes writes again
            assert net[0].weight.fetch()[0, 0].item() == 1.5
    finally:
        procs.stop()


def test_rank_down_answers_unavailable(tmp_path) -> None:
    """After a rank dies, calls that need it fail with UNAVAILABLE (RANK_DOWN, the rank
    named), not a hang; a model on rank 0 alone is still served."""
    procs = ClusterProcs(tmp_path / "data", 2, launcher="direct").start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            c.create_model("mlp", make(), shard="fsdp")
            c.create_model("here", make())  # not sharded: rank 0 only
            procs.kill(1)
            with pytest.raises(UnavailableError) as e:
                c.get_tensor("mlp", "0.weight")[0]
            assert e.value.reason == "RANK_DOWN"
            assert e.value.metadata["rank"] == "1"
            with pytest.raises(UnavailableError) as e:
                c.set_slice("mlp", "0.weight", (0, 0), torch.tensor(1.0))
            assert e.value.reason == "RANK_DOWN"
            assert torch.equal(c.get_tensor("here", "0.bias")[0], make()[0].bias.detach())
    finally:
        procs.stop(signal.SIGKILL)


def test_routed_read_fetches_parts_from_the_ranks(cc: paramhub.Client) -> None:
    """A big whole-tensor read of a sharded model is assembled from the ranks' parts (no
    GetTensor through the front door) and equals what the front door answers."""
    torch.manual_seed(5)
    local = nn.Linear(1024, 1024)  # a 4 MiB weight: routed; its 4 KiB bias is not
    assert sum(p.numel() * 4 for p in local.parameters()) > MAX_MODEL_BYTES
    net = cc.create_model("big", local, shard="fsdp")  # over one rank's limit, not a part's
    before = dict(cc.rpc_counts)
    w = net.weight.fetch()
    assert torch.equal(w, local.weight.detach())
    assert cc.rpc_counts.get("GetTensor", 0) == before.get("GetTensor", 0)
    assert cc.rpc_counts.get("GetTensorInline", 0) == before.get("GetTensorInline", 0)
    assert cc.rpc_counts["ReadShard"] - before.get("ReadShard", 0) == 2  # one per rank
    net.weight.data[1000:1024, :3] = 9.0  # rank 1's rows
    net.weight.data[0] = 1.0  # rank 0's
    expected = local.weight.detach().clone()
    expected[1000:1024, :3] = 9.0
    expected[0] = 1.0
    routed, version = cc.get_tensor("big", "weight")
    assert torch.equal(routed, expected)
    assert version == cc.describe_model("big").tensors[0].version
    # The same bytes through the front door (an index is never routed).
    front, _ = cc.get_tensor("big", "weight", (slice(None),))
    assert torch.equal(front, expected)
    # A big whole write (8 MiB of float64) goes to the owners (test_cluster_routed.py); with
    # an index it is streamed through the front door and written to both ranks.
    value = torch.randn(1024, 1024, dtype=torch.float64)
    before = dict(cc.rpc_counts)
    net.weight.data[0:1024] = value
    assert cc.rpc_counts["StreamSetSlice"] == before.get("StreamSetSlice", 0) + 1
    assert torch.equal(net.weight.fetch(), value.float())


def test_sharded_part_over_max_model_bytes_is_refused(cc: paramhub.Client) -> None:
    """--max-model-bytes bounds each rank's part: a model whose part on a rank is larger is
    refused (RESOURCE_EXHAUSTED, MODEL_TOO_LARGE), and nothing is created on any rank."""
    too_big = nn.Linear(2048, 1600)  # 13 MB: 6.5 MB per rank
    with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
        cc.create_model("huge", too_big, shard="fsdp")
    assert e.value.reason == "MODEL_TOO_LARGE"
    assert cc.list_models() == []
    assert [r.held_bytes for r in cc.cluster_info()] == [0, 0]


def test_cluster_service_needs_a_token_on_an_auth_server(settings, tmp_path) -> None:
    """ClusterService goes through the same pipeline as ParameterService: with --auth-file
    no token is UNAUTHENTICATED, a read token is enough."""
    import dataclasses

    from paramhub_server.app import build_server

    tokens = tmp_path / "tokens"
    tokens.write_text("read read-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    srv = build_server(dataclasses.replace(settings, auth_file=tokens))
    try:
        target = f"127.0.0.1:{srv.port}"
        with paramhub.connect(target, timeout=30) as c:
            with pytest.raises(paramhub.errors.AuthError) as e:
                c.cluster_info()
            assert e.value.code == "UNAUTHENTICATED"
        with paramhub.connect(target, timeout=30, token="read-token-0123456789abcdef") as c:
            assert [r.rank for r in c.cluster_info()] == [0]
    finally:
        srv.stop(grace=None)
