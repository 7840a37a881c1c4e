"""Remote training: remote autograd, server-side optimizers, parameter-server mode.

Everything runs against the real server on port 0 through the real SDK; worker tests start real
worker processes (tests/integration/_ps_worker.py).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramhub
from paramhub.errors import (AlreadyExistsError, ConflictError, InvalidArgumentError,
                             NotFoundError)

sys.path.insert(0, str(Path(__file__).parent))
from _ps_worker import batch  # noqa: E402

WORKER = Path(__file__).parent / "_ps_worker.py"


def seed_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def shared_net() -> nn.Module:
    """The seed's In[51]: one Linear used twice (its gradient sums both uses)."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                         nn.Linear(8, 1))


def grads_of(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in
            module.named_parameters()}


def values_of(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.fetch() for n, p in net.named_parameters()}


def assert_close_dicts(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            torch.testing.assert_close(a[k], b[k], **tol, msg=k)


# ---------------------------------------------------------------------------- remote autograd

@pytest.mark.parametrize("build,shape", [(seed_mlp, (5, 4)), (conv_net, (3, 1, 8, 8)),
                                         (shared_net, (5, 4))],
                         ids=["seed_mlp", "conv_net", "shared_net"])
def test_backward_gradients_match_local_autograd(client, build, shape) -> None:
    local = build()
    net = client.create_model("m", copy.deepcopy(local))
    torch.manual_seed(1)
    X = torch.randn(shape)
    y = torch.randn(local(X).shape)
    Xr = X.clone().requires_grad_(True)
    Xl = X.clone().requires_grad_(True)
    out = net(Xr)
    assert out.grad_fn is not None and out.requires_grad
    F.mse_loss(out, y).backward()
    F.mse_loss(local(Xl), y).backward()
    remote = {n: p.grad for n, p in net.named_parameters()}
    assert_close_dicts(remote, grads_of(local))
    torch.testing.assert_close(Xr.grad, Xl.grad)
    # A second backward accumulates, as in torch.
    F.mse_loss(net(X), y).backward()
    F.mse_loss(local(X), y).backward()
    assert_close_dicts({n: p.grad for n, p in net.named_parameters()}, grads_of(local))


def test_zero_grad_is_one_rpc_and_clears_like_torch(client) -> None:
    net = client.create_model("m", seed_mlp())
    net(torch.rand(2, 4)).sum().backward()
    assert net[0].weight.grad is not None
    before = client.rpc_counts.copy()
    net.zero_grad()
    assert client.rpc_counts - before == {"ZeroGrad": 1}
    assert all(p.grad is None for p in net.parameters())
    net(torch.rand(2, 4)).sum().backward()
    net[2].zero_grad(set_to_none=False)  # a submodule only, zero-filled
    assert torch.equal(net[2].weight.grad, torch.zeros(1, 8))
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_forward_without_grad_needs_is_a_plain_forward(client) -> None:
    net = client.create_model("m", seed_mlp())
    X = torch.rand(3, 4)
    before = client.rpc_counts.copy()
    with torch.no_grad():
        out = net(X)
    assert out.grad_fn is None and not out.requires_grad
    assert client.rpc_counts - before == {"Forward": 1}
    # Grad mode on: an autograd node, still one Forward and nothing kept on the server.
    out = net(X)
    assert out.grad_fn is not None
    assert client.rpc_counts - before == {"Forward": 2}
    assert net[0].weight.grad is None


def test_backward_replays_dropout_masks(client) -> None:
    torch.manual_seed(0)
    net = client.create_model("m", nn.Sequential(nn.Dropout(0.5)))
    X = torch.ones(64, 16, requires_grad=True)
    out = net(X)
    kept = out != 0
    assert 0 < kept.sum() < kept.numel()
    out.sum().backward()
    # The gradient is the mask the forward drew, scaled by 1 / (1 - p).
    assert torch.equal(X.grad, kept.float() * 2)


def test_backward_replays_dropout_after_a_mode_switch(client) -> None:
    # Which modules may draw is found once per tree; their modes are read on every pass.
    torch.manual_seed(0)
    net = client.create_model("m", nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5)))
    net.eval()
    X = torch.ones(64, 16, requires_grad=True)
    assert (net(X) != 0).all()  # eval: no mask (the pass was asked with a seed all the same)
    net.train()
    for _ in range(2):
        X.grad = None
        out = net(X)
        kept = out != 0
        assert 0 < kept.sum() < kept.numel()
        out.sum().backward()
        # The replayed pass drew the same mask: d(sum)/dX = (mask / (1 - p)) @ W.
        w = net[0].weight.fetch()
        torch.testing.assert_close(X.grad, (kept.float() * 2) @ w)


