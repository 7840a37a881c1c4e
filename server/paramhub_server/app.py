"""build_server(settings) -> Server: the servicer behind the RPC pipeline (auth, readiness,
decoding, metrics, request ids), health with liveness and readiness, reflection, TLS."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramhub.v1 import parameter_service_pb2 as pb
from paramhub_server.admission import Admission, Limits
from paramhub_server.auth import Authenticator
from paramhub_server.cluster.service import (ClusterParameterService, ClusterServicer,
                                             add_cluster_servicer)
from paramhub_server.core.registry import Registry, parse_device
from paramhub_server.core.store import Store
from paramhub_server.interceptors import Pipeline
from paramhub_server.metrics import Metrics
from paramhub_server.settings import Settings
from paramhub_server.transport import (HTTP2_OPTIONS, Transport, add_servicer,
                                        server_tls_context)

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterService"].full_name
#: Health service names: "liveness" is SERVING once the process accepts calls; "readiness" (and
#: "" and the ParameterService name, which load balancers usually check) once loading finished.
LIVENESS, READINESS = "liveness", "readiness"
_SERVING, _NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                          health_pb2.HealthCheckResponse.NOT_SERVING)


class ConfigError(ValueError):
    """Settings that must not be served (e.g. an exposed address without authentication)."""


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


def check_settings(settings: Settings) -> None:
    """Refuses unsafe or inconsistent settings before anything binds (ConfigError)."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    if not 1 <= settings.max_spec_depth <= 64:
        raise ConfigError("--max-spec-depth must be 1 to 64")
    if not 0 < settings.client_share <= 1:
        raise ConfigError("--client-share must be in (0, 1]")
    for name in ("max_model_bytes", "max_total_bytes", "max_concurrent_rpcs",
                 "max_tensor_elements", "max_workers", "max_watchers", "max_transfers",
                 "max_round_waiters"):
        value = getattr(settings, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    authenticated = settings.auth_file is not None or settings.tls_client_ca is not None
    if not is_loopback(settings.host) and not authenticated and not settings.insecure:
        raise ConfigError(
            f"refusing to serve {settings.host} without authentication: give --auth-file "
            "(or mTLS with --tls-client-ca), or --insecure to accept any caller")
    if settings.trust_remote_code and settings.auth_file is None and not is_loopback(
            settings.host):
        # Without roles every caller would count as admin and could run code here.
        raise ConfigError("--trust-remote-code on a non-loopback address needs --auth-file "
                          "(only admin tokens may send code)")


class Server:
    """A running paramhub server: the grpc.Server plus what shutting it down needs."""

    def __init__(self, grpc_server: grpc.Server, port: int, health_servicer: health.HealthServicer,
                 registry: Registry, metrics: Metrics | None = None,
                 transport: Transport | None = None, admission: Admission | None = None
                 ) -> None:
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer
        self.registry = registry
        self.metrics = metrics
        self.transport = transport
        self.admission = admission
        #: The ParameterService and ClusterService handlers (a torchrun launch joins them to
        #: its cluster, cluster/launch.py).
        self.parameter_service: Any = None
        self.cluster_service: Any = None
        self._ready = threading.Event()
        self._loaded = threading.Event()  # the loader finished (successfully or not)
        self._recovered = threading.Event()  # the data directory's models are loaded (or failed)

    @property
    def metrics_port(self) -> int | None:
        """Port of the /metrics endpoint, if one was asked for."""
        return self.metrics.port if self.metrics is not None else None

    def ready(self) -> bool:
        """Whether loading has finished (ParameterService calls answer UNAVAILABLE before)."""
        return self._ready.is_set()

    def set_ready(self, ready: bool) -> None:
        """Flips readiness (health "readiness", "" and the service name)."""
        if ready:
            self._ready.set()
        else:
            self._ready.clear()
        for name in ("", SERVICE_NAME, READINESS):
            self.health.set(name, _SERVING if ready else _NOT_SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING first (load balancers stop sending), then drain and stop."""
        self._ready.clear()
        self.health.enter_graceful_shutdown()
        # Calls parked by design end now instead of holding the drain: watch streams close,
        # sync-round pushes still waiting answer UNAVAILABLE (their round never completes).
        self.registry.close_watchers()
        self.registry.close_rounds()
        self.grpc_server.stop(grace).wait()
        if self.transport is not None:
            self.transport.close()  # ends transfers still blocked on a data-channel socket
        if self.admission is not None:
            self.admission.close()
        self.registry.close()  # flush and close every model's write-ahead log
        if self.metrics is not None:
            self.metrics.stop()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Waits until loading (recovery from the data directory) has finished; True if the
        server is ready."""
        self._loaded.wait(timeout)
        return self.ready()


def _read(path: object) -> bytes:
    with open(path, "rb") as f:  # type: ignore[call-overload]
        return f.read()


def build_server(settings: Settings, *, loader: Callable[[Registry], None] | None = None,
                 wait_ready: bool = True) -> Server:
    """Builds and starts a server bound to settings.host:settings.port (0 picks a free port).

    Liveness is SERVING as soon as it listens. With a data directory, the stored models are
    recovered (newest snapshot + write-ahead log replay) in a background thread, followed by
    `loader` if given; readiness turns SERVING when that is done; until then ParameterService
    calls answer UNAVAILABLE (reason NOT_READY). With `wait_ready` this returns only after the
    recovery (not after `loader`).

    Raises:
        ConfigError: unsafe or inconsistent settings (checked before binding).
        OSError: the address cannot be bound.
    """
    check_settings(settings)
    authenticator = (Authenticator.from_file(settings.auth_file)
                     if settings.auth_file is not None else None)
    device = parse_device(settings.device, torch.device("cpu"))
    store = None
    if settings.data_dir is not None:
        store = Store(settings.data_dir, fsync=settings.fsync,
                      fsync_interval=settings.fsync_interval_s,
                      compact_bytes=settings.compact_bytes)
    registry = Registry(device, max_model_bytes=settings.max_model_bytes,
                        max_total_bytes=settings.max_total_bytes,
                        max_spec_nodes=settings.max_spec_nodes,
                        max_spec_depth=settings.max_spec_depth, store=store,
                        trust_remote_code=settings.trust_remote_code,
                        model_packages=settings.model_packages)
    methods = list(pb.DESCRIPTOR.services_by_name["ParameterService"].methods_by_name)
    admission = Admission(Limits(watchers=settings.max_watchers,
                                 transfers=settings.max_transfers,
                                 round_waiters=settings.max_round_waiters,
                                 client_share=settings.client_share))
    registry.max_round_waiters = settings.max_round_waiters
    metrics = Metrics(registry, methods, admission=admission)
    holder: dict[str, Server] = {}
    pipeline = Pipeline(authenticator=authenticator, metrics=metrics,
                        ready=lambda: "s" in holder and holder["s"].ready(),
                        admission=admission)
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Keepalive pings find peers that vanished without closing (a host that died, a
        # dropped link): their parked watch streams and transfers are cancelled and release
        # their slots. Clients may ping every 10 s, with or without calls in flight.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        *HTTP2_OPTIONS,
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                                    thread_name_prefix="paramhub-rpc"),
                         interceptors=[pipeline], options=options,
                         maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    # The data channel, on the same host as gRPC: in TLS with the server's certificates when
    # gRPC is (plaintext would expose what TLS protects).
    data_host = settings.host if settings.data_channel else None
    data_tls = (server_tls_context(str(settings.tls_cert), str(settings.tls_key),
                                   str(settings.tls_client_ca) if settings.tls_client_ca else None)
                if settings.tls_cert is not None and data_host is not None else None)
    transport = Transport(max_message_bytes=settings.max_message_bytes, shm=settings.shm,
                          data_host=data_host, data_port=settings.data_port, data_tls=data_tls,
                          max_data_writes=max(1, settings.max_workers // 2))
    # The cluster's handlers (server/paramhub_server/cluster) serve sharded models once a
    # torchrun launch joins them to a cluster; until then (and on a plain server) they are the
    # plain handlers, and ClusterService answers as a cluster of one rank.
    parameter_service = ClusterParameterService(
        registry, max_tensor_elements=settings.max_tensor_elements, transport=transport)
    add_servicer(parameter_service, server)
    cluster_service = ClusterServicer(None, f"{settings.host}:{settings.port}", str(device),
                                      registry)
    add_cluster_servicer(cluster_service, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, "paramhub.v1.ClusterService",
         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    address = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{address}:{settings.port}"
    if settings.tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(_read(settings.tls_key), _read(settings.tls_cert))],
            root_certificates=(_read(settings.tls_client_ca)
                               if settings.tls_client_ca is not None else None),
            require_client_auth=settings.tls_client_ca is not None)
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    if settings.metrics_port is not None:
        metrics.serve(settings.host, settings.metrics_port)
    srv = Server(server, port, health_servicer, registry, metrics, transport, admission)
    srv.parameter_service, srv.cluster_service = parameter_service, cluster_service
    cluster_service.address = f"{settings.host}:{port}"
    holder["s"] = srv
    server.start()
    health_servicer.set(LIVENESS, _SERVING)
    if loader is None and store is None:
        srv.set_ready(True)
        srv._recovered.set()
        srv._loaded.set()
    else:
        srv.set_ready(False)

        def load() -> None:
            try:
                if store is not None:
                    started = time.monotonic()
                    try:
                        loaded = registry.recover()
                    finally:
                        srv._recovered.set()
                    log.info("recovered %d models from %s in %.2fs", len(loaded),
                             settings.data_dir, time.monotonic() - started)
                else:
                    srv._recovered.set()
                if loader is not None:
                    loader(registry)
            except Exception:  # noqa: BLE001 - stays not ready; the log says why
                log.exception("loading failed; the server stays not ready")
                return
            finally:
                srv._loaded.set()
            srv.set_ready(True)
            log.info("loading finished; ready")

        threading.Thread(target=load, name="paramhub-load", daemon=True).start()
        if wait_ready:
            srv._recovered.wait()
    log.info("paramhub serving on %s:%d (device %s, %s, %s)", settings.host, port, device,
             "TLS" if settings.tls_cert else "plaintext",
             "auth" if authenticator else "no auth")
    return srv
