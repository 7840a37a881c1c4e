"""Trusted code: user-defined nn.Module classes served by `paramhub serve --trust-remote-code`
(or named from a --model-package), admin callers only; refused by default."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import paramhub
from paramhub.errors import (FailedPreconditionError, InvalidArgumentError, NotFoundError,
                             PermissionDeniedError)
from paramhub.common import pb
from paramhub_server.app import build_server


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(20, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, X):
        return self.out(F.relu(self.hidden(X)))


class MyLinear(nn.Module):
    def __init__(self, in_units, units):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_units, units))
        self.bias = nn.Parameter(torch.randn(units))
        self.units = units

    def forward(self, X):
        return F.relu(torch.matmul(X, self.weight.data) + self.bias.data)

    def extra_repr(self):
        return f"units={self.units}"


class FixedHiddenMLP(nn.Module):
    """A Python while loop over data in forward: cannot be exported, served as code."""

    def __init__(self):
        super().__init__()
        self.rand_weight = torch.rand((20, 20))  # a constant tensor, not a parameter
        self.linear = nn.Linear(20, 20)

    def forward(self, X):
        X = self.linear(X)
        X = F.relu(X @ self.rand_weight + 1)
        X = self.linear(X)  # the same layer twice: shared parameters
        while X.abs().sum() > 1:
            X /= 2
        return X.sum()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, ids):
        return self.head(self.emb(ids) * self.scale)


def _trusting(settings):
    return dataclasses.replace(settings, trust_remote_code=True)


@pytest.fixture
def trusted(settings):
    srv = build_server(_trusting(settings))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            yield c
    finally:
        srv.stop(grace=None)


def test_code_model_is_refused_without_trust_remote_code(client):
    with pytest.raises(FailedPreconditionError) as e:
        client.create_model("mlp", MLP())
    assert e.value.code == "FAILED_PRECONDITION" and e.value.reason == "REMOTE_CODE_DISABLED"
    assert "--trust-remote-code" in str(e.value) and "example_inputs" in str(e.value)
    assert client.list_models() == []


@pytest.mark.parametrize("make,inputs", [
    (MLP, lambda: (torch.rand(2, 20),)),
    (lambda: MyLinear(5, 3), lambda: (torch.rand(2, 5),)),
    (FixedHiddenMLP, lambda: (torch.rand(2, 20),)),
    (Tied, lambda: (torch.tensor([[1, 2, 3]]),)),
], ids=["MLP", "MyLinear", "FixedHiddenMLP", "Tied"])
def test_code_model_prints_computes_and_reads_like_local_torch(trusted, make, inputs):
    torch.manual_seed(0)
    local = make()
    net = trusted.create_model("m", local)
    assert repr(net) == repr(local)
    assert type(net) is type(local)
    args = inputs()
    assert torch.equal(net(*args), local(*args))
    assert list(net.state_dict()) == list(local.state_dict())
    assert all(torch.equal(net.state_dict()[k].fetch(), v) for k, v in local.state_dict().items())
    pulled = net.pull()
    assert type(pulled) is type(local) and torch.equal(pulled(*args), local(*args))
    assert trusted.list_models()[0].source == "code"


def test_code_model_keeps_tied_weights_tied(trusted):
    net = trusted.create_model("tied", Tied())
    assert net.head.weight is net.emb.weight
    assert trusted.check_shared(net, "emb.weight", "head.weight")
    net.emb.weight.data[0] = 1.0
    assert torch.equal(net.head.weight.fetch()[0], torch.ones(8))


def test_code_model_writes_inits_and_training(trusted):
    torch.manual_seed(0)
    local = MLP()
    net = trusted.create_model("m", local)
    torch.manual_seed(3)
    nn.init.normal_(local.hidden.weight, std=0.01)
    torch.manual_seed(3)
    nn.init.normal_(net.hidden.weight, std=0.01)
    assert torch.equal(net.hidden.weight.fetch(), local.hidden.weight.detach())
    X = torch.rand(4, 20)
    net(X).sum().backward()
    local(X).sum().backward()
    assert torch.allclose(net.out.weight.grad, local.out.weight.grad)


def test_code_model_needs_the_admin_role(settings, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("write write-token-0123456789abcdef\nadmin admin-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    srv = build_server(dataclasses.replace(_trusting(settings), auth_file=tokens))
    try:
        target = f"127.0.0.1:{srv.port}"
        with paramhub.connect(target, token="write-token-0123456789abcdef", timeout=60) as w:
            with pytest.raises(PermissionDeniedError) as e:
                w.create_model("mlp", MLP())
            assert e.value.reason == "ROLE_TOO_LOW"
        with paramhub.connect(target, token="admin-token-0123456789abcdef", timeout=60) as a:
            assert a.list_models() == []
            net = a.create_model("mlp", MLP())
            assert net(torch.rand(1, 20)).shape == (1, 10)
    finally:
        srv.stop(grace=None)


def test_trust_remote_code_on_a_public_address_needs_an_auth_file(settings):
    from paramhub_server.app import ConfigError

    with pytest.raises(ConfigError):
        build_server(dataclasses.replace(_trusting(settings), host="0.0.0.0", insecure=True))


def test_bad_module_pickles_are_rejected_and_create_nothing(trusted):
    for data, reason in ((b"not a pickle", "BAD_MODULE"),
                         (__import__("pickle").dumps([1, 2]), "BAD_MODULE")):
        header = pb.CreateModelHeader(model_id="bad", module_pickle=data)
        with pytest.raises(InvalidArgumentError) as e:
            trusted._call(trusted.stub.CreateModel, iter([pb.CreateModelRequest(header=header)]))
        assert e.value.reason == reason
    from paramhub import _code

    data, _ = _code.dumps(MLP())  # no values uploaded
    header = pb.CreateModelHeader(model_id="bad", module_pickle=data)
    with pytest.raises(InvalidArgumentError) as e:
        trusted._call(trusted.stub.CreateModel, iter([pb.CreateModelRequest(header=header)]))
    assert e.value.reason == "MISSING_VALUES"
    assert trusted.list_models() == []


def test_code_models_survive_a_restart_only_while_trusted(settings):
    torch.manual_seed(0)
    local = FixedHiddenMLP()
    X = torch.rand(3, 20)
    srv = build_server(_trusting(settings))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("fixed", local)
            net.linear.bias.data[0] = 2.0
            with torch.no_grad():
                local.linear.bias[0] = 2.0
            c.create_checkpoint(net, "ck")
        srv.stop(grace=None)
        srv = build_server(settings)  # no longer trusting: the model is not loaded
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            with pytest.raises(NotFoundError):
                c.model("fixed")
        srv.stop(grace=None)
        srv = build_server(_trusting(settings))
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.model("fixed")
            assert repr(net) == repr(local)
            assert torch.equal(net(X), local(X))
            c.restore_checkpoint(net, "ck")
            assert torch.equal(net(X), local(X))
    finally:
        srv.stop(grace=None)


def test_model_package_serves_its_classes_without_trust_remote_code(settings, tmp_path,
                                                                    monkeypatch):
    pkg = tmp_path / "pkgs" / "phmodels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Scaled(nn.Module):
            def __init__(self, n):
                super().__init__()
                self.lin = nn.Linear(n, n)
                self.factor = 3.0

            def forward(self, x):
                return self.lin(x) * self.factor

            def extra_repr(self):
                return f"factor={self.factor}"
    """))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    import phmodels

    srv = build_server(dataclasses.replace(settings, model_packages=("phmodels",)))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            local = phmodels.Scaled(4)
            net = c.create_model("scaled", local)
            x = torch.rand(2, 4)
            assert repr(net) == repr(local) and torch.equal(net(x), local(x))
            # A class outside the listed packages (this test module) is still refused.
            with pytest.raises(FailedPreconditionError) as e:
                c.create_model("mlp", MLP())
            assert e.value.reason == "REMOTE_CODE_DISABLED"
            assert [m.name for m in c.list_models()] == ["models/scaled"]
    finally:
        srv.stop(grace=None)


