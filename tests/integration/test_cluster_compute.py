"""Compute on sharded models over a 2-rank cluster (torchrun, gloo, 127.0.0.1), through the
unchanged SDK: Forward, remote autograd and server-side optimizers equal one local torch process;
version checks and bad inputs change nothing on any rank; optimizer state survives kill -9."""

from __future__ import annotations

import copy
import signal
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from _cluster import ClusterProcs
from _ps_worker import batch
from torch import nn

import paramhub
from paramhub.errors import ConflictError, InvalidArgumentError, NotFoundError

pytestmark = pytest.mark.timeout(600)
TOL = {"rtol": 1e-5, "atol": 1e-6}
MAX_MESSAGE_BYTES = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ClusterProcs]:
    procs = ClusterProcs(tmp_path_factory.mktemp("cluster") / "data", 2,
                         extra=("--max-message-bytes", str(MAX_MESSAGE_BYTES))).start()
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


def seed_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                      batch_first=True)


def shared_net() -> nn.Module:
    """One Linear used twice: its gradient sums both uses (gathered twice per pass)."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared,
                         nn.Linear(8, 1))


#: (model, input shape, a tensor-parallel plan of its Linears: Shard(0) and Shard(1) weights)
MODELS: list[tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, str]]] = [
    (seed_mlp, (5, 4), {"0": "colwise", "2": "rowwise"}),
    (conv_net, (3, 1, 8, 8), {"6": "rowwise"}),
    (encoder_layer, (2, 5, 8), {"linear1": "colwise", "linear2": "rowwise"}),
    (shared_net, (5, 4), {"0": "colwise", "2": "rowwise", "5": "rowwise"})]
IDS = ["seed_mlp", "conv_net", "encoder_layer", "shared_net"]
CASES = [(build, shape, shard) for build, shape, plan in MODELS for shard in ("fsdp", plan)]
CASE_IDS = [f"{i}-{'fsdp' if s == 'fsdp' else 'tp'}" for i in IDS for s in ("fsdp", "tp")]


def grads(net: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in net.named_parameters()}


def assert_close_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            torch.testing.assert_close(a[k], b[k], **TOL, msg=k)


def state(c: paramhub.Client, model: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every tensor's value (assembled from both ranks) and version."""
    values = {n: p.fetch() for n, p in c.model(model).state_dict().items()}
    versions = {t.name: t.version for t in c.describe_model(model).tensors}
    return values, versions


@pytest.mark.parametrize("build,shape,shard", CASES, ids=CASE_IDS)
def test_sharded_forward_and_backward_match_one_process(cc: paramhub.Client, build, shape,
                                                        shard) -> None:
    local = build()
    net = cc.create_model("m", copy.deepcopy(local), shard=shard)
    placements = {p for p, _ in cc.describe_placement("m").values()}
    assert placements & {"shard(0)", "shard(1)"}
    if shard != "fsdp":
        assert "shard(1)" in placements  # a rowwise weight: split along its columns
    torch.manual_seed(1)
    X = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(net(X), local(X), **TOL)
    y = torch.randn(local(X).shape)
    Xr, Xl = X.clone().requires_grad_(True), X.clone().requires_grad_(True)
    F.mse_loss(net(Xr), y).backward()
    F.mse_loss(local(Xl), y).backward()
    assert_close_dicts(grads(net), grads(local))
    torch.testing.assert_close(Xr.grad, Xl.grad, **TOL)
    # A second backward accumulates, as in torch; a gradient's slice reads like a value's.
    F.mse_loss(net(X), y).backward()
    F.mse_loss(local(X), y).backward()
    assert_close_dicts(grads(net), grads(local))
    name, p = next(iter(local.named_parameters()))
    torch.testing.assert_close(cc.get_tensor("m", name, (slice(1, 3),), grad=True)[0],
                               p.grad[1:3], **TOL)
    net.zero_grad()
    assert all(g is None for g in grads(net).values())


def test_sharded_zero_grad_of_a_submodule_fills_zeros(cc: paramhub.Client) -> None:
    net = cc.create_model("m", seed_mlp(), shard="fsdp")
    net(torch.rand(3, 4)).sum().backward()
    net[2].zero_grad(set_to_none=False)
    assert torch.equal(net[2].weight.grad, torch.zeros(1, 8))
    assert net[0].weight.grad.abs().sum() > 0


