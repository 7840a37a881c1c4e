"""A writer-preferring reader/writer lock.

Readers share the lock; a writer holds it alone. A waiting writer blocks new readers so that a
stream of reads cannot starve writes. Readers never hold it while sending bytes to a client
(they copy what they read first), so no reader waits behind a slow network peer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class RWLock:
    """Reader/writer lock; use `with lock.read():` or `with lock.write():`.

    The guards are plain objects rather than generator context managers, and a release only
    notifies when a thread is waiting: every RPC takes this lock, and the cheaper form saves a
    few microseconds of Python per call.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._waiting = 0  # threads blocked in _cond.wait()
        self._read = _ReadGuard(self)
        self._write = _WriteGuard(self)
        #: Called after each release of the exclusive hold, in the releasing thread, with
        #: whether the `with` block ended without an exception (the journal waits there for
        #: the fsync that makes the block's write durable: group commit, see store.py).
        self.after_write: Callable[[bool], None] | None = None

    def read(self) -> _ReadGuard:
        """Holds the lock shared for the duration of the `with` block."""
        return self._read

    def write(self) -> _WriteGuard:
        """Holds the lock exclusively for the duration of the `with` block."""
        return self._write

    def _wait(self) -> None:
        self._waiting += 1
        try:
            self._cond.wait()
        finally:
            self._waiting -= 1

    def acquire_read(self) -> None:
        """Takes the lock shared (pair with release_read)."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._wait()
            self._readers += 1

    def release_read(self) -> None:
        """Releases a shared hold."""
        with self._cond:
            self._readers -= 1
            if self._readers == 0 and self._waiting:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        """Takes the lock exclusively (pair with release_write)."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._wait()
            finally:
                self._writers_waiting -= 1
                if self._waiting and not self._writers_waiting:
                    # Readers held back only by this waiting writer may go if it gave up.
                    self._cond.notify_all()
            self._writer = True

    def release_write(self) -> None:
        """Releases the exclusive hold."""
        with self._cond:
            self._writer = False
            if self._waiting:
                self._cond.notify_all()


class _ReadGuard:
    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_read()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release_read()


class _WriteGuard:
    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_write()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._lock.release_write()
        after = self._lock.after_write
        if after is not None:
            after(exc_type is None)
