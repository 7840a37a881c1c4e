"""Live updates for the open pages: ONE SDK watch per model, however many pages follow it.

    Feeds.subscribe(model_id, key)   -> Subscriber (an asyncio queue of events for one page)
    Feeds.unsubscribe(subscriber)

A ModelFeed holds the model's watch (`client.watch`, iterated on a thread) and hands each
event to the event loop, which fans it out to the feed's subscribers. A page about one tensor
also subscribes to that tensor's Topic: a write that changes the tensor makes ONE Probe for all
the pages on it (coalesced: at most one in flight, at most PROBE_HZ a second, and always one
more after the last change), and the topic keeps the histograms of the last HISTORY versions
for the ridge plot. A feed outlives its last page by LINGER_S seconds so that moving from page
to page keeps the watch (and the history) instead of reopening it.

Events (SSE event name, JSON data): "model" (model version, op, changed tensors), "stats"
(a topic's statistics, histogram and history), "resync" (the watch fell behind: re-read
everything), "error" (the watch or a probe failed: code, reason, message). A page whose queue
fills up (a stalled browser) gets its queue replaced by one "resync".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from paramhub.errors import ParamhubError
from paramhub_server.ui.views import BINS, TensorKey, stats_payload

if TYPE_CHECKING:
    import paramhub
    from paramhub._watch import Watch, WatchEvent

log = logging.getLogger(__name__)

HISTORY = 48
PROBE_HZ = 10.0
LINGER_S = 10.0
QUEUE_MAX = 256
#: Topics a feed keeps (with their history) before it forgets those no page follows.
MAX_TOPICS = 1024
#: Marks the end of a subscriber's stream.
END: dict[str, Any] = {"event": "end", "data": {}}


def _error_data(e: BaseException) -> dict[str, Any]:
    if isinstance(e, ParamhubError):
        return {"code": e.code,
                "reason": e.reason, "message": str(e)}
    return {"code": "INTERNAL", "reason": "", "message": type(e).__name__}


class Subscriber:
    """One open page's event queue (used on the event loop only)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.topics: list[tuple[ModelFeed, Topic | None]] = []
        self.closed = False

    def put(self, event: str, data: dict[str, Any]) -> None:
        """Queues an event; a full queue is replaced by one resync."""
        if self.closed:
            return
        if self.queue.qsize() >= QUEUE_MAX:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait({"event": "resync", "data": {"reason": "page fell behind"}})
            return
        self.queue.put_nowait({"event": event, "data": data})

    def end(self) -> None:
        """Ends the page's stream (the browser reconnects on its own)."""
        if not self.closed:
            self.queue.put_nowait(END)
            self.closed = True


@dataclass(eq=False)
class Topic:
    """One tensor followed by some pages: its latest statistics and histogram history."""

    key: TensorKey
    subs: set[Subscriber] = field(default_factory=set)
    last: dict[str, Any] | None = None
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    in_flight: bool = False
    dirty: bool = False
    last_probe: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        """The latest statistics with the whole history (a newly opened page)."""
        return {**(self.last or {}), "key": _key_data(self.key), "history": list(self.history)}


def _key_data(key: TensorKey) -> dict[str, Any]:
    return {"name": key.name, "kind": key.kind, "grad": key.grad}


