"""CreateModel through the real SDK against an in-process server on port 0."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from torch import nn

from _core_helpers import bits, create, model_ids, raises, read_all
from paramhub import _codec, _spec
from paramhub.errors import (AlreadyExistsError, InvalidArgumentError, NotFoundError,
                             ResourceExhaustedError)
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb


def _named_blocks_with_shared() -> nn.Module:
    # Modules are constructed in the order they first appear in the tree (pre-order), which
    # is the order spec_from_module lists them in: the shared Linear is made inside block0.
    net = nn.Sequential()
    shared = None
    for i in range(2):
        first = nn.Linear(4 if i == 0 else 8, 8)
        shared = shared or nn.Linear(8, 8)
        net.add_module(f"block{i}", nn.Sequential(first, nn.ReLU(), shared))
    net.add_module("head", nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 3)))
    return net


def _d2l_shared() -> nn.Module:
    # The walkthrough's form: the shared layer is constructed before the layers listed ahead
    # of it in the tree.
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                         nn.Linear(8, 1))


def _move_node_first(spec: pb.ModelSpec, index: int) -> pb.ModelSpec:
    """The same tree with nodes[index] constructed first (indices remapped)."""
    order = [index] + [i for i in range(len(spec.nodes)) if i != index]
    new_index = {old: new for new, old in enumerate(order)}
    out = pb.ModelSpec(root=new_index[spec.root], ties=spec.ties)
    for old in order:
        node = out.nodes.add()
        node.CopyFrom(spec.nodes[old])
        for child in node.children:
            child.node = new_index[child.node]
    return out


def _tied() -> nn.Module:
    emb, head = nn.Embedding(11, 5), nn.Linear(5, 11, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, nn.Tanh(), head)


SEEDED = {
    "Linear": lambda: nn.Linear(7, 5),
    "Conv2d": lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3),
    "LSTM": lambda: nn.LSTM(4, 6, num_layers=2, bidirectional=True),
    "BatchNorm2d": lambda: nn.BatchNorm2d(5),
    "nested_named_blocks_shared": _named_blocks_with_shared,
    "tied_weights": _tied,
    "transformer_layer": lambda: nn.TransformerEncoderLayer(8, 2, 16),
}


@pytest.mark.parametrize("seed", [0, 2024])
@pytest.mark.parametrize("name", list(SEEDED))
def test_create_model_seed_reproduces_local_torch_bit_for_bit(client, name, seed):
    torch.manual_seed(seed)
    local = SEEDED[name]()
    with torch.device("meta"):
        skeleton = SEEDED[name]()  # the client sends only the structure
    info = create(client, "m", skeleton, seed=seed)
    remote = read_all(client, "m")
    expected = local.state_dict(keep_vars=False)
    # state_dict drops tied duplicates; the server lists every name.
    assert set(expected) <= set(remote)
    for key, value in expected.items():
        assert bits(remote[key]) == bits(value), key
    assert info.version == 0
    assert info.num_parameters == sum(p.numel() for p in local.parameters())


def test_create_model_seed_follows_the_spec_node_order(client):
    """Seeded creation draws in spec node order. spec_from_module lists modules in pre-order,
    so a module constructed earlier than that (the walkthrough's `shared = nn.Linear(8, 8)`
    made first) needs its node moved first to reproduce local init; uploading values (what
    Client.create_model does for a module that holds values) is exact in any case."""
    torch.manual_seed(7)
    local = _d2l_shared()
    spec = _spec.spec_from_module(local)
    shared_node = spec.nodes[spec.root].children[2].node
    client.create_model_from_spec("preorder", spec, seed=7)
    client.create_model_from_spec("ordered", _move_node_first(spec, shared_node), seed=7)
    preorder, ordered = read_all(client, "preorder"), read_all(client, "ordered")
    for key, value in local.state_dict().items():
        assert bits(ordered[key]) == bits(value), key
    assert bits(preorder["0.weight"]) != bits(local[0].weight.detach())
    assert client.check_shared("ordered", "2.weight", "4.weight")


def test_create_model_reports_model_info(client):
    info = create(client, "mlp", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                  seed=1)
    assert info.name == "models/mlp"
    assert info.device == "cpu"
    assert info.root_class == "Sequential"
    assert info.num_parameters == 4 * 8 + 8 + 8 * 2 + 2
    assert info.num_bytes == info.num_parameters * 4
    assert model_ids(client) == ["mlp"]


def test_create_model_counts_tied_storage_once(client):
    info = create(client, "t", _tied(), seed=0)
    assert info.num_parameters == 11 * 5
    assert info.num_bytes == 11 * 5 * 4


def test_create_model_uploaded_values_replace_built_ones(client):
    torch.manual_seed(3)
    local = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        local[1].running_mean.uniform_()
        local[1].num_batches_tracked.fill_(17)
    create(client, "up", local, upload=True)
    remote = read_all(client, "up")
    for key, value in local.state_dict().items():
        assert bits(remote[key]) == bits(value), key


def test_create_model_partial_upload_keeps_seeded_values(client):
    torch.manual_seed(9)
    local = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    spec = _spec.spec_from_module(local)
    new_bias = torch.tensor([5.0, -5.0])
    client.create_model_from_spec("p", spec, seed=9, values={"1.bias": new_bias})
    remote = read_all(client, "p")
    assert bits(remote["1.bias"]) == bits(new_bias)
    for key in ("0.weight", "0.bias", "1.weight"):
        assert bits(remote[key]) == bits(local.state_dict()[key])


def test_create_model_streams_values_larger_than_a_chunk(client):
    local = nn.Linear(1024, 700)  # 2.7 MiB of weight: three 1 MiB chunks
    create(client, "big", local, upload=True)
    remote, _ = client.get_tensor("big", "weight")
    assert bits(remote) == bits(local.weight.detach())


def test_create_model_without_seed_builds_fresh_values(client):
    create(client, "a", nn.Linear(50, 50))
    create(client, "b", nn.Linear(50, 50))
    assert not torch.equal(client.get_tensor("a", "weight")[0], client.get_tensor("b", "weight")[0])


def test_create_model_float64_and_dtype_args(client):
    local = nn.Linear(3, 2, dtype=torch.float64)
    create(client, "f64", local, upload=True)
    w, _ = client.get_tensor("f64", "weight")
    assert w.dtype is torch.float64 and bits(w) == bits(local.weight.detach())


# ------------------------------------------------------------------------------- errors


def test_create_model_existing_id_is_already_exists_and_keeps_the_original(client):
    torch.manual_seed(0)
    original = nn.Linear(2, 2)
    create(client, "dup", original, upload=True)
    with raises(AlreadyExistsError, "MODEL_EXISTS") as e:
        create(client, "dup", nn.Linear(2, 2), upload=True)
    assert e.value.metadata["model"] == "dup"
    assert bits(client.get_tensor("dup", "weight")[0]) == bits(original.weight.detach())
    with raises(AlreadyExistsError, "MODEL_EXISTS"):
        create(client, "dup", nn.Conv1d(1, 1, 1), seed=0)  # even a different model
    assert model_ids(client) == ["dup"]


def test_create_model_concurrent_same_id_creates_exactly_one(client):
    results: list[str] = []

    def attempt(i: int) -> None:
        try:
            create(client, "race", nn.Linear(8, 8), seed=i)
            results.append("ok")
        except AlreadyExistsError:
            results.append("exists")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["exists"] * 5 + ["ok"]
    assert model_ids(client) == ["race"]


@pytest.mark.parametrize("model_id", ["", "-x", "a/b", "a b", "x" * 129, "models/x", "é"])
def test_create_model_bad_id(client, model_id):
    with raises(InvalidArgumentError, "BAD_MODEL_ID"):
        create(client, model_id, nn.Linear(1, 1), seed=0)
    assert model_ids(client) == []


def _spec_with(type_name: str) -> pb.ModelSpec:
    spec = pb.ModelSpec(root=0)
    spec.nodes.add(type="Sequential").children.add(name="0", node=1)
    spec.nodes.add(type=type_name)
    return spec


@pytest.mark.parametrize("type_name", ["os.system", "builtins.eval", "NotAModule", "Module"])
def test_create_model_unknown_class_names_it(client, type_name):
    with raises(InvalidArgumentError, "MODULE_NOT_ALLOWED") as e:
        client.create_model_from_spec("bad", _spec_with(type_name), seed=0)
    assert type_name in str(e.value)
    assert e.value.metadata["class"] == type_name
    assert model_ids(client) == []


def test_create_model_malformed_specs(client):
    cyclic = pb.ModelSpec(root=0)
    cyclic.nodes.add(type="Sequential").children.add(name="0", node=0)
    bad_child = pb.ModelSpec(root=0)
    bad_child.nodes.add(type="Sequential").children.add(name="0", node=5)
    bad_args = pb.ModelSpec(root=0)
    bad_args.nodes.add(type="Linear", args=[_codec.value_to_proto("four")])
    bad_tie = _spec.spec_from_module(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3)))
    bad_tie.ties.add(parameter="1.weight", source="0.weight")
    for spec in (pb.ModelSpec(), cyclic, bad_child, bad_args, bad_tie):
        with raises(InvalidArgumentError, "BAD_SPEC"):
            client.create_model_from_spec("bad", spec, seed=0)
    assert model_ids(client) == []


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "cpu:0", "cuda:999"])
def test_create_model_bad_device(client, device):
    with raises(InvalidArgumentError, "BAD_DEVICE"):
        create(client, "dev", nn.Linear(1, 1), seed=0, device=device)
    assert model_ids(client) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_create_model_cuda_on_cpu_server(client):
    with raises(InvalidArgumentError, "BAD_DEVICE"):
        create(client, "dev", nn.Linear(1, 1), seed=0, device="cuda")


@pytest.mark.parametrize("values,cls,reason", [
    ({"weight": torch.zeros(3, 2)}, InvalidArgumentError, "BAD_VALUE"),
    ({"weight": torch.zeros(2, 2, dtype=torch.float64)}, InvalidArgumentError, "BAD_VALUE"),
    ({"bias": torch.zeros(2), "nope": torch.zeros(1)}, NotFoundError, "TENSOR_NOT_FOUND"),
], ids=["shape", "dtype", "unknown_key"])
def test_create_model_bad_uploaded_values(client, values, cls, reason):
    spec = _spec.spec_from_module(nn.Linear(2, 2))
    with raises(cls, reason):
        client.create_model_from_spec("v", spec, values=values)
    assert model_ids(client) == []


def _raw_create(client, messages):
    return client._call(client.stub.CreateModel, iter(messages))


def _header(model_id="raw"):
    return pb.CreateModelRequest(header=pb.CreateModelHeader(
        model_id=model_id, spec=_spec.spec_from_module(nn.Linear(2, 2)), seed=0))


def test_create_model_stream_errors(client):
    chunk = pb.CreateModelRequest(chunk=tpb.TensorChunk(
        header=tpb.TensorHeader(name="bias", dtype=tpb.DTYPE_FLOAT32, shape=[2]),
        data=b"\0" * 8))
    short = pb.CreateModelRequest(chunk=tpb.TensorChunk(
        header=tpb.TensorHeader(name="bias", dtype=tpb.DTYPE_FLOAT32, shape=[2]),
        data=b"\0" * 5))
    headless = pb.CreateModelRequest(chunk=tpb.TensorChunk(data=b"\0" * 8))
    cases = [
        ([], "BAD_STREAM"),
        ([chunk], "BAD_STREAM"),
        ([_header(), _header()], "BAD_STREAM"),
        ([_header(), chunk, _header()], "BAD_STREAM"),
        ([_header(), short], "BAD_TENSOR_BYTES"),
        ([_header(), headless], "BAD_TENSOR_BYTES"),
    ]
    for messages, reason in cases:
        with raises(InvalidArgumentError, reason):
            _raw_create(client, messages)
    assert model_ids(client) == []
    # The id is still free after every failure.
    info = _raw_create(client, [_header(), chunk]).model
    assert info.name == "models/raw"
    assert torch.equal(client.get_tensor("raw", "bias")[0], torch.zeros(2))


class TestMaxModelBytes:
    """A server with a per-model memory limit (1 MiB), so RESOURCE_EXHAUSTED is reachable."""

    @pytest.fixture
    def settings(self, settings):
        return dataclasses.replace(settings, max_model_bytes=1 << 20)

    def test_create_model_over_max_model_bytes_is_resource_exhausted(self, client):
        create(client, "small", nn.Linear(256, 256), seed=0)  # 257 KiB: fits
        with raises(ResourceExhaustedError, "MODEL_TOO_LARGE") as e:
            create(client, "huge", nn.Linear(1024, 1024), seed=0)  # 4 MiB: does not
        assert e.value.metadata["limit"] == "max_model_bytes"
        with raises(ResourceExhaustedError, "MODEL_TOO_LARGE"):
            create(client, "huge", nn.Linear(1024, 1024), upload=True)
        assert model_ids(client) == ["small"]