def test_backward_batchnorm_updates_running_stats_once(client) -> None:
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1))
    net = client.create_model("m", copy.deepcopy(local))
    X = torch.randn(8, 4)
    net(X).pow(2).mean().backward()
    local(X).pow(2).mean().backward()
    assert_close_dicts({n: p.grad for n, p in net.named_parameters()}, grads_of(local))
    torch.testing.assert_close(net[1].running_mean.fetch(), local[1].running_mean)
    assert net[1].num_batches_tracked.fetch().item() == 1


def test_backward_after_a_parameter_write_is_aborted(client) -> None:
    net = client.create_model("m", seed_mlp())
    out = net(torch.rand(2, 4))
    net[0].bias.data[0] = 1.0
    with pytest.raises(ConflictError) as e:
        out.sum().backward()
    assert e.value.code == "ABORTED" and e.value.reason == "PARAMETERS_CHANGED"
    assert all(p.grad is None for p in net.parameters())


def test_backward_bad_output_gradient_is_invalid_and_changes_nothing(client) -> None:
    net = client.create_model("m", seed_mlp())
    X = torch.rand(2, 4)
    _, version = client.forward_versioned("m", [X], {})
    for grads, reason in (([torch.ones(3, 1)], "BAD_SHAPE"), ([], "BAD_ARGUMENT")):
        with pytest.raises(InvalidArgumentError) as e:
            client.backward("m", [X], {}, grad_outputs=grads, grad_inputs=[],
                            forward_model_version=version)
        assert e.value.code == "INVALID_ARGUMENT" and e.value.reason == reason
    with pytest.raises(InvalidArgumentError) as e:
        client.backward("m", [X], {}, grad_outputs=[torch.ones(2, 1)], grad_inputs=[3],
                        forward_model_version=version)
    assert e.value.reason == "BAD_ARGUMENT"
    assert all(p.grad is None for p in net.parameters())


# ---------------------------------------------------------------------------- optimizers

OPTIMIZER_CASES = [
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99)}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5, "centered": True}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
]


@pytest.mark.parametrize("name,kwargs", OPTIMIZER_CASES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTIMIZER_CASES)])
def test_optimizer_step_matches_torch_optim_after_10_steps(client, name, kwargs) -> None:
    local = seed_mlp()
    net = client.create_model("m", copy.deepcopy(local))
    opt = getattr(paramhub.optim, name)(net.parameters(), **kwargs)
    lopt = getattr(torch.optim, name)(local.parameters(), **kwargs)
    for step in range(10):
        X, y = batch(0, step, 16)
        opt.zero_grad()
        F.mse_loss(net(X), y).backward()
        opt.step()
        lopt.zero_grad()
        F.mse_loss(local(X), y).backward()
        lopt.step()
    assert opt.steps == 10
    assert_close_dicts(values_of(net), {n: p.detach() for n, p in local.named_parameters()})
    # The state reads back in torch's layout and loads into a local optimizer.
    sd = opt.state_dict()
    ref = lopt.state_dict()
    assert sd["state"].keys() == ref["state"].keys()
    for i in ref["state"]:
        assert_close_dicts(sd["state"][i], ref["state"][i])
    fresh = getattr(torch.optim, name)(net.pull().parameters(), **kwargs)
    fresh.load_state_dict(sd)


