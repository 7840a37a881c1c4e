"""Tensors of every dtype and size through the real server, over gRPC and shared memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import paramhub
from paramhub import _codec, _spec
from paramhub.errors import (ConflictError, InvalidArgumentError, NotFoundError,
                             ResourceExhaustedError)
from paramhub.common import pb
from paramhub_server.app import build_server

from _tensors import random_tensor

DTYPES = list(_codec._DTYPES)
MIB = 1 << 20


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(_codec.byte_view(a), _codec.byte_view(b)))


class Holder(nn.Module):
    """Buffers of any dtype, served through Registry.adopt."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.clone())


@pytest.fixture(params=[False, True], ids=["grpc", "shm"])
def any_client(request, target):
    with paramhub.connect(target, timeout=120, shm=request.param) as c:
        assert c.uses_shm is request.param
        yield c


def test_get_tensor_and_set_slice_every_dtype(server, any_client):
    originals = {f"t{i}": random_tensor((3, 5), dt, seed=i) for i, dt in enumerate(DTYPES)}
    server.registry.adopt("dtypes", Holder(originals))
    for i, (name, original) in enumerate(originals.items()):
        got, version = any_client.get_tensor("dtypes", name, kind="buffers")
        assert _same_bytes(got, original), DTYPES[i]
        assert version == 0
        new = random_tensor((3, 5), original.dtype, seed=100 + i)
        assert any_client.set_slice("dtypes", name, None, new, kind="buffers") == 1
        got, version = any_client.get_tensor("dtypes", name, kind="buffers")
        assert _same_bytes(got, new) and version == 1


@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 3), (1,), (2, 3, 4)])
def test_get_tensor_zero_dim_and_empty(server, any_client, shape):
    t = torch.randn(shape)
    server.registry.adopt("shapes", Holder({"x": t}))
    got, _ = any_client.get_tensor("shapes", "x", kind="buffers")
    assert got.shape == t.shape and torch.equal(got, t)
    new = torch.randn(shape)
    any_client.set_slice("shapes", "x", None, new, kind="buffers")
    assert torch.equal(any_client.get_tensor("shapes", "x", kind="buffers")[0], new)


@pytest.mark.parametrize("nbytes", [MIB - 1, MIB, MIB + 1, 2 * MIB - 1, 2 * MIB, 2 * MIB + 1,
                                    4 * MIB - 1, 4 * MIB, 4 * MIB + 1, 5 * MIB + 1])
def test_sizes_at_chunk_boundaries(server, any_client, nbytes):
    t = random_tensor((nbytes,), torch.uint8)
    server.registry.adopt("sizes", Holder({"x": torch.zeros(nbytes, dtype=torch.uint8)}))
    # Writes over 4 MiB use StreamSetSlice (or shm), below SetSlice: both sides of each boundary.
    assert any_client.set_slice("sizes", "x", None, t, kind="buffers") == 1
    got, version = any_client.get_tensor("sizes", "x", kind="buffers")
    assert version == 1 and torch.equal(got, t)


def test_non_contiguous_views_both_ways(server, any_client):
    base = torch.randn(600, 700)
    server.registry.adopt("views", Holder({"x": base}))
    for index in [(slice(None), slice(1, None, 3)), (slice(None, None, 2),), (Ellipsis, 5),
                  (torch.tensor([5, 1, 5]),)]:
        got, _ = any_client.get_tensor("views", "x", index, kind="buffers")
        assert got.is_contiguous() and torch.equal(got, base[index])
    # A transposed (non-contiguous) value written into a non-contiguous region.
    value = torch.randn(700, 300).t()
    any_client.set_slice("views", "x", (slice(None, None, 2),), value, kind="buffers")
    expected = base.clone()
    expected[::2] = value
    assert torch.equal(any_client.get_tensor("views", "x", kind="buffers")[0], expected)
    # Conjugate / negative views travel resolved.
    z = torch.randn(4, 4, dtype=torch.complex64)
    server.registry.adopt("conj", Holder({"z": torch.zeros(4, 4, dtype=torch.complex64)}))
    any_client.set_slice("conj", "z", None, z.conj(), kind="buffers")
    assert torch.equal(any_client.get_tensor("conj", "z", kind="buffers")[0], z.conj_physical())


def _create(client: paramhub.Client, model_id: str, module: nn.Module) -> None:
    # The SDK's create_model returns the module mirror; only the wire call matters here.
    client.create_model_from_spec(model_id, _spec.spec_from_module(module),
                                  values=module.state_dict())


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))


