"""The nn.Module mirror: what torch users do with a local module, done on a served one."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from torch import nn

import paramhub
from paramhub import ConflictError, InvalidArgumentError, NotFoundError, OutOfRangeError
from paramhub.errors import FailedPreconditionError


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


@pytest.fixture
def pair(client):
    torch.manual_seed(0)
    local = mlp()
    return client.create_model("mlp", local), local


def test_mirror_structure_and_metadata(pair):
    net, local = pair
    assert repr(net) == repr(local)
    assert type(net[0]) is nn.Linear and isinstance(net[0].weight, nn.Parameter)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in local.named_parameters()]
    assert net[0].weight.shape == (8, 4) and net[0].weight.dtype == torch.float32
    served_on = torch.device(net.paramhub_client.describe_model("mlp").model.device)
    assert net[0].weight.device == served_on and net[0].weight.requires_grad
    assert paramhub.is_remote(net) and paramhub.is_remote(net[0])
    assert list(net.state_dict()) == list(local.state_dict())
    assert repr(net[0:2]) == repr(local[0:2])


def test_mirror_reads_match_local(pair):
    net, local = pair
    assert repr(net[0].weight) == repr(local[0].weight)
    assert repr(net[0].weight.data[1:3, ::2]) == repr(local[0].weight.data[1:3, ::2])
    mask = local[0].weight.data > 0
    assert torch.equal(net[0].weight.data[mask], local[0].weight.data[mask])
    assert torch.equal(net[0].weight.data[torch.tensor([0, 3])], local[0].weight.data[[0, 3]])
    assert torch.equal(net[0].weight.data.t()[1], local[0].weight.data.t()[1])
    assert torch.equal(net[0].weight + 1, local[0].weight.detach() + 1)
    assert torch.equal(net[0].weight.abs().sum(), local[0].weight.detach().abs().sum())
    assert net[2].weight.grad is None
    X = torch.rand(3, 4)
    assert torch.allclose(net(X), local(X).detach()) and torch.allclose(net[0](X), local[0](X))


@pytest.mark.parametrize("edit", [
    lambda w: w.__setitem__((0, 0), 42),
    lambda w: w.__setitem__((slice(None), 1), torch.arange(8.0)),
    lambda w: w[1:3].__iadd__(1),
    lambda w: w[:, ::2].__imul__(-2),
    lambda w: w.__isub__(0.5),
    lambda w: w.__itruediv__(4),
    lambda w: w.copy_(torch.ones(8, 4)),
    lambda w: w.fill_(3),
    lambda w: w.zero_(),
    lambda w: w.clamp_(-0.1, 0.1),
    lambda w: w.t().__setitem__((1, 2), 9),
    lambda w: w[0].__setitem__(1, 7),
    lambda w: w.__setitem__(w.abs() > 0.2, 0),
    lambda w: w.view(-1).__setitem__(slice(0, 5), 5),
    lambda w: w.add_(torch.ones(4), alpha=2),
])
def test_mirror_in_place_edits_match_local(pair, edit):
    net, local = pair
    edit(net[0].weight.data)
    edit(local[0].weight.data)
    assert torch.equal(net[0].weight.fetch(), local[0].weight.detach())


def test_mirror_augmented_slice_assignment_writes_once(pair, client):
    net, local = pair
    before = client.rpc_counts["SetSlice"]
    net[0].weight.data[:] += 1
    assert client.rpc_counts["SetSlice"] - before == 1
    local[0].weight.data[:] += 1
    assert torch.equal(net[0].weight.fetch(), local[0].weight.detach())
    version = net[0].weight.version
    net[0].weight.data *= net[0].weight.data.abs() >= 0.5
    local[0].weight.data *= local[0].weight.data.abs() >= 0.5
    assert torch.equal(net[0].weight.fetch(), local[0].weight.detach())
    assert net[0].weight.version == version + 1


def test_mirror_init_runs_on_server(pair, client):
    net, _ = pair
    before = client.rpc_counts["ApplyInit"]
    nn.init.normal_(net[0].weight, mean=3.0, std=0.01)
    nn.init.constant_(net[2].weight, 42)
    nn.init.kaiming_uniform_(net[0].weight, a=1)
    assert client.rpc_counts["ApplyInit"] - before == 3
    assert (net[2].weight.fetch() == 42).all()
    nn.init.eye_(net[0].weight)
    assert torch.equal(net[0].weight.fetch(), torch.eye(8, 4))
    nn.init.ones_(net[0].weight)
    assert (net[0].weight.fetch() == 1).all()
    nn.init.orthogonal_(net[0].weight)
    w = net[0].weight.fetch()
    assert torch.allclose(w.T @ w, torch.eye(4), atol=1e-5)
    nn.init.xavier_uniform_(net[0].weight)
    bound = (6 / (4 + 8)) ** 0.5
    assert net[0].weight.fetch().abs().max() <= bound
    nn.init.trunc_normal_(net[0].weight, a=-0.5, b=0.5)
    w = net[0].weight.fetch()
    assert w.abs().max() <= 0.5 and w.std() > 0


def test_mirror_apply_with_type_check_selects_linear(client):
    torch.manual_seed(0)
    net = client.create_model("conv", nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(),
                                                    nn.Linear(2, 3)))
    conv_before = net[0].weight.fetch()

    def init(m):
        if type(m) == nn.Linear:
            nn.init.constant_(m.weight, 1)
            nn.init.zeros_(m.bias)
    net.apply(init)
    assert torch.equal(net[0].weight.fetch(), conv_before)
    assert (net[2].weight.fetch() == 1).all() and (net[2].bias.fetch() == 0).all()


def test_mirror_two_clients_see_each_other(pair, target):
    net, _ = pair
    with paramhub.connect(target) as other:
        twin = other.model("mlp")
        twin[0].weight.data[2, 2] = -5
        assert net[0].weight.data[2, 2].item() == -5
        net[2].bias.data.fill_(9)
        assert twin[2].bias.fetch().item() == 9


def test_mirror_concurrent_read_modify_write_is_atomic(pair, target):
    """clamp_-style ops are read-modify-write with expected_version: none is lost."""
    net, _ = pair
    net[2].bias.data.zero_()

    errors = []

    def worker():
        try:
            with paramhub.connect(target) as c:
                b = c.model("mlp")[2].bias
                for _ in range(20):
                    b.data.add_(1)            # atomic SetSlice(add)
                    b.data.clamp_(max=1e9)    # read-modify-write, retried on conflict
        except Exception as e:  # surfaced below: a thread's exception would be lost
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert net[2].bias.fetch().item() == 80


def test_mirror_tied_and_shared(client):
    shared = nn.Linear(8, 8)
    net = client.create_model("s", nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared))
    assert net[1] is net[3] and net[1].weight is net[3].weight
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    emb[1].weight = emb[0].weight
    tied = client.create_model("t", emb)
    assert tied[0].weight is tied[1].weight
    assert client.check_shared(tied, "0.weight", "1.weight")
    assert client.shared_groups(tied) == [["0.weight", "1.weight"]]
    assert len(list(tied.parameters())) == 1  # torch's de-duplication of tied weights
    tied[1].weight.data[0] = 3
    assert (tied[0].weight.fetch()[0] == 3).all()


def test_mirror_state_dict_save_load_and_pull(pair):
    net, local = pair
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert all(type(v) is torch.Tensor for v in saved.values())
    assert all(torch.equal(saved[k], v) for k, v in local.state_dict().items())
    new = {k: torch.full_like(v, 2.0) for k, v in local.state_dict().items()}
    net.load_state_dict(new)
    assert all(torch.equal(v.fetch(), new[k]) for k, v in net.state_dict().items())
    copy = net.pull()
    assert type(copy) is nn.Sequential and not paramhub.is_remote(copy)
    assert torch.equal(copy[0].weight.detach(), new["0.weight"])
    with pytest.raises(RuntimeError):  # torch's own shape check still runs
        net.load_state_dict({**new, "0.weight": torch.zeros(2, 2)})


def test_mirror_train_eval_and_buffers(client):
    torch.manual_seed(0)
    local = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    net = client.create_model("bn", local)
    x = torch.rand(4, 1, 5, 5)
    assert torch.allclose(net(x), local(x).detach(), atol=1e-6)
    assert torch.allclose(net[1].running_mean.fetch(), local[1].running_mean)
    assert net[1].num_batches_tracked.fetch().item() == 1
    net.eval()
    local.eval()
    assert not net.training and not net[1].training
    assert client.describe_model("bn").modules[2].training is False
    assert torch.allclose(net(x), local(x).detach(), atol=1e-6)
    assert net[1].num_batches_tracked.fetch().item() == 1


def test_mirror_errors_leave_values_unchanged(pair):
    net, _ = pair
    before = net[0].weight.fetch()
    with pytest.raises(OutOfRangeError):
        net[0].weight.data[8, 0] = 1
    with pytest.raises(InvalidArgumentError):
        net[0].weight.data[0] = torch.ones(5)
    with pytest.raises(InvalidArgumentError):
        net[0].weight.data[0] = torch.ones(4, dtype=torch.complex64)
    with pytest.raises(InvalidArgumentError):
        net(torch.rand(2, 5))
    with pytest.raises(NotImplementedError):
        net.to("cpu")
    with pytest.raises(NotImplementedError):
        torch._foreach_add_(list(net.parameters()), 1.0)
    assert torch.equal(net[0].weight.fetch(), before)


def test_mirror_expected_version_conflict(pair, client):
    net, _ = pair
    w = net[0].weight
    version = client.get_tensor("mlp", "0.weight")[1]
    client.set_slice("mlp", "0.weight", (0, 0), 1.0, expected_version=version)
    with pytest.raises(ConflictError) as err:
        client.set_slice("mlp", "0.weight", (0, 0), 2.0, expected_version=version)
    assert err.value.reason == "VERSION_MISMATCH"
    assert w.data[0, 0].item() == 1.0


def test_mirror_attach_unknown_model(client):
    with pytest.raises(NotFoundError) as err:
        client.model("nope")
    assert err.value.reason == "MODEL_NOT_FOUND"


def test_mirror_custom_module_class_needs_a_trusting_server(client):
    # A user-defined class is sent as code, which a default server refuses
    # (test_trusted_code.py covers a --trust-remote-code server).
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(FailedPreconditionError) as err:
        client.create_model("c", Custom())
    assert err.value.reason == "REMOTE_CODE_DISABLED"
    assert client.list_models() == []


def test_mirror_batch_applies_torch_edits_atomically(pair, client, target):
    net, local = pair
    before = client.model_version(net)
    with net.batch() as b:
        net[0].weight.data[0, 0] = 5
        net[0].weight.data[1] += 1
        nn.init.zeros_(net[0].bias)
        nn.init.constant_(net[2].weight, 2.0)
        with paramhub.connect(target) as other:  # nothing is visible before the block ends
            assert torch.equal(other.model("mlp")[0].weight.fetch(), local[0].weight.detach())
    assert b.model_version == before + 1  # one model version for the whole batch
    local_w = local[0].weight.detach().clone()
    local_w[0, 0] = 5
    local_w[1] += 1
    assert torch.equal(net[0].weight.fetch(), local_w)
    assert (net[0].bias.fetch() == 0).all() and (net[2].weight.fetch() == 2).all()


def test_mirror_batch_failure_changes_nothing(pair, client):
    net, local = pair
    with pytest.raises(InvalidArgumentError):
        with client.batch(net):
            net[0].weight.data[0, 0] = 5
            net[2].weight.data[0] = torch.ones(3)  # wrong shape: the whole batch is refused
    assert torch.equal(net[0].weight.fetch(), local[0].weight.detach())


def test_mirror_watch_sees_sdk_writes(pair):
    net, _ = pair
    events = net.watch()
    try:
        assert next(iter(events)).kind == "started"
        net[0].weight.data[0, 0] = 1
        event = next(iter(events))
        assert event.kind == "write" and "0.weight" in str(event)
    finally:
        events.close()
