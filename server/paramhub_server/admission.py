"""Admission per method class: calls that wait never take capacity from calls that work.

gRPC-Python's sync server runs each call on a thread from the executor it was given, for the
whole life of the call: a WatchModel stream parked between events, a sync-round PushGrads
waiting at its barrier, a GetTensor stream blocked on a slow reader's flow-control window. With
one shared pool of `--max-workers` threads, sixteen such calls starved every other call, health
checks included. grpc lets a method's behavior name its own executor
(`behavior.experimental_thread_pool`), so each class of method gets its own:

    class      methods                                        threads, and who may take them
    call       every unary RPC (reads, writes, Forward, ...)  --max-workers (short work only)
    watch      WatchModel                                     --max-watchers
    transfer   the other streaming RPCs (GetTensor, PullState, PullModel, ExportCheckpoint,
               StreamSetSlice, PushState, CreateModel, ApplyBatch)  --max-transfers
    round      PushGrads (a sync round's pushes wait for the round's step)  --max-round-waiters

A parked call costs one parked thread of its own class (its stack pages and a few hundred bytes
of Python state; README "Many clients" has the measured cost), never a slot of another class.
A waiting class is admitted by count: past its limit, or past a client's share of it
(`--client-share`, so one client with many streams cannot take every slot), a call fails at once
with RESOURCE_EXHAUSTED and a reason naming the limit, never a hang. Threads are created as
calls need them and kept for reuse (at most the limit plus a little slack for rejections).

Why not grpc.aio (where a parked call costs no thread at all): measured on the 2-vCPU machine
the project is developed on (`python -m benchmarks.aio_echo`), an aio echo handler answers in
790 us against 662 us for the sync server's, and a sync handler on the aio server (its migration
pool) in 949 us: every small call would pay 19-43% for making the rare long call cheaper, while
a parked thread costs ~50 KiB (README "Many clients").

A client is told apart by its credentials' principal when the server authenticates, else by its
connection (peer address and port: each SDK `Client` opens its own).
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

from paramhub.common import rpcs
from paramhub.errors import ResourceExhaustedError

CALL, WATCH, TRANSFER, ROUND = "call", "watch", "transfer", "round"

#: Methods that wait by design, by class; every other streaming method is a TRANSFER and every
#: unary one a CALL (method_class).
_WAITING = {name: {"watch": WATCH, "round": ROUND}[f.wait]
            for name, f in rpcs.FACTS.items() if f.wait}  # `wait` in the proto's options

#: Threads beyond a class's limit, for the calls that are being refused (each is quick).
SLACK = 8

#: The reason a refused call carries, per class.
REASONS = {WATCH: "TOO_MANY_WATCHERS", TRANSFER: "TOO_MANY_TRANSFERS",
           ROUND: "TOO_MANY_ROUND_WAITERS"}
FLAGS = {WATCH: "--max-watchers", TRANSFER: "--max-transfers", ROUND: "--max-round-waiters"}


def method_class(method: str, *, request_streaming: bool, response_streaming: bool) -> str:
    """The admission class of a ParameterService method."""
    if method in _WAITING:
        return _WAITING[method]
    return TRANSFER if request_streaming or response_streaming else CALL


@dataclass(frozen=True)
class Limits:
    """How many calls of each waiting class may be in progress, and a client's share of it."""

    watchers: int = 1024
    transfers: int = 64
    round_waiters: int = 256
    #: Fraction of each class's slots one client may hold (at least one slot).
    client_share: float = 0.25

    def of(self, cls: str) -> int:
        return {WATCH: self.watchers, TRANSFER: self.transfers, ROUND: self.round_waiters}[cls]


class Gate:
    """Counts one class's calls in progress, in all and per client."""

    def __init__(self, cls: str, limit: int, per_client: int) -> None:
        self.cls = cls
        self.limit = limit
        self.per_client = per_client
        self.active = 0
        self._by_client: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, client: str) -> None:
        """Takes a slot for `client`.

        Raises:
            ResourceExhaustedError: the class is full, or the client holds its share of it.
        """
        with self._lock:
            held = self._by_client.get(client, 0)
            if self.active >= self.limit:
                scope, limit = "server", self.limit
            elif held >= self.per_client:
                scope, limit = "client", self.per_client
            else:
                self.active += 1
                self._by_client[client] = held + 1
                return
        what = {WATCH: "watch streams", TRANSFER: "streaming transfers",
                ROUND: "sync-round pushes waiting"}[self.cls]
        whose = "this server" if scope == "server" else "one client"
        raise ResourceExhaustedError(
            f"{whose} has {limit} {what} open, its limit ({FLAGS[self.cls]}"
            f"{'' if scope == 'server' else ' x --client-share'}); close one or retry later",
            reason=REASONS[self.cls],
            metadata={"limit": str(limit), "scope": scope, "class": self.cls})

    def leave(self, client: str) -> None:
        with self._lock:
            self.active -= 1
            held = self._by_client[client] - 1
            if held:
                self._by_client[client] = held
            else:
                del self._by_client[client]


class Admission:
    """The gates and thread pools of the waiting classes."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.gates: dict[str, Gate] = {}
        self.pools: dict[str, futures.ThreadPoolExecutor] = {}
        for cls in (WATCH, TRANSFER, ROUND):
            limit = limits.of(cls)
            self.gates[cls] = Gate(cls, limit, max(1, int(limit * limits.client_share)))
            self.pools[cls] = futures.ThreadPoolExecutor(
                max_workers=limit + SLACK, thread_name_prefix=f"paramhub-rpc-{cls}")

    def active(self) -> dict[str, int]:
        """Calls in progress per waiting class (for metrics)."""
        return {cls: g.active for cls, g in self.gates.items()}

    def close(self) -> None:
        """Lets the pools' threads end once their calls have (never blocks)."""
        for pool in self.pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
