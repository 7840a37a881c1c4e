"""Concurrent writers and readers through the real SDK: atomic SetSlice, no torn reads, and
Forward on a consistent snapshot. Loops are bounded in count; nothing measures time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import paramhub
from _core_helpers import create

THREADS, ADDS = 8, 200


def test_set_slice_concurrent_adds_are_atomic(client, target):
    create(client, "c", nn.Linear(4, 3), seed=0)
    # Start from an integer so that float32 holds every intermediate sum exactly.
    client.set_slice("c", "weight", (1, 2), 0.0)
    start, start_version = client.get_tensor("c", "weight", (1, 2))
    assert start.item() == 0.0 and start_version == 1
    barrier = threading.Barrier(THREADS, timeout=60)

    def worker(_: int) -> list[int]:
        with paramhub.connect(target, timeout=60) as c:  # one channel per thread
            barrier.wait()
            return [c.set_slice("c", "weight", (1, 2), 1.0, op="add") for _ in range(ADDS)]

    with ThreadPoolExecutor(THREADS) as pool:
        versions = [v for vs in pool.map(worker, range(THREADS)) for v in vs]
    end, version = client.get_tensor("c", "weight", (1, 2))
    assert end.item() - start.item() == THREADS * ADDS == 1600
    # Every write got its own version: none was lost or merged.
    assert sorted(versions) == list(range(start_version + 1, start_version + THREADS * ADDS + 1))
    assert version == start_version + THREADS * ADDS
    assert client.describe_model("c").model.version == start_version + THREADS * ADDS
    # Neighbouring elements were not touched.
    torch.manual_seed(0)
    expected = nn.Linear(4, 3).weight.detach().clone()
    expected[1, 2] = 1600.0
    assert torch.equal(client.get_tensor("c", "weight")[0], expected)


def test_readers_never_see_half_a_write(client, target):
    emb = nn.Embedding(512, 64)  # 128 KiB: a write copies many cache lines
    create(client, "r", emb, seed=0)
    client.set_slice("r", "weight", None, 0.0)
    stop = threading.Event()
    torn: list[set[float]] = []
    seen: set[float] = set()  # whole-tensor values read (each one write's)

    def writer() -> None:
        with paramhub.connect(target, timeout=60) as c:
            for k in range(1, 151):
                c.set_slice("r", "weight", None, float(k))
        stop.set()

    def reader() -> int:
        reads = 0
        with paramhub.connect(target, timeout=60) as c:
            while not stop.is_set() and reads < 2000:
                w, _ = c.get_tensor("r", "weight")
                values = set(w.unique().tolist())
                if len(values) != 1:
                    torn.append(values)
                seen.update(values)
                reads += 1
        return reads

    with ThreadPoolExecutor(4) as pool:
        w = pool.submit(writer)
        readers = [pool.submit(reader) for _ in range(3)]
        w.result()
        counts = [r.result() for r in readers]
    assert not torn
    assert sum(counts) > 0
    # The reads overlapped the writes: they saw states between the first and the last write
    # (a test whose reads all ran before or after the writer would prove nothing).
    assert len({v for v in seen if 0 < v < 150}) >= 2, sorted(seen)
    assert client.get_tensor("r", "weight")[0].eq(150.0).all()


def test_forward_sees_a_consistent_snapshot(client, target):
    lin = nn.Linear(256, 4)
    create(client, "f", lin, seed=0)
    client.set_slice("f", "bias", None, 0.0)
    client.set_slice("f", "weight", None, 0.0)
    client.set_training("f", False)
    stop = threading.Event()
    bad: list[list[float]] = []
    ks: set[float] = set()  # the write each output saw

    def writer() -> None:
        with paramhub.connect(target, timeout=60) as c:
            for k in range(1, 101):
                c.set_slice("f", "weight", None, float(k))
        stop.set()

    def reader() -> None:
        x = torch.ones(1, 256)
        with paramhub.connect(target, timeout=60) as c:
            for _ in range(1000):
                if stop.is_set():
                    break
                y = c.forward("f", x)
                # Every output is 256 * k for one k: a forward pass never mixes two writes.
                k = y[0, 0].item() / 256
                ks.add(k)
                if not (k == int(k) and torch.equal(y, torch.full((1, 4), 256 * k))):
                    bad.append(y[0].tolist())

    with ThreadPoolExecutor(3) as pool:
        w = pool.submit(writer)
        rs = [pool.submit(reader) for _ in range(2)]
        w.result()
        for r in rs:
            r.result()
    assert not bad
    # Forward ran while the weight was being rewritten: it saw intermediate writes.
    assert len({k for k in ks if 0 < k < 100}) >= 2, sorted(ks)