def test_optimizer_param_groups_and_attach(client) -> None:
    local = seed_mlp()
    net = client.create_model("m", copy.deepcopy(local))
    groups = lambda m: [{"params": m[0].parameters(), "lr": 0.5},  # noqa: E731
                        {"params": m[2].parameters()}]
    opt = paramhub.optim.SGD(groups(net), lr=0.1, momentum=0.5)
    lopt = torch.optim.SGD(groups(local), lr=0.1, momentum=0.5)
    assert opt.created and [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    X, y = batch(0, 0, 8)
    F.mse_loss(net(X), y).backward()
    F.mse_loss(local(X), y).backward()
    opt.step()
    lopt.step()
    assert_close_dicts(values_of(net), {n: p.detach() for n, p in local.named_parameters()})
    # The same construction attaches (state kept); another process can look it up.
    again = paramhub.optim.SGD(groups(net), lr=0.1, momentum=0.5)
    assert not again.created and again.steps == 1
    found = paramhub.optim.get(paramhub.connect(client.target).model("m"))
    assert isinstance(found, paramhub.optim.SGD) and found.steps == 1


BAD_OPTIMIZERS = [
    ("LBFGS", {"lr": 0.1}, "BAD_OPTIMIZER"),
    ("__import__", {}, "BAD_OPTIMIZER"),
    ("SGD", {"lr": 0.1, "foreach": True}, "BAD_OPTIMIZER_ARGUMENT"),
    ("SGD", {"lr": "0.1"}, "BAD_OPTIMIZER_ARGUMENT"),
    ("SGD", {"lr": True}, "BAD_OPTIMIZER_ARGUMENT"),
    ("SGD", {"lr": -1.0}, "BAD_OPTIMIZER_ARGUMENT"),
    ("SGD", {"lr": 0.1, "nesterov": True}, "BAD_OPTIMIZER_ARGUMENT"),
    ("Adam", {"betas": (0.9,)}, "BAD_OPTIMIZER_ARGUMENT"),
    ("Adam", {"betas": (0.9, 1.5)}, "BAD_OPTIMIZER_ARGUMENT"),
    ("RMSprop", {"nesterov": True}, "BAD_OPTIMIZER_ARGUMENT"),
]


@pytest.mark.parametrize("name,kwargs,reason", BAD_OPTIMIZERS)
def test_create_optimizer_bad_arguments_change_nothing(client, name, kwargs, reason) -> None:
    net = client.create_model("m", seed_mlp())
    before = values_of(net)
    with pytest.raises(InvalidArgumentError) as e:
        client.create_optimizer("m", name, [([p.remote_name for p in net.parameters()], {})],
                                kwargs)
    assert e.value.code == "INVALID_ARGUMENT" and e.value.reason == reason
    with pytest.raises(NotFoundError) as nf:
        client.optimizer_step("m")
    assert nf.value.reason == "OPTIMIZER_NOT_FOUND"
    assert_close_dicts(values_of(net), before, rtol=0, atol=0)


def test_create_optimizer_conflicts_and_duplicates_change_nothing(client) -> None:
    net = client.create_model("m", seed_mlp())
    opt = paramhub.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.rand(2, 4)).sum().backward()
    opt.step()
    with pytest.raises(AlreadyExistsError) as e:
        paramhub.optim.Adam(net.parameters(), lr=0.1)
    assert e.value.reason == "OPTIMIZER_EXISTS"
    w = net[0].weight
    with pytest.raises(InvalidArgumentError) as e:
        paramhub.optim.SGD([{"params": [w]}, {"params": [w]}], lr=0.1, replace=True)
    assert e.value.reason == "DUPLICATE_PARAMETER"
    with pytest.raises(InvalidArgumentError) as e:
        paramhub.optim.SGD([torch.zeros(2)], lr=0.1)
    assert e.value.reason == "BAD_OPTIMIZER_ARGUMENT"
    kept = paramhub.optim.get(net)
    assert isinstance(kept, paramhub.optim.SGD) and kept.steps == 1
    assert kept.state_dict()["state"][0]["momentum_buffer"].shape == (8, 4)
    replaced = paramhub.optim.Adam(net.parameters(), lr=0.1, replace=True)
    assert replaced.created and replaced.state_dict()["state"] == {}