OPTIMIZERS = [("SGD", {"lr": 0.1, "momentum": 0.9}),
              ("Adam", {"lr": 0.01, "betas": (0.8, 0.99)})]


@pytest.mark.parametrize("shard", ["fsdp", {"0": "colwise", "2": "rowwise"}], ids=["fsdp", "tp"])
@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_sharded_optimizer_10_steps_match_torch_optim(cc: paramhub.Client, name, kwargs,
                                                      shard) -> None:
    local = seed_mlp()
    net = cc.create_model("m", copy.deepcopy(local), shard=shard)
    opt = getattr(paramhub.optim, name)(net.parameters(), **kwargs)
    lopt = getattr(torch.optim, name)(local.parameters(), **kwargs)
    version = cc.describe_model("m").model.version
    for step in range(10):
        X, y = batch(0, step, 16)
        opt.zero_grad()
        F.mse_loss(net(X), y).backward()
        opt.step()
        lopt.zero_grad()
        F.mse_loss(local(X), y).backward()
        lopt.step()
    assert opt.steps == 10
    assert cc.describe_model("m").model.version == version + 10  # one version per step
    assert_close_dicts({n: p.fetch() for n, p in net.named_parameters()},
                       {n: p.detach() for n, p in local.named_parameters()})
    sd, ref = opt.state_dict(), lopt.state_dict()
    assert sd["state"].keys() == ref["state"].keys()
    for i in ref["state"]:
        assert_close_dicts(sd["state"][i], ref["state"][i])


def test_backward_after_a_write_is_aborted_on_every_rank(cc: paramhub.Client) -> None:
    net = cc.create_model("m", seed_mlp(), shard="fsdp")
    out = net(torch.rand(2, 4))
    net[0].bias.data[7] = 1.0  # rank 1's row
    with pytest.raises(ConflictError) as e:
        out.sum().backward()
    assert e.value.code == "ABORTED" and e.value.reason == "PARAMETERS_CHANGED"
    assert all(g is None for g in grads(net).values())


def test_sharded_bad_inputs_change_nothing(cc: paramhub.Client) -> None:
    net = cc.create_model("m", seed_mlp(), shard="fsdp")
    before = state(cc, "m")
    with pytest.raises(InvalidArgumentError) as e:
        net(torch.rand(2, 5))  # wrong input shape
    assert e.value.reason == "BAD_INPUT"
    with pytest.raises(InvalidArgumentError) as e:
        net(torch.rand(2, 5)).sum().backward()
    assert e.value.reason == "BAD_INPUT"
    X = torch.rand(2, 4)
    _, version = cc.forward_versioned("m", [X], {})
    for outs, reason in (([torch.ones(3, 1)], "BAD_SHAPE"), ([], "BAD_ARGUMENT")):
        with pytest.raises(InvalidArgumentError) as e:
            cc.backward("m", [X], {}, grad_outputs=outs, grad_inputs=[],
                        forward_model_version=version)
        assert e.value.reason == reason
    with pytest.raises(ConflictError) as e:  # a stale version
        cc.backward("m", [X], {}, grad_outputs=[torch.ones(2, 1)], grad_inputs=[],
                    forward_model_version=version - 1)
    assert e.value.reason == "PARAMETERS_CHANGED"
    with pytest.raises(NotFoundError) as e:
        cc.optimizer_step("m")
    assert e.value.reason == "OPTIMIZER_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as e:
        paramhub.optim.SGD(net.parameters(), lr=-1.0)
    assert e.value.reason == "BAD_OPTIMIZER_ARGUMENT"
    with pytest.raises(NotFoundError) as e:
        cc.forward("m", X, module_path="7")
    assert e.value.reason == "MODULE_NOT_FOUND"
    after = state(cc, "m")
    assert after[1] == before[1]
    assert_close_dicts(after[0], before[0])
    assert all(g is None for g in grads(net).values())
    with pytest.raises(NotFoundError) as e:
        cc.get_optimizer_state("m")
    assert e.value.reason == "OPTIMIZER_NOT_FOUND"