def test_pull_state_whole_and_filtered(client):
    torch.manual_seed(0)
    local = _mlp()
    _create(client, "mlp", local)
    state, versions = client.pull_state("mlp")
    assert list(state) == list(local.state_dict())
    for k, v in local.state_dict().items():
        assert _same_bytes(state[k], v)
    assert set(versions.values()) == {0}
    assert list(client.pull_state("mlp", parameters_only=True)[0]) == [
        n for n, _ in local.named_parameters()]
    assert list(client.pull_state("mlp", prefix="1.")[0]) == [
        k for k in local.state_dict() if k.startswith("1.")]
    assert list(client.pull_state("mlp", glob="*.bias")[0]) == ["0.bias", "1.bias", "2.bias"]
    picked, versions = client.pull_state("mlp", names=["2.weight", "0.bias"])
    assert list(picked) == ["2.weight", "0.bias"]
    client.set_slice("mlp", "0.bias", 0, 5.0)
    assert client.pull_state("mlp", names=["0.bias"])[1] == {"0.bias": 1}


def test_pull_state_errors(client):
    _create(client, "mlp", _mlp())
    with pytest.raises(NotFoundError) as e:
        client.pull_state("mlp", names=["0.weight", "nope"])
    assert e.value.reason == "TENSOR_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as e:
        client.pull_state("mlp", names=["0.weight", "0.weight"])
    assert e.value.reason == "DUPLICATE_TENSOR"
    with pytest.raises(NotFoundError) as e:
        client.pull_state("ghost")
    assert e.value.reason == "MODEL_NOT_FOUND"


def test_push_state_round_trip_and_versions(client):
    _create(client, "mlp", _mlp())
    torch.manual_seed(1)
    other = _mlp()
    versions = client.push_state("mlp", other.state_dict())
    assert set(versions) == set(other.state_dict()) and set(versions.values()) == {1}
    state, pulled_versions = client.pull_state("mlp")
    for k, v in other.state_dict().items():
        assert _same_bytes(state[k], v)
    assert pulled_versions == versions
    # A subset, with a dtype cast as load_state_dict does (float64 -> float32).
    client.push_state("mlp", {"2.bias": torch.tensor([7.0], dtype=torch.float64)})
    assert client.get_tensor("mlp", "2.bias") == (torch.tensor([7.0]), 2)


def test_push_state_is_all_or_nothing(client):
    _create(client, "mlp", _mlp())
    before, before_versions = client.pull_state("mlp")
    before = {k: v.clone() for k, v in before.items()}
    good = {k: torch.ones_like(v) for k, v in before.items()}
    cases = [
        ({**good, "2.weight": torch.ones(2, 8)}, InvalidArgumentError, "BAD_SHAPE"),
        ({**good, "nope": torch.ones(1)}, NotFoundError, "TENSOR_NOT_FOUND"),
        ({**good, "0.weight": torch.ones(8, 4, dtype=torch.complex64)}, InvalidArgumentError,
         "BAD_DTYPE"),
    ]
    for state, exc, reason in cases:
        with pytest.raises(exc) as e:
            client.push_state("mlp", state)
        assert e.value.reason == reason
    with pytest.raises(ConflictError) as e:
        client.push_state("mlp", good, expected_model_version=41)
    assert e.value.reason == "VERSION_MISMATCH"
    after, after_versions = client.pull_state("mlp")
    assert after_versions == before_versions
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_pull_and_push_state_of_tied_weights(client):
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net[2].weight = net[0].weight
    _create(client, "tied", net)
    state, _ = client.pull_state("tied")
    assert torch.equal(state["0.weight"], state["2.weight"])
    versions = client.push_state("tied", {"2.weight": torch.full((4, 4), 3.0)})
    assert versions == {"0.weight": 1}  # a storage is reported by its first name
    assert torch.equal(client.get_tensor("tied", "0.weight")[0], torch.full((4, 4), 3.0))


def test_forward_output_over_the_message_limit_is_resource_exhausted(settings):
    srv = build_server(dataclasses.replace(settings, max_message_bytes=1 * MIB))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            _create(c, "wide", nn.Linear(4, 1024))
            before = c.list_models()[0].version
            with pytest.raises(ResourceExhaustedError) as e:
                c.forward("wide", torch.randn(512, 4))  # 2 MiB of output
            assert e.value.reason == "MESSAGE_TOO_LARGE"
            assert e.value.metadata["limit"] == "max_message_bytes"
            with pytest.raises(ResourceExhaustedError) as e:
                c.forward("wide", torch.randn(300_000, 4))  # 4.6 MiB of input
            assert e.value.reason == "MESSAGE_TOO_LARGE"
            assert e.value.metadata["limit_bytes"] == str(MIB)
            assert c.forward("wide", torch.randn(2, 4)).shape == (2, 1024)
            assert c.list_models()[0].version == before
    finally:
        srv.stop(None)


def test_transport_info(client, server):
    info = client.transport_info()
    assert info.max_message_bytes == server.transport.max_message_bytes
    assert info.chunk_bytes == _codec.DEFAULT_CHUNK_BYTES
    assert info.shm_address == server.transport.shm.address