# ---------------------------------------------------------------------------- parameter server

def _run_workers(target: str, model_id: str, n: int, steps: int, size: int, tmp: Path
                 ) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), target, model_id, str(w), str(steps),
                               str(size), str(tmp / f"w{w}.json")], env=env)
             for w in range(n)]
    for p in procs:
        assert p.wait(timeout=240) == 0
    return [json.loads((tmp / f"w{w}.json").read_text()) for w in range(n)]


def test_sync_two_worker_processes_match_one_process_aggregated_steps(client, target,
                                                                      tmp_path) -> None:
    local = seed_mlp()
    net = client.create_model("ps", copy.deepcopy(local))
    paramhub.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.configure_training("sync", sync_workers=2)
    steps = 6
    results = _run_workers(target, "ps", 2, steps, 16, tmp_path)
    assert all(r["outcomes"] == ["applied"] * steps for r in results)
    lopt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        grads = []
        for w in range(2):
            local.zero_grad()
            x, y = batch(w, step, 16)
            F.mse_loss(local(x), y).backward()
            grads.append([p.grad.clone() for p in local.parameters()])
        for p, g0, g1 in zip(local.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        lopt.step()
    assert paramhub.optim.get(net).steps == steps
    assert_close_dicts(values_of(net), {n: p.detach() for n, p in local.named_parameters()},
                       rtol=1e-5, atol=1e-6)


def test_async_workers_converge_within_5_percent_of_local_training(client, target,
                                                                   tmp_path) -> None:
    local = seed_mlp()
    net = client.create_model("ps", copy.deepcopy(local))
    paramhub.optim.Adam(net.parameters(), lr=0.005)
    net.configure_training("async")
    workers, steps, size = 2, 150, 32
    results = _run_workers(target, "ps", workers, steps, size, tmp_path)
    assert all(o == "applied" for r in results for o in r["outcomes"])
    # Local training on the same samples (same batches, in step order), one step per batch.
    lopt = torch.optim.Adam(local.parameters(), lr=0.005)
    for step in range(steps):
        for w in range(workers):
            lopt.zero_grad()
            x, y = batch(w, step, size)
            F.mse_loss(local(x), y).backward()
            lopt.step()
    x_test, y_test = batch(99, 0, 2048)
    with torch.no_grad():
        remote_loss = F.mse_loss(net(x_test), y_test).item()
        local_loss = F.mse_loss(local(x_test), y_test).item()
        initial = F.mse_loss(seed_mlp()(x_test), y_test).item()
    print(f"async final loss {remote_loss:.5f}, local {local_loss:.5f}, initial {initial:.5f}")
    assert local_loss < initial / 5  # the task is learned
    assert abs(remote_loss - local_loss) <= 0.05 * local_loss


def _push_once(net: nn.Module, version: int, local: nn.Module, step: int) -> paramhub.PushResult:
    local.zero_grad()
    x, y = batch(0, step, 8)
    F.mse_loss(local(x), y).backward()
    return net.push_grads(local, version)


@pytest.mark.parametrize("policy", ["reject", "scale"])
def test_bounded_staleness_forced_old_version(client, policy) -> None:
    net = client.create_model("ps", seed_mlp())
    paramhub.optim.SGD(net.parameters(), lr=0.1)
    net.configure_training("bounded_staleness", max_staleness=1, stale_policy=policy)
    old_local, old_version = net.pull(return_version=True)
    for step in range(3):  # three steps from fresh pulls: staleness 0 each
        fresh, v = net.pull(return_version=True)
        r = _push_once(net, v, fresh, step)
        assert (r.outcome, r.staleness) == ("applied", 0)
    before = values_of(net)
    old_local.zero_grad()
    x, y = batch(0, 10, 8)
    F.mse_loss(old_local(x), y).backward()
    r = net.push_grads(old_local, old_version)
    assert r.staleness == 3
    after = values_of(net)
    if policy == "reject":
        assert r.outcome == "rejected" and not r.applied and r.steps == 3
        assert_close_dicts(after, before, rtol=0, atol=0)
    else:
        assert r.outcome == "scaled" and r.scale == pytest.approx(2 / 4)
        expected = {n: before[n] - 0.1 * 0.5 * p.grad for n, p in old_local.named_parameters()}
        assert_close_dicts(after, expected)


def test_sync_rejects_gradients_from_before_the_last_step_and_queues_on_deadline(client
                                                                                  ) -> None:
    net = client.create_model("ps", seed_mlp())
    paramhub.optim.SGD(net.parameters(), lr=0.1)
    net.configure_training("sync", sync_workers=1)
    stale_local, stale_version = net.pull(return_version=True)
    fresh, v = net.pull(return_version=True)
    assert _push_once(net, v, fresh, 0).outcome == "applied"
    before = values_of(net)
    r = _push_once(net, stale_version, stale_local, 1)
    assert (r.outcome, r.staleness) == ("rejected", 1)
    assert_close_dicts(values_of(net), before, rtol=0, atol=0)
    # Two workers per step but only one pushes: the call ends at its deadline, queued.
    net.configure_training("sync", sync_workers=2)
    fresh, v = net.pull(return_version=True)
    fresh.zero_grad()
    x, y = batch(0, 2, 8)
    F.mse_loss(fresh(x), y).backward()
    r = net.push_grads(fresh, v, timeout=0.5)
    assert r.outcome == "queued"
    assert_close_dicts(values_of(net), before, rtol=0, atol=0)


def test_push_grads_bad_input_changes_nothing(client) -> None:
    net = client.create_model("ps", seed_mlp())
    local, v = net.pull(return_version=True)
    grads = {n: torch.ones_like(p) for n, p in local.named_parameters()}
    with pytest.raises(NotFoundError) as e:
        net.push_grads(grads, v)
    assert e.value.reason == "OPTIMIZER_NOT_FOUND"
    paramhub.optim.SGD(net[0].parameters(), lr=0.1)  # the optimizer covers layer 0 only
    before = values_of(net)
    cases = [
        ({"0.weight": torch.ones(3, 3)}, v, InvalidArgumentError, "BAD_SHAPE"),
        ({"0.weight": torch.ones(8, 4, dtype=torch.int64)}, v, InvalidArgumentError,
         "BAD_DTYPE"),
        ({"2.weight": torch.ones(1, 8)}, v, InvalidArgumentError, "PARAMETER_NOT_OPTIMIZED"),
        ({"9.weight": torch.ones(1)}, v, NotFoundError, "TENSOR_NOT_FOUND"),
        ({"0.weight": torch.ones(8, 4)}, v + 5, InvalidArgumentError, "BAD_VERSION"),
    ]
    for g, version, cls, reason in cases:
        with pytest.raises(cls) as e:
            net.push_grads(g, version)
        assert e.value.reason == reason, reason
    with pytest.raises(InvalidArgumentError) as e:
        net.configure_training("sync", sync_workers=0)
    assert e.value.reason == "BAD_TRAINING_MODE"
    assert paramhub.optim.get(net).steps == 0
    assert_close_dicts(values_of(net), before, rtol=0, atol=0)


def test_pull_return_version_is_one_consistent_read(client) -> None:
    net = client.create_model("m", seed_mlp())
    net[0].weight.data[0, 0] = 7.0
    before = client.rpc_counts.copy()
    local, version = net.pull(return_version=True)
    assert client.rpc_counts - before == {"PullModel": 1}
    assert version == client.list_models()[0].version
    assert local[0].weight[0, 0].item() == 7.0
    same = net.pull(local)
    assert same is local and isinstance(net.pull(), nn.Module)
