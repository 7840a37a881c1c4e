"""Lazy modules (nn.LazyLinear, LazyConv*, LazyBatchNorm*, ...) served as in torch: uninitialized
until the first Forward materializes them on the server, from the client's generator; the
mirror then re-describes the model; the materialized shapes survive restarts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import paramhub
from paramhub.errors import InvalidArgumentError, PermissionDeniedError
from paramhub_server.app import build_server


def _lazy_mlp() -> nn.Module:
    return nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(3))


def _lazy_cnn() -> nn.Module:
    return nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU(),
                         nn.Flatten(), nn.LazyLinear(5))


def _states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(torch.as_tensor(sa[k]), sb[k]) for k in sa)


@pytest.mark.parametrize("make", [_lazy_mlp, _lazy_cnn])
def test_forward_lazy_model_materializes_like_local_torch(client, make):
    X = torch.rand(2, 3, 5, 5) if make is _lazy_cnn else torch.rand(2, 7)
    torch.manual_seed(0)
    local = make()
    before_local = repr(local)
    y_local = local(X)
    after_local = torch.rand(4)  # the generator moved on as the materialization drew

    torch.manual_seed(0)
    net = client.create_model("lazy", make())
    assert repr(net) == before_local
    y = net(X)
    assert torch.rand(4).equal(after_local)
    assert torch.equal(y, y_local)
    assert repr(net) == repr(local)  # LazyLinear(in_features=0, ...) -> Linear(in_features=7, ...)
    assert type(net[0]) is type(local[0])
    assert _states_equal(net.pull(), local)
    # The mirror now holds handles with the inferred shapes; a second pass is a plain Forward.
    assert net[-1].weight.shape == local[-1].weight.shape
    assert torch.equal(net(X), local(X)) if make is _lazy_mlp else True


def test_uninitialized_parameter_reads_give_torch_error_and_change_nothing(client):
    net = client.create_model("lazy", _lazy_mlp())
    local = _lazy_mlp()
    assert repr(net[0].weight) == repr(local[0].weight) == "<UninitializedParameter>"
    with pytest.raises(RuntimeError) as mirror_err:
        net[0].weight.shape  # noqa: B018 - torch's own error, as locally
    with pytest.raises(RuntimeError) as local_err:
        local[0].weight.shape  # noqa: B018
    assert str(mirror_err.value) == str(local_err.value)
    version = client.model_version("lazy")
    for call in (lambda: client.get_tensor("lazy", "0.weight"),
                 lambda: client.set_slice("lazy", "0.weight", None, 1.0),
                 lambda: client.pull_state("lazy", ["0.bias"])):
        with pytest.raises(InvalidArgumentError) as e:
            call()
        assert isinstance(e.value, ValueError)
        assert e.value.code == "INVALID_ARGUMENT" and e.value.reason == "UNINITIALIZED_TENSOR"
    assert client.model_version("lazy") == version
    assert [t.name for t in client.list_parameters("lazy")] == []


def test_failed_first_forward_materializes_as_torch_does(client):
    # torch infers the shapes before the layer fails, and keeps them: so does the server.
    bad = torch.rand(2, 5, dtype=torch.float64)  # float64 input into float32 layers
    local = _lazy_mlp()
    with pytest.raises(RuntimeError):
        local(bad)
    net = client.create_model("lazy", _lazy_mlp())
    with pytest.raises(InvalidArgumentError) as e:
        net(bad)
    assert e.value.reason == "BAD_INPUT"
    assert repr(net) == repr(local)
    assert net[0].weight.shape == local[0].weight.shape == (16, 5)
    assert net(torch.rand(2, 5)).shape == (2, 3)


def test_second_mirror_sees_materialized_model(client, target):
    net = client.create_model("lazy", _lazy_mlp())
    with paramhub.connect(target, timeout=60) as other:
        stale = other.model("lazy")
        net(torch.rand(1, 7))
        fresh = other.model("lazy")
        assert repr(fresh) == repr(net)
        # A mirror made before the materialization re-describes at its first call.
        out = stale(torch.ones(1, 7))
        assert torch.equal(out, net(torch.ones(1, 7)))
        assert repr(stale) == repr(net)


def test_read_role_cannot_materialize(settings, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("read read-token-0123456789abcdef\nadmin admin-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    srv = build_server(dataclasses.replace(settings, auth_file=tokens, data_dir=None))
    try:
        target = f"127.0.0.1:{srv.port}"
        with paramhub.connect(target, token="admin-token-0123456789abcdef", timeout=60) as w:
            w.create_model("lazy", _lazy_mlp())
        with paramhub.connect(target, token="read-token-0123456789abcdef", timeout=60) as r:
            net = r.model("lazy")
            with pytest.raises(PermissionDeniedError) as e:
                net(torch.rand(1, 7))
            assert e.value.reason == "ROLE_TOO_LOW"
            assert repr(r.model("lazy")[0]).startswith("LazyLinear(in_features=0,")
    finally:
        srv.stop(grace=None)


def test_materialized_shapes_survive_restarts(settings):
    X = torch.rand(3, 7)
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.create_model("still-lazy", _lazy_mlp())
            net = c.create_model("lazy", _lazy_cnn())
            net(torch.rand(2, 3, 5, 5))
            net[0].weight.data[0, 0, 0, 0] = 5.0  # a logged write after the snapshot
            expected = {k: v.clone() for k, v in net.state_dict().items()}
            text, version = repr(net), c.model_version(net)
        srv.stop(grace=None)
        srv = build_server(settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.model("lazy")
            assert repr(net) == text and c.model_version(net) == version
            got = net.state_dict()
            assert all(torch.equal(got[k].fetch(), v) for k, v in expected.items())
            lazy = c.model("still-lazy")
            assert repr(lazy[0]) == "LazyLinear(in_features=0, out_features=16, bias=True)"
            lazy(X)
            assert lazy[2].weight.shape == (3, 16)
        srv.stop(grace=None)
        srv = build_server(settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert c.model("still-lazy")[0].weight.shape == (16, 7)
    finally:
        srv.stop(grace=None)


def test_forward_materializes_from_the_callers_generator_state(client):
    # The in-process server shares this process's default generator, so draw from another one
    # (and move the default one elsewhere): only the sent state can give local torch's values.
    X = torch.rand(2, 7)
    torch.manual_seed(0)
    local = _lazy_mlp()
    y_local = local(X)
    after = torch.default_generator.get_state()
    client.create_model("lazy", _lazy_mlp())
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(123)
    y, materialized = client.forward_materializing("lazy", [X], {}, generator=g)
    assert materialized and torch.equal(y, y_local)
    assert torch.equal(g.get_state(), after)
    assert _states_equal(client.model("lazy").pull(), local)
    _, stale = client.forward_materializing("lazy", [X], {}, generator=g)
    assert stale and torch.equal(g.get_state(), after)  # nothing drawn; nothing lazy left


def test_bad_generator_state_is_rejected_and_changes_nothing(client):
    from paramhub.common import pb

    client.create_model("lazy", _lazy_mlp())
    request = pb.ForwardRequest(model="models/lazy", generator_state=b"\x00" * 10,
                                args=[paramhub._codec.value_to_proto(torch.rand(1, 7))])
    with pytest.raises(InvalidArgumentError) as e:
        client._call(client.stub.Forward, request)
    assert e.value.reason == "BAD_GENERATOR_STATE"
    assert repr(client.model("lazy")[0]).startswith("LazyLinear")


def test_checkpoint_taken_before_materialization_cannot_be_restored_after(client):
    net = client.create_model("lazy", nn.Sequential(nn.Linear(7, 7), nn.LazyLinear(3)))
    client.create_checkpoint(net, "early")
    net(torch.rand(1, 7))
    client.create_checkpoint(net, "late")
    version = client.model_version(net)
    with pytest.raises(InvalidArgumentError) as e:
        client.restore_checkpoint(net, "early")
    assert e.value.reason == "CHECKPOINT_MISMATCH"
    assert client.model_version(net) == version
    net[1].weight.data[0, 0] = 9.0
    client.restore_checkpoint(net, "late")
    assert net[1].weight.data[0, 0].item() != 9.0


def test_load_state_dict_materializes_lazy_modules_as_torch_does(settings):
    X = torch.rand(2, 7)
    torch.manual_seed(0)
    trained = _lazy_mlp()
    trained(X)
    state = trained.state_dict()
    local = _lazy_mlp()
    local_keys = local.load_state_dict(state)
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            clone = c.create_model("clone", _lazy_mlp())
            assert repr(clone.load_state_dict(state)) == repr(local_keys)
            # torch keeps the lazy class (in_features=0) until the first Forward.
            assert repr(clone) == repr(local)
            assert clone[0].weight.shape == (16, 7)
            assert torch.equal(clone[0].weight.fetch(), state["0.weight"])
        srv.stop(grace=None)
        srv = build_server(settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            clone = c.model("clone")
            assert repr(clone) == repr(local)
            assert torch.equal(clone(X), local(X))
            assert repr(clone) == repr(local)  # now Linear(in_features=7, ...) in both
    finally:
        srv.stop(grace=None)


def test_mirror_of_a_partly_materialized_model_describes_only_when_needed(client):
    net = client.create_model("lazy", _lazy_mlp())
    h = net[0](torch.rand(2, 7))  # materializes the first layer only, as in torch
    assert repr(net[0]).startswith("Linear(in_features=7") and h.shape == (2, 16)
    assert repr(net[2]).startswith("LazyLinear(in_features=0")
    before = client.rpc_counts.get("DescribeModel", 0)
    net[0](torch.rand(2, 7))
    assert client.rpc_counts.get("DescribeModel", 0) == before  # nothing lazy on that path
    assert net(torch.rand(2, 7)).shape == (2, 3)
    assert repr(net[2]) == "Linear(in_features=16, out_features=3, bias=True)"