class ModelFeed:
    """The one watch of a model and the pages following it (see the module docstring)."""

    def __init__(self, feeds: Feeds, model_id: str) -> None:
        self.feeds = feeds
        self.model_id = model_id
        self.subs: set[Subscriber] = set()
        self.topics: dict[TensorKey, Topic] = {}
        self.model_version: int | None = None
        #: name -> first name of its storage (watch events name a storage by its first name).
        self.first_name: dict[str, str] = {}
        self.watch: Watch | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.dead = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- the watch, on its own thread --------------------------------------------------------

    def start(self) -> None:
        """Opens the watch (the call returns at once) and starts the thread that reads it."""
        self.watch = self.feeds.client.watch(self.model_id)
        threading.Thread(target=self._pump, args=(self.watch,), daemon=True,
                         name=f"paramhub-ui-watch-{self.model_id}").start()

    def _pump(self, watch: Watch) -> None:
        error: BaseException | None = None
        try:
            for ev in watch:
                if not self._post(self._on_event, ev):
                    return
        except BaseException as e:  # noqa: BLE001 - reported to the pages
            error = e
        self._post(self._on_end, error)

    def _post(self, fn: Any, arg: Any) -> bool:
        try:
            self.feeds.loop.call_soon_threadsafe(fn, arg)
            return True
        except RuntimeError:  # the loop is closed: the UI is shutting down
            return False

    # --- on the event loop ----------------------------------------------------------------------

    def _on_end(self, error: BaseException | None) -> None:
        if self.dead:
            return
        if error is not None:
            log.warning("watch of %s ended: %s", self.model_id, error)
            self.broadcast("error", {"model": self.model_id, **_error_data(error)})
        self.close()

    def _on_event(self, ev: WatchEvent) -> None:
        if self.dead:
            return
        self.model_version = ev.model_version
        self.broadcast("model", {
            "model": self.model_id, "kind": ev.kind, "model_version": ev.model_version,
            "op": ev.op, "writer": ev.writer,
            "changes": [{"name": c.name, "version": c.version, "region": c.region}
                        for c in ev.changes]})
        if ev.kind == "resync":
            self.broadcast("resync", {"model": self.model_id, "reason": "watch resync"})
            self.first_name.clear()
            for topic in self.topics.values():
                self.refresh(topic, force=True)
        elif ev.kind == "write":
            changed = {c.name for c in ev.changes}
            for topic in self.topics.values():
                # Until the tied names are known (the first probe learns them), any write may
                # concern any topic.
                first = self.first_name.get(topic.key.name)
                # A gradient changes on backward/step/zero_grad without a tensor change of its
                # own name: a grad page re-probes on any write (the checksum tells if it moved).
                if topic.subs and (topic.key.grad or first is None or first in changed):
                    self.refresh(topic)

    def broadcast(self, event: str, data: dict[str, Any]) -> None:
        """Sends an event to every page following this model."""
        for sub in list(self.subs):
            sub.put(event, data)

    def refresh(self, topic: Topic, *, force: bool = False) -> None:
        """Probes the topic's tensor once more (coalesced with a probe in flight)."""
        if topic.in_flight:
            topic.dirty = True
            return
        topic.in_flight = True
        task = self.feeds.loop.create_task(self._probe(topic, force))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, topic: Topic, force: bool) -> None:
        key = topic.key
        try:
            while not self.dead and topic.subs:
                topic.dirty = False
                wait = topic.last_probe + 1.0 / PROBE_HZ - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                topic.last_probe = time.monotonic()
                try:
                    if not self.first_name and not key.grad:
                        await self._learn_names()
                    resp = await asyncio.to_thread(
                        self.feeds.client.probe, self.model_id, key.name, kind=key.kind,
                        grad=key.grad, bins=BINS, timeout=30)
                except ParamhubError as e:
                    data = {"model": self.model_id, "key": _key_data(key), **_error_data(e)}
                    for sub in list(topic.subs):
                        sub.put("error", data)
                else:
                    stats = stats_payload(resp)
                    moved = (topic.last is None or force
                             or (stats["version"], stats["sha256"])
                             != (topic.last["version"], topic.last["sha256"]))
                    force = False
                    if moved:
                        topic.last = stats
                        point = {"version": stats["version"], "model_version":
                                 stats["model_version"], "hist": stats["hist"],
                                 "norm": stats["norm"], "mean": stats["mean"],
                                 "std": stats["std"]}
                        if topic.history and topic.history[-1]["version"] == stats["version"]:
                            topic.history[-1] = point
                        else:
                            topic.history.append(point)
                        data = {**stats, "key": _key_data(key), "point": point}
                        for sub in list(topic.subs):
                            sub.put("stats", data)
                if not topic.dirty:
                    break
        finally:
            topic.in_flight = False

    async def _learn_names(self) -> None:
        desc = await asyncio.to_thread(self.feeds.client.describe_model, self.model_id)
        first: dict[int, str] = {}
        for t in desc.tensors:
            self.first_name[t.name] = first.setdefault(t.storage_group, t.name)

    def add(self, sub: Subscriber, key: TensorKey | None) -> None:
        """Adds a page (and, for a tensor page, it to the tensor's topic)."""
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.subs.add(sub)
        topic = None
        if key is not None:
            topic = self.topics.get(key)
            if topic is None:
                if len(self.topics) >= MAX_TOPICS:  # forget tensors no page follows any more
                    for k in [k for k, t in self.topics.items() if not t.subs]:
                        del self.topics[k]
                topic = self.topics[key] = Topic(key)
            topic.subs.add(sub)
        sub.topics.append((self, topic))
        if self.model_version is not None:
            sub.put("model", {"model": self.model_id, "kind": "current", "op": "",
                              "model_version": self.model_version, "writer": "",
                              "changes": []})
        if topic is not None:
            if topic.last is not None:
                sub.put("stats", topic.snapshot())
            self.refresh(topic)

    def remove(self, sub: Subscriber, topic: Topic | None) -> None:
        """Removes a page; the last one leaving starts the linger timer."""
        self.subs.discard(sub)
        if topic is not None:
            topic.subs.discard(sub)
        if not self.subs and not self.dead and self.linger is None:
            self.linger = self.feeds.loop.call_later(self.feeds.linger_s, self.close)

    def close(self) -> None:
        """Closes the watch and ends every page's stream (their browsers reconnect)."""
        if self.dead:
            return
        self.dead = True
        if self.linger is not None:
            self.linger.cancel()
        if self.watch is not None:
            self.watch.close()
        if self.feeds.models.get(self.model_id) is self:
            del self.feeds.models[self.model_id]
        for sub in list(self.subs):
            sub.end()


class Feeds:
    """Every model feed of one UI process (created and used on its event loop)."""

    def __init__(self, client: paramhub.Client, *, linger_s: float = LINGER_S) -> None:
        self.client = client
        self.linger_s = linger_s
        self.models: dict[str, ModelFeed] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the feeds live on (bound at the app's start, or the first one to
        subscribe)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def bind_loop(self) -> None:
        """Binds the feeds to the running event loop (the app's lifespan does at start)."""
        self._loop = asyncio.get_running_loop()

    def close_threadsafe(self) -> None:
        """close() from another thread (a no-op when the loop is already gone)."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self.close)
            except RuntimeError:
                pass

    def subscribe(self, model_ids: list[str], key: TensorKey | None = None) -> Subscriber:
        """A page follows these models (a tensor page: one model and the tensor `key`)."""
        self._loop = self._loop or asyncio.get_running_loop()
        sub = Subscriber()
        for model_id in model_ids:
            feed = self.models.get(model_id)
            if feed is None:
                feed = self.models[model_id] = ModelFeed(self, model_id)
                feed.start()
            feed.add(sub, key)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """The page is gone."""
        sub.closed = True
        for feed, topic in sub.topics:
            feed.remove(sub, topic)
        sub.topics.clear()

    def watch_count(self) -> int:
        """Open watches (one per followed model)."""
        return len(self.models)

    def close(self) -> None:
        """Closes every watch and ends every stream (shutdown)."""
        for feed in list(self.models.values()):
            feed.close()
