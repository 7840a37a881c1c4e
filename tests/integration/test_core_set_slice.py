"""SetSlice and StreamSetSlice through the real SDK: ops, indices, broadcasting, versions,
expected_version, tied storage, streamed values, errors that change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _core_helpers import bits, create, raises, read_all, snapshot, unchanged
from paramhub import _codec
from paramhub.client import INLINE_BYTES
from paramhub.errors import (ConflictError, InvalidArgumentError, NotFoundError,
                             OutOfRangeError)
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb

W = "0.weight"


@pytest.fixture
def local(client):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    create(client, "m", m, upload=True)
    return m


def _w(local) -> torch.Tensor:
    return local[0].weight.detach().clone()


OPS = {"assign": lambda r, v: v, "add": lambda r, v: r + v, "sub": lambda r, v: r - v,
       "mul": lambda r, v: r * v, "div": lambda r, v: r / v}

REGIONS = {
    "whole": None, "row": 1, "negative_row": -1, "element": (2, 3), "column": (slice(None), 4),
    "step": (slice(None, None, 2), slice(1, None, 2)), "ellipsis": (Ellipsis, 0),
    "int_tensor": torch.tensor([0, 3]), "bool_mask": torch.tensor([True, False, False, True,
                                                                   True]),
    "none": (None, 2),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("region", list(REGIONS))
def test_set_slice_ops_and_regions_match_local_torch(client, local, op, region):
    index = REGIONS[region]
    expected = _w(local)
    sel = expected[index] if index is not None else expected
    value = torch.full(sel.shape, 2.5) if sel.dim() else torch.tensor(2.5)
    new = OPS[op](sel, value)
    if index is None:
        expected = new
    else:
        expected[index] = new
    version = client.set_slice("m", W, index, value, op=op)
    assert version == 1
    assert bits(client.get_tensor("m", W)[0]) == bits(expected)


def test_set_slice_broadcasts_scalars_and_rows(client, local):
    expected = _w(local)
    client.set_slice("m", W, (slice(0, 2),), torch.arange(6.0))  # a row into two rows
    expected[0:2] = torch.arange(6.0)
    client.set_slice("m", W, None, 3.0, op="mul")  # a Python number into everything
    expected *= 3.0
    client.set_slice("m", W, (slice(None), 0), torch.tensor([[1.0]]).squeeze(0), op="add")
    expected[:, 0] += 1.0
    assert bits(client.get_tensor("m", W)[0]) == bits(expected)


def test_set_slice_promotes_like_torch_inplace(client, local):
    expected = _w(local)
    client.set_slice("m", W, 0, torch.ones(6, dtype=torch.int64), op="add")
    client.set_slice("m", W, 1, torch.ones(6, dtype=torch.float64) * 0.5)
    expected[0] += 1
    expected[1] = 0.5
    got, _ = client.get_tensor("m", W)
    assert got.dtype is torch.float32 and bits(got) == bits(expected)


def test_set_slice_buffers(client, local):
    client.set_slice("m", "1.running_mean", slice(0, 2), 7.0, kind="buffers")
    client.set_slice("m", "1.num_batches_tracked", None, 5, op="add", kind="buffers")
    assert torch.equal(client.get_tensor("m", "1.running_mean", kind="buffers")[0],
                       torch.tensor([7.0, 7.0, 0.0, 0.0, 0.0]))
    assert client.get_tensor("m", "1.num_batches_tracked", kind="buffers")[0].item() == 5


def test_set_slice_versions(client, local):
    assert client.set_slice("m", W, 0, 1.0) == 1
    assert client.set_slice("m", W, 0, 1.0, op="add") == 2
    assert client.set_slice("m", "0.bias", 0, 1.0) == 1
    response = client._call(client.stub.SetSlice, pb.SetSliceRequest(
        name="models/m/parameters/0.bias", op=pb.SLICE_OP_ADD,
        value=_codec.tensor_to_proto(torch.tensor(1.0))))
    assert (response.version, response.model_version) == (2, 4)
    assert client.list_models()[0].version == 4


def test_set_slice_expected_version(client, local):
    assert client.set_slice("m", W, 0, 1.0, expected_version=0) == 1
    assert client.set_slice("m", W, 0, 2.0, expected_version=1) == 2
    assert client.get_tensor("m", W, (0, 0))[0].item() == 2.0


@pytest.mark.parametrize("expected_version", [0, 2, -1, 100])
def test_set_slice_stale_expected_version_is_aborted(client, local, expected_version):
    client.set_slice("m", W, 0, 1.0)  # version 1
    with unchanged(client, "m"), raises(ConflictError, "VERSION_MISMATCH") as e:
        client.set_slice("m", W, 0, 9.0, expected_version=expected_version)
    assert e.value.metadata["version"] == "1"


def test_set_slice_tied_storage_is_one_tensor(client):
    emb, head = nn.Embedding(4, 3), nn.Linear(3, 4, bias=False)
    head.weight = emb.weight
    create(client, "tied", nn.Sequential(emb, head), seed=0)
    v = client.set_slice("tied", "1.weight", (0, 0), 100.0)
    assert client.get_tensor("tied", "0.weight", (0, 0))[0].item() == 100.0
    assert client.get_tensor("tied", "0.weight")[1] == v == 1
    # expected_version is per storage: either name sees the same version.
    assert client.set_slice("tied", "0.weight", (0, 1), 5.0, expected_version=1) == 2


def test_set_slice_shared_module_is_one_tensor(client):
    shared = nn.Linear(2, 2)
    create(client, "s", nn.Sequential(shared, nn.ReLU(), shared), seed=0)
    client.set_slice("s", "0.weight", (0, 0), 100.0)
    assert client.get_tensor("s", "2.weight", (0, 0))[0].item() == 100.0


def test_stream_set_slice_large_value(client):
    emb = nn.Embedding(1 << 18, 8)  # 8 MiB of float32 weight
    create(client, "big", emb, seed=0)
    value = torch.randn(1 << 18, 8)
    assert value.numel() * 4 > INLINE_BYTES  # goes through StreamSetSlice
    assert client.set_slice("big", "weight", None, value) == 1
    assert bits(client.get_tensor("big", "weight")[0]) == bits(value)
    half = torch.ones((1 << 17) + 1, 8)
    assert client.set_slice("big", "weight", slice(0, (1 << 17) + 1), half, op="add") == 2
    expected = value.clone()
    expected[: (1 << 17) + 1] += 1
    assert bits(client.get_tensor("big", "weight")[0]) == bits(expected)


def _stream_request(value: torch.Tensor, name="models/m/parameters/0.weight", **kw):
    req = pb.SetSliceRequest(name=name, op=pb.SLICE_OP_ASSIGN,
                             value=tpb.Tensor(dtype=_codec.dtype_to_proto(value.dtype),
                                              shape=list(value.shape)), **kw)
    return pb.StreamSetSliceRequest(request=req)


def test_stream_set_slice_raw_with_small_chunks(client, local):
    value = torch.arange(30.0).reshape(5, 6)
    data = _codec.tensor_to_proto(value).data
    msgs = [_stream_request(value)] + [pb.StreamSetSliceRequest(data=data[i:i + 7])
                                       for i in range(0, len(data), 7)]
    response = client._call(client.stub.StreamSetSlice, iter(msgs))
    assert (response.version, response.model_version) == (1, 1)
    assert torch.equal(client.get_tensor("m", W)[0], value)


def test_stream_set_slice_errors_change_nothing(client, local):
    value = torch.zeros(5, 6)
    data = _codec.tensor_to_proto(value).data
    first = _stream_request(value)
    with_data = _stream_request(value)
    with_data.request.value.data = b"\0" * 4
    cases = [
        ([], InvalidArgumentError, "BAD_STREAM"),
        ([pb.StreamSetSliceRequest(data=data)], InvalidArgumentError, "BAD_STREAM"),
        ([with_data, pb.StreamSetSliceRequest(data=data)], InvalidArgumentError, "BAD_STREAM"),
        ([first, pb.StreamSetSliceRequest(data=data), first], InvalidArgumentError,
         "BAD_STREAM"),
        ([first, pb.StreamSetSliceRequest(data=data[:-1])], InvalidArgumentError,
         "BAD_TENSOR_BYTES"),
        ([first, pb.StreamSetSliceRequest(data=data + b"x")], InvalidArgumentError,
         "BAD_TENSOR_BYTES"),
        ([_stream_request(torch.zeros(2, 2)), pb.StreamSetSliceRequest(data=b"\0" * 16)],
         InvalidArgumentError, "BAD_SHAPE"),
        ([_stream_request(value, expected_version=3), pb.StreamSetSliceRequest(data=data)],
         ConflictError, "VERSION_MISMATCH"),
        ([_stream_request(value, name="models/m/parameters/zz"),
          pb.StreamSetSliceRequest(data=data)], NotFoundError, "TENSOR_NOT_FOUND"),
    ]
    with unchanged(client, "m"):
        for msgs, cls, reason in cases:
            with raises(cls, reason):
                client._call(client.stub.StreamSetSlice, iter(msgs))


# ------------------------------------------------------------------------------- errors


def test_set_slice_unknown_model_and_tensor(client, local):
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.set_slice("ghost", W, 0, 1.0)
    with unchanged(client, "m"):
        with raises(NotFoundError, "TENSOR_NOT_FOUND"):
            client.set_slice("m", "0.nope", 0, 1.0)
        with raises(NotFoundError, "TENSOR_NOT_FOUND"):
            client.set_slice("m", "1.running_mean", 0, 1.0)  # a buffer, named as a parameter
        with raises(NotFoundError, "TENSOR_NOT_FOUND"):
            client.set_slice("m", W, 0, 1.0, kind="buffers")


@pytest.mark.parametrize("index", [5, -6, (0, 6), torch.tensor([1, 7])], ids=str)
def test_set_slice_out_of_range(client, local, index):
    with unchanged(client, "m"), raises(OutOfRangeError, "INDEX_OUT_OF_RANGE"):
        client.set_slice("m", W, index, 1.0)


@pytest.mark.parametrize("index,value,op", [
    (None, torch.ones(5, 5), "assign"),
    (0, torch.ones(5), "add"),
    ((slice(None), 0), torch.ones(6), "mul"),
    (torch.tensor([0, 1]), torch.ones(3, 6), "sub"),
], ids=["whole", "row", "column", "int_tensor"])
def test_set_slice_shape_that_does_not_broadcast(client, local, index, value, op):
    with unchanged(client, "m"), raises(InvalidArgumentError, "BAD_SHAPE"):
        client.set_slice("m", W, index, value, op=op)


@pytest.mark.parametrize("name,kind,value,op", [
    ("1.num_batches_tracked", "buffers", torch.tensor(1.5), "assign"),
    ("1.num_batches_tracked", "buffers", torch.tensor(1.5), "add"),
    ("1.num_batches_tracked", "buffers", torch.tensor(2), "div"),
    (W, "parameters", torch.tensor(1 + 2j), "assign"),
    (W, "parameters", torch.ones(6, dtype=torch.complex64), "add"),
], ids=["float_into_int", "float_add_into_int", "int_true_div", "complex_into_float",
        "complex_add_into_float"])
def test_set_slice_dtype_that_cannot_be_cast(client, local, name, kind, value, op):
    with unchanged(client, "m"), raises(InvalidArgumentError, "BAD_DTYPE"):
        client.set_slice("m", name, None, value, op=op, kind=kind)


@pytest.mark.parametrize("items", [
    [tpb.IndexItem(slice=tpb.Slice(step=0))],
    [tpb.IndexItem(slice=tpb.Slice(step=-2))],
    [tpb.IndexItem(ellipsis=tpb.Ellipsis())] * 2,
    [tpb.IndexItem(tensor=_codec.tensor_to_proto(torch.tensor([0.0])))],
    [tpb.IndexItem()],
], ids=["step0", "step_negative", "two_ellipses", "float_tensor", "unset"])
def test_set_slice_bad_index(client, local, items):
    request = pb.SetSliceRequest(name="models/m/parameters/0.weight", index=items,
                                 op=pb.SLICE_OP_ASSIGN,
                                 value=_codec.tensor_to_proto(torch.tensor(1.0)))
    with unchanged(client, "m"), raises(InvalidArgumentError, "BAD_INDEX"):
        client._call(client.stub.SetSlice, request)


@pytest.mark.parametrize("op", [pb.SLICE_OP_UNSPECIFIED, 99])
def test_set_slice_bad_op(client, local, op):
    request = pb.SetSliceRequest(name="models/m/parameters/0.weight", op=op,
                                 value=_codec.tensor_to_proto(torch.tensor(1.0)))
    with unchanged(client, "m"), raises(InvalidArgumentError, "BAD_OP"):
        client._call(client.stub.SetSlice, request)
    with raises(InvalidArgumentError, "BAD_OP"):
        client.set_slice("m", W, 0, 1.0, op="pow")  # the SDK refuses before sending


@pytest.mark.parametrize("value,reason", [
    (tpb.Tensor(), "UNSUPPORTED_DTYPE"),
    (tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 3), "BAD_TENSOR_BYTES"),
    (tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=[-2]), "BAD_SHAPE"),
], ids=["missing_value", "short_bytes", "negative_shape"])
def test_set_slice_malformed_value(client, local, value, reason):
    request = pb.SetSliceRequest(name="models/m/parameters/0.weight", op=pb.SLICE_OP_ASSIGN,
                                 value=value)
    with unchanged(client, "m"), raises(InvalidArgumentError, reason):
        client._call(client.stub.SetSlice, request)


def test_set_slice_failure_after_valid_writes_keeps_them(client, local):
    client.set_slice("m", W, 0, 1.0)
    before = snapshot(client, "m")
    with raises(OutOfRangeError, "INDEX_OUT_OF_RANGE"):
        client.set_slice("m", W, 9, 1.0)
    assert snapshot(client, "m") == before
    assert read_all(client, "m")[W][0].eq(1.0).all()
