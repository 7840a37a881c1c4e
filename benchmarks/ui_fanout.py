"""The web inspector's fan-out: N open pages on one parameter, one SDK write, how long until
every page has the write's event and the parameter's new statistics; and how many watches the
server holds meanwhile (one per model, whatever N).

    python -m benchmarks.ui_fanout              # N = 1, 50, 200; 10 writes each

Everything runs in this process (the server in-process, the inspector on a uvicorn thread, the
pages as httpx event-stream readers): the numbers include the readers' own share of the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from torch import nn

import paramhub
from paramhub_server.app import build_server
from paramhub_server.settings import Settings
from paramhub_server.ui import UIServer, build_app


async def _reader(resp: httpx.Response, seen: dict[str, float], want: list[int]) -> None:
    """Notes when this page first sees the event and the statistics of version want[0]."""
    name = ""
    async for line in resp.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            d = json.loads(line[6:])
            if name == "model" and d["model_version"] == want[0] and "model" not in seen:
                seen["model"] = time.perf_counter()
            if name == "stats" and d["version"] == want[0] and "stats" not in seen:
                seen["stats"] = time.perf_counter()


async def _run(base: str, client: paramhub.Client, server, n: int, writes: int
               ) -> tuple[list[float], list[float], int]:
    model_lat: list[float] = []
    stats_lat: list[float] = []
    watches = 0
    limits = httpx.Limits(max_connections=n + 10)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        streams = [await http.send(http.build_request(
            "GET", "/api/models/bench/events", params={"name": "0.weight"}), stream=True)
            for _ in range(n)]
        # The parameter's version equals the model's here (one tensor written at a time).
        want = [client.tensor_version("bench", "0.weight")]
        seen: list[dict[str, float]] = [{} for _ in streams]
        readers = [asyncio.create_task(_reader(s, d, want)) for s, d in zip(streams, seen)]
        for _ in range(writes):
            await asyncio.sleep(0.3)  # readers attached, previous probes settled
            watches = max(watches, len(server.registry.get("bench").watchers))
            for d in seen:
                d.clear()
            want[0] += 1
            t0 = time.perf_counter()
            await asyncio.to_thread(client.set_slice, "bench", "0.weight", None,
                                    torch.randn(64, 64))
            deadline = time.monotonic() + 30
            while (not all("stats" in d and "model" in d for d in seen)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.005)
            model_lat.append(max(d.get("model", float("inf")) for d in seen) - t0)
            stats_lat.append(max(d.get("stats", float("inf")) for d in seen) - t0)
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for s in streams:
            await s.aclose()
    return model_lat, stats_lat, watches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pages", type=int, nargs="+", default=[1, 50, 200])
    ap.add_argument("--writes", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        srv = build_server(Settings(host="127.0.0.1", port=0, device="cpu",
                                    data_dir=Path(d) / "data"))
        client = paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60)
        client.create_model("bench", nn.Sequential(nn.Linear(64, 64)))
        ui = UIServer(build_app(client, allowed_hosts=["127.0.0.1"]), "127.0.0.1", 0)
        ui.start()
        print(f"{'pages':>6} {'server watches':>15} {'last page has event (ms)':>26} "
              f"{'last page has stats (ms)':>26}")
        print(f"{'':>6} {'':>15} {'median':>12} {'max':>13} {'median':>12} {'max':>13}")
        try:
            for n in args.pages:
                m, s, w = asyncio.run(_run(ui.url.rstrip("/"), client, srv, n, args.writes))
                print(f"{n:>6} {w:>15} {statistics.median(m) * 1e3:>12.1f} "
                      f"{max(m) * 1e3:>13.1f} {statistics.median(s) * 1e3:>12.1f} "
                      f"{max(s) * 1e3:>13.1f}")
        finally:
            ui.stop()
            client.close()
            srv.stop(None)


if __name__ == "__main__":
    main()
