"""Watching a model's writes: `for event in client.watch("mlp"): ...` or a callback.

The first event is always "started" (the model version watching began at); then one "write"
event per committed write, in commit order. If this client falls behind (its server-side queue
fills up) it receives one "resync" event in place of the events it missed: re-read whatever you
track, then continue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from paramhub.errors import from_rpc_error
from paramhub.common import pb

if TYPE_CHECKING:
    from paramhub.client import Client

log = logging.getLogger(__name__)

_KINDS = {pb.WATCH_EVENT_KIND_STARTED: "started", pb.WATCH_EVENT_KIND_WRITE: "write",
          pb.WATCH_EVENT_KIND_RESYNC: "resync"}


@dataclass(frozen=True)
class TensorChange:
    """A tensor a write changed: its (first) name, new version and written region text."""

    name: str
    version: int
    region: str


@dataclass(frozen=True)
class WatchEvent:
    """One watch event.

    Attributes:
        kind: "started", "write" or "resync".
        model_version: the model's version after the write (at start / at resync).
        op: e.g. "set_slice.add", "apply_init.normal_", "batch", "restore_checkpoint".
        changes: the tensors the write changed.
        writer: the writing client's writer id (or peer address).
        time_ns: commit time, nanoseconds since the Unix epoch.
        request_id: the write's request id.
    """

    kind: str
    model_version: int
    op: str
    changes: tuple[TensorChange, ...]
    writer: str
    time_ns: int
    request_id: str

    @classmethod
    def from_proto(cls, m: pb.WatchModelResponse) -> WatchEvent:
        """From the wire message."""
        return cls(_KINDS.get(m.kind, "unknown"), m.model_version, m.op,
                   tuple(TensorChange(c.name, c.version, c.region) for c in m.changes),
                   m.writer, m.time_unix_nanos, m.request_id)


class Watch:
    """An open watch: iterate it for events; `close()` ends it (also as a context manager).

    With a callback, a background thread calls `callback(event)` for each event until closed;
    `join()` waits for that thread.
    """

    def __init__(self, client: Client, model_id: str, *, max_queue: int = 0,
                 timeout: float | None = None,
                 callback: Callable[[WatchEvent], Any] | None = None) -> None:
        from paramhub._names import model_name

        self.model_id = model_id
        self._call: Any = client.stub.WatchModel(
            pb.WatchModelRequest(name=model_name(model_id), max_queue=max_queue),
            timeout=timeout, metadata=client._read_metadata)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        if callback is not None:
            self._thread = threading.Thread(target=self._pump, args=(callback,), daemon=True,
                                            name=f"paramhub-watch-{model_id}")
            self._thread.start()

    def __iter__(self) -> Iterator[WatchEvent]:
        try:
            for m in self._call:
                yield WatchEvent.from_proto(m)
        except grpc.RpcError as e:
            if self._closed and e.code() == grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(e) from None

    def _pump(self, callback: Callable[[WatchEvent], Any]) -> None:
        try:
            for ev in self:
                callback(ev)
        except BaseException as e:  # noqa: BLE001 - kept for the owner to inspect
            self.error = e
            if not self._closed:
                log.warning("watch of %s ended: %s", self.model_id, e)

    def close(self) -> None:
        """Ends the watch (cancels the stream)."""
        self._closed = True
        self._call.cancel()

    def join(self, timeout: float | None = None) -> None:
        """Waits for the callback thread to finish (after close() or the stream's end)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self.join()
