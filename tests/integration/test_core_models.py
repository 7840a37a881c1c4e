"""ListModels, DeleteModel, DescribeModel and ListParameters through the real SDK."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _core_helpers import create, model_ids, raises, unchanged
from paramhub import _spec
from paramhub.errors import InvalidArgumentError, NotFoundError
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb


def _net() -> nn.Module:
    """Linear, shared Linear at two paths, BatchNorm (buffers), and a tied head."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    net = nn.Sequential()
    net.add_module("emb", emb)
    net.add_module("block0", nn.Sequential(shared, nn.ReLU(), shared))
    net.add_module("norm", nn.BatchNorm1d(4))
    net.add_module("head", head)
    return net


# ------------------------------------------------------------------------------- ListModels


def test_list_models_empty_then_sorted(client):
    assert client.list_models() == []
    for model_id in ("zeta", "alpha", "Mid"):
        create(client, model_id, nn.Linear(2, 2), seed=0)
    infos = client.list_models()
    assert [m.name for m in infos] == ["models/Mid", "models/alpha", "models/zeta"]
    assert all(m.root_class == "Linear" and m.version == 0 for m in infos)


def test_list_models_reports_versions(client):
    create(client, "m", nn.Linear(2, 2), seed=0)
    client.set_slice("m", "bias", 0, 1.0)
    client.set_slice("m", "bias", 1, 1.0)
    assert client.list_models()[0].version == 2


# ------------------------------------------------------------------------------- DeleteModel


def test_delete_model(client):
    create(client, "a", nn.Linear(2, 2), seed=0)
    create(client, "b", nn.Linear(2, 2), seed=0)
    client.delete_model("a")
    assert model_ids(client) == ["b"]
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.get_tensor("a", "weight")
    # The id is free again.
    create(client, "a", nn.Conv1d(1, 2, 3), seed=0)
    assert [m.root_class for m in client.list_models()] == ["Conv1d", "Linear"]


def test_delete_model_not_found(client):
    create(client, "keep", nn.Linear(2, 2), seed=0)
    with raises(NotFoundError, "MODEL_NOT_FOUND") as e:
        client.delete_model("nope")
    assert e.value.metadata["model"] == "nope"
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.delete_model("keep2")
    assert model_ids(client) == ["keep"]


@pytest.mark.parametrize("name", ["keep", "model/keep", "models/", "models/keep/x", ""])
def test_delete_model_bad_name(client, name):
    create(client, "keep", nn.Linear(2, 2), seed=0)
    with unchanged(client, "keep"), raises(InvalidArgumentError, "BAD_NAME"):
        client._call(client.stub.DeleteModel, pb.DeleteModelRequest(name=name))
    assert model_ids(client) == ["keep"]


# ------------------------------------------------------------------------------- DescribeModel


def test_describe_model_tree(client):
    local = _net()
    create(client, "net", local, upload=True)
    desc = client.describe_model("net")
    assert desc.model.name == "models/net"
    paths = [m.path for m in desc.modules]
    assert paths == [p for p, _ in local.named_modules(remove_duplicate=False)]
    by_path = {m.path: m for m in desc.modules}
    assert by_path[""].class_name == "Sequential"
    assert list(by_path[""].children) == ["emb", "block0", "norm", "head"]
    assert list(by_path["block0"].children) == ["0", "1", "2"]
    # torch's own one-line description of each module.
    for path, mod in local.named_modules(remove_duplicate=False):
        assert by_path[path].extra_repr == mod.extra_repr()
        assert by_path[path].class_name == type(mod).__name__
        assert by_path[path].training is True
    # The shared Linear is one module object at two paths.
    assert by_path["block0.0"].module_group == by_path["block0.2"].module_group
    groups = [m.module_group for m in desc.modules]
    assert len(set(groups)) == len(groups) - 1
    # The spec it was built from comes back and rebuilds the same tree.
    with torch.device("meta"):
        rebuilt = _spec.build_module(desc.spec)
    assert repr(rebuilt) == repr(local)


def test_describe_model_tensors(client):
    local = _net()
    create(client, "net", local, upload=True)
    desc = client.describe_model("net")
    names = [t.name for t in desc.tensors]
    expected = [n for n, _ in local.named_parameters(remove_duplicate=False)] + [
        n for n, _ in local.named_buffers(remove_duplicate=False)]
    assert sorted(names) == sorted(expected)
    info = {t.name: t for t in desc.tensors}
    assert info["emb.weight"].kind == pb.TENSOR_KIND_PARAMETER
    assert info["norm.running_mean"].kind == pb.TENSOR_KIND_BUFFER
    assert info["norm.num_batches_tracked"].dtype == tpb.DTYPE_INT64
    assert info["norm.running_mean"].requires_grad is False
    assert info["emb.weight"].requires_grad is True
    assert list(info["emb.weight"].shape) == [6, 4]
    assert info["emb.weight"].device == "cpu"
    assert info["emb.weight"].dtype == tpb.DTYPE_FLOAT32
    assert not any(t.has_grad for t in desc.tensors)
    # Tied names and a shared module's names share storage groups.
    assert info["emb.weight"].storage_group == info["head.weight"].storage_group
    assert info["block0.0.weight"].storage_group == info["block0.2.weight"].storage_group
    assert info["block0.0.bias"].storage_group == info["block0.2.bias"].storage_group
    distinct = {t.storage_group for t in desc.tensors}
    assert len(distinct) == len(desc.tensors) - 3
    assert desc.model.num_parameters == sum(p.numel() for p in local.parameters())


def test_describe_model_versions_follow_writes(client):
    create(client, "net", _net(), upload=True)
    client.set_slice("net", "head.weight", (0, 0), 1.0)
    info = {t.name: t for t in client.describe_model("net").tensors}
    assert info["head.weight"].version == 1
    assert info["emb.weight"].version == 1  # the same storage
    assert info["block0.0.weight"].version == 0


def test_describe_model_not_found(client):
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.describe_model("ghost")
    with raises(InvalidArgumentError, "BAD_NAME"):
        client._call(client.stub.DescribeModel, pb.DescribeModelRequest(name="ghost"))


# ------------------------------------------------------------------------------- ListParameters


def test_list_parameters_filters(client):
    local = _net()
    create(client, "net", local, upload=True)
    all_params = [t.name for t in client.list_parameters("net")]
    assert all_params == [n for n, _ in local.named_parameters(remove_duplicate=False)]
    with_buffers = [t.name for t in client.list_parameters("net", include_buffers=True)]
    assert set(with_buffers) - set(all_params) == {"norm.running_mean", "norm.running_var",
                                                   "norm.num_batches_tracked"}
    assert [t.name for t in client.list_parameters("net", prefix="block0.")] == [
        "block0.0.weight", "block0.0.bias", "block0.2.weight", "block0.2.bias"]
    assert [t.name for t in client.list_parameters("net", glob="*.bias")] == [
        "block0.0.bias", "block0.2.bias", "norm.bias"]
    assert [t.name for t in client.list_parameters("net", prefix="block0.", glob="*.bias")] == [
        "block0.0.bias", "block0.2.bias"]
    assert [t.name for t in client.list_parameters("net", glob="norm.running_*",
                                                   include_buffers=True)] == [
        "norm.running_mean", "norm.running_var"]
    assert client.list_parameters("net", prefix="nothing") == []
    assert client.list_parameters("net", glob="*.running_mean") == []  # buffers not asked


def test_list_parameters_not_found(client):
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.list_parameters("ghost")
    with raises(InvalidArgumentError, "BAD_NAME"):
        client._call(client.stub.ListParameters, pb.ListParametersRequest(model="a/b/c"))