def test_mirror_in_a_process_without_the_class_is_a_faithful_tree(trusted, tmp_path):
    local = MyLinear(5, 3)
    net = trusted.create_model("lin", local)
    wrapped = trusted.create_model("fixed", FixedHiddenMLP())
    script = textwrap.dedent(f"""
        import paramhub
        c = paramhub.connect({trusted.target!r}, timeout=60)
        lin, fixed = c.model("lin"), c.model("fixed")
        print(repr(lin)); print(repr(fixed))
        print(type(lin).__name__, type(lin).__module__, [n for n, _ in lin.named_parameters()])
    """)
    # Run elsewhere, so that this test module (where the classes live) is not importable.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True, cwd=tmp_path, env=env).stdout
    assert out.splitlines() == [
        *repr(net).splitlines(), *repr(wrapped).splitlines(),
        f"MyLinear {__name__} ['weight', 'bias']"]


class LazyStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.LazyLinear(6)
        self.b = nn.LazyLinear(2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_lazy_layers_in_a_code_model_materialize_and_survive_a_restart(settings):
    X = torch.rand(3, 4)
    torch.manual_seed(0)
    local = LazyStack()
    y_local = local(X)
    srv = build_server(_trusting(settings))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            torch.manual_seed(0)
            net = c.create_model("lazy", LazyStack())
            assert repr(net.a) == "LazyLinear(in_features=0, out_features=6, bias=True)"
            assert torch.equal(net(X), y_local)
            assert repr(net) == repr(local)
        srv.stop(grace=None)
        srv = build_server(_trusting(settings))
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.model("lazy")
            assert repr(net) == repr(local)
            assert torch.equal(net(X), y_local)
    finally:
        srv.stop(grace=None)