def test_small_reads_go_unary_and_stay_correct(server, client):
    server.registry.adopt("inline", Holder({"x": torch.arange(12.0).reshape(3, 4)}))
    first, v0 = client.get_tensor("inline", "x", kind="buffers")  # streamed; size learnt
    assert client._sizes[("models/inline/buffers/x", "value", "")] == 48
    again, v1 = client.get_tensor("inline", "x", (1, slice(None, None, 2)), kind="buffers")
    assert torch.equal(again, first[1, ::2]) and v0 == v1 == 0
    assert torch.equal(client.get_tensor("inline", "x", (None, Ellipsis, 0),
                                         kind="buffers")[0], first[None, ..., 0])
    # Recreated under the same name with a big tensor: the stale size only costs a refusal.
    server.registry.delete("inline")
    server.registry.adopt("inline", Holder({"x": torch.ones(1536, 1024)}))
    big, _ = client.get_tensor("inline", "x", kind="buffers")
    assert big.shape == (1536, 1024) and bool(big.eq(1).all())


def test_get_tensor_inline_refuses_big_values(server, client):
    server.registry.adopt("inline", Holder({"x": torch.ones(2048, 1024)}))  # 8 MiB
    request = pb.GetTensorInlineRequest(name="models/inline/buffers/x")
    with pytest.raises(ResourceExhaustedError) as e:
        client._call(client._get_inline_raw, request)
    assert e.value.reason == "MESSAGE_TOO_LARGE" and e.value.metadata["limit"] == "inline_bytes"
    request.index.extend(_codec.index_to_proto((slice(0, 2),)))
    chunk = client._call(client._get_inline_raw, request)
    assert chunk.header.shape == [2, 1024] and len(chunk.data) == 2 * 1024 * 4


def test_get_tensor_out_receives_in_place(server, client):
    server.registry.adopt("outm", Holder({"x": torch.randn(1024, 300)}))
    out = torch.empty(1024, 300)
    got, _ = client.get_tensor("outm", "x", kind="buffers", out=out)
    assert got is out and torch.equal(out, server.registry.get("outm").module.x)
    with pytest.raises(InvalidArgumentError) as e:
        client.get_tensor("outm", "x", kind="buffers", out=torch.empty(3))
    assert e.value.reason == "BAD_OUT"


@pytest.mark.cuda
@pytest.mark.parametrize("shm", [False, True], ids=["grpc", "shm"])
def test_cuda_server_moves_tensors_both_ways(settings, shm):
    srv = build_server(dataclasses.replace(settings, device="cuda"))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=120, shm=shm) as c:
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 8))
            _create(c, "gpu", net)
            live = srv.registry.get("gpu").module
            assert live[0].weight.is_cuda
            for _ in range(2):  # the second read of a known size takes the pooled path
                w, _ = c.get_tensor("gpu", "0.weight")
                assert not w.is_cuda and torch.equal(w, net[0].weight.detach())
            region, _ = c.get_tensor("gpu", "0.weight", (slice(None), slice(0, 512, 2)))
            assert torch.equal(region, net[0].weight.detach()[:, 0:512:2])
            new = torch.randn(1024, 1024)
            c.set_slice("gpu", "0.weight", None, new)
            assert torch.equal(live[0].weight.detach().cpu(), new)
            state, _ = c.pull_state("gpu")
            assert torch.equal(state["0.weight"], new)
            c.push_state("gpu", {k: v * 2 for k, v in state.items()})
            assert torch.equal(live[2].bias.detach().cpu(), state["2.bias"] * 2)
            out = c.forward("gpu", torch.ones(2, 1024))
            assert out.shape == (2, 8) and not out.is_cuda
    finally:
        srv.stop(None)


def test_mirror_pull_and_load_state_dict_use_one_bulk_call(client):
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    net = client.create_model("mirror", local)
    before = dict(client.rpc_counts)
    copy = net.pull()
    assert type(copy) is nn.Sequential and not hasattr(copy, "model_id")
    for k, v in local.state_dict().items():
        assert torch.equal(copy.state_dict()[k], v)
    calls = {k: v - before.get(k, 0) for k, v in client.rpc_counts.items()
             if v != before.get(k, 0)}
    assert "GetTensor" not in calls  # one bulk read
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    before = dict(client.rpc_counts)
    result = net.load_state_dict(other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    calls = {k: v - before.get(k, 0) for k, v in client.rpc_counts.items()
             if v != before.get(k, 0)}
    assert calls == {"PushState": 1}
    pulled, _ = client.pull_state("mirror")
    for k, v in other.state_dict().items():
        assert torch.equal(pulled[k], v)
    # strict: a missing key changes nothing and raises as torch does.
    partial = {k: torch.zeros_like(v) for k, v in other.state_dict().items() if k != "2.bias"}
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict(partial)
    assert torch.equal(client.pull_state("mirror")[0]["0.weight"], other[0].weight)
    assert net.load_state_dict(partial, strict=False).missing_keys == ["2.bias"]
    assert torch.equal(client.pull_state("mirror")[0]["0.weight"], torch.zeros(8, 4))
