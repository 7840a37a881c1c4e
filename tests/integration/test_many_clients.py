"""Many tools at once: calls that wait (watch streams, sync-round pushes, slow readers) never
starve the calls that work, limits answer at once, and slots come back when calls end.

Each starvation test opens more waiting calls than the server has unary threads (16) and then
requires health and a small read to answer before a deadline; on the single-pool server these
calls waited behind the parked ones until DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

import paramhub
from paramhub.errors import ResourceExhaustedError
from paramhub.common import pb
from paramhub_server.app import build_server

#: Deadline for the calls that must not starve: generous for a loaded 2-core machine, far
#: shorter than "never" (what they got before).
PROMPT = 10.0


def _health_ok(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=PROMPT
        ).status == health_pb2.HealthCheckResponse.SERVING


def _assert_responsive(target: str) -> None:
    """Health and a small read answer before PROMPT, from a fresh connection."""
    assert _health_ok(target)
    with paramhub.connect(target, timeout=PROMPT) as c:
        value, _ = c.get_tensor("m", "weight", (0, 0))
        assert value.shape == ()


def _open_watches(c: paramhub.Client, model: str, n: int) -> list[Iterator[pb.WatchModelResponse]]:
    """n watch streams parked on the server (each has delivered its STARTED event)."""
    streams = []
    for _ in range(n):
        it = c.stub.WatchModel(pb.WatchModelRequest(name=f"models/{model}"))
        first = next(it)
        assert first.kind == pb.WATCH_EVENT_KIND_STARTED
        streams.append(it)
    return streams


def _cancel_all(streams: list) -> None:
    for s in streams:
        s.cancel()


@pytest.fixture
def lin(client):
    client.create_model("m", nn.Linear(64, 64))
    return client


def test_watchers_beyond_the_thread_pool_leave_the_server_responsive(server, target, lin):
    clients = [paramhub.connect(target, timeout=60) for _ in range(4)]
    streams = [s for c in clients for s in _open_watches(c, "m", 20)]  # 80 > 16 threads
    try:
        assert server.admission.gates["watch"].active == 80
        _assert_responsive(target)
        # A write still reaches a parked watcher.
        lin.model("m").weight.data[0, 0] = 7.0
        ev = next(streams[-1])
        assert ev.kind == pb.WATCH_EVENT_KIND_WRITE
    finally:
        _cancel_all(streams)
        for c in clients:
            c.close()
    _wait_for(lambda: server.admission.gates["watch"].active == 0)


def _wait_for(cond, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.05)


def test_watch_limit_answers_resource_exhausted_at_once_and_frees_slots(settings):
    srv = build_server(dataclasses.replace(settings, max_watchers=4, client_share=1.0))
    target = f"127.0.0.1:{srv.port}"
    try:
        with paramhub.connect(target, timeout=30) as c:
            c.create_model("m", nn.Linear(2, 2))
            streams = _open_watches(c, "m", 4)
            with pytest.raises(ResourceExhaustedError) as e:
                next(iter(c.watch("m")))
            assert e.value.reason == "TOO_MANY_WATCHERS"
            assert e.value.metadata["scope"] == "server"
            assert e.value.metadata["limit"] == "4"
            streams.pop().cancel()
            _wait_for(lambda: srv.admission.gates["watch"].active == 3)
            streams += _open_watches(c, "m", 1)  # the slot came back
            _cancel_all(streams)
    finally:
        srv.stop(grace=None)


def test_one_client_cannot_take_every_watch_slot(settings):
    srv = build_server(dataclasses.replace(settings, max_watchers=8, client_share=0.25))
    target = f"127.0.0.1:{srv.port}"
    try:
        with paramhub.connect(target, timeout=30) as a, paramhub.connect(target, timeout=30) as b:
            a.create_model("m", nn.Linear(2, 2))
            held = _open_watches(a, "m", 2)
            with pytest.raises(ResourceExhaustedError) as e:
                next(iter(a.watch("m")))
            assert (e.value.reason, e.value.metadata["scope"]) == ("TOO_MANY_WATCHERS", "client")
            held += _open_watches(b, "m", 2)  # another client still gets its share
            _cancel_all(held)
    finally:
        srv.stop(grace=None)


def _sgd_model(c: paramhub.Client, name: str = "r") -> Any:
    net = c.create_model(name, nn.Linear(4, 1))
    paramhub.optim.SGD(net.parameters(), lr=0.1)
    return net


def test_sync_round_larger_than_the_thread_pool_completes(server, target, lin):
    workers = 40  # > 16 unary threads: 39 pushes wait at the barrier together
    net = _sgd_model(lin)
    net.configure_training("sync", sync_workers=workers)
    _, v = net.pull(return_version=True)
    grads = {"weight": torch.ones(1, 4), "bias": torch.ones(1)}
    results: list = [None] * workers
    clients = [paramhub.connect(target, timeout=120) for _ in range(workers)]

    def push(i: int) -> None:
        results[i] = clients[i].push_grads("r", grads, v)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        # While the round fills up the server answers other calls.
        _assert_responsive(target)
    finally:
        for t in threads:
            t.join(120)
        for c in clients:
            c.close()
    assert [r.outcome for r in results] == ["applied"] * workers
    assert len({r.model_version for r in results}) == 1
    w, _ = lin.get_tensor("r", "weight")
    assert results[0].steps == 1
    assert torch.equal(w, net.pull().weight.detach())


def test_sync_round_the_server_cannot_hold_is_refused(settings):
    srv = build_server(dataclasses.replace(settings, max_round_waiters=4))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=30) as c:
            net = _sgd_model(c)
            net.configure_training("sync", sync_workers=5)  # 4 waiters: fits
            with pytest.raises(ResourceExhaustedError) as e:
                net.configure_training("sync", sync_workers=6)
            assert e.value.reason == "ROUND_TOO_LARGE"
            cfg = c.stub.ConfigureTraining(pb.ConfigureTrainingRequest(
                model="models/r", config=pb.TrainingConfig(mode=pb.TRAINING_MODE_SYNC,
                                                           sync_workers=5)), timeout=30)
            assert cfg.config.sync_workers == 5  # unchanged by the refused call
    finally:
        srv.stop(grace=None)


def test_sync_push_without_a_deadline_waits_and_is_counted_once(server, target, lin):
    net = _sgd_model(lin)
    net.configure_training("sync", sync_workers=2)
    _, v = net.pull(return_version=True)
    grads = {"weight": torch.ones(1, 4), "bias": torch.ones(1)}
    out: list = []
    with paramhub.connect(target, timeout=None) as forever:
        t = threading.Thread(target=lambda: out.append(forever.push_grads("r", grads, v)))
        t.start()
        _wait_for(lambda: server.admission.gates["round"].active == 1)
        second = lin.push_grads("r", grads, v)
        t.join(60)
    assert out and out[0].outcome == "applied" and second.outcome == "applied"
    assert out[0].steps == second.steps == 1  # one step for the two pushes, none counted twice


def test_slow_readers_of_a_big_tensor_leave_the_server_responsive(server, target, lin):
    lin.create_model("big", nn.Linear(2048, 2048))  # 16 MiB weight
    readers = 24  # > 16 unary threads, each parked on a full flow-control window
    # No BDP probing: the receive window stays at its initial 64 KiB, as a reader that stops
    # reading keeps it (a fast reader's window would grow and buffer the whole tensor).
    conns = [paramhub.connect(target, timeout=60, shm=False, data_channel=False,
                              options=[("grpc.http2.bdp_probe", 0)])
             for _ in range(readers)]
    streams = []
    try:
        for c in conns:
            it = c._get_tensor_raw(pb.GetTensorRequest(name="models/big/parameters/weight",
                                                       chunk_bytes=1 << 20), timeout=60)
            next(it)  # the first chunk arrived; the rest wait for a reader that never comes
            streams.append(it)
        assert server.admission.gates["transfer"].active == readers
        _assert_responsive(target)
        # The readers share one copy of the unchanged weight.
        m = server.registry.get("big")
        copies = {id(r()) for *_, r in m._shared_reads.values() if r() is not None}
        assert len(copies) == 1
    finally:
        _cancel_all(streams)
        for c in conns:
            c.close()
    _wait_for(lambda: server.admission.gates["transfer"].active == 0)


def test_transfer_limit_answers_resource_exhausted(settings):
    srv = build_server(dataclasses.replace(settings, max_transfers=2, client_share=1.0))
    target = f"127.0.0.1:{srv.port}"
    try:
        with paramhub.connect(target, timeout=30, shm=False, data_channel=False) as c:
            c.create_model("big", nn.Linear(1024, 1024))
            req = pb.GetTensorRequest(name="models/big/parameters/weight", chunk_bytes=1 << 16)
            held = [c._get_tensor_raw(req, timeout=30) for _ in range(2)]
            for it in held:
                next(it)
            with pytest.raises(ResourceExhaustedError) as e:
                c.get_tensor("big", "weight")
            assert e.value.reason == "TOO_MANY_TRANSFERS"
            _cancel_all(held)
            _wait_for(lambda: srv.admission.gates["transfer"].active == 0)
            value, _ = c.get_tensor("big", "weight")  # slots came back
            assert value.shape == (1024, 1024)
    finally:
        srv.stop(grace=None)


@pytest.mark.timeout(120)
def test_sigterm_drains_parked_calls_and_exits_zero(tmp_path):
    """`paramhub serve` with parked watchers, a sync push waiting without a deadline and a
    stalled reader still exits 0 within its drain time after SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "paramhub_server", "--port", "0",
         "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        target = proc.stdout.readline().strip()
        assert target, proc.stderr.read()
        c = paramhub.connect(target, timeout=None)
        c.create_model("m", nn.Linear(4, 1))
        net = _sgd_model(c, "r")
        net.configure_training("sync", sync_workers=3)
        _, v = net.pull(return_version=True)
        streams = _open_watches(c, "m", 20)
        c.create_model("big", nn.Linear(1024, 1024))
        reader = paramhub.connect(target, timeout=None, shm=False, data_channel=False)
        stalled = reader._get_tensor_raw(pb.GetTensorRequest(
            name="models/big/parameters/weight", chunk_bytes=1 << 16), timeout=None)
        next(stalled)
        errors: list = []

        def push() -> None:
            try:
                c.push_grads("r", {"weight": torch.ones(1, 4), "bias": torch.ones(1)}, v)
            except Exception as exc:  # noqa: BLE001 - recorded and checked below
                errors.append(exc)

        t = threading.Thread(target=push, daemon=True)
        t.start()
        time.sleep(1.0)  # the push is parked at the barrier
        proc.send_signal(signal.SIGTERM)
        # The drain promise is 10 s; the bound only tells a hang from an exit.
        rc = proc.wait(timeout=45)
        assert rc == 0, proc.stderr.read()
        t.join(10)
        assert errors and getattr(errors[0], "reason", None) == "SHUTTING_DOWN"
        _cancel_all(streams + [stalled])
        c.close()
        reader.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shared_read_copies_never_outlive_a_write_or_a_restore(server, target, client):
    """Readers share the copy of an unchanged tensor only: after a write, and after a
    checkpoint restore (which sets versions back), a read sees the new values even while a
    stalled reader still holds the old copy."""
    net = client.create_model("big", nn.Linear(1024, 1024))
    stalled = paramhub.connect(target, timeout=60, shm=False, data_channel=False,
                               options=[("grpc.http2.bdp_probe", 0)])
    req = pb.GetTensorRequest(name="models/big/parameters/weight", chunk_bytes=1 << 16)
    plain = paramhub.connect(target, timeout=60, shm=False, data_channel=False)
    held = []
    try:
        def hold() -> None:
            it = stalled._get_tensor_raw(req, timeout=60)
            next(it)
            held.append(it)

        hold()
        first, _ = plain.get_tensor("big", "weight")
        net.weight.data[0, 0] = 5.0
        hold()
        after_write, _ = plain.get_tensor("big", "weight")
        assert after_write[0, 0] == 5.0 and torch.equal(after_write[1:], first[1:])
        client.create_checkpoint("big", "c")
        net.weight.data[0, 0] = 6.0
        hold()
        assert plain.get_tensor("big", "weight")[0][0, 0] == 6.0
        client.restore_checkpoint("big", "c")
        assert torch.equal(plain.get_tensor("big", "weight")[0], after_write)
    finally:
        _cancel_all(held)
        stalled.close()
        plain.close()


