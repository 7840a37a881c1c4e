"""The data channel (big tensors over a greeted TCP port): negotiation, round trips, fallback,
token rules, auth, and cleanup after a client dies."""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import paramhub
import paramhub.v1.parameter_service_pb2 as pb
from paramhub import _codec, _data
from paramhub._transfer.base import GetJob
from paramhub._transfer.stream import read_tensor_stream
from paramhub.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from paramhub_server.app import build_server

from _procfs import count_fds

MIN = _data.DATA_MIN_BYTES
REPO = Path(__file__).resolve().parents[2]


class Holder(torch.nn.Module):
    """Buffers of any dtype, served through Registry.adopt."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.clone())


def _wait(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _connect(target: str, **kw) -> paramhub.Client:
    return paramhub.connect(target, timeout=120, shm=False, progress=False, **kw)


def _buf(server, name: str) -> torch.Tensor:
    return getattr(server.registry.get("m").module, name)


def _random(dtype: torch.dtype, n: int) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(n) > 0.5
    if dtype.is_complex:
        return torch.randn(n, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(n).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), (n,), dtype=dtype)


def test_negotiated_and_used_for_big_transfers_only(server, target):
    server.registry.adopt("m", Holder({"big": torch.randn(MIN // 4 + 5),
                                       "small": torch.randn(8)}))
    channel = server.transport.data
    with _connect(target) as c:
        info = c.transport_info()
        assert info.data_port == channel.port
        assert c.uses_data_channel
        assert channel.pending == 1  # the negotiation's greeted connection, kept for reuse
        c.get_tensor("m", "small", kind="buffers")
        assert channel.sent == 0 and channel.pending == 1
        big, version = c.get_tensor("m", "big", kind="buffers")
        assert channel.sent == 1 and torch.equal(big, _buf(server, "big"))
        new = torch.randn(MIN // 4 + 5)
        v2 = c.set_slice("m", "big", None, new, kind="buffers")
        assert channel.received == 1 and v2 == version + 1
        assert torch.equal(_buf(server, "big"), new)
        c.set_slice("m", "small", None, torch.ones(8), kind="buffers")
        assert channel.received == 1  # small writes stay inline
        assert c.rpc_counts["SetSlice"] == 2 and c.rpc_counts["StreamSetSlice"] == 0
        # The returned tensor is private: changing it changes nothing on the server.
        big += 1
        assert torch.equal(_buf(server, "big"), new)
    assert _wait(lambda: channel.pending == 0)


@pytest.mark.parametrize("dtype", list(_codec._DTYPES), ids=str)
def test_round_trip_every_dtype(server, target, dtype):
    n = MIN // dtype.itemsize + 3  # just over the threshold
    value = _random(dtype, n)
    server.registry.adopt("m", Holder({"t": torch.zeros(n, dtype=dtype)}))
    channel = server.transport.data
    with _connect(target) as c:
        c.set_slice("m", "t", None, value, kind="buffers")
        assert channel.received == 1
        assert torch.equal(_buf(server, "t"), value)
        got, _ = c.get_tensor("m", "t", kind="buffers")
        assert channel.sent == 1
        assert got.dtype == dtype and torch.equal(got, value)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_sizes_at_the_threshold(server, target, delta):
    n = MIN + delta
    value = torch.randint(0, 255, (n,), dtype=torch.uint8)
    server.registry.adopt("m", Holder({"t": torch.zeros(n, dtype=torch.uint8)}))
    channel = server.transport.data
    with _connect(target) as c:
        c.set_slice("m", "t", None, value, kind="buffers")
        got, _ = c.get_tensor("m", "t", kind="buffers")
        assert torch.equal(got, value) and torch.equal(_buf(server, "t"), value)
        used = delta >= 0
        assert (channel.received, channel.sent) == ((1, 1) if used else (0, 0))
        assert c.rpc_counts["StreamSetSlice"] == (0 if used else 1)


def test_non_contiguous_values_regions_and_out(server, target):
    rows, cols = 2048, MIN // 4 // 1024  # 2 * MIN bytes of float32
    base = torch.randn(rows, cols)
    server.registry.adopt("m", Holder({"w": base}))
    channel = server.transport.data
    with _connect(target) as c:
        # A transposed (non-contiguous) value of the whole tensor.
        value = torch.randn(cols, rows).t()
        assert not value.is_contiguous()
        c.set_slice("m", "w", None, value, kind="buffers")
        assert torch.equal(_buf(server, "w"), value)
        # A strided region (every other column: MIN bytes) written and read back.
        region = torch.randn(rows, cols // 2)
        c.set_slice("m", "w", (slice(None), slice(None, None, 2)), region, kind="buffers")
        expect = value.clone()
        expect[:, ::2] = region
        assert torch.equal(_buf(server, "w"), expect)
        got, _ = c.get_tensor("m", "w", (slice(None), slice(None, None, 2)), kind="buffers")
        assert torch.equal(got, region)
        out = torch.empty(rows, cols)
        same, _ = c.get_tensor("m", "w", kind="buffers", out=out)
        assert same is out and torch.equal(out, expect)
        assert channel.received == 2 and channel.sent == 2
        with pytest.raises(InvalidArgumentError) as e:  # out of the wrong shape
            c.get_tensor("m", "w", kind="buffers", out=torch.empty(rows, cols + 1))
        assert e.value.reason == "BAD_OUT"


def test_off_on_the_server(settings):
    srv = build_server(dataclasses.replace(settings, data_channel=False))
    try:
        assert srv.transport.data is None
        srv.registry.adopt("m", Holder({"big": torch.randn(MIN // 4 + 1)}))
        with _connect(f"127.0.0.1:{srv.port}") as c:
            assert c.transport_info().data_port == 0
            assert not c.uses_data_channel
            got, _ = c.get_tensor("m", "big", kind="buffers")
            assert torch.equal(got, _buf(srv, "big"))
            value = torch.randn(MIN // 4 + 1)
            c.set_slice("m", "big", None, value, kind="buffers")
            assert torch.equal(_buf(srv, "big"), value)
            # Naming a token anyway: the server says the channel is off.
            with pytest.raises(InvalidArgumentError) as e:
                list(c._stream(c._get_tensor_raw, pb.GetTensorRequest(
                    name="models/m/buffers/big", data_token="0" * 32)))
            assert e.value.reason == "DATA_CHANNEL_UNAVAILABLE"
    finally:
        srv.stop(None)


def test_off_on_the_client(server, target):
    server.registry.adopt("m", Holder({"big": torch.randn(MIN // 4 + 1)}))
    channel = server.transport.data
    with _connect(target, data_channel=False) as c:
        assert not c.uses_data_channel
        got, _ = c.get_tensor("m", "big", kind="buffers")
        value = torch.randn(MIN // 4 + 1)
        c.set_slice("m", "big", None, value, kind="buffers")
        assert torch.equal(_buf(server, "big"), value)
    assert channel.sent == channel.received == channel.pending == 0


def test_falls_back_when_the_port_is_unreachable(server, target):
    server.registry.adopt("m", Holder({"big": torch.randn(MIN // 4 + 1)}))
    with _connect(target) as c:
        assert c.uses_data_channel
        server.transport.data.close()  # the kept connection dies; new ones are refused
        got, _ = c.get_tensor("m", "big", kind="buffers")
        assert torch.equal(got, _buf(server, "big"))
        value = torch.randn(MIN // 4 + 1)
        c.set_slice("m", "big", None, value, kind="buffers")
        assert torch.equal(_buf(server, "big"), value)
        assert not c.uses_data_channel
    # A port that was never reachable: negotiation fails, gRPC is used from the start.
    server.transport.data = None
    with _connect(target) as c:
        assert not c.uses_data_channel
        assert torch.equal(c.get_tensor("m", "big", kind="buffers")[0], value)


def _greet(server) -> _data.DataLink:
    return _data.DataLink("127.0.0.1", server.transport.data.port)


def test_token_is_single_use_and_unknown_tokens_are_refused(server, target):
    server.registry.adopt("m", Holder({"big": torch.randn(MIN // 4 + 1)}))
    before = _buf(server, "big").clone()
    with _connect(target, data_channel=False) as c:
        greeted = _greet(server).connect()
        request = pb.GetTensorRequest(name="models/m/buffers/big", data_token=greeted.token)
        got, _, moved = read_tensor_stream(c, GetJob(request, None), data=greeted,
                                           keep_data=lambda g: g.close())
        assert torch.equal(got, before) and moved == "data"
        for token in (greeted.token, "0" * 32, "x"):
            with pytest.raises(InvalidArgumentError) as e:
                list(c._stream(c._get_tensor_raw, pb.GetTensorRequest(
                    name="models/m/buffers/big", data_token=token)))
            assert e.value.reason == "DATA_CHANNEL_UNAVAILABLE"
        # A write naming the used token: refused before any byte is read, nothing written.
        write = pb.SetSliceRequest(name="models/m/buffers/big", op=pb.SLICE_OP_ASSIGN,
                                   request_id="r1", data_token=greeted.token)
        write.value.dtype = _codec.dtype_to_proto(torch.float32)
        write.value.shape.append(MIN // 4 + 1)
        with pytest.raises(InvalidArgumentError) as e:
            c._call(c.stub.SetSlice, write)
        assert e.value.reason == "DATA_CHANNEL_UNAVAILABLE"
    assert torch.equal(_buf(server, "big"), before)


def test_bytes_sent_for_another_transfer_are_refused(server, target):
    n = MIN // 4 + 1
    server.registry.adopt("m", Holder({"a": torch.zeros(n), "b": torch.zeros(n)}))
    with _connect(target, data_channel=False) as c:
        greeted = _greet(server).connect()
        value = torch.ones(n)
        meant = pb.SetSliceRequest(name="models/m/buffers/a", op=pb.SLICE_OP_ASSIGN,
                                   request_id="r1", data_token=greeted.token)
        meant.value.dtype = _codec.dtype_to_proto(torch.float32)
        meant.value.shape.append(n)
        # The client sends bytes bound to tensor "a", then names the token for tensor "b".
        sender = threading.Thread(target=lambda: _send_quietly(
            greeted.conn, _data.PREAMBLE.pack(n * 4, _data.write_digest(greeted.token, meant)),
            value))
        sender.start()
        other = pb.SetSliceRequest()
        other.CopyFrom(meant)
        other.name = "models/m/buffers/b"
        with pytest.raises(InvalidArgumentError) as e:
            c._call(c.stub.SetSlice, other)
        assert e.value.reason == "DATA_CHANNEL_MISMATCH"
        sender.join(30)
        greeted.close()
        # Same tensor, another size announced: refused too.
        greeted = _greet(server).connect()
        meant.data_token = greeted.token
        sender = threading.Thread(target=lambda: _send_quietly(
            greeted.conn, _data.PREAMBLE.pack(n * 4 - 4, _data.write_digest(greeted.token,
                                                                             meant)), value))
        sender.start()
        with pytest.raises(InvalidArgumentError) as e:
            c._call(c.stub.SetSlice, meant)
        assert e.value.reason == "DATA_CHANNEL_MISMATCH"
        sender.join(30)
        greeted.close()
    assert not _buf(server, "a").any() and not _buf(server, "b").any()
    assert server.registry.get("m").version == 0


def _send_quietly(conn: socket.socket, preamble: bytes, value: torch.Tensor) -> None:
    try:
        conn.sendall(preamble)
        _data.send_view(conn, _codec._memory(_codec.byte_view(value)))
    except OSError:
        pass  # the server refused and closed the connection


def test_bad_name_is_refused_before_any_byte(server, target):
    server.registry.adopt("m", Holder({"big": torch.zeros(MIN // 4 + 1)}))
    channel = server.transport.data
    with _connect(target) as c:
        assert c.uses_data_channel
        with pytest.raises(NotFoundError):
            c.set_slice("m", "nope", None, torch.ones(MIN // 4 + 1), kind="buffers")
    assert channel.received == 0 and not _buf(server, "big").any()
    assert _wait(lambda: channel.pending == 0)


@pytest.fixture
def auth_server(settings, tmp_path):
    p = tmp_path / "tokens"
    p.write_text("read read-token-0123456789abcdef\nwrite write-token-0123456789abcdef\n")
    srv = build_server(dataclasses.replace(settings, auth_file=p))
    try:
        yield srv
    finally:
        srv.stop(grace=None)


def test_auth_still_enforced(auth_server):
    target = f"127.0.0.1:{auth_server.port}"
    auth_server.registry.adopt("m", Holder({"big": torch.zeros(MIN // 4 + 1)}))
    channel = auth_server.transport.data
    with _connect(target, token="read-token-0123456789abcdef") as reader:
        assert reader.uses_data_channel  # the port itself grants nothing
        got, _ = reader.get_tensor("m", "big", kind="buffers")  # reading is allowed
        assert channel.sent == 1 and not got.any()
        with pytest.raises(PermissionDeniedError):
            reader.set_slice("m", "big", None, torch.ones(MIN // 4 + 1), kind="buffers")
    assert channel.received == 0 and not _buf(auth_server, "big").any()
    # Without any token, no read either.
    with _connect(target) as anonymous:
        with pytest.raises(paramhub.errors.AuthError):
            anonymous.get_tensor("m", "big", kind="buffers")
    # Bytes pushed at the data port without any call are never applied.
    raw = socket.create_connection(("127.0.0.1", channel.port))
    raw.recv(32)
    raw.sendall(b"\0" * 4096)
    raw.close()
    with _connect(target, token="write-token-0123456789abcdef") as writer:
        writer.set_slice("m", "big", None, torch.ones(MIN // 4 + 1), kind="buffers")
    assert channel.received == 1 and bool(_buf(auth_server, "big").all())
    assert _wait(lambda: channel.pending == 0)


def _socket_fds() -> int:
    return count_fds("socket:")


def _threads() -> list[str]:
    """This process's threads except grpc's RPC pool (which grows to --max-workers on demand
    and keeps its threads)."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith("paramhub-rpc"))


def test_no_leaked_threads_or_sockets_after_client_is_killed(server, target):
    server.registry.adopt("m", Holder({"big": torch.zeros(4 * MIN, dtype=torch.uint8)}))
    channel = server.transport.data
    threads, sockets = _threads(), _socket_fds()
    script = textwrap.dedent(f"""
        import torch, paramhub
        c = paramhub.connect("{target}", timeout=60, shm=False, progress=False)
        assert c.uses_data_channel
        big = torch.ones({4 * MIN}, dtype=torch.uint8)
        i = 0
        while True:
            c.get_tensor("m", "big", kind="buffers")
            c.set_slice("m", "big", None, big, kind="buffers")
            i += 1
            if i == 2:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # somewhere in the middle of a transfer
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert channel.sent >= 2 and channel.received >= 2
    assert _wait(lambda: channel.pending == 0), "the dead client's connections were kept"
    assert _wait(lambda: _threads() == threads), "a transfer thread is left"
    assert _wait(lambda: _socket_fds() <= sockets, 30), "sockets of the dead client are open"
    # The server still serves, over the data channel too.
    with _connect(target) as c:
        assert c.get_tensor("m", "big", kind="buffers")[0].shape == (4 * MIN,)
