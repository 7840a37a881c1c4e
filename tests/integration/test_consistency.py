"""Versions, atomic writes and batches, no torn reads, idempotent retries, watch (issue 5)."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import paramhub
from paramhub import _spec
from paramhub.errors import (ConflictError, InvalidArgumentError, NotFoundError,
                             OutOfRangeError)
from paramhub.common import pb
from paramhub_server.app import build_server


def _create(client: paramhub.Client, model_id: str, module: nn.Module, seed: int = 0) -> None:
    client.create_model_from_spec(model_id, _spec.spec_from_module(module), seed=seed)


# --------------------------------------------------------------------------- lost updates

def _add_worker(target: str, n: int) -> None:
    with paramhub.connect(target, timeout=60) as c:
        for _ in range(n):
            c.set_slice("ctr", "weight", (0, 0), 1.0, "add")


def _cas_worker(target: str, n: int) -> int:
    conflicts = 0
    with paramhub.connect(target, timeout=60) as c:
        done = 0
        while done < n:
            value, version = c.get_tensor("ctr", "weight", (0, 0))
            try:
                c.set_slice("ctr", "weight", (0, 0), value + 1, expected_version=version)
                done += 1
            except ConflictError:
                conflicts += 1
    return conflicts


def _run_processes(fn, target: str, n: int, procs: int = 4) -> list:
    ctx = mp.get_context("spawn")
    with ctx.Pool(procs) as pool:
        return pool.starmap(fn, [(target, n)] * procs, chunksize=1)


@pytest.mark.slow
def test_set_slice_add_from_four_processes_loses_no_update(client, target):
    _create(client, "ctr", nn.Linear(2, 2, dtype=torch.float64))
    client.set_slice("ctr", "weight", None, 0.0)
    before = client.tensor_version("ctr", "weight")
    _run_processes(_add_worker, target, 500)
    value, version = client.get_tensor("ctr", "weight")
    assert value[0, 0].item() == 2000.0
    assert value[1].tolist() == [0.0, 0.0] and value[0, 1].item() == 0.0
    assert version == before + 2000


@pytest.mark.slow
def test_set_slice_expected_version_retry_loops_lose_no_update(client, target):
    _create(client, "ctr", nn.Linear(2, 2, dtype=torch.float64))
    client.set_slice("ctr", "weight", None, 0.0)
    before = client.tensor_version("ctr", "weight")
    conflicts = _run_processes(_cas_worker, target, 500)
    value, version = client.get_tensor("ctr", "weight", (0, 0))
    assert value.item() == 2000.0
    assert version == before + 2000
    assert sum(conflicts) >= 0  # conflicts happen under contention; each was retried


def test_set_slice_stale_expected_version_is_aborted_and_changes_nothing(client):
    _create(client, "m", nn.Linear(2, 2))
    v = client.set_slice("m", "weight", None, 1.0)
    with pytest.raises(ConflictError) as e:
        client.set_slice("m", "weight", None, 5.0, expected_version=v - 1)
    assert e.value.code == "ABORTED" and e.value.reason == "VERSION_MISMATCH"
    value, version = client.get_tensor("m", "weight")
    assert version == v and torch.equal(value, torch.ones(2, 2))


def test_versions_reported_by_every_read_and_write(client):
    _create(client, "m", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    assert client.model_version("m") == 0
    assert client.set_slice("m", "0.weight", None, 1.0) == 1
    assert client.get_tensor("m", "0.weight")[1] == 1
    assert client.tensor_version("m", "0.weight") == 1
    r = client.apply_init("m", "zeros_", [pb.InitTarget(glob="*.bias")])
    assert [(t.name, t.version) for t in r.updated] == [("0.bias", 1), ("1.bias", 1)]
    assert r.model_version == 2 == client.model_version("m")
    with client.batch("m") as b:
        b.assign("1.weight", torch.ones(2, 2))
    assert b.model_version == 3 and b.updated == {"1.weight": 1}


# --------------------------------------------------------------------------- torn reads

@pytest.fixture
def memory_server(settings):
    srv = build_server(dataclasses.replace(settings, data_dir=None))
    try:
        yield srv
    finally:
        srv.stop(grace=None)


@pytest.mark.slow
def test_readers_and_forward_never_see_a_half_written_64mib_tensor(memory_server):
    target = f"127.0.0.1:{memory_server.port}"
    n = 4096  # 4096 x 4096 float32 = 64 MiB
    with paramhub.connect(target, timeout=120) as c:
        _create(c, "big", nn.Linear(n, n))
        c.set_slice("big", "bias", None, 0.0)
        c.set_slice("big", "weight", None, 0.0)
    stop = threading.Event()
    seen: dict[str, set] = {"get": set(), "forward": set()}
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with paramhub.connect(target, timeout=120) as c:
                while not stop.is_set():
                    t, _ = c.get_tensor("big", "weight")
                    lo, hi = t.min().item(), t.max().item()
                    assert lo == hi, f"torn read: min {lo} max {hi}"
                    seen["get"].add(lo)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def forwarder() -> None:
        try:
            with paramhub.connect(target, timeout=120) as c:
                x = torch.ones(1, n)
                while not stop.is_set():
                    out = c.forward("big", x)
                    lo, hi = out.min().item(), out.max().item()
                    assert lo == hi, f"torn forward: min {lo} max {hi}"
                    seen["forward"].add(lo)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader), threading.Thread(target=forwarder)]
    for t in threads:
        t.start()
    try:
        with paramhub.connect(target, timeout=120) as c:
            for i in range(8):
                c.set_slice("big", "weight", None, torch.full((n, n), float(i % 2)))
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert seen["get"] <= {0.0, 1.0} and seen["get"]
    assert seen["forward"] <= {0.0, float(n)} and seen["forward"]


# --------------------------------------------------------------------------- batches

def _chain(client: paramhub.Client) -> None:
    _create(client, "chain", nn.Sequential(nn.Linear(1, 1, bias=False),
                                           nn.Linear(1, 1, bias=False)))


def test_batch_is_seen_all_or_nothing_by_forward(client, target):
    _chain(client)
    with client.batch("chain"):
        client.set_slice("chain", "0.weight", None, 1.0)
        client.set_slice("chain", "1.weight", None, 1.0)
    stop = threading.Event()
    bad: list[float] = []

    def forwarder() -> None:
        with paramhub.connect(target, timeout=60) as c:
            while not stop.is_set():
                y = c.forward("chain", torch.ones(1, 1)).item()
                k = round(y ** 0.5)
                if k * k != y:  # w0 == w1 == k always gives k^2; a half batch gives k(k-1)
                    bad.append(y)

    t = threading.Thread(target=forwarder)
    t.start()
    try:
        for k in range(2, 60):
            with client.batch("chain"):
                client.set_slice("chain", "0.weight", None, float(k))
                client.set_slice("chain", "1.weight", None, float(k))
    finally:
        stop.set()
        t.join(60)
    assert not bad
    assert client.forward("chain", torch.ones(1, 1)).item() == 59.0 ** 2


def test_batch_mixes_slices_inits_and_whole_tensors_in_order(client):
    _create(client, "m", nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    v0 = client.model_version("m")
    with client.batch("m") as b:
        client.set_slice("m", "0.weight", None, torch.zeros(3, 2))
        client.set_slice("m", "0.weight", (1, slice(None)), 2.0, "add")  # sees the zeros
        client.set_slice("m", "0.weight", (1, 0), 3.0, "mul")
        client.apply_init("m", "ones_", [pb.InitTarget(glob="*.bias")])
        b.assign("1.weight", torch.full((1, 3), 7.0))
        assert client.get_tensor("m", "0.weight")[0].abs().sum() > 0  # not applied yet
    assert b.model_version == v0 + 1
    assert b.updated == {"0.weight": 1, "0.bias": 1, "1.weight": 1, "1.bias": 1}
    w, v = client.get_tensor("m", "0.weight")
    assert w.tolist() == [[0, 0], [6, 2], [0, 0]] and v == 1
    assert client.get_tensor("m", "0.bias")[0].tolist() == [1, 1, 1]
    assert client.get_tensor("m", "1.weight")[0].tolist() == [[7, 7, 7]]


def test_batch_with_a_bad_write_applies_nothing(client):
    _create(client, "m", nn.Linear(2, 2))
    before, v = client.get_tensor("m", "weight")
    mv = client.model_version("m")
    with pytest.raises(OutOfRangeError) as e:
        with client.batch("m"):
            client.set_slice("m", "weight", None, 5.0)
            client.set_slice("m", "bias", 7, 1.0)
    assert e.value.reason == "INDEX_OUT_OF_RANGE"
    with pytest.raises(NotFoundError) as e2:
        with client.batch("m"):
            client.set_slice("m", "weight", None, 5.0)
            client.set_slice("m", "nope", None, 1.0)
    assert e2.value.reason == "TENSOR_NOT_FOUND"
    with pytest.raises(ConflictError):
        with client.batch("m"):
            client.set_slice("m", "weight", None, 5.0)
            client.set_slice("m", "bias", None, 1.0, expected_version=v + 3)
    with pytest.raises(ConflictError):
        with client.batch("m", expected_model_version=mv + 1):
            client.set_slice("m", "weight", None, 5.0)
    with pytest.raises(InvalidArgumentError) as e3:
        with client.batch("m"):
            client.set_slice("m", "weight", None, 5.0)
            client.apply_init("m", "no_such_init_", [pb.InitTarget(parameter="bias")])
    assert e3.value.reason == "UNKNOWN_INIT_SCHEME"
    with pytest.raises(RuntimeError):
        with client.batch("m"):
            client.set_slice("m", "weight", None, 5.0)
            raise RuntimeError("user code failed: nothing is sent")
    after, v2 = client.get_tensor("m", "weight")
    assert torch.equal(before, after) and v2 == v and client.model_version("m") == mv


def test_batch_rejects_writes_to_another_model_and_empty_batches(client):
    _create(client, "a", nn.Linear(2, 2))
    _create(client, "b", nn.Linear(2, 2))
    before = client.get_tensor("a", "weight")
    b = client.batch("a")
    b.set_slice("weight", None, 1.0)
    b._writes.append((pb.BatchWrite(set_slice=pb.SetSliceRequest(
        name="models/b/parameters/weight", op=pb.SLICE_OP_ASSIGN,
        value=paramhub._codec.tensor_to_proto(torch.tensor(1.0)))), None))
    with pytest.raises(InvalidArgumentError) as e:
        b.commit()
    assert e.value.reason == "BAD_BATCH"
    with pytest.raises(InvalidArgumentError) as e2:
        client.batch("a").commit()
    assert e2.value.reason == "EMPTY_BATCH"
    after = client.get_tensor("a", "weight")
    assert torch.equal(before[0], after[0]) and before[1] == after[1]


def test_batch_streams_values_larger_than_one_message(client):
    _create(client, "m", nn.Linear(1024, 2048))  # 8 MiB weight: sent as data messages
    value = torch.randn(2048, 1024)
    with client.batch("m") as b:
        client.set_slice("m", "weight", None, value)
        client.set_slice("m", "bias", None, 3.0)
        value.zero_()  # the batch keeps its own copy
    got, _ = client.get_tensor("m", "weight")
    assert got.abs().sum() > 0 and b.updated["weight"] == 1


# --------------------------------------------------------------------------- idempotency

def test_retried_write_with_same_request_id_is_applied_once(client):
    _create(client, "m", nn.Linear(2, 2, dtype=torch.float64))
    client.set_slice("m", "weight", None, 0.0)
    rid = uuid.uuid4().hex
    v1 = client.set_slice("m", "weight", (0, 0), 1.0, "add", request_id=rid)
    v2 = client.set_slice("m", "weight", (0, 0), 1.0, "add", request_id=rid)
    assert v1 == v2
    value, version = client.get_tensor("m", "weight", (0, 0))
    assert value.item() == 1.0 and version == v1
    r1 = client.apply_init("m", "ones_", [pb.InitTarget(parameter="bias")], request_id="init-1")
    r2 = client.apply_init("m", "zeros_", [pb.InitTarget(parameter="bias")], request_id="init-1")
    assert r1 == r2 and client.get_tensor("m", "bias")[0].tolist() == [1.0, 1.0]
    with client.batch("m", request_id="batch-1"):
        client.set_slice("m", "bias", None, 1.0, "add")
    with client.batch("m", request_id="batch-1") as again:
        client.set_slice("m", "bias", None, 1.0, "add")
    assert client.get_tensor("m", "bias")[0].tolist() == [2.0, 2.0]
    assert again.updated == {"bias": 2}  # the original batch's answer


def test_request_id_reused_by_another_kind_of_write_is_rejected(client):
    _create(client, "m", nn.Linear(2, 2))
    client.set_slice("m", "weight", None, 1.0, request_id="same")
    before = client.get_tensor("m", "bias")
    with pytest.raises(InvalidArgumentError) as e:
        client.apply_init("m", "zeros_", [pb.InitTarget(parameter="bias")], request_id="same")
    assert e.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(InvalidArgumentError) as e2:
        client.set_slice("m", "bias", None, 1.0, request_id="x" * 129)
    assert e2.value.reason == "BAD_REQUEST_ID"
    after = client.get_tensor("m", "bias")
    assert torch.equal(before[0], after[0]) and before[1] == after[1]


# --------------------------------------------------------------------------- watch

@contextlib.contextmanager
def _watching(client: paramhub.Client, model_id: str, until_version: int,
              **kw: Any) -> Iterator[tuple[list, threading.Event]]:
    """Watches a model: yields (events so far, set once `until_version` is seen), after the
    "started" event; stops the watch on exit."""
    events: list = []
    started = threading.Event()
    done = threading.Event()

    def on_event(ev) -> None:
        events.append(ev)
        if ev.kind == "started":
            started.set()
        if ev.kind == "write" and ev.model_version == until_version:
            done.set()

    w = client.watch(model_id, on_event, **kw)
    try:
        assert started.wait(30)
        yield events, done
    finally:
        w.close()
        w.join(30)


def test_watch_delivers_every_event_of_1000_writes_in_order(client):
    _create(client, "m", nn.Linear(4, 2))
    with _watching(client, "m", 1000, max_queue=65536) as (events, done):
        ids = [f"w{i}" for i in range(1000)]
        for i, rid in enumerate(ids):
            client.set_slice("m", "weight", (i % 2, slice(0, 2)), 1.0, "add", request_id=rid)
        assert done.wait(60)
    assert events[0].kind == "started" and events[0].model_version == 0
    writes = events[1:1001]
    assert [e.kind for e in writes] == ["write"] * 1000
    assert [e.model_version for e in writes] == list(range(1, 1001))
    assert [e.request_id for e in writes] == ids
    assert all(e.op == "set_slice.add" and e.writer == client.writer_id for e in writes)
    assert [e.changes[0].version for e in writes] == list(range(1, 1001))
    assert writes[0].changes[0].name == "weight" and writes[0].changes[0].region == "[0, 0:2]"
    assert all(a.time_ns <= b.time_ns for a, b in zip(writes, writes[1:]))


def test_watch_slow_watcher_gets_a_resync_event(client, target):
    _create(client, "m", nn.Sequential(*[nn.Linear(2, 2) for _ in range(40)]))
    # The slow watcher's channel advertises a small HTTP/2 window and no BDP growth, so that
    # not reading soon stops the server's sends instead of filling large transport buffers.
    slow = paramhub.connect(target, timeout=60, options=[("grpc.http2.lookahead_bytes", 4096),
                                                         ("grpc.http2.bdp_probe", 0)])
    w = slow.watch("m", max_queue=2)
    it = iter(w)
    try:
        assert next(it).kind == "started"
        # The watcher reads nothing while 300 writes (events of ~3 KiB each: 80 changes)
        # commit: the window fills, the server's queue of 2 overflows.
        for _ in range(300):
            client.apply_init("m", "zeros_", [pb.InitTarget(glob="*")])
        kinds, last = [], None
        for ev in it:
            kinds.append(ev.kind)
            last = ev
            if ev.model_version == 300:  # the last write's event, or a resync at it
                break
        assert "resync" in kinds
        assert last.model_version == 300
    finally:
        w.close()
        slow.close()


def test_watch_unknown_model_is_not_found(client):
    with pytest.raises(NotFoundError) as e:
        next(iter(client.watch("missing")))
    assert e.value.reason == "MODEL_NOT_FOUND"


def test_every_kind_of_write_names_its_writer(client, target):
    """Writes carry the client's writer id (reads leave that header out, so it must still reach
    every write RPC): SetSlice, StreamSetSlice, ApplyInit, ApplyBatch, PushState and a
    checkpoint restore all show it in their watch events."""
    _create(client, "m", nn.Linear(4, 300_000))  # a 4.8 MB weight: streamed, not inline
    client.create_checkpoint("m", "c0")
    with _watching(client, "m", 6) as (events, done), \
            paramhub.connect(target, timeout=60, shm=False, data_channel=False) as plain:
        client.set_slice("m", "bias", 0, 1.0)
        plain.set_slice("m", "weight", None, torch.ones(300_000, 4))  # StreamSetSlice
        client.apply_init("m", "zeros_", [pb.InitTarget(parameter="bias")])
        with client.batch("m"):
            client.set_slice("m", "bias", 1, 2.0)
        client.push_state("m", {"bias": torch.zeros(300_000)})
        client.restore_checkpoint("m", "c0")
        assert done.wait(30)
        assert plain.rpc_counts["StreamSetSlice"] == 1
    writes = [e for e in events if e.kind == "write"]
    assert [e.model_version for e in writes] == [1, 2, 3, 4, 5, 6]
    assert [e.writer for e in writes] == [client.writer_id, plain.writer_id] + [
        client.writer_id] * 4
