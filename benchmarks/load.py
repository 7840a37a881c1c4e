"""`make load`: many tools on one default server at once, bounded in time, loopback only.

A default `paramhub serve` (durable, --fsync always, default limits) runs in its own process;
the load comes from separate driver processes (their own GILs) started together:

    mixed      64 clients (2 processes x 32 threads, each its own connection) looping over a
               small read, an acknowledged increment of their own counter element and a Forward,
               with a 100 ms pause after each call (tools, not a benchmark loop: 64 clients that
               never pause saturate 2 cores by themselves, and every latency becomes queueing)
    watchers   1,000 WatchModel streams (grpc.aio in one process, over 8 connections) on a model
               a writer changes once a second; each stream counts the events it received
    slow       32 readers of a 64 MiB weight over gRPC streams, each with a 64 KiB receive window
               (no BDP probing) reading one 1 MiB chunk every 0.5 s
    round      64 workers (threads, each its own connection) in one sync-mode training round
               after another
    probe      the main process: a one-element read and a health check every 50 ms

Before the load starts, the probe measures the unloaded p50 of the same read. At the end the
table gives unary p50/p99 under load against it, errors by status code, the server's peak RSS
and open file descriptors, completed sync rounds, watch events received, and checks that nothing
acknowledged was lost: each counter element equals the number of increments acknowledged.

Why a hand-written driver and not locust: locust's users are gevent greenlets, and grpcio's
blocking calls need grpc's gevent integration to yield; the streams this test parks (watchers,
stalled readers, barrier waiters) and the exact accounting of acknowledged increments are plain
in processes and threads.

    python -m benchmarks.load                 # 60 s (LOAD_SECONDS overrides)
    python -m benchmarks.load --seconds 20 --watchers 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
MIXED_PROCS, MIXED_THREADS = 2, 32
COUNTER = 64  # elements of the counter: one per mixed client


def _connect(target: str, **kw: Any) -> Any:
    import paramhub

    return paramhub.connect(target, timeout=30, **kw)


class Start:
    """Drivers set up (import, connect), say so, then all start together; `deadline` is set by
    the main process when it says go (time.monotonic() is system-wide on Linux)."""

    def __init__(self, ctx: Any) -> None:
        self.ready = ctx.Queue()
        self.go = ctx.Event()
        self.at = ctx.Value("d", 0.0)

    def wait(self, what: str) -> float:
        self.ready.put(what)
        self.go.wait()
        return float(self.at.value)


def _run_threads(work: Any, n: int) -> None:
    """work(0) .. work(n - 1), each on its own thread; returns when all have."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):  # a grpc.RpcError
        code = code()
    return getattr(code, "name", None) or str(code or type(exc).__name__)


# --------------------------------------------------------------------------- driver processes

def mixed(target: str, proc: int, start: Start, think: float, out: Any) -> None:
    """MIXED_THREADS clients: read, increment (counted when acknowledged), Forward."""
    lat: dict[str, list[float]] = {"read": [], "increment": [], "forward": []}
    acks: dict[int, int] = {}
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    x = torch.randn(2, 4)
    conns = [_connect(target) for _ in range(MIXED_THREADS)]
    deadline = start.wait("mixed")

    def client(slot: int) -> None:
        c = conns[slot % MIXED_THREADS]
        mine: dict[str, list[float]] = {k: [] for k in lat}
        n, errs = 0, Counter[str]()
        try:
            net = c.model("mlp")
            while time.monotonic() < deadline:
                for op in ("read", "increment", "forward"):
                    t = time.perf_counter()
                    try:
                        if op == "read":
                            c.get_tensor("mlp", "0.weight", (0, 0))
                        elif op == "increment":
                            c.set_slice("ctr", "weight", (0, slot), 1.0, op="add")
                            n += 1
                        else:
                            net(x)
                        mine[op].append(time.perf_counter() - t)
                    except Exception as exc:  # noqa: BLE001 - counted by code
                        errs[_code(exc)] += 1
                    time.sleep(think)
        finally:
            c.close()
            with lock:
                for k, v in mine.items():
                    lat[k].extend(v)
                acks[slot] = n
                errors.update(errs)

    _run_threads(lambda i: client(proc * MIXED_THREADS + i), MIXED_THREADS)
    out.put(("mixed", {"lat": lat, "acks": acks, "errors": dict(errors)}))


