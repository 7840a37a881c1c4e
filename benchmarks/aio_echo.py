"""The measurement behind the server's concurrency design (README "Many clients").

One echo method served three ways in one server process, called from a separate client process
(its own GIL), 3,000 calls each after 300 warm-up calls, medians of 3 rounds:

    sync              grpc.server with a thread pool (what paramhub serves unary calls on)
    aio-async         grpc.aio.server, an `async def` handler on the event loop
    aio-sync-in-pool  grpc.aio.server, a plain handler run on its migration thread pool

    python -m benchmarks.aio_echo
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc

N, WARM, ROUNDS = 3000, 300, 3


def _sync_echo(req: bytes, ctx: object) -> bytes:
    return req


async def _async_echo(req: bytes, ctx: object) -> bytes:
    return req


def _handlers(fn: object) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "e.E", {"Echo": grpc.unary_unary_rpc_method_handler(fn)})


def _serve_aio(fn: object) -> int:
    ready, box = threading.Event(), {}

    def run() -> None:
        async def main() -> None:
            s = grpc.aio.server(migration_thread_pool=futures.ThreadPoolExecutor(16))
            s.add_generic_rpc_handlers((_handlers(fn),))
            box["port"] = s.add_insecure_port("127.0.0.1:0")
            await s.start()
            ready.set()
            await s.wait_for_termination()

        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    ready.wait()
    return box["port"]


def serve() -> None:
    """Prints the three ports, then serves until stdin closes."""
    s = grpc.server(futures.ThreadPoolExecutor(16))
    s.add_generic_rpc_handlers((_handlers(_sync_echo),))
    sync_port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    print(sync_port, _serve_aio(_async_echo), _serve_aio(_sync_echo), flush=True)
    sys.stdin.read()


def _median_us(port: int) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary("/e.E/Echo")
        for _ in range(WARM):
            call(b"x" * 16)
        ts = []
        for _ in range(N):
            t = time.perf_counter()
            call(b"x" * 16)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def main() -> None:
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.aio_echo", "--serve"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = [int(p) for p in server.stdout.readline().split()]  # type: ignore[union-attr]
        names = ("sync", "aio-async", "aio-sync-in-pool")
        rows = {n: [] for n in names}
        for _ in range(ROUNDS):
            for name, port in zip(names, ports):
                rows[name].append(_median_us(port))
        base = statistics.median(rows["sync"])
        for name in names:
            m = statistics.median(rows[name])
            print(f"{name:<18} p50 {m:7.0f} us  {m / base:4.2f}x sync")
    finally:
        server.stdin.close()  # type: ignore[union-attr]
        server.wait(10)


if __name__ == "__main__":
    serve() if "--serve" in sys.argv else main()
