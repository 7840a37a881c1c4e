"""The same-host shared-memory fast path: negotiation, fallback and cleanup."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

import paramhub
import paramhub.v1.parameter_service_pb2 as pb
from paramhub import _shm
from paramhub.errors import InvalidArgumentError, UnavailableError
from paramhub_server.app import build_server
from paramhub_server.core.registry import Registry
from paramhub_server.api.service import ParameterService
from paramhub_server.transport import ShmChannel, Transport, add_servicer

from _procfs import count_fds


MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not _shm.shm_supported(), reason="needs Linux memfd")


class Holder(torch.nn.Module):
    """Buffers of any dtype, served through Registry.adopt."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.clone())


def _memfds(pid: int | str = "self") -> int:
    """Open memfd descriptors of a process."""
    return count_fds("/memfd:paramhub", pid)


def _shm_entries() -> set[str]:
    """paramhub's entries in /dev/shm (it should never make any: its segments are memfds)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {e for e in os.listdir("/dev/shm") if "paramhub" in e}


def _wait(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_shm_negotiated_and_used_for_big_transfers_only(server, target):
    server.registry.adopt("m", Holder({"big": torch.randn(1024, 512), "small": torch.randn(8)}))
    channel = server.transport.shm
    with paramhub.connect(target, timeout=60) as c:
        assert c.uses_shm
        assert channel.pending == 1  # the negotiation's greeted connection, kept for reuse
        small, _ = c.get_tensor("m", "small", kind="buffers")
        assert channel.sent == 0 and channel.pending == 1  # inline: token left unused
        big, _ = c.get_tensor("m", "big", kind="buffers")
        assert channel.sent == 1
        assert torch.equal(big, server.registry.get("m").module.big)
        c.set_slice("m", "big", None, torch.ones(1024, 512), kind="buffers")
        assert channel.received == 1
        c.set_slice("m", "small", None, torch.ones(8), kind="buffers")
        assert channel.received == 1  # small writes stay inline
        state, _ = c.pull_state("m")
        assert channel.sent == 2 and torch.equal(state["big"], torch.ones(1024, 512))
        c.push_state("m", {"big": torch.zeros(1024, 512)})
        assert channel.received == 2
        assert torch.equal(server.registry.get("m").module.big, torch.zeros(1024, 512))
        # The returned tensor is an ordinary writable CPU tensor, private to this process.
        big += 1
        assert torch.equal(server.registry.get("m").module.big, torch.zeros(1024, 512))
    del big, state
    assert _wait(lambda: _memfds() == 0)
    assert _wait(lambda: channel.pending == 0)


def test_shm_off_on_the_server(settings):
    srv = build_server(dataclasses.replace(settings, shm=False))
    try:
        srv.registry.adopt("m", Holder({"big": torch.randn(1024, 512)}))
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert c.transport_info().shm_address == ""
            assert not c.uses_shm
            got, _ = c.get_tensor("m", "big", kind="buffers")
            assert torch.equal(got, srv.registry.get("m").module.big)
            c.set_slice("m", "big", None, torch.ones(1024, 512), kind="buffers")
            assert torch.equal(srv.registry.get("m").module.big, torch.ones(1024, 512))
    finally:
        srv.stop(None)


def test_shm_off_on_the_client(server, target):
    server.registry.adopt("m", Holder({"big": torch.randn(1024, 512)}))
    with paramhub.connect(target, timeout=60, shm=False) as c:
        assert not c.uses_shm
        c.get_tensor("m", "big", kind="buffers")
        c.set_slice("m", "big", None, torch.ones(1024, 512), kind="buffers")
        c.pull_state("m")
    assert server.transport.shm.sent == server.transport.shm.received == 0
    assert server.transport.shm.pending == 0


def test_shm_token_is_single_use_and_checked(server, target):
    server.registry.adopt("m", Holder({"big": torch.randn(1024, 512)}))
    before = server.registry.get("m").module.big.clone()
    with paramhub.connect(target, timeout=60, shm=False) as c:
        for token in ("0" * 32, ""):
            request = pb.GetTensorRequest(
                name="models/m/buffers/big", shm_token=token or "x")
            with pytest.raises(InvalidArgumentError) as e:
                list(c._stream(c._get_tensor_raw, request))
            assert e.value.reason == "SHM_UNAVAILABLE"
    assert torch.equal(server.registry.get("m").module.big, before)


def test_shm_falls_back_when_the_channel_goes_away(server, target):
    server.registry.adopt("m", Holder({"big": torch.randn(1024, 512)}))
    with paramhub.connect(target, timeout=60) as c:
        assert c.uses_shm
        server.transport.shm.close()  # the kept token dies; new connections are refused
        got, _ = c.get_tensor("m", "big", kind="buffers")  # SHM_UNAVAILABLE -> gRPC
        assert torch.equal(got, server.registry.get("m").module.big)
        c.set_slice("m", "big", None, torch.ones(1024, 512), kind="buffers")  # connect fails
        assert torch.equal(server.registry.get("m").module.big, torch.ones(1024, 512))
        assert not c.uses_shm


def test_shm_channel_keeps_a_sent_memfd_while_polling(server):
    """The server's liveness poll peeks at pending connections; a memfd already sent by the
    client must survive it."""
    channel = server.transport.shm
    link = _shm.ShmLink(channel.address)
    greeted = link.connect()
    segment = _shm.create_segment(4096)
    segment.tensor.fill_(7)
    _shm.send_segment(greeted.conn, segment)
    time.sleep(0.8)  # several poll rounds
    received = channel.receive(channel.take(greeted.token), 4096)
    assert int(received.tensor.sum()) == 7 * 4096
    received.close()
    greeted.close()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_shm_falls_back_from_another_network_namespace(tmp_path):
    """A client that cannot reach the server's abstract socket (here: another network
    namespace, as on another host) negotiates gRPC and still moves tensors."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    path = tmp_path / "grpc.sock"
    registry = Registry(torch.device("cpu"))
    registry.adopt("m", Holder({"big": torch.arange(1024 * 512, dtype=torch.float32)}))
    transport = Transport(max_message_bytes=64 * MIB, shm=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_servicer(ParameterService(registry, transport=transport), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    script = textwrap.dedent(f"""
        import torch, paramhub
        with paramhub.connect("unix:{path}", timeout=60) as c:
            t, _ = c.get_tensor("m", "big", kind="buffers")
            c.set_slice("m", "big", None, t * 2, kind="buffers")
            print(c.uses_shm, bool(torch.equal(t, torch.arange(1024 * 512.0))))
    """)
    try:
        same = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120)
        assert same.stdout.split() == ["True", "True"], same.stderr
        other = subprocess.run(["unshare", "-n", sys.executable, "-c", script],
                               capture_output=True, text=True, timeout=120)
        assert other.stdout.split() == ["False", "False"], other.stderr  # (values doubled)
        assert torch.equal(registry.get("m").module.big, torch.arange(1024 * 512.0) * 4)
        assert transport.shm.sent == 1 and transport.shm.received == 1
    finally:
        server.stop(None).wait()
        transport.close()


def _client_script(target: str) -> str:
    return textwrap.dedent(f"""
        import sys, torch, paramhub
        c = paramhub.connect("{target}", timeout=60)
        assert c.uses_shm
        big = torch.ones(16 << 20, dtype=torch.uint8)
        i = 0
        while True:
            c.get_tensor("m", "big", kind="buffers")
            c.set_slice("m", "big", None, big, kind="buffers")
            i += 1
            if i == 2:
                print("ready", flush=True)
    """)


def test_no_leak_after_client_is_killed(server, target):
    server.registry.adopt("m", Holder({"big": torch.zeros(16 << 20, dtype=torch.uint8)}))
    shm_before = _shm_entries()
    proc = subprocess.Popen([sys.executable, "-c", _client_script(target)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # somewhere in the middle of a transfer
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    channel = server.transport.shm
    assert channel.sent + channel.received >= 4
    assert _wait(lambda: channel.pending == 0), "the dead client's connections were kept"
    assert _wait(lambda: _memfds() == 0), "a memfd of the dead client's transfers is still open"
    assert _shm_entries() == shm_before == set()
    # The server still serves.
    with paramhub.connect(target, timeout=60) as c:
        assert c.get_tensor("m", "big", kind="buffers")[0].shape == (16 << 20,)


def test_no_leak_after_server_is_killed(tmp_path):
    shm_before = _shm_entries()
    proc = subprocess.Popen([sys.executable, "-m", "paramhub_server", "--port", "0",
                             "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=REPO)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("127.0.0.1:")
        with paramhub.connect(address, timeout=20) as c:
            from paramhub import _spec
            c.create_model_from_spec("m", _spec.spec_from_module(
                torch.nn.Linear(1024, 1024, bias=False, device="meta")), seed=0)
            assert c.uses_shm
            w, _ = c.get_tensor("m", "weight")
            c.set_slice("m", "weight", None, w * 2)
            server_pid = proc.pid
            assert _memfds(server_pid) == 0
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            with pytest.raises(UnavailableError):
                c.get_tensor("m", "weight", timeout=5)
            with pytest.raises(UnavailableError):
                c.set_slice("m", "weight", None, w, timeout=5)
        del w
        assert _wait(lambda: _memfds() == 0)
        assert _shm_entries() == shm_before == set()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
