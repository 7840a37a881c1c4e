"""Tensor-parallel plans on a 2-rank paramhub cluster (torchrun, gloo, 127.0.0.1): placements
as torch's ColwiseParallel / RowwiseParallel make them, reads and writes of Shard(1) tensors
against local torch, atomicity across ranks, routed reads, the seed walkthrough, bad plans,
and durability across a kill -9 restart."""

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
from paramhub.errors import InvalidArgumentError, OutOfRangeError

pytestmark = pytest.mark.timeout(600)

#: The plans the seed walkthrough's models are served with.
WALKTHROUGH_PLANS = {
    "mlp": {"0": "colwise", "2": "rowwise"},
    "rgnet": {"0.*.0": "colwise", "0.*.2": "rowwise", "1": "rowwise"},
    "shared": {"0": "colwise", "2": "rowwise", "6": "rowwise"},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ClusterProcs]:
    procs = ClusterProcs(tmp_path_factory.mktemp("cluster-tp") / "data", 2).start()
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
    """colwise Linear(6, 10) -> rowwise Linear(10, 6): the rowwise weight is (6, 10),
    Shard(1): columns 0-4 on rank 0, 5-9 on rank 1."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 6))


PLAN = {"0": "colwise", "2": "rowwise"}


def test_plan_places_tensors_like_torch(cc: paramhub.Client) -> None:
    local = make()
    net = cc.create_model("mlp", local, shard=PLAN)
    placement = cc.describe_placement("mlp")
    assert placement == {"0.weight": ("shard(0)", (0, 5, 10)), "0.bias": ("shard(0)", (0, 5, 10)),
                         "2.weight": ("shard(1)", (0, 5, 10)), "2.bias": ("replicate", ())}
    for (n, p), (ln, lp) in zip(net.named_parameters(), local.named_parameters(), strict=True):
        assert n == ln and torch.equal(p.fetch(), lp.detach())
    # Each rank holds its part only: half of each sharded tensor, all of the replicated bias.
    part = (5 * 6 + 5 + 6 * 5 + 6) * 4
    assert [r.held_bytes for r in cc.cluster_info()] == [part, part]
    X = torch.rand(4, 6)
    assert torch.allclose(net(X).detach(), local(X).detach())
    # Embeddings (colwise: Shard(1); rowwise: Shard(0)), an uneven split, a dim too small.
    torch.manual_seed(1)
    emb = nn.Sequential(nn.Embedding(9, 5), nn.Embedding(5, 4), nn.Linear(4, 7),
                        nn.Linear(7, 1))
    cc.create_model("emb", emb, shard={"0": "colwise", "1": "rowwise", "2": "rowwise",
                                       "3": "colwise"})
    got = cc.describe_placement("emb")
    assert got["0.weight"] == ("shard(1)", (0, 3, 5))  # 5 columns: 3 + 2, as torch.chunk
    assert got["1.weight"] == ("shard(0)", (0, 3, 5))
    assert got["2.weight"] == ("shard(1)", (0, 2, 4))
    assert got["3.weight"] == ("replicate", ()) and got["3.weight"].note == \
        "dim 0 has 1 < 2 ranks: replicated"
    assert got["0.weight"].note == ""
    remote = cc.model("emb")
    idx = torch.tensor([[0, 8, 3]])
    assert torch.allclose(remote[0](idx).detach(), emb[0](idx).detach())
    for n, t in emb.state_dict().items():
        assert torch.equal(cc.get_tensor("emb", n)[0], t), n


def test_shard1_reads_and_writes_match_local_torch(cc: paramhub.Client) -> None:
    local = make()
    net = cc.create_model("mlp", local, shard=PLAN)
    w, lw = net[2].weight, local[2].weight.detach()  # (6, 10), Shard(1)
    steps = [
        lambda t: t.__setitem__((0, 0), 42.0),                         # rank 0 only
        lambda t: t.__setitem__((slice(None), 9), -1.0),               # rank 1 only
        lambda t: t.__setitem__((slice(1, 5), slice(3, 8)), 7.0),      # spans both ranks
        lambda t: t.__setitem__((slice(None), slice(None, None, 3)), torch.arange(6.0)[:, None]),
        lambda t: t.__setitem__((torch.tensor([1, 4, 4]), torch.tensor([0, 8, 8])), 3.0),
        lambda t: t.__setitem__(t > 2.5, 0.5),                         # a boolean mask
        lambda t: t.__setitem__((..., 2), torch.linspace(0, 1, 6)),
        lambda t: t.__setitem__(slice(2, 4), torch.arange(10.0)),      # whole rows: both ranks
    ]
    version = cc.describe_model("mlp").tensors[2].version
    for i, step in enumerate(steps):
        step(w.data)
        step(lw)
        assert torch.equal(w.fetch(), lw), i
        now = cc.describe_model("mlp").tensors[2].version
        assert now == version + 1, i
        version = now
    w.data[:] += 1
    lw += 1
    w.data[:, 4:6] *= 2
    lw[:, 4:6] *= 2
    w.data[1] -= torch.arange(10.0)
    lw[1] -= torch.arange(10.0)
    assert torch.equal(w.fetch(), lw)
    for index in [(slice(None), slice(3, 7)), (slice(2, 5), 6), (..., -1), (lw > 1,),
                  (torch.tensor([5, 0]), torch.tensor([9, 1])), (slice(None, None, 2),)]:
        assert torch.equal(cc.get_tensor("mlp", "2.weight", index)[0], lw[index]), index
    # Inits draw the whole tensor on rank 0, exactly as local torch would.
    torch.manual_seed(7)
    nn.init.normal_(w)
    torch.manual_seed(7)
    nn.init.normal_(lw)
    assert torch.equal(w.fetch(), lw)


def test_box_writes_match_local_torch(cc: paramhub.Client) -> None:
    """Writes of boxes of step-1 slices (staged as runs of a rank's part where they are one,
    by ids elsewhere) on Shard(0), Shard(1) and replicated tensors with uneven splits, every
    op, broadcast values and two writes of one tensor in a batch, against local torch."""
    torch.manual_seed(3)
    # colwise Linear(5, 7): weight (7, 5) Shard(0) split 4 + 3; rowwise Linear(7, 3): weight
    # (3, 7) Shard(1) split 4 + 3, bias (3,) replicated.
    local = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    cc.create_model("box", local, shard={"0": "colwise", "1": "rowwise"})
    boxes = [(), (slice(None),), (slice(0, 4),), (slice(3, 5),), (slice(4, None),),
             (slice(-2, None),), (slice(1, 2),), (slice(2, 6), slice(None)), (slice(5, 3),),
             (slice(None), slice(1, 3)), (slice(1, 2), slice(2, 6)), (slice(0, 100),)]
    want = {n: t.detach().clone() for n, t in local.state_dict().items()}
    for k, index in enumerate(boxes):
        for name in ("0.weight", "1.weight", "1.bias", "0.bias"):
            t = want[name]
            if len(index) > t.dim():
                continue
            region = t[index]
            for op, value in [("assign", torch.arange(float(region.numel())).view(region.shape)
                               + 10 * k),
                              ("add", torch.tensor(1.5)), ("mul", torch.full(region.shape[-1:],
                                                                             -2.0))]:
                cc.set_slice("box", name, index, value, op=op)
                with torch.no_grad():
                    if op == "assign":
                        t[index] = value
                    elif op == "add":
                        t[index] += value
                    else:
                        t[index] *= value
                assert torch.equal(cc.get_tensor("box", name)[0], t), (name, index, op)
    with cc.batch("box") as b:
        b.set_slice("0.weight", (slice(2, 6),), torch.tensor(9.0))
        b.set_slice("0.weight", (slice(3, 5),), torch.tensor(1.0), "add")
        b.set_slice("1.weight", (), torch.tensor(0.5), "mul")
    want["0.weight"][2:6] = 9.0
    want["0.weight"][3:5] += 1.0
    want["1.weight"] *= 0.5
    for name, t in want.items():
        assert torch.equal(cc.get_tensor("box", name)[0], t), name


@pytest.mark.parametrize("bad, code, reason", [
    (lambda t: t.__setitem__((0, 10), 1.0), OutOfRangeError, "INDEX_OUT_OF_RANGE"),
    (lambda t: t.__setitem__((slice(None), slice(0, 4)), torch.ones(6, 3)),
     InvalidArgumentError, "BAD_SHAPE"),
])
def test_shard1_bad_write_changes_nothing(cc: paramhub.Client, bad, code, reason) -> None:
    net = cc.create_model("mlp", make(), shard=PLAN)
    before = net[2].weight.fetch()
    version = cc.describe_model("mlp").model.version
    with pytest.raises(code) as e:
        bad(net[2].weight.data)
    assert e.value.reason == reason
    assert torch.equal(net[2].weight.fetch(), before)
    assert cc.describe_model("mlp").model.version == version


def test_shard1_bad_reads_are_refused(cc: paramhub.Client) -> None:
    """A mask of the wrong shape or an index out of range is refused on every rank alike
    (the cluster keeps serving), as local torch refuses it."""
    local = make()
    net = cc.create_model("mlp", local, shard=PLAN)
    with pytest.raises(InvalidArgumentError):
        cc.get_tensor("mlp", "2.weight", (torch.ones(3, dtype=torch.bool),))
    with pytest.raises(OutOfRangeError):
        cc.get_tensor("mlp", "2.weight", (slice(None), 10))
    with pytest.raises(OutOfRangeError):
        cc.get_tensor("mlp", "2.weight", (slice(None), torch.tensor([0, 10])))
    assert torch.equal(net[2].weight.fetch(), local[2].weight.detach())


def test_shard1_concurrent_writers_are_atomic(cc: paramhub.Client,
                                              cluster: ClusterProcs) -> None:
    """Fillers write one value over the whole Shard(1) weight (both ranks' columns), adders
    add 1 to columns spanning both ranks; readers never see two values, no add is lost."""
    cc.create_model("mlp", make(), shard=PLAN)
    cc.set_slice("mlp", "2.weight", (), torch.zeros(6, 10))
    cc.set_slice("mlp", "0.weight", (), torch.zeros(10, 6))
    stop = threading.Event()
    torn: list[torch.Tensor] = []
    rounds = 12

    def filler(k: int) -> None:
        with paramhub.connect(cluster.target, timeout=60) as c:
            for i in range(rounds):
                c.set_slice("mlp", "2.weight", (), torch.full((6, 10), float(k * 100 + i)))

    def adder() -> None:
        with paramhub.connect(cluster.target, timeout=60) as c:
            for _ in range(rounds):
                c.set_slice("mlp", "0.weight", (slice(2, 8),), torch.ones(1), op="add")

    def reader() -> None:
        with paramhub.connect(cluster.target, timeout=60) as c:
            for _ in range(150):
                if stop.is_set():
                    return
                w = c.get_tensor("mlp", "2.weight")[0]
                if not torch.all(w == w[0, 0]):
                    torn.append(w)

    errors = run_writers_and_readers(
        [functools.partial(filler, 0), functools.partial(filler, 1), adder, adder],
        [reader, reader], stop)
    assert not errors, errors
    assert not torn, torn[:2]
    w = cc.get_tensor("mlp", "0.weight")[0]
    assert torch.equal(w[2:8], torch.full((6, 6), float(2 * rounds)))
    assert torch.equal(w[:2], torch.zeros(2, 6)) and torch.equal(w[8:], torch.zeros(2, 6))


def test_routed_read_and_write_of_a_shard1_tensor(cc: paramhub.Client) -> None:
    """A big whole read of a Shard(1) tensor is assembled from both ranks' column blocks
    (ReadShard, nothing through GetTensor) and equals the tensor; a big whole write sends
    each rank its columns (StageShard) and commits them as one write."""
    torch.manual_seed(5)
    local = nn.Linear(1000, 520)  # rowwise: a (520, 1000) weight, 2 MiB, split 500 + 500
    net = cc.create_model("big", nn.Sequential(local), shard={"0": "rowwise"})
    assert cc.describe_placement("big")["0.weight"] == ("shard(1)", (0, 500, 1000))
    net[0].weight.data[:, 998:] = 9.0  # rank 1's columns
    net[0].weight.data[3, :2] = 1.0  # rank 0's
    expected = local.weight.detach().clone()
    expected[:, 998:] = 9.0
    expected[3, :2] = 1.0
    before = dict(cc.rpc_counts)
    routed, version = cc.get_tensor("big", "0.weight")
    assert torch.equal(routed, expected)
    assert cc.rpc_counts["ReadShard"] - before.get("ReadShard", 0) == 2  # one per rank
    assert cc.rpc_counts.get("GetTensor", 0) == before.get("GetTensor", 0)
    assert version == cc.describe_model("big").tensors[0].version
    front, _ = cc.get_tensor("big", "0.weight", (slice(None),))
    assert torch.equal(front, expected)
    # A big whole write goes straight to the owners too: each is sent its columns.
    value = torch.randn(520, 1000)
    before = dict(cc.rpc_counts)
    net[0].weight.data[:] = value
    counts = {k: cc.rpc_counts.get(k, 0) - before.get(k, 0) for k in cc.rpc_counts}
    assert counts.get("StageShard") == 2 and counts.get("CommitStagedWrite") == 1
    assert not counts.get("SetSlice") and not counts.get("StreamSetSlice")
    assert torch.equal(net[0].weight.fetch(), value)
    assert cc.describe_model("big").tensors[0].version == version + 1


def test_training_batches_state_and_checkpoints_on_shard1(cc: paramhub.Client) -> None:
    """What the other sharded-model features do on Shard(0) they do on a plan's Shard(1)
    tensors: backward and an optimizer step equal local torch, a batch spanning both ranks'
    columns is one version, pull/push of state and a checkpoint restore round-trip."""
    import copy

    import torch.nn.functional as F

    local = make(2)
    net = cc.create_model("mlp", copy.deepcopy(local), shard=PLAN)
    opt = paramhub.optim.Adam(net.parameters(), lr=0.01)
    lopt = torch.optim.Adam(local.parameters(), lr=0.01)
    torch.manual_seed(3)
    for _ in range(3):
        X, y = torch.randn(8, 6), torch.randn(8, 6)
        opt.zero_grad()
        F.mse_loss(net(X), y).backward()
        opt.step()
        lopt.zero_grad()
        F.mse_loss(local(X), y).backward()
        lopt.step()
    for n, p in local.named_parameters():
        torch.testing.assert_close(cc.get_tensor("mlp", n)[0], p.detach(), rtol=1e-5,
                                   atol=1e-6, msg=n)
    lw = cc.get_tensor("mlp", "2.weight")[0]
    version = cc.describe_model("mlp").model.version
    with cc.batch("mlp") as b:
        b.set_slice("2.weight", (slice(None), slice(3, 8)), torch.tensor(2.0), "add")
        b.set_slice("2.weight", (0, slice(None)), torch.arange(10.0))
    lw[:, 3:8] += 2.0
    lw[0] = torch.arange(10.0)
    assert torch.equal(cc.get_tensor("mlp", "2.weight")[0], lw)
    assert cc.describe_model("mlp").model.version == version + 1
    pulled, _ = cc.pull_state("mlp")
    assert torch.equal(pulled["2.weight"], lw)
    cc.create_checkpoint("mlp", "ck")
    cc.push_state("mlp", {"2.weight": torch.ones(6, 10)})
    assert torch.equal(net[2].weight.fetch(), torch.ones(6, 10))
    cc.restore_checkpoint("mlp", "ck")
    assert torch.equal(net[2].weight.fetch(), lw)
    assert cc.describe_placement("mlp")["2.weight"] == ("shard(1)", (0, 5, 10))


def test_seed_walkthrough_on_tensor_parallel_models(cc: paramhub.Client) -> None:
    """The seed walkthrough, unchanged except that MAKE serves each net with a colwise /
    rowwise plan."""
    def make_local(name, build):
        torch.manual_seed(0)
        return build()

    def make_remote(name, build):
        torch.manual_seed(0)
        return cc.create_model(name, build(), shard=WALKTHROUGH_PLANS[name])

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
    assert cc.describe_placement("mlp")["2.weight"] == ("shard(1)", (0, 4, 8))
    assert cc.describe_placement("rgnet")["0.block3.2.weight"] == ("shard(1)", (0, 4, 8))
    assert cc.describe_placement("rgnet")["0.block3.0.weight"] == ("shard(0)", (0, 4, 8))
    shared = cc.describe_placement("shared")
    assert shared["2.weight"] == shared["4.weight"] == ("shard(1)", (0, 4, 8))


@pytest.mark.parametrize("plan, words", [
    ({"7": "colwise"}, "does not have"),
    ({"layers.*.w1": "colwise"}, "does not have"),
    ({"1": "colwise"}, "ReLU"),
    ({"0": "sequence_parallel"}, "unknown tensor-parallel style"),
    ({"0": "colwise", "2": "colwise", "4": "rowwise"}, "tied"),
    ("rowwise-everything", "unknown sharding plan"),
    ({f"layer{i}": "colwise" for i in range(400)}, "more than 7000"),  # refused by the SDK
    (["0", "colwise"], "mapping"),
])
def test_bad_plans_create_nothing(cc: paramhub.Client, plan, words) -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), shared, nn.ReLU(), shared)
    with pytest.raises(InvalidArgumentError) as e:
        cc.create_model("bad", model, shard=plan)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.reason == "BAD_SHARD"
    assert words in str(e.value)
    assert cc.list_models() == []
    assert [r.held_bytes for r in cc.cluster_info()] == [0, 0]


def test_tensor_parallel_model_survives_kill_9(tmp_path) -> None:
    """Acknowledged writes of a tensor-parallel model (Shard(0) and Shard(1) tensors) and its
    placements are back after kill -9 of the whole cluster and a restart."""
    procs = ClusterProcs(tmp_path / "data", 2).start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.create_model("mlp", make(3), shard=PLAN)
            net[2].weight.data[:, 3:8] += 5  # spans both ranks' columns
            net[2].weight.data[0, 9] = 11.0
            net[0].bias.data[7] = -2.0
            expected = {k: v.fetch() for k, v in net.state_dict().items()}
            versions = {t.name: t.version for t in c.describe_model("mlp").tensors}
            placement = c.describe_placement("mlp")
    finally:
        procs.stop(signal.SIGKILL)
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.model("mlp")
            for k, v in net.state_dict().items():
                assert torch.equal(v.fetch(), expected[k]), k
            assert {t.name: t.version for t in c.describe_model("mlp").tensors} == versions
            assert c.describe_placement("mlp") == placement
            assert placement["2.weight"] == ("shard(1)", (0, 5, 10))
            net[2].weight.data[5, 5] = 1.5  # and it takes writes again
            assert net[2].weight.fetch()[5, 5].item() == 1.5
    finally:
        procs.stop()