def test_a_client_that_dies_releases_its_slots(server, target, lin):
    """kill -9 of a process holding watch streams and stalled reads: its slots come back."""
    lin.create_model("big", nn.Linear(1024, 1024))
    script = f"""
import paramhub
from paramhub.common import pb
c = paramhub.connect({target!r}, timeout=None, shm=False, data_channel=False,
                     options=[("grpc.http2.bdp_probe", 0)])
held = []
for _ in range(10):
    it = c.stub.WatchModel(pb.WatchModelRequest(name="models/m"))
    next(it)
    held.append(it)
for _ in range(3):
    it = c._get_tensor_raw(pb.GetTensorRequest(name="models/big/parameters/weight",
                                               chunk_bytes=1 << 16), timeout=None)
    next(it)
    held.append(it)
print("ready", flush=True)
import time
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        gates = server.admission.gates
        assert (gates["watch"].active, gates["transfer"].active) == (10, 3)
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
    _wait_for(lambda: gates["watch"].active == 0 and gates["transfer"].active == 0)
    _assert_responsive(target)


def test_stalled_data_channel_writes_cannot_take_every_unary_thread(settings):
    """A data-channel SetSlice is a unary call that waits for its client's bytes: at most half
    the unary threads may wait so; past that the write is refused as DATA_CHANNEL_UNAVAILABLE
    and the SDK sends the value over a gRPC stream instead."""
    from paramhub import _codec, _data

    srv = build_server(dataclasses.replace(settings, max_workers=2))  # 1 data-channel write
    target = f"127.0.0.1:{srv.port}"
    n = _data.DATA_MIN_BYTES // 4 + 1
    try:
        with paramhub.connect(target, timeout=60, shm=False) as c:
            c.create_model("m", nn.Linear(n, 1, bias=False))
            assert c.uses_data_channel
            stalled = []
            for _ in range(2):  # two writers that announce a value and never send it
                link = _data.DataLink("127.0.0.1", srv.transport.data.port).connect()
                req = pb.SetSliceRequest(name="models/m/parameters/weight",
                                         op=pb.SLICE_OP_ASSIGN, request_id=f"s{len(stalled)}",
                                         data_token=link.token)
                req.value.dtype = _codec.dtype_to_proto(torch.float32)
                req.value.shape.extend([1, n])
                stalled.append((link, c.stub.SetSlice.future(req, timeout=60)))
            # One waits on its bytes; the other is refused at once, nothing written.
            _wait_for(lambda: sum(f.done() for _, f in stalled) == 1)
            refused = next(f for _, f in stalled if f.done())
            assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _health_ok(target)
            value = torch.full((1, n), 3.0)
            assert c.set_slice("m", "weight", None, value) == 1  # over a gRPC stream
            assert torch.equal(c.get_tensor("m", "weight")[0], value)
            for link, f in stalled:
                link.close()
                f.cancel()
    finally:
        srv.stop(grace=None)
