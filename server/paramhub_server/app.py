"""build_server(settings) -> (grpc.Server, port): the servicer, health and reflection."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramhub.v1 import parameter_service_pb2 as pb
from paramhub.v1 import parameter_service_pb2_grpc as pb_grpc
from paramhub_server.core.registry import Registry, parse_device
from paramhub_server.core.store import Store
from paramhub_server.servicer import ParameterService
from paramhub_server.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterService"].full_name


class Server:
    """A running paramhub server: the grpc.Server plus what shutting it down needs."""

    def __init__(self, grpc_server: grpc.Server, port: int, health_servicer: health.HealthServicer,
                 registry: Registry, recovery: threading.Thread | None = None) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer
        self.registry = registry
        self._recovery = recovery

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits until recovery from the data directory is done; True if it is."""
        return self.registry.ready.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first (load balancers stop sending), end watch streams, drain
        and stop, then flush and close every model's log."""
        self.health.enter_graceful_shutdown()
        if self._recovery is not None:
            self._recovery.join()
        for m in self.registry.list():
            m.watchers.close()
        self.grpc_server.stop(grace).wait()
        self.registry.close()


def build_server(settings: Settings, *, wait_ready: bool = True) -> Server:
    """Builds and starts a server bound to settings.host:settings.port (0 picks a free port).

    With a data directory, stored models are recovered in a background thread while health
    says NOT_SERVING and ParameterService calls answer UNAVAILABLE (reason STARTING); health
    turns SERVING when recovery is done. `wait_ready` returns only then.
    """
    device = parse_device(settings.device, torch.device("cpu"))
    store = None
    if settings.data_dir is not None:
        store = Store(settings.data_dir, fsync=settings.fsync,
                      fsync_interval=settings.fsync_interval_s,
                      compact_bytes=settings.compact_bytes)
    registry = Registry(device, max_model_bytes=settings.max_model_bytes, store=store)
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                                    thread_name_prefix="paramhub-rpc"),
                         options=options)
    pb_grpc.add_ParameterServiceServicer_to_server(ParameterService(registry), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{address}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()

    def recover() -> None:
        loaded = registry.recover()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("paramhub serving on %s:%d (device %s, %d models recovered from %s)",
                 settings.host, port, device, len(loaded), settings.data_dir)

    recovery = threading.Thread(target=recover, name="paramhub-recovery", daemon=True)
    recovery.start()
    if wait_ready:
        recovery.join()
    return Server(server, port, health_servicer, registry, recovery)
