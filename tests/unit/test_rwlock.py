"""The per-model reader/writer lock (paramhub_server.core.rwlock). No sockets.

Ordering is observed through the lock's own counters and events with bounded waits, never by
measuring time.
"""

from __future__ import annotations

import threading

import pytest

from paramhub_server.core.rwlock import RWLock

WAIT = 10.0  # seconds; an upper bound for a thread to reach a point, not a timing assertion


def _until(predicate, what: str) -> None:
    """Waits (bounded) until predicate() holds."""
    done = threading.Event()
    for _ in range(2000):
        if predicate():
            return
        done.wait(0.005)
    raise AssertionError(f"timed out waiting until {what}")


def _thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_readers_share_the_lock():
    lock = RWLock()
    inside = threading.Barrier(3, timeout=WAIT)

    def reader():
        with lock.read():
            inside.wait()  # all three readers are inside at once, or this breaks

    threads = [_thread(reader) for _ in range(2)]
    with lock.read():
        inside.wait()
    for t in threads:
        t.join(WAIT)
    assert lock._readers == 0


def test_writer_waits_for_readers_and_excludes_them():
    lock = RWLock()
    wrote = threading.Event()

    def writer():
        with lock.write():
            wrote.set()

    with lock.read():
        t = _thread(writer)
        _until(lambda: lock._writers_waiting == 1, "the writer waits")
        assert not wrote.is_set()
    t.join(WAIT)
    assert wrote.is_set()


def test_waiting_writer_blocks_new_readers():
    lock = RWLock()
    order: list[str] = []

    def writer():
        with lock.write():
            order.append("writer")

    def late_reader():
        with lock.read():
            order.append("reader")

    with lock.read():
        w = _thread(writer)
        _until(lambda: lock._writers_waiting == 1, "the writer waits")
        r = _thread(late_reader)
        # The late reader must queue behind the waiting writer, not join the current reader.
        _until(lambda: r.is_alive() and lock._readers == 1, "the late reader is blocked")
        assert order == []
    w.join(WAIT)
    r.join(WAIT)
    assert order == ["writer", "reader"]


def test_writers_are_exclusive():
    lock = RWLock()
    counter = {"inside": 0, "max": 0, "total": 0}

    def writer():
        for _ in range(200):
            with lock.write():
                counter["inside"] += 1
                counter["max"] = max(counter["max"], counter["inside"])
                value = counter["total"]
                threading.Event().wait(0)  # yield the GIL inside the critical section
                counter["total"] = value + 1
                counter["inside"] -= 1

    threads = [_thread(writer) for _ in range(4)]
    for t in threads:
        t.join(WAIT * 3)
    assert counter["max"] == 1
    assert counter["total"] == 800


@pytest.mark.parametrize("mode", ["read", "write"])
def test_exception_releases_the_lock(mode):
    lock = RWLock()
    with pytest.raises(RuntimeError):
        with getattr(lock, mode)():
            raise RuntimeError("boom")
    assert (lock._readers, lock._writer, lock._writers_waiting) == (0, False, 0)
    with lock.write():
        pass
