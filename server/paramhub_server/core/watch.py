"""Watching a model: every committed write becomes an event, delivered to each watcher in commit
order through a bounded queue.

The model publishes under its write lock, so publication order is commit order. Publishing
never blocks on a watcher: when a watcher's queue is full its pending events are dropped and
it receives one RESYNC event (with the model version at that moment) before any later event,
so a slow watcher knows it missed something instead of missing it silently.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

STARTED = "started"
WRITE = "write"
RESYNC = "resync"
CLOSED = "closed"

DEFAULT_QUEUE = 1024
MAX_QUEUE = 65536


@dataclass(frozen=True)
class Change:
    """One storage a write changed."""

    name: str
    version: int
    region: str


@dataclass(frozen=True)
class Event:
    """A watch event (see WatchModelResponse in the proto)."""

    kind: str
    model_version: int
    op: str = ""
    changes: tuple[Change, ...] = ()
    writer: str = ""
    time_ns: int = field(default_factory=time.time_ns)
    request_id: str = ""


class Watcher:
    """One subscription. Iterate with `get(timeout)`; call `close()` when done."""

    def __init__(self, hub: WatchHub, max_queue: int, model_version: int) -> None:
        self._hub = hub
        self.max_queue = max_queue
        self._queue: deque[Event] = deque([Event(STARTED, model_version)])
        self._cv = threading.Condition()
        self._closed = False
        self.resyncs = 0

    def _offer(self, event: Event) -> None:
        with self._cv:
            if self._closed:
                return
            if len(self._queue) >= self.max_queue:
                # Fell behind: drop what is pending, tell the watcher so.
                self._queue.clear()
                self._queue.append(Event(RESYNC, event.model_version, op=event.op))
                self.resyncs += 1
            else:
                self._queue.append(event)
            self._cv.notify()

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event; None after `timeout` seconds without one; a CLOSED event once the
        watch is over (the watcher or the model was closed)."""
        with self._cv:
            if not self._queue and not self._closed:
                self._cv.wait(timeout)
            if self._queue:
                return self._queue.popleft()
            if self._closed:
                return Event(CLOSED, 0)
            return None

    def close(self) -> None:
        """Ends the subscription; a blocked `get` returns."""
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify_all()
        self._hub._remove(self)


class WatchHub:
    """The watchers of one model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: list[Watcher] = []

    def subscribe(self, model_version: int, max_queue: int = 0) -> Watcher:
        """A new watcher whose first event is STARTED at `model_version`. Call it under the
        model's lock (read or write) so that no write falls between the version and the
        subscription."""
        size = min(max(max_queue or DEFAULT_QUEUE, 1), MAX_QUEUE)
        w = Watcher(self, size, model_version)
        with self._lock:
            self._watchers.append(w)
        return w

    def publish(self, event: Event) -> None:
        """Offers an event to every watcher (never blocks on a slow one)."""
        with self._lock:
            watchers = list(self._watchers)
        for w in watchers:
            w._offer(event)

    def close(self) -> None:
        """Ends every subscription (the model was deleted or the server is stopping)."""
        with self._lock:
            watchers, self._watchers = self._watchers, []
        for w in watchers:
            w.close()

    def _remove(self, w: Watcher) -> None:
        with self._lock:
            if w in self._watchers:
                self._watchers.remove(w)

    def __len__(self) -> int:
        with self._lock:
            return len(self._watchers)

    def __bool__(self) -> bool:
        return bool(self._watchers)  # one list read: atomic under the GIL
