"""The server core without grpc (paramhub_server.core): registry and ServedModel on tiny real
modules. No sockets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paramhub.common import spec as _spec
from paramhub.errors import (AlreadyExistsError, ConflictError, InvalidArgumentError,
                             NotFoundError, OutOfRangeError, ResourceExhaustedError)
from paramhub_server.core.registry import Registry, check_model_id, parse_device


def _registry(**kw) -> Registry:
    return Registry(torch.device("cpu"), **kw)


def _spec_of(m: nn.Module):
    return _spec.spec_from_module(m)


def test_registry_create_get_list_delete():
    reg = _registry()
    m = reg.create("b", _spec_of(nn.Linear(2, 3)), seed=0, device="")
    reg.create("a", _spec_of(nn.ReLU()), seed=None, device="cpu")
    assert reg.get("b") is m
    assert [x.id for x in reg.list()] == ["a", "b"]
    reg.delete("a")
    with pytest.raises(NotFoundError) as e:
        reg.get("a")
    assert e.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(NotFoundError):
        reg.delete("a")


def test_registry_create_is_all_or_nothing():
    reg = _registry(max_model_bytes=100)
    with pytest.raises(ResourceExhaustedError):
        reg.create("x", _spec_of(nn.Linear(10, 10)), seed=0, device="")
    with pytest.raises(InvalidArgumentError):
        reg.create("x", _spec_of(nn.Linear(2, 2)), seed=0, device="",
                   values=[("weight", torch.zeros(3, 3))])
    with pytest.raises(NotFoundError):
        reg.create("x", _spec_of(nn.Linear(2, 2)), seed=0, device="",
                   values=[("nope", torch.zeros(1))])
    assert reg.list() == []
    reg.create("x", _spec_of(nn.Linear(2, 2)), seed=0, device="")
    with pytest.raises(AlreadyExistsError):
        reg.create("x", _spec_of(nn.Linear(2, 2)), seed=0, device="")


@pytest.mark.parametrize("model_id", ["a", "A9", "x" * 128, "a.b-c_d", "0"])
def test_check_model_id_accepts(model_id):
    assert check_model_id(model_id) == model_id


@pytest.mark.parametrize("model_id", ["", "_a", ".a", "x" * 129, "a/b", "a\nb", "a b"])
def test_check_model_id_rejects(model_id):
    with pytest.raises(InvalidArgumentError) as e:
        check_model_id(model_id)
    assert e.value.reason == "BAD_MODEL_ID"


def test_parse_device():
    default = torch.device("cpu")
    assert parse_device("", default) is default
    assert parse_device("cpu", default) == torch.device("cpu")
    for bad in ("gpu", "cuda:", "cuda:1234", "meta", "CPU"):
        with pytest.raises(InvalidArgumentError):
            parse_device(bad, default)


def _model():
    torch.manual_seed(0)
    reg = _registry()
    local = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    return reg.create("m", _spec_of(local), seed=0, device=""), local


def test_served_model_set_slice_and_versions():
    m, local = _model()
    assert m.set_slice("0.weight", (0,), "add", torch.tensor(1.0)) == (1, 1)
    assert m.set_slice("0.bias", (), "assign", torch.zeros(4)) == (1, 2)
    expected = local[0].weight.detach().clone()
    expected[0] += 1
    assert torch.equal(m.read("0.weight", ()).tensor, expected)
    assert m.read("0.weight", ()).version == 1


def test_served_model_failed_writes_change_nothing():
    m, _ = _model()
    before = {n: m.read(n, ()).tensor.clone() for n in m.names()}
    with pytest.raises(OutOfRangeError):
        m.set_slice("0.weight", (9,), "assign", torch.tensor(1.0))
    with pytest.raises(InvalidArgumentError):
        m.set_slice("0.weight", (), "add", torch.ones(5))
    with pytest.raises(ConflictError):
        m.set_slice("0.weight", (), "add", torch.ones(1), expected_version=3)
    with pytest.raises(InvalidArgumentError):
        m.set_slice("0.weight", (), "pow", torch.ones(1))
    with pytest.raises(InvalidArgumentError):
        m.apply_init([("parameter", "0.weight"), ("parameter", "0.bias")], "xavier_uniform_",
                     {}, seed=0)
    for n in m.names():
        assert torch.equal(m.read(n, ()).tensor, before[n]), n
    assert m.version == 0 and set(m.versions) == {0}


def test_served_model_read_returns_copies():
    m, _ = _model()
    r = m.read("0.weight", ())
    r.tensor.fill_(5)
    assert not m.read("0.weight", ()).tensor.eq(5).all()
    r = m.read("0.weight", (slice(None), 0))  # a view of the storage in torch: still a copy
    r.tensor.fill_(5)
    assert not m.read("0.weight", ()).tensor.eq(5).any()


def test_served_model_select_and_shared_groups():
    reg = _registry()
    shared = nn.Linear(2, 2)
    m = reg.create("s", _spec_of(nn.Sequential(shared, nn.Tanh(), shared)), seed=0, device="")
    assert m.shared_groups() == [["0.weight", "2.weight"], ["0.bias", "2.bias"]]
    assert m.check_shared(["0.weight", "2.weight"]) == (True, m.shared_groups())
    refs = m.select([("glob", "*"), ("module", ("2", "Linear", "weight"))])
    assert [r.name for r in refs] == ["0.weight", "0.bias"]
