"""`paramhub serve` under torchrun: this rank's settings, the process group, the addresses.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each process it
starts. Rank r serves gRPC on `--port + LOCAL_RANK` (a free port when --port is 0), keeps its
state in `DATA_DIR/rank-{r}`, joins a gloo process group, and learns every rank's address with
one all_gather_object; rank 0 is the front door clients connect to.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from paramhub_server.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between a torchrun worker's checks that its agent is still alive.
LAUNCHER_CHECK_S = 1.0
#: Seconds a rank whose agent is gone has to stop by itself before it exits.
LAUNCHER_GONE_GRACE_S = 30.0

#: Seconds a collective may wait (gloo's timeout). The command loop's heartbeat keeps idle
#: ranks well inside it; a stalled rank fails the collective after this.
PG_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class RankEnv:
    """What torchrun told this process."""

    rank: int
    local_rank: int
    world_size: int


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv | None:
    """This process's place in a torchrun launch, or None when not launched by torchrun."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        return RankEnv(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", "0")),
                       world_size=int(env["WORLD_SIZE"]))
    except ValueError:
        return None


def rank_settings(settings: Settings, env: RankEnv) -> Settings:
    """The settings of rank `env.rank`: its own port and data directory; only rank 0 keeps
    the metrics port (one endpoint per host would collide)."""
    port = settings.port + env.local_rank if settings.port else 0
    data_dir = (settings.data_dir / f"rank-{env.rank}"
                if settings.data_dir is not None else None)
    metrics = settings.metrics_port
    if metrics and env.local_rank:
        metrics = metrics + env.local_rank
    data_port = settings.data_port + env.local_rank if settings.data_port else 0
    return dataclasses.replace(settings, port=port, data_dir=data_dir, metrics_port=metrics,
                               data_port=data_port)


def advertised(host: str, port: int) -> str:
    """The address other ranks and clients reach this rank at: the bind address, or this
    host's name when bound to every interface."""
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = os.environ.get("PARAMHUB_ADVERTISE_HOST") or _hostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _hostname() -> str:
    import socket

    return socket.getfqdn()


def join(env: RankEnv, address: str, *, device: str, data_dir: Any,
         max_model_bytes: int | None = None) -> Any:
    """Joins the gloo process group, exchanges addresses and starts the command loop.
    Returns the running `engine.Cluster`."""
    import torch.distributed as dist

    from paramhub_server.cluster import engine

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=attempt_store(env),
                                rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=PG_TIMEOUT_S))
    addresses: list[Any] = [None] * env.world_size
    dist.all_gather_object(addresses, address)
    log.info("rank %d of %d at %s; ranks at %s", env.rank, env.world_size, address, addresses)
    cluster = engine.Cluster(env.rank, env.world_size, addresses, device=device,
                             data_dir=data_dir, probe=_probe, max_model_bytes=max_model_bytes)
    cluster.start()
    return cluster


def attempt_store(env: RankEnv) -> Any:
    """The rendezvous store (torchrun's, from MASTER_ADDR/MASTER_PORT) under a prefix of its
    own for this launch attempt (TORCHELASTIC_RESTART_COUNT).

    Under `torchrun --max-restarts` the static rendezvous keeps one TCPStore (the agent's)
    for every attempt, and init_process_group("env://") reads its keys unprefixed: a
    restarted rank found the gloo addresses the dead attempt's ranks had published there and
    connected to those (refused), so the restarted cluster never formed. With the attempt in
    the prefix every attempt meets only its own ranks."""
    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size,
                                       timeout=timedelta(seconds=PG_TIMEOUT_S)))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"paramhub/attempt-{attempt}/", store)


def _probe(address: str) -> bool:
    """Whether the rank at `address` still answers gRPC health (1 s)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=1.0)
        return True
    except grpc.RpcError:
        return False


class Launch:
    """What `paramhub serve` does differently under torchrun (cli.py calls these three)."""

    def __init__(self, env: RankEnv, settings: Settings) -> None:
        self.env = env
        # Each rank's own port and data dir; the same-host shared memory and the data channel
        # are not used for sharded tensors (their bytes come from the ranks: ReadShard).
        self.settings = dataclasses.replace(rank_settings(settings, env), shm=False,
                                            data_channel=False)
        self._server: Any = None
        self._bound = threading.Event()
        self.cluster: Any = None

    def loader(self, registry: Any) -> None:
        """Runs in the server's loading thread (readiness stays NOT_SERVING until it ends):
        waits for the bound port, joins the process group, hands the cluster to the
        services."""
        if not self._bound.wait(timeout=PG_TIMEOUT_S):
            raise RuntimeError("the server never reported its port")
        srv = self._server
        address = advertised(self.settings.host, srv.port)
        self.cluster = join(self.env, address, device=str(registry.default_device),
                            data_dir=self.settings.data_dir,
                            max_model_bytes=self.settings.max_model_bytes)
        srv.parameter_service.cluster = self.cluster
        srv.cluster_service.cluster = self.cluster

    def bound(self, server: Any) -> None:
        """Called with the running server once build_server returned."""
        self._server = server
        self._bound.set()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def prepare(settings: Settings) -> Launch | None:
    """A Launch when this process was started by torchrun, else None (a plain server)."""
    env = rank_env()
    if env is None:
        return None
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's agent
        watch_launcher(_stop_self)
    return Launch(env, settings)


def watch_launcher(on_gone: Callable[[], None], interval_s: float = LAUNCHER_CHECK_S) -> None:
    """Calls `on_gone` once the process that started this one is gone (this process was
    re-parented). torchrun starts its workers in sessions of their own and only stops them
    itself: when its agent is SIGKILLed (or OOM-killed) they would live on, holding their
    ports and data directories, and a new launch on the same directories would share them."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        log.error("the torchrun agent that started this rank (pid %d) is gone; stopping",
                  parent)
        on_gone()

    threading.Thread(target=watch, name="paramhub-launcher-watch", daemon=True).start()


def _stop_self() -> None:
    """Stops this server as SIGTERM does (drain, then exit); exits outright if that has not
    happened after LAUNCHER_GONE_GRACE_S (a collective waiting on a dead peer)."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(LAUNCHER_GONE_GRACE_S)
    os._exit(1)
