"""The transfer layer: which transport the policy picks for each size and client, what each
transfer is recorded as, fallback when a side link dies, and the scalar fast path of handles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paramhub
from paramhub import _codec, _data, _shm
from paramhub._transfer.policy import DEFAULT, Policy
from paramhub.errors import InvalidArgumentError, NotFoundError, OutOfRangeError

MIB = 1 << 20
BIG = _data.DATA_MIN_BYTES // 4 + 1  # float32 elements just past the data channel's threshold


class Holder(nn.Module):
    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.clone())


def _buf(server, name: str) -> torch.Tensor:
    return getattr(server.registry.get("m").module, name)


def _moved(c: paramhub.Client, fn) -> str:
    """The transfers `fn` made through the layer, as "op:transport" (exactly one expected)."""
    before = dict(c.transfers)
    fn()
    after = dict(c.transfers)
    grown = [k for k in after if after[k] != before.get(k, 0)]
    assert len(grown) == 1 and after[grown[0]] - before.get(grown[0], 0) == 1, (before, after)
    return grown[0]


@pytest.mark.skipif(not _shm.shm_supported(), reason="needs Linux memfd")
def test_same_host_client_moves_big_tensors_through_shm(server, target):
    server.registry.adopt("m", Holder(big=torch.randn(MIB // 2), small=torch.randn(4)))
    with paramhub.connect(target, timeout=60, progress=False) as c:
        c.list_parameters("m", include_buffers=True)  # sizes known: the policy can pick
        assert _moved(c, lambda: c.get_tensor("m", "small", kind="buffers")) == "get:inline"
        assert _moved(c, lambda: c.get_tensor("m", "big", kind="buffers")) == "get:shm"
        # The second read of a size seen before lends the server a warm pooled segment.
        got, _ = c.get_tensor("m", "big", kind="buffers")
        assert torch.equal(got, _buf(server, "big"))
        value = torch.randn(MIB // 2)
        assert _moved(c, lambda: c.set_slice("m", "big", None, value, kind="buffers")) == "set:shm"
        assert torch.equal(_buf(server, "big"), value)
        assert _moved(c, lambda: c.set_slice("m", "small", 0, 1.5, kind="buffers")) == "set:inline"
        assert _moved(c, lambda: c.pull_state("m")) == "pull:shm"
        assert _moved(c, lambda: c.push_state("m", {"big": value * 2})) == "push:shm"
        assert torch.equal(_buf(server, "big"), value * 2)
        assert server.transport.shm.sent >= 2 and server.transport.shm.received >= 2


def test_remote_client_moves_big_tensors_over_the_data_channel(server, target):
    server.registry.adopt("m", Holder(big=torch.randn(BIG), mid=torch.randn(2 * MIB)))
    with paramhub.connect(target, timeout=120, shm=False, progress=False) as c:
        c.list_parameters("m", include_buffers=True)
        assert _moved(c, lambda: c.get_tensor("m", "big", kind="buffers")) == "get:data"
        value = torch.randn(BIG)
        assert _moved(c, lambda: c.set_slice("m", "big", None, value, kind="buffers")) == "set:data"
        assert torch.equal(_buf(server, "big"), value)
        # 8 MiB: under the data channel's threshold, over the inline limit: a gRPC stream.
        mid = torch.randn(2 * MIB)
        assert _moved(c, lambda: c.set_slice("m", "mid", None, mid, kind="buffers")
                      ) == "set:stream"
        assert _moved(c, lambda: c.get_tensor("m", "mid", kind="buffers")) == "get:stream"
        assert _moved(c, lambda: c.pull_state("m")) == "pull:stream"
        assert _moved(c, lambda: c.push_state("m", {"mid": mid + 1})) == "push:stream"
        assert torch.equal(_buf(server, "mid"), mid + 1)


def test_a_dead_side_link_falls_back_and_is_recorded_so(server, target):
    server.registry.adopt("m", Holder(big=torch.randn(BIG)))
    with paramhub.connect(target, timeout=120, shm=False, progress=False) as c:
        assert c.uses_data_channel
        server.transport.data.close()  # the kept connection dies; new ones are refused
        got, _ = c.get_tensor("m", "big", kind="buffers")
        assert torch.equal(got, _buf(server, "big"))
        assert c.transfers["get:stream"] == 1 and c.transfers["get:data"] == 0
        # The next transfer finds the port closed: the link is dropped, gRPC from then on.
        c.get_tensor("m", "big", kind="buffers")
        assert c.transfers["get:stream"] == 2 and not c.uses_data_channel


def test_refused_transfers_are_not_recorded_and_change_nothing(server, target):
    server.registry.adopt("m", Holder(big=torch.zeros(BIG)))
    with paramhub.connect(target, timeout=120, shm=False, progress=False) as c:
        with pytest.raises(NotFoundError):
            c.get_tensor("m", "nope", kind="buffers")
        with pytest.raises(InvalidArgumentError) as e:
            c.set_slice("m", "big", slice(0, 4), torch.ones(BIG), kind="buffers")
        assert e.value.reason == "BAD_SHAPE"
        with pytest.raises(InvalidArgumentError) as e:
            c.get_tensor("m", "big", kind="buffers", out=torch.empty(3))
        assert e.value.reason == "BAD_OUT"
        assert sum(c.transfers.values()) == 0
    assert not _buf(server, "big").any() and server.registry.get("m").version == 0


def test_policy_orders_transports_by_size():
    p = DEFAULT
    assert p.order_get(8, out=False) == ["inline", "stream"]
    assert p.order_get(8, out=True) == ["stream"]
    assert p.order_get(p.inline_read_bytes, out=False)[0] == "inline"
    assert p.order_get(max(p.inline_read_bytes, p.shm_min_bytes) + 1, out=False) == [
        "shm", "stream"]
    assert p.order_get(p.data_min_bytes, out=False) == ["shm", "data", "stream"]
    assert p.order_get(None, out=False) == ["shm", "data", "stream"]
    assert p.order_set(p.inline_bytes) == ["shm", "inline"]
    assert p.order_set(p.inline_bytes + 1) == ["shm", "stream"]
    assert p.order_set(p.shm_min_bytes - 1) == ["inline"]
    assert p.order_set(p.data_min_bytes) == ["shm", "data", "stream"]
    assert p.order_push(p.shm_min_bytes - 1) == ["stream"]
    custom = Policy.from_info(type("Info", (), {"data_min_bytes": 1 << 30, "shm_min_bytes": 0})())
    assert custom.data_min_bytes == 1 << 30 and custom.shm_min_bytes == DEFAULT.shm_min_bytes


# ------------------------------------------------------------------ the scalar fast path

@pytest.fixture
def seed_mlp(client):
    with torch.device("meta"):
        module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    return client.create_model("mlp", module, seed=0)


def test_scalar_setitem_goes_as_a_python_number(client, seed_mlp, server, monkeypatch):
    seen: list[object] = []
    encode = _codec.scalar_to_proto

    def recording(value):
        seen.append(value)
        return encode(value)

    monkeypatch.setattr(_codec, "scalar_to_proto", recording)
    w = seed_mlp[0].weight
    version = w.version
    seed_mlp[0].weight.data[0, 0] = 42
    w.data[1] = 0.5  # a row, broadcast on the server
    w[2, 3] = True
    live = server.registry.get("mlp").module[0].weight
    assert live[0, 0].item() == 42.0 and live.dtype == torch.float32
    assert torch.equal(live[1], torch.full((4,), 0.5))
    assert live[2, 3].item() == 1.0
    # Each write encoded the Python number itself (no tensor built first), one inline call.
    assert seen == [42, 0.5, True]
    assert client.transfers["set:inline"] == 3
    assert w.version == version + 3


@pytest.mark.parametrize("index, value, error, reason", [
    ((8, 0), 1, OutOfRangeError, "INDEX_OUT_OF_RANGE"),
    ((0, 0), 1 << 70, None, None),  # past int64: torch's own error, raised locally
    ((0, 0), "x", None, None),
])
def test_scalar_setitem_bad_inputs_change_nothing(client, seed_mlp, server, index, value,
                                                  error, reason):
    before = server.registry.get("mlp").module[0].weight.detach().clone()
    version = server.registry.get("mlp").version
    with pytest.raises(error or (TypeError, ValueError, RuntimeError, OverflowError)) as e:
        seed_mlp[0].weight.data[index] = value
    if reason is not None:
        assert e.value.reason == reason
    assert torch.equal(server.registry.get("mlp").module[0].weight, before)
    assert server.registry.get("mlp").version == version
    assert client.transfers["set:inline"] == 0


def test_transport_info_advertises_the_policy(client):
    info = client.transport_info()
    assert (info.inline_bytes, info.inline_read_bytes, info.shm_min_bytes,
            info.data_min_bytes) == (DEFAULT.inline_bytes, DEFAULT.inline_read_bytes,
                                     DEFAULT.shm_min_bytes, DEFAULT.data_min_bytes)
    assert client._transfers.policy == DEFAULT


@pytest.mark.skipif(not _shm.shm_supported(), reason="needs Linux memfd")
def test_refused_write_releases_the_named_shm_connection(server, target):
    import paramhub.common.pb as pb
    server.registry.adopt("m", Holder(big=torch.zeros(MIB // 2)))
    channel = server.transport.shm
    link = _shm.ShmLink(channel.address)
    with paramhub.connect(target, timeout=60, shm=False) as c:
        for name, error in (("models/nope/buffers/big", NotFoundError),
                            ("models/m/buffers/nope", NotFoundError)):
            greeted = link.connect()
            assert channel.pending == 1
            request = pb.SetSliceRequest(name=name, op=pb.SLICE_OP_ASSIGN, request_id="r",
                                         shm_token=greeted.token)
            request.value.dtype = _codec.dtype_to_proto(torch.float32)
            request.value.shape.append(MIB // 2)
            with pytest.raises(error):
                c._call(c.stub.SetSlice, request)
            # Released at once (not left to expire), and nothing was received or written.
            assert channel.pending == 0 and channel.received == 0
            greeted.close()
        request = pb.SetSliceRequest(name="models/m/buffers/big", op=pb.SLICE_OP_ASSIGN,
                                     request_id="r", shm_token="0" * 32)
        with pytest.raises(InvalidArgumentError) as e:
            c._call(c.stub.SetSlice, request)
        assert e.value.reason == "SHM_UNAVAILABLE"
    assert not _buf(server, "big").any() and server.registry.get("m").version == 0


# ------------------------------------------------------------------ the Transfer message

class _Recording:
    """A real call handle that keeps a copy of each request it sends (the call still goes to
    the server unchanged)."""

    def __init__(self, fn) -> None:
        self.fn, self._method, self.requests = fn, fn._method, []

    def __call__(self, request, **kw):
        copy = type(request)()
        copy.CopyFrom(request)
        self.requests.append(copy)
        return self.fn(request, **kw)

    def future(self, request, **kw):
        self.requests.append(request)
        return self.fn.future(request, **kw)


def _names_only_transfer(request) -> bool:
    legacy = (request.shm_token, getattr(request, "shm_client_buffer", False),
              getattr(request, "data_token", ""))
    return request.HasField("transfer") and not any(legacy)


@pytest.mark.skipif(not _shm.shm_supported(), reason="needs Linux memfd")
def test_sdk_names_side_links_in_the_transfer_message(server, target):
    server.registry.adopt("m", Holder(big=torch.randn(BIG)))
    for shm in (True, False):
        with paramhub.connect(target, timeout=120, shm=shm, progress=False) as c:
            c.list_parameters("m", include_buffers=True)
            gets = c._get_tensor_raw = _Recording(c._get_tensor_raw)
            sets = c.stub.SetSlice = _Recording(c.stub.SetSlice)
            value = torch.randn(BIG)
            got, _ = c.get_tensor("m", "big", kind="buffers")
            c.get_tensor("m", "big", kind="buffers")  # shm: the pooled client buffer
            c.set_slice("m", "big", None, value, kind="buffers")
            link = "shm" if shm else "data"
            assert c.transfers[f"get:{link}"] == 2 and c.transfers[f"set:{link}"] == 1
            assert torch.equal(_buf(server, "big"), value)
            requests = gets.requests + sets.requests
            assert len(requests) == 3 and all(_names_only_transfer(r) for r in requests)
            if shm:
                assert gets.requests[1].transfer.shm_client_buffer


def test_server_reads_the_transfer_message_and_the_legacy_fields(server, target):
    import paramhub.common.pb as pb
    server.registry.adopt("m", Holder(big=torch.randn(BIG)))
    value = torch.randn(BIG)
    with paramhub.connect(target, timeout=120, shm=False, data_channel=False) as c:
        for legacy in (False, True):
            link = _data.DataLink("127.0.0.1", server.transport.data.port)
            greeted = link.connect()
            request = (pb.GetTensorRequest(name="models/m/buffers/big", data_token=greeted.token)
                       if legacy else pb.GetTensorRequest(
                           name="models/m/buffers/big",
                           transfer=pb.Transfer(data_token=greeted.token)))
            from paramhub._transfer.base import GetJob
            from paramhub._transfer.stream import read_tensor_stream
            got, _, moved = read_tensor_stream(c, GetJob(request, None), data=greeted,
                                               keep_data=lambda g: g.close())
            assert moved == "data" and torch.equal(got, _buf(server, "big"))
        # A write naming its token in `transfer`: the preamble's digest covers the request as
        # sent (legacy field cleared, as old clients compute it).
        greeted = _data.DataLink("127.0.0.1", server.transport.data.port).connect()
        write = pb.SetSliceRequest(name="models/m/buffers/big", op=pb.SLICE_OP_ASSIGN,
                                   request_id="t1", transfer=pb.Transfer(data_token=greeted.token))
        write.value.dtype = _codec.dtype_to_proto(torch.float32)
        write.value.shape.append(BIG)
        import threading
        sender = threading.Thread(target=lambda: greeted.conn.sendall(
            _data.PREAMBLE.pack(BIG * 4, _data.write_digest(greeted.token, write))
            + _codec.tensor_bytes(value)))
        sender.start()
        c._call(c.stub.SetSlice, write)
        sender.join(30)
        greeted.close()
        assert torch.equal(_buf(server, "big"), value)
        version = server.registry.get("m").version
        # Unknown tokens in `transfer` are refused with the link's reason; nothing changes.
        for transfer, reason in ((pb.Transfer(shm_token="0" * 32), "SHM_UNAVAILABLE"),
                                 (pb.Transfer(data_token="0" * 32), "DATA_CHANNEL_UNAVAILABLE")):
            bad = pb.SetSliceRequest(name="models/m/buffers/big", op=pb.SLICE_OP_ASSIGN,
                                     request_id="t2", transfer=transfer)
            bad.value.dtype = _codec.dtype_to_proto(torch.float32)
            bad.value.shape.append(BIG)
            with pytest.raises(InvalidArgumentError) as e:
                c._call(c.stub.SetSlice, bad)
            assert e.value.reason == reason
            with pytest.raises(InvalidArgumentError) as e:
                list(c._stream(c._get_tensor_raw, pb.GetTensorRequest(
                    name="models/m/buffers/big", transfer=transfer)))
            assert e.value.reason == reason
    assert torch.equal(_buf(server, "big"), value)
    assert server.registry.get("m").version == version
