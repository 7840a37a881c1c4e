"""GetTensor through the real SDK: whole tensors, torch indices, buffers, chunking, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _core_helpers import bits, create, raises, unchanged
from paramhub import _codec
from paramhub.errors import InvalidArgumentError, NotFoundError, OutOfRangeError
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb


@pytest.fixture
def local(client):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    with torch.no_grad():
        m[1].running_mean.copy_(torch.arange(5.0))
    create(client, "m", m, upload=True)
    return m


W = "0.weight"

INDICES = {
    "int": 2, "negative": -1, "pair": (1, -2), "slice_step": slice(None, None, 2),
    "slice_bounds": (slice(1, 4), slice(-3, None)), "ellipsis": (Ellipsis, 0),
    "none": (None, slice(None), 1), "bool_mask": torch.tensor([True, False, True, False, True]),
    "int_tensor": torch.tensor([4, 0, -1]), "2d_mask": "mask", "list": [0, 0, 3],
    "mixed": (torch.tensor([0, 2]), slice(None, None, 3)), "empty_slice": slice(3, 3),
}


@pytest.mark.parametrize("name", list(INDICES))
def test_get_tensor_index_matches_local_torch(client, local, name):
    index = INDICES[name]
    w = local[0].weight.detach()
    if index == "mask":
        index = w > 0
    got, version = client.get_tensor("m", W, index)
    assert bits(got) == bits(w[index].contiguous())
    assert version == 0


def test_get_tensor_whole_and_bias(client, local):
    assert bits(client.get_tensor("m", W)[0]) == bits(local[0].weight.detach())
    assert bits(client.get_tensor("m", "0.bias")[0]) == bits(local[0].bias.detach())
    assert bits(client.get_tensor("m", "1.weight")[0]) == bits(local[1].weight.detach())


def test_get_tensor_buffers(client, local):
    got, _ = client.get_tensor("m", "1.running_mean", kind="buffers")
    assert torch.equal(got, torch.arange(5.0))
    count, _ = client.get_tensor("m", "1.num_batches_tracked", kind="buffers")
    assert count.dtype is torch.int64 and count.shape == ()
    got, _ = client.get_tensor("m", "1.running_mean", slice(1, None, 2), kind="buffers")
    assert torch.equal(got, torch.tensor([1.0, 3.0]))


def test_get_tensor_0d_result(client, local):
    got, _ = client.get_tensor("m", W, (1, 2))
    assert got.shape == () and bits(got) == bits(local[0].weight.detach()[1, 2])


def test_get_tensor_returns_a_copy(client, local):
    got, _ = client.get_tensor("m", W)
    got.fill_(0)
    assert bits(client.get_tensor("m", W)[0]) == bits(local[0].weight.detach())


def test_get_tensor_version_follows_writes(client, local):
    client.set_slice("m", W, 0, 1.0)
    _, version = client.get_tensor("m", W)
    assert version == 1
    _, version = client.get_tensor("m", "0.bias")
    assert version == 0


@pytest.mark.parametrize("chunk_bytes,expected", [(0, 1 << 20), (1, 4 << 10), (10_000, 10_000),
                                                   (1 << 30, 4 << 20)])
def test_get_tensor_chunk_size_is_clamped(client, chunk_bytes, expected):
    t = torch.arange(3 << 20, dtype=torch.uint8)  # 3 MiB: several chunks of every size
    lin = nn.Embedding(3 << 18, 4)  # weight of (786432, 4) float32 = 12 MiB
    with torch.no_grad():
        lin.weight.view(-1).view(torch.uint8)[: t.numel()].copy_(t)
    create(client, "big", lin, upload=True)
    request = pb.GetTensorRequest(name="models/big/parameters/weight", chunk_bytes=chunk_bytes)
    chunks = [r.chunk for r in client._stream(client.stub.GetTensor, request)]
    total = lin.weight.numel() * 4
    assert len(chunks) == -(-total // expected)
    assert all(len(c.data) == expected for c in chunks[:-1])
    assert chunks[0].header.name == "weight" and list(chunks[0].header.shape) == [3 << 18, 4]
    (asm,) = list(_codec.assemble_tensors(chunks))
    assert bits(asm.finish()) == bits(lin.weight.detach())


def test_get_tensor_of_an_empty_region(client, local):
    got, _ = client.get_tensor("m", W, (slice(2, 2),))
    assert got.shape == (0, 6)


# ------------------------------------------------------------------------------- errors


def test_get_tensor_unknown_model(client):
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.get_tensor("ghost", W)


@pytest.mark.parametrize("name,kind", [("0.nope", "parameters"), ("2.weight", "parameters"),
                                       ("1.running_mean", "parameters"),
                                       ("0.weight", "buffers"), ("", "parameters")])
def test_get_tensor_unknown_tensor(client, local, name, kind):
    cls, reason = (NotFoundError, "TENSOR_NOT_FOUND") if name else (InvalidArgumentError,
                                                                    "BAD_NAME")
    with raises(cls, reason):
        client.get_tensor("m", name, kind=kind)


@pytest.mark.parametrize("name", ["models/m", "models/m/weights/0.weight", "m/parameters/0.weight",
                                  "models//parameters/0.weight"])
def test_get_tensor_bad_name(client, local, name):
    with raises(InvalidArgumentError, "BAD_NAME"):
        list(client._stream(client.stub.GetTensor, pb.GetTensorRequest(name=name)))


def test_get_tensor_grad_not_set(client, local):
    with raises(NotFoundError, "GRAD_NOT_SET"):
        client.get_tensor("m", W, grad=True)
    with raises(NotFoundError, "GRAD_NOT_SET"):
        client.get_tensor("m", "1.running_mean", grad=True, kind="buffers")


@pytest.mark.parametrize("index", [5, -6, (0, 6), (slice(None), -7),
                                   torch.tensor([0, 5]), torch.tensor([-6])], ids=str)
def test_get_tensor_out_of_range(client, local, index):
    with unchanged(client, "m"), raises(OutOfRangeError, "INDEX_OUT_OF_RANGE"):
        client.get_tensor("m", W, index)


@pytest.mark.parametrize("items", [
    [tpb.IndexItem(slice=tpb.Slice(step=0))],
    [tpb.IndexItem(slice=tpb.Slice(step=-1))],
    [tpb.IndexItem(ellipsis=tpb.Ellipsis()), tpb.IndexItem(ellipsis=tpb.Ellipsis())],
    [tpb.IndexItem(tensor=_codec.tensor_to_proto(torch.tensor([0.0])))],
    [tpb.IndexItem()],
    [tpb.IndexItem(integer=0)] * 3,
    [tpb.IndexItem(tensor=_codec.tensor_to_proto(torch.tensor([True, False])))],
], ids=["step0", "step_negative", "two_ellipses", "float_tensor", "unset", "too_many",
        "mask_shape"])
def test_get_tensor_bad_index(client, local, items):
    request = pb.GetTensorRequest(name="models/m/parameters/0.weight", index=items)
    with unchanged(client, "m"), raises(InvalidArgumentError, "BAD_INDEX"):
        list(client._stream(client.stub.GetTensor, request))
