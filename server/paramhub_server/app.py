"""build_server(settings) -> (grpc.Server, port): the servicer, health and reflection."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramhub.v1 import parameter_service_pb2 as pb
from paramhub_server.core.registry import Registry, parse_device
from paramhub_server.servicer import ParameterService
from paramhub_server.settings import Settings
from paramhub_server.transport import Transport, add_servicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterService"].full_name


class Server:
    """A running paramhub server: the grpc.Server plus what shutting it down needs."""

    def __init__(self, grpc_server: grpc.Server, port: int, health_servicer: health.HealthServicer,
                 registry: Registry, transport: Transport | None = None) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer
        self.registry = registry
        self.transport = transport

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first (load balancers stop sending), then drain and stop."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        if self.transport is not None:
            self.transport.close()


def build_server(settings: Settings) -> Server:
    """Builds and starts a server bound to settings.host:settings.port (0 picks a free port)."""
    device = parse_device(settings.device, torch.device("cpu"))
    registry = Registry(device, max_model_bytes=settings.max_model_bytes)
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                                    thread_name_prefix="paramhub-rpc"),
                         options=options)
    transport = Transport(max_message_bytes=settings.max_message_bytes, shm=settings.shm)
    add_servicer(ParameterService(registry, transport), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{address}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("paramhub serving on %s:%d (device %s)", settings.host, port, device)
    return Server(server, port, health_servicer, registry, transport)