def test_sharded_forward_output_over_the_message_limit_is_refused(cc: paramhub.Client
                                                                  ) -> None:
    net = cc.create_model("wide", nn.Sequential(nn.Linear(4, 512)), shard="fsdp")
    version = cc.describe_model("wide").model.version
    with torch.no_grad():
        assert net(torch.rand(10, 4)).shape == (10, 512)
        with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
            net(torch.rand(MAX_MESSAGE_BYTES // 2048 + 1, 4))  # > 1 MiB of float32 out
    assert e.value.reason == "MESSAGE_TOO_LARGE"
    assert cc.describe_model("wide").model.version == version


def test_sharded_optimizer_state_survives_kill_9(tmp_path) -> None:
    """3 Adam steps, kill -9 of the whole cluster, restart on the same data: 3 more steps
    equal 6 uninterrupted steps of torch.optim.Adam on one process."""
    local = seed_mlp()
    lopt = torch.optim.Adam(local.parameters(), lr=0.01)
    procs = ClusterProcs(tmp_path / "data", 2).start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.create_model("m", copy.deepcopy(local), shard="fsdp")
            opt = paramhub.optim.Adam(net.parameters(), lr=0.01)
            for step in range(3):
                X, y = batch(0, step, 16)
                opt.zero_grad()
                F.mse_loss(net(X), y).backward()
                opt.step()
            version = c.describe_model("m").model.version
    finally:
        procs.stop(signal.SIGKILL)
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.model("m")
            assert c.describe_model("m").model.version == version
            opt = paramhub.optim.Adam(net.parameters(), lr=0.01)  # attaches, state kept
            assert opt.steps == 3
            for step in range(3, 6):
                X, y = batch(0, step, 16)
                opt.zero_grad()
                F.mse_loss(net(X), y).backward()
                opt.step()
            for step in range(6):
                X, y = batch(0, step, 16)
                lopt.zero_grad()
                F.mse_loss(local(X), y).backward()
                lopt.step()
            assert_close_dicts({n: p.fetch() for n, p in net.named_parameters()},
                               {n: p.detach() for n, p in local.named_parameters()})
            sd = opt.state_dict()["state"]
            for i, ref in lopt.state_dict()["state"].items():
                assert_close_dicts(sd[i], ref)
    finally:
        procs.stop()


@pytest.mark.parametrize("rank0, rank1, committed", [
    # Rank 1 logged the step's commit, rank 0 died before: rank 0 applies its prepare.
    pytest.param("before-commit-log:3", "after-commit-log:3", True, id="committed"),
    # Rank 1 died after logging its prepare, before the vote: nobody committed the step.
    pytest.param(None, "after-prepare-log:3", False, id="not-committed"),
])
def test_a_step_in_doubt_is_resolved_with_its_optimizer_state(tmp_path, rank0, rank1,
                                                              committed) -> None:
    """A rank dies in the middle of the third step (a two-phase commit like a write's): after
    a restart the step is there on every rank with its optimizer state, or nowhere, and
    training goes on equal to torch.optim.Adam on one process."""
    local = seed_mlp()
    lopt = torch.optim.Adam(local.parameters(), lr=0.01)
    procs = ClusterProcs(tmp_path / "data", 2, launcher="direct")
    procs.rank_env = {r: {"PARAMHUB_CLUSTER_CRASH_AT": p}
                      for r, p in ((0, rank0), (1, rank1)) if p}
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.create_model("m", copy.deepcopy(local), shard="fsdp")
            opt = paramhub.optim.Adam(net.parameters(), lr=0.01)
            for step in range(3):
                X, y = batch(0, step, 16)
                opt.zero_grad()
                F.mse_loss(net(X), y).backward()
                if step < 2:
                    opt.step()
                else:
                    with pytest.raises(paramhub.errors.UnavailableError):
                        opt.step()
    finally:
        procs.stop(signal.SIGKILL)
    procs.rank_env = {}
    procs.start()
    try:
        with paramhub.connect(procs.target, timeout=60) as c:
            net = c.model("m")
            opt = paramhub.optim.Adam(net.parameters(), lr=0.01)
            done = 3 if committed else 2
            assert opt.steps == done
            assert c.describe_model("m").model.version == 1 + done
            for step in range(done, 5):
                X, y = batch(0, step, 16)
                opt.zero_grad()
                F.mse_loss(net(X), y).backward()
                opt.step()
            for step in range(5):
                X, y = batch(0, step, 16)
                lopt.zero_grad()
                F.mse_loss(local(X), y).backward()
                lopt.step()
            assert_close_dicts({n: p.fetch() for n, p in net.named_parameters()},
                               {n: p.detach() for n, p in local.named_parameters()})
            sd = opt.state_dict()["state"]
            for i, ref in lopt.state_dict()["state"].items():
                assert_close_dicts(sd[i], ref)
    finally:
        procs.stop()
