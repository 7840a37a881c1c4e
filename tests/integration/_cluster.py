"""A paramhub cluster for tests: K ranks of `paramhub serve` on 127.0.0.1, started by torchrun
(as a user would) or directly with torchrun's environment variables (so a test can kill one
rank), waited for with bounded polls and torn down after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: Seconds a cluster may take to become ready (torch import, process group, recovery).
START_TIMEOUT_S = 120.0


def free_port_pair() -> int:
    """A port P with P and P + 1 free now (bounded tries)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port > 65000:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of ports")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(target: str, timeout: float = 1.0) -> bool:
    """Whether the server at `target` answers readiness SERVING."""
    try:
        with grpc.insecure_channel(target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=timeout)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


class ClusterProcs:
    """K ranks on 127.0.0.1: rank r on `port + r`, state in `data_dir/rank-{r}`."""

    def __init__(self, data_dir: Path, ranks: int = 2, *, launcher: str = "torchrun",
                 extra: tuple[str, ...] = (), torchrun_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.ranks = ranks
        self.launcher = launcher
        self.extra = extra
        #: More torchrun options (e.g. "--max-restarts", "1").
        self.torchrun_args = torchrun_args
        self.port = 0
        #: Extra environment of one rank (direct launch only), e.g. a crash point.
        self.rank_env: dict[int, dict[str, str]] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = data_dir.parent / f"cluster-{id(self)}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def address(self, rank: int) -> str:
        return f"127.0.0.1:{self.port + rank}"

    def _serve_args(self) -> list[str]:
        return ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir",
                str(self.data_dir), "--log-level", "WARNING", *self.extra]

    def start(self) -> ClusterProcs:
        self.port = free_port_pair() if self.ranks <= 2 else free_port()
        master = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
        out = open(self.log, "ab")  # noqa: SIM115 - closed with the processes
        if self.launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                   str(self.ranks), "--master-addr", "127.0.0.1", "--master-port", str(master),
                   *self.torchrun_args, "-m", "paramhub_server", *self._serve_args()]
            self.procs = [subprocess.Popen(cmd, env=env, stdout=out, stderr=out,
                                           start_new_session=True)]
        else:  # each rank by hand, with the variables torchrun would set
            for r in range(self.ranks):
                renv = {**env, "RANK": str(r), "LOCAL_RANK": str(r),
                        "WORLD_SIZE": str(self.ranks), "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(master), **self.rank_env.get(r, {})}
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "paramhub_server", *self._serve_args()], env=renv,
                    stdout=out, stderr=out, start_new_session=True))
        out.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(ready(self.address(r)) for r in range(self.ranks)):
                return self
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the cluster did not become ready; log:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_exit(self, timeout: float = 60.0) -> list[int | None]:
        """Waits (bounded) until every process has exited; their exit codes (None: still
        running at the deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.2)
        return [p.poll() for p in self.procs]

    def rank_pid(self, rank: int) -> int | None:
        """The pid of the process now serving `rank` (under torchrun: the launcher's child
        whose RANK is `rank`), or None."""
        if self.launcher == "direct":
            return self.procs[rank].pid if self.procs[rank].poll() is None else None
        return self._workers().get(rank)

    def _workers(self) -> dict[int, int]:
        """rank -> pid of torchrun's worker processes now alive (its children)."""
        if not self.procs or self.launcher == "direct":
            return {}
        parent = str(self.procs[0].pid)
        out: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[1]
                if ppid != parent:
                    continue
                env = (d / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            for var in env:
                if var.startswith(b"RANK="):
                    out[int(var[5:])] = int(d.name)
        return out

    def kill(self, rank: int) -> None:
        """SIGKILL one rank (direct launch only)."""
        assert self.launcher == "direct"
        self.procs[rank].kill()
        self.procs[rank].wait(timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stops every process (the launcher's whole process group, and torchrun's workers,
        which it starts in sessions of their own: a SIGKILLed torchrun cannot pass the signal
        on, and its ranks would live on), bounded."""
        workers = list(self._workers().values())
        if sig == signal.SIGKILL:
            _kill(workers)
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill(workers)
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        self.procs = []


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_writers_and_readers(writers: list[Callable[[], None]],
                            readers: list[Callable[[], None]],
                            stop: threading.Event) -> list[BaseException]:
    """Runs every writer and reader in its own thread; once the writers are done, sets `stop`
    (readers poll it) and waits for the readers, each join bounded. The errors raised in any
    thread."""
    errors: list[BaseException] = []

    def guard(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    started = [threading.Thread(target=guard, args=(fn,)) for fn in writers + readers]
    for t in started:
        t.start()
    for t in started[:len(writers)]:
        t.join(timeout=300)
    stop.set()
    for t in started[len(writers):]:
        t.join(timeout=300)
    return errors
