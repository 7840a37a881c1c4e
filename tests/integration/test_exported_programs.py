"""Exported programs: client.create_model(name, module, example_inputs=(x,)) sends a torch.export
program that a default server (no --trust-remote-code) serves without unpickling anything, with
the original module tree and names."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import paramhub
from paramhub.errors import InvalidArgumentError
from paramhub.common import pb
from paramhub_server.app import build_server


class MyLinear(nn.Module):
    """A custom layer with its own parameters: exports fine."""

    def __init__(self, in_units, units):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_units, units))
        self.bias = nn.Parameter(torch.randn(units))
        self.units = units

    def forward(self, x):
        return torch.relu(x @ self.weight + self.bias)

    def extra_repr(self):
        return f"units={self.units}"


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Sequential(MyLinear(4, 3), nn.ReLU(), nn.Linear(3, 4))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.body(h))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        x = self.linear(x)
        while x.abs().sum() > 1:  # Python control flow on tensor values: not exportable
            x = x / 2
        return x


IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])


def test_program_is_served_like_the_local_module_on_a_default_server(client, monkeypatch):
    # Nothing the client sent may be unpickled: make any unpickling on the server fail.
    def refuse(*args, **kwargs):
        raise AssertionError("the server unpickled client data")

    torch.manual_seed(0)
    local = TiedNet()
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    net = client.create_model("p", local, example_inputs=(IDS,))
    monkeypatch.undo()
    assert repr(net) == repr(local)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in local.named_parameters()]
    assert torch.equal(net(IDS), local(IDS))
    assert client.list_models()[0].source == "program"
    # Tied weights stay tied.
    assert net.head.weight is net.emb.weight
    assert client.check_shared(net, "emb.weight", "head.weight")
    # Reads, slice writes and client-seeded inits.
    net.body[0].weight.data[0, 0] = 5.0
    with torch.no_grad():
        local.body[0].weight[0, 0] = 5.0
    torch.manual_seed(3)
    nn.init.xavier_uniform_(net.body[2].weight)
    torch.manual_seed(3)
    nn.init.xavier_uniform_(local.body[2].weight)
    assert torch.equal(net(IDS), local(IDS))
    # Remote autograd and a server-side optimizer step.
    opt = paramhub.optim.SGD(net.parameters(), lr=0.1)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        local_opt.zero_grad()
        net(IDS).square().mean().backward()
        local(IDS).square().mean().backward()
        opt.step()
        local_opt.step()
    for (n, p), (_, q) in zip(net.named_parameters(), local.named_parameters()):
        assert torch.allclose(p.fetch(), q.detach(), atol=1e-6), n


def test_program_model_survives_a_restart(settings):
    torch.manual_seed(0)
    local = TiedNet()
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("p", local, example_inputs=(IDS,))
            original = local(IDS)
            c.create_checkpoint(net, "before")
            net.emb.weight.data[1] = 0.5
            with torch.no_grad():
                local.emb.weight[1] = 0.5
            version = c.model_version(net)
        srv.stop(grace=None)
        srv = build_server(settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.model("p")
            assert repr(net) == repr(local) and c.model_version(net) == version
            assert torch.equal(net(IDS), local(IDS))
            assert c.check_shared(net, "emb.weight", "head.weight")
            c.restore_checkpoint(net, "before")
            assert torch.equal(net(IDS), original)
    finally:
        srv.stop(grace=None)


def test_data_dependent_control_flow_is_not_exportable(client):
    with pytest.raises(InvalidArgumentError) as e:
        client.create_model("dd", DataDependent(), example_inputs=(torch.rand(2, 4),))
    assert e.value.reason == "NOT_EXPORTABLE" and "--trust-remote-code" in str(e.value)
    assert client.list_models() == []


def test_bad_programs_are_rejected_and_create_nothing(client):
    from paramhub import _program

    good, values = _program.export(TiedNet(), (IDS,))
    cases = [b"{}", b"not json", good.exported_program.replace(b"aten", b"xaten")]
    for program in cases:
        header = pb.CreateModelHeader()
        header.CopyFrom(good)
        header.model_id, header.exported_program = "bad", program

        def requests(h=header):
            yield pb.CreateModelRequest(header=h)
            for name, t in values.items():
                for chunk in paramhub._codec.iter_tensor_chunks(t, name=name):
                    yield pb.CreateModelRequest(chunk=chunk)

        with pytest.raises(InvalidArgumentError) as e:
            client._call(client.stub.CreateModel, requests())
        assert e.value.reason == "BAD_PROGRAM"
    assert client.list_models() == []


def test_program_node_names_cannot_inject_code(client, tmp_path):
    # torch.fx generates Python from the graph: names the client chose must not become code.
    import json

    from paramhub import _program

    marker = tmp_path / "pwned"
    header, values = _program.export(nn.Sequential(nn.Linear(3, 3), nn.ReLU()),
                                     (torch.rand(2, 3),))
    text = header.exported_program.decode()
    evil = f"x = __import__('pathlib').Path({str(marker)!r}).touch(); y"
    for name in ("linear", "relu"):
        text = text.replace(f'"{name}"', json.dumps(evil + name))
    header.model_id, header.exported_program = "evil", text.encode()

    def requests():
        yield pb.CreateModelRequest(header=header)
        for name, t in values.items():
            for chunk in paramhub._codec.iter_tensor_chunks(t, name=name):
                yield pb.CreateModelRequest(chunk=chunk)

    try:
        client._call(client.stub.CreateModel, requests())
        client.forward("evil", torch.rand(2, 3))
    except InvalidArgumentError as e:  # rejecting the program is fine too
        assert e.reason in ("BAD_PROGRAM", "BAD_INPUT")
    assert not marker.exists()


class LazyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.LazyLinear(16)
        self.out = nn.LazyLinear(4)

    def forward(self, X):
        return self.out(torch.relu(self.hidden(X)))


class MySequential(nn.Module):
    def __init__(self, *args):
        super().__init__()
        for idx, module in enumerate(args):
            self.add_module(str(idx), module)

    def forward(self, X):
        for module in self.children():
            X = module(X)
        return X


@pytest.mark.parametrize("make", [
    LazyMLP,
    lambda: MySequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(2)),
    lambda: nn.Sequential(MyLinear(6, 5), nn.Dropout(0.0), MyLinear(5, 2)),
], ids=["LazyMLP", "MySequential", "MyLinear"])
def test_textbook_models_export_to_a_default_server(client, make):
    X = torch.rand(3, 6)
    torch.manual_seed(0)
    local = make()
    y_local = local(X)
    after = torch.default_generator.get_state()
    torch.manual_seed(0)
    net = client.create_model("m", make(), example_inputs=(X,))
    assert torch.equal(torch.default_generator.get_state(), after)  # lazy layers drew here
    assert repr(net) == repr(local)
    assert torch.equal(net(X), y_local)
    assert torch.equal(net(X[:2]), local(X[:2]))  # the batch size is not baked in
