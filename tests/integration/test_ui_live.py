"""The web inspector's live side through HTTP event streams: one server watch per model however
many pages, statistics and history that follow writes, resync, a deleted model."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from _ui import make_model, served_ui


@pytest.fixture
def model(client):
    make_model(client)
    return "mlp"


async def _read_events(resp: httpx.Response, events: list[tuple[str, dict]]) -> None:
    """Appends (event name, data) of an event stream until cancelled."""
    name = ""
    async for line in resp.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))


def test_ui_event_streams_share_one_watch_per_model(server, client, model):
    """200 open pages on two models (tensor pages on several parameters, model pages, index
    pages) hold exactly one watch per model on the server; one write reaches all of them, and
    every page on the written tensor gets its new statistics."""
    make_model(client, "other")
    pages = ([("/api/models/mlp/events", {"name": n}) for n in ("0.weight", "2.bias",
                                                                "6.weight")] * 40
             + [("/api/models/mlp/events", {})] * 40 + [("/api/events",
                                                         {"model": ["mlp", "other"]})] * 40)

    async def run(base: str) -> list[list[tuple[str, dict]]]:
        limits = httpx.Limits(max_connections=len(pages) + 10)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
            logs: list[list[tuple[str, dict]]] = [[] for _ in pages]
            async with asyncio.timeout(120):
                streams = [await http.send(http.build_request("GET", path, params=params),
                                           stream=True) for path, params in pages]
                assert all(s.status_code == 200 for s in streams)
                readers = [asyncio.create_task(_read_events(s, log))
                           for s, log in zip(streams, logs)]
                # Every page has its first event ("model" at the current version) before the
                # write, so each one must see the write's event too.
                while sum(1 for log in logs if log) < len(pages):
                    await asyncio.sleep(0.05)
                status = (await http.get("/api/status")).json()
                assert status["watches"] == 2
                assert len(server.registry.get("mlp").watchers) == 1
                assert len(server.registry.get("other").watchers) == 1
                await asyncio.to_thread(client.set_slice, "mlp", "0.weight", None, 3.0)
                while not all(any(n == "model" and d["model_version"] == 1 for n, d in log)
                              for log in logs[:160]):
                    await asyncio.sleep(0.05)
                while not all(any(n == "stats" and d.get("version") == 1 for n, d in log)
                              for log in logs[:120:3] + logs[2:120:3]):
                    await asyncio.sleep(0.05)
                for t in readers:
                    t.cancel()
                for s in streams:
                    await s.aclose()
            return logs

    with served_ui(client, linger_s=0.2) as (_, base):
        logs = asyncio.run(run(base))
        # Pages on 0.weight and on 6.weight (tied to it) saw max == 3 after the write.
        for log in logs[:120:3] + logs[2:120:3]:
            stats = [d for n, d in log if n == "stats" and d.get("version") == 1]
            assert stats and stats[-1]["max"] == 3.0
        # Pages on 2.bias got no new statistics from a write to 0.weight.
        for log in logs[1:120:3]:
            assert all(d["version"] == 0 for n, d in log if n == "stats")
        # Pages closed: after the linger time the watches go away.
        deadline = time.monotonic() + 30
        while len(server.registry.get("mlp").watchers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.registry.get("mlp").watchers) == 0


def test_ui_stats_history_follows_a_training_run(client, model):
    """Writes in a row (as an optimizer's steps) each reach the page as statistics, and the
    topic keeps their histograms for the ridge plot."""
    async def run(base: str) -> list[dict]:
        got: list[dict] = []
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async with asyncio.timeout(60):
                async with http.stream("GET", "/api/models/mlp/events",
                                       params={"name": "2.weight"}) as resp:
                    name = ""
                    async for line in resp.aiter_lines():
                        if line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: ") and name == "stats":
                            d = json.loads(line[6:])
                            got.append(d)
                            if d["version"] >= 5:
                                return got
                            # the next "step" once the page has seen this one
                            await asyncio.to_thread(client.set_slice, "mlp", "2.weight",
                                                    None, 0.9, op="mul")
        return got

    async def first_stats(base: str) -> dict:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async with asyncio.timeout(60):
                async with http.stream("GET", "/api/models/mlp/events",
                                       params={"name": "2.weight"}) as resp:
                    name = ""
                    async for line in resp.aiter_lines():
                        if line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: ") and name == "stats":
                            return json.loads(line[6:])
        raise AssertionError("no stats event")

    with served_ui(client) as (_, base):
        got = asyncio.run(run(base))
        # A page opened later (within the linger time) gets the history at once.
        later = asyncio.run(first_stats(base))
    assert [d["version"] for d in got] == [0, 1, 2, 3, 4, 5]
    assert [p["version"] for p in got[-1:]] == [5] and got[-1]["point"]["version"] == 5
    norms = [d["norm"] for d in got]
    assert norms == sorted(norms, reverse=True)
    assert [p["version"] for p in later["history"]] == [0, 1, 2, 3, 4, 5]
    assert [p["norm"] for p in later["history"]] == pytest.approx(norms)


def test_ui_watch_resync_reaches_pages_and_reprobes(client, model):
    """A "resync" from the watch (the inspector fell behind the server's queue) goes to every
    page, which re-reads, and the followed tensors are probed again (sent even if unchanged)."""
    from paramhub._watch import WatchEvent

    async def run(server, base: str) -> list[str]:
        names: list[str] = []
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async with asyncio.timeout(60):
                async with http.stream("GET", "/api/models/mlp/events",
                                       params={"name": "0.weight"}) as resp:
                    name = ""
                    async for line in resp.aiter_lines():
                        if line.startswith("event: "):
                            name = line[7:]
                            names.append(name)
                        if name == "stats" and names.count("stats") == 1 and \
                                line.startswith("data: "):
                            feeds = server.app.state.feeds
                            feeds.loop.call_soon_threadsafe(
                                feeds.models["mlp"]._on_event,
                                WatchEvent("resync", 0, "", (), "", 0, ""))
                        if names.count("stats") == 2:
                            return names
        return names

    with served_ui(client) as (server, base):
        names = asyncio.run(run(server, base))
    assert names[-3:] == ["model", "resync", "stats"], names


def test_ui_deleted_model_ends_its_streams_with_not_found(client, model):
    """Deleting a followed model ends its pages' streams; a page that reconnects is told
    NOT_FOUND (its script then stops reconnecting) and no watch is left behind."""
    async def read_all(http: httpx.AsyncClient) -> list[tuple[str, dict]]:
        events: list[tuple[str, dict]] = []
        async with http.stream("GET", "/api/models/mlp/events") as resp:
            name = ""
            async for line in resp.aiter_lines():  # ends when the inspector ends the stream
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
                    if len(events) == 1:
                        await asyncio.to_thread(client.delete_model, "mlp")
        return events

    async def run(base: str) -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            async with asyncio.timeout(60):
                first = await read_all(http)
                again: list[tuple[str, dict]] = []
                async with http.stream("GET", "/api/models/mlp/events") as resp:
                    name = ""
                    async for line in resp.aiter_lines():
                        if line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: "):
                            again.append((name, json.loads(line[6:])))
                return first, again

    with served_ui(client, linger_s=0.2) as (ui, base):
        first, again = asyncio.run(run(base))
        assert ui.app.state.feeds.watch_count() == 0
    assert first[0][0] == "model"
    assert [(n, d["code"], d["reason"]) for n, d in again if n == "error"] == [
        ("error", "NOT_FOUND", "MODEL_NOT_FOUND")]