def watchers(target: str, n: int, start: Start, out: Any) -> None:
    """n WatchModel streams over 8 connections (grpc.aio: a parked stream costs no thread
    here either), each counting its events."""
    from paramhub.common import pb
    from paramhub.v1 import parameter_service_pb2_grpc as pb_grpc

    async def main() -> dict[str, Any]:
        channels = [grpc.aio.insecure_channel(target, options=[
            ("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
        events = [0] * n
        errors: Counter[str] = Counter()
        opened = 0

        async def watch(i: int) -> None:
            nonlocal opened
            stub = pb_grpc.ParameterServiceStub(channels[i % len(channels)])
            call = stub.WatchModel(pb.WatchModelRequest(name="models/watched"))
            try:
                first = True
                async for _ in call:
                    if first:
                        opened += 1
                        first = False
                    events[i] += 1
            except asyncio.CancelledError:
                call.cancel()
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1

        tasks = [asyncio.create_task(watch(i)) for i in range(n)]
        # Ready once every stream is open (the main process measures what they cost).
        while opened + sum(errors.values()) < n:
            await asyncio.sleep(0.05)
        deadline = await asyncio.get_running_loop().run_in_executor(None, start.wait,
                                                                    "watchers")
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        return {"opened": opened, "events": sum(events),
                "min_events": min(events) if events else 0, "errors": dict(errors)}

    out.put(("watchers", asyncio.run(main())))


def slow_readers(target: str, n: int, start: Start, out: Any) -> None:
    """n readers of the big weight, each taking a 1 MiB chunk every 0.5 s."""
    from paramhub.common import pb

    clients = [_connect(target, shm=False, data_channel=False,
                        options=[("grpc.http2.bdp_probe", 0)]) for _ in range(n)]
    deadline = start.wait("slow")
    done, errors = Counter[str](), Counter[str]()
    lock = threading.Lock()

    def read(i: int) -> None:
        c = clients[i]
        while time.monotonic() < deadline:
            it = c._get_tensor_raw(pb.GetTensorRequest(
                name="models/big/parameters/weight", chunk_bytes=1 << 20), timeout=600)
            try:
                for _ in it:
                    with lock:
                        done["chunks"] += 1
                    if time.monotonic() >= deadline:
                        it.cancel()
                        return
                    time.sleep(0.5)
                with lock:
                    done["tensors"] += 1
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    with lock:
                        errors[exc.code().name] += 1
                time.sleep(0.5)

    _run_threads(read, n)
    for c in clients:
        c.close()
    out.put(("slow", {"whole_reads": done["tensors"], "chunks": done["chunks"],
                      "errors": dict(errors)}))


def round_workers(target: str, n: int, think: float, start: Start, out: Any) -> None:
    """n sync-round workers pushing round after round until the deadline."""
    clients = [_connect(target) for _ in range(n)]
    grads = {"weight": torch.full((1, 4), 0.01), "bias": torch.full((1,), 0.01)}
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    barrier = threading.Barrier(n)
    deadline = start.wait("round")

    def work(i: int) -> None:
        c = clients[i]
        _, v = c.get_tensor("sync", "weight")
        while True:
            # Every worker decides together whether to start another round, so none is left
            # waiting alone at the server's barrier when time is up.
            if i == 0 and time.monotonic() >= deadline:
                stop.set()
            try:
                barrier.wait(timeout=120)
            except threading.BrokenBarrierError:
                return
            if stop.is_set():
                return
            time.sleep(think)
            try:
                r = c.push_grads("sync", grads, v, timeout=120)
                v = r.model_version
                with lock:
                    outcomes[r.outcome] += 1
            except Exception as exc:  # noqa: BLE001 - counted by code
                with lock:
                    errors[_code(exc)] += 1
                _, v = c.get_tensor("sync", "weight")

    _run_threads(work, n)
    for c in clients:
        c.close()
    out.put(("round", {"outcomes": dict(outcomes), "errors": dict(errors)}))


# --------------------------------------------------------------------------- measurement

def _proc_stats(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, open fds, threads) of a process."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("LOAD_SECONDS", 60)))
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=32)
    ap.add_argument("--round", type=int, default=64)
    ap.add_argument("--mixed", type=int, default=MIXED_PROCS * MIXED_THREADS,
                    help=f"mixed clients (a multiple of {MIXED_THREADS})")
    ap.add_argument("--round-think", type=float, default=0.1,
                    help="pause of each sync worker between rounds (its 'compute'), seconds")
    ap.add_argument("--think", type=float, default=0.1,
                    help="pause of each mixed client after each call, seconds")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra `paramhub serve` argument (repeatable), e.g. --server-arg=--in-memory")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    import paramhub
    from paramhub.errors import ParamhubError

    data = tempfile.mkdtemp(prefix="paramhub-load-")
    server = subprocess.Popen([str(Path(PY).parent / "paramhub"), "serve", "--port", "0",
                               "--data-dir", data, "--log-level", "WARNING",
                               *args.server_arg],
                              stdout=subprocess.PIPE, text=True)
    try:
        target = server.stdout.readline().strip()  # type: ignore[union-attr]
        c = paramhub.connect(target, timeout=60)
        torch.manual_seed(0)
        c.create_model("mlp", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
        ctr = c.create_model("ctr", nn.Linear(COUNTER, 1, bias=False))
        ctr.weight.data[:] = 0.0
        c.create_model("watched", nn.Linear(4, 4))
        c.create_model("big", nn.Linear(4096, 4096, bias=False))  # 64 MiB weight
        sync = c.create_model("sync", nn.Linear(4, 1))
        paramhub.optim.SGD(sync.parameters(), lr=0.01)
        sync.configure_training("sync", sync_workers=args.round)

        def probe(n: int, pause: float, until: float | None = None) -> tuple[list[float],
                                                                             list[float],
                                                                             Counter[str]]:
            reads, healths, errs = [], [], Counter[str]()
            hc = grpc.insecure_channel(target)
            health = health_pb2_grpc.HealthStub(hc)
            i = 0
            while (i < n) if until is None else (time.monotonic() < until):
                i += 1
                t = time.perf_counter()
                try:
                    c.get_tensor("mlp", "0.weight", (0, 0), timeout=10)
                    reads.append(time.perf_counter() - t)
                except ParamhubError as exc:
                    errs[_code(exc)] += 1
                t = time.perf_counter()
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    healths.append(time.perf_counter() - t)
                except grpc.RpcError as exc:
                    errs["health " + exc.code().name] += 1
                time.sleep(pause)
            hc.close()
            return reads, healths, errs

        probe(50, 0.0)  # warm
        base_reads, base_health, _ = probe(300, 0.01)
        pid = server.pid
        rss0, fds0, threads0 = _proc_stats(pid)

        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        go = Start(ctx)
        # The watchers first, alone: what an idle watch stream costs the server.
        procs = [ctx.Process(target=watchers, args=(target, args.watchers, go, out))]
        procs[0].start()
        go.ready.get(timeout=300)
        time.sleep(1.0)
        rss_w, _, threads_w = _proc_stats(pid)
        procs += [ctx.Process(target=mixed, args=(target, i, go, args.think, out))
                  for i in range(args.mixed // MIXED_THREADS)]
        procs += [ctx.Process(target=slow_readers, args=(target, args.slow, go, out)),
                  ctx.Process(target=round_workers, args=(target, args.round, args.round_think,
                                                          go, out))]
        for p in procs[1:]:
            p.start()
        for _ in procs[1:]:
            go.ready.get(timeout=300)
        cpu0, wall0 = _cpu_seconds(pid), time.monotonic()
        deadline = time.monotonic() + args.seconds
        go.at.value = deadline
        go.go.set()
        samples: list[tuple[int, int, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append(_proc_stats(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(min(5.0, args.seconds / 4))  # the streams open
        writes = 0

        def writer() -> None:  # one write a second on the watched model
            nonlocal writes
            while time.monotonic() < deadline - 1:
                c.set_slice("watched", "bias", (0,), 1.0, op="add")
                writes += 1
                time.sleep(1.0)

        wt = threading.Thread(target=writer)
        wt.start()
        load_reads, load_health, probe_errs = probe(0, 0.05, until=deadline - 1)
        wt.join()
        server_cores = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
        results: dict[str, Any] = {}
        for _ in procs:
            kind, res = out.get(timeout=300)
            results.setdefault(kind, []).append(res)
        for p in procs:
            p.join(60)
        stop.set()
        sampler.join()
        rss_end, fds_end, threads_end = _proc_stats(pid)
        final, _ = c.get_tensor("ctr", "weight")
        after_reads, _, _ = probe(200, 0.01)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    mixed_res = results.get("mixed", [])
    lat: dict[str, list[float]] = {"read": [], "increment": [], "forward": []}
    acks: dict[int, int] = {}
    errors: Counter[str] = Counter()
    for r in mixed_res:
        for k, v in r["lat"].items():
            lat[k].extend(v)
        acks.update({int(k): v for k, v in r["acks"].items()})
        errors.update(r["errors"])
    lost = [(slot, n, float(final[0, slot])) for slot, n in acks.items()
            if float(final[0, slot]) != n]
    w = results.get("watchers", [{}])[0]
    s = results.get("slow", [{}])[0]
    rd = results.get("round", [{}])[0]
    for part in (w, s, rd):
        errors.update({f"{k}": v for k, v in part.get("errors", {}).items()})
    errors.update(probe_errs)
    base = statistics.median(base_reads) * 1e6
    peak_rss = max([rss0] + [x[0] for x in samples])
    peak_fds = max([fds0] + [x[1] for x in samples])
    peak_threads = max([threads0] + [x[2] for x in samples])
    rows = [
        ("unloaded one-element read p50", f"{base:.0f} us", ""),
        ("probe read under load p50 / p99", f"{_pct(load_reads, .5):.0f} / "
         f"{_pct(load_reads, .99):.0f} us", f"{_pct(load_reads, .5) / base:.1f}x / "
         f"{_pct(load_reads, .99) / base:.1f}x unloaded p50"),
        ("health Check under load p50 / p99", f"{_pct(load_health, .5):.0f} / "
         f"{_pct(load_health, .99):.0f} us",
         f"unloaded p50 {statistics.median(base_health) * 1e6:.0f} us"),
        ("mixed clients' read p50 / p99", f"{_pct(lat['read'], .5):.0f} / "
         f"{_pct(lat['read'], .99):.0f} us",
         f"{len(lat['read'])} calls, {3 * len(lat['read']) / args.seconds:.0f} calls/s in all"),
        ("mixed clients' increment p50 / p99 (durable)", f"{_pct(lat['increment'], .5):.0f} / "
         f"{_pct(lat['increment'], .99):.0f} us", f"{len(lat['increment'])} calls"),
        ("mixed clients' Forward p50 / p99", f"{_pct(lat['forward'], .5):.0f} / "
         f"{_pct(lat['forward'], .99):.0f} us", f"{len(lat['forward'])} calls"),
        ("read p50 after the load", f"{_pct(after_reads, .5):.0f} us", ""),
        ("idle watchers alone: server RSS / threads added",
         f"{(rss_w - rss0) / 2**20:.1f} MiB / {threads_w - threads0}",
         f"{(rss_w - rss0) / max(1, args.watchers) / 1024:.0f} KiB per watch stream"),
        ("watch streams open / events received", f"{w.get('opened')} / {w.get('events')}",
         f"{writes} writes watched; fewest events on one stream {w.get('min_events')}"),
        ("slow readers: 1 MiB chunks / whole reads", f"{s.get('chunks')} / "
         f"{s.get('whole_reads')}", f"{args.slow} readers of a 64 MiB weight"),
        ("sync rounds (pushes by outcome)", f"{rd.get('outcomes')}", f"{args.round} workers"),
        ("server CPU under load", f"{server_cores:.2f} cores busy", f"of {os.cpu_count()}"),
        ("server RSS start / peak / end", f"{rss0 >> 20} / {peak_rss >> 20} / "
         f"{rss_end >> 20} MiB", ""),
        ("server fds start / peak / end", f"{fds0} / {peak_fds} / {fds_end}", ""),
        ("server threads start / peak / end", f"{threads0} / {peak_threads} / {threads_end}",
         ""),
        ("errors by code", json.dumps(dict(errors)) if errors else "none", ""),
        ("acknowledged increments lost", f"{len(lost)} of {sum(acks.values())}",
         "each counter element == its client's acknowledged increments" if not lost
         else str(lost[:5])),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nmake load: {args.seconds:.0f} s, default `paramhub serve` (durable), "
          f"{args.mixed} mixed clients, {args.watchers} watchers, "
          f"{args.slow} slow readers, {args.round}-worker sync rounds; {os.cpu_count()} CPUs")
    for name, value, detail in rows:
        print(f"  {name:<{width}}  {value:<28} {detail}")
    if args.json is not None:
        args.json.write_text(json.dumps({r[0]: [r[1], r[2]] for r in rows}, indent=1) + "\n")
    return 1 if lost or (args.mixed and not acks) else 0


if __name__ == "__main__":
    sys.exit(main())
