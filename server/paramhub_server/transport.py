"""How tensor bytes travel: raw-frame (de)serializers for the bulk RPCs and the same-host
shared-memory channel.

Raw frames: the servicer's bulk streams (GetTensor, PullState out; StreamSetSlice, PushState in)
are registered with (de)serializers that pass ready-made protobuf wire bytes through and read
incoming data fields as memoryviews (see paramhub._codec "Raw wire frames"). The wire format is
unchanged: a plain protobuf peer interoperates.

Shared memory (Linux): the server listens on a random abstract unix socket, advertised by
GetTransportInfo. A client that can connect to it is on the same host (and network namespace);
each connection is greeted with a fresh single-use token, which the client names in one gRPC call
(so authentication and limits still apply to every transfer). The bytes then travel in an
anonymous memfd passed over that connection with SCM_RIGHTS: a memfd has no name, so nothing can
leak in /dev/shm when either side dies, and each one holds only the bytes of its own transfer
(never other tensors' or models' memory). Received memfds are sealed against shrinking before
they are mapped, so a client cannot crash the server with SIGBUS.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import torch
from google.protobuf import message_factory

from paramhub import _codec
from paramhub._shm import (ShmSegment, create_segment, receive_segment, send_segment,
                           shm_supported)
from paramhub.errors import InvalidArgumentError
from paramhub.v1 import parameter_service_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterService"]

#: Seconds a greeted shm connection waits for the gRPC call that names its token.
TOKEN_TTL = 60.0
#: Seconds the server waits for a client's memfd on a named connection.
RECV_TIMEOUT = 30.0
#: Length of a token (hex characters).
TOKEN_CHARS = 32

#: HTTP/2 settings for both ends: gRPC's default 16 KiB frames cut each 1 MiB chunk into 64
#: frames, each a trip through the transport; the largest frame HTTP/2 allows (2**24 - 1)
#: measured ~1.5x the throughput of streamed tensors on loopback (benchmarks/).
HTTP2_OPTIONS = [("grpc.http2.max_frame_size", (1 << 24) - 1)]

__all__ = ["HTTP2_OPTIONS", "add_servicer", "ShmChannel", "Transport", "create_segment", "ShmSegment"]



def _passthrough(message: Any) -> bytes:
    """Sends bytes that are already protobuf wire format as they are; serializes messages."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def _data_or(cls: Any, tag: int) -> Callable[[bytes], Any]:
    def deserialize(buf: bytes) -> Any:
        view = _codec.parse_data_frame(buf, tag)
        return view if view is not None else cls.FromString(buf)
    return deserialize


def add_servicer(servicer: Any, server: grpc.Server) -> None:
    """Registers every ParameterService method of `servicer`, with raw-frame (de)serializers for
    the bulk streams. Replaces the generated add_ParameterServiceServicer_to_server."""
    handlers = {}
    for method in SERVICE.methods:
        req = message_factory.GetMessageClass(method.input_type)
        resp = message_factory.GetMessageClass(method.output_type)
        deserializer: Callable[[bytes], Any] = req.FromString
        serializer: Callable[[Any], bytes] = resp.SerializeToString
        if method.name in ("GetTensor", "PullState", "GetTensorInline"):
            serializer = _passthrough
        elif method.name == "StreamSetSlice":
            deserializer = _data_or(req, 0x12)  # StreamSetSliceRequest.data = 2
        elif method.name == "PushState":
            deserializer = _data_or(req, 0x12)  # PushStateRequest.data = 2
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(getattr(servicer, method.name),
                                        request_deserializer=deserializer,
                                        response_serializer=serializer)
    generic = grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


# ---------------------------------------------------------------------------------------------
# Shared memory


class ShmChannel:
    """The server's end of the same-host channel: accepts connections, greets each with a token,
    and hands the connection to the one gRPC call that names it."""

    def __init__(self) -> None:
        self.address = f"paramhub-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind("\0" + self.address)
        self._listener.listen(64)
        self._listener.settimeout(0.25)
        self._pending: dict[str, tuple[socket.socket, float]] = {}
        #: Segments sent to and received from clients (for tests and metrics).
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="paramhub-shm",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            self._expire()
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            token = secrets.token_hex(TOKEN_CHARS // 2)
            # Registered before the client can know it: it may name it at once.
            with self._lock:
                self._pending[token] = (conn, time.monotonic())
            try:
                conn.settimeout(RECV_TIMEOUT)
                conn.sendall(token.encode("ascii"))
            except OSError:
                with self._lock:
                    self._pending.pop(token, None)
                conn.close()

    def _expire(self) -> None:
        """Drops tokens that are too old or whose client hung up (e.g. it died)."""
        now = time.monotonic()
        with self._lock:
            entries = list(self._pending.items())
        dead = [t for t, (_, at) in entries if now - at > TOKEN_TTL]
        poller = select.poll()
        by_fd = {}
        for token, (conn, _) in entries:
            try:
                poller.register(conn.fileno(), select.POLLIN | select.POLLHUP)
                by_fd[conn.fileno()] = (token, conn)
            except (OSError, ValueError):
                dead.append(token)
        for fd, events in poller.poll(0):
            token, conn = by_fd[fd]
            if events & select.POLLHUP:
                dead.append(token)
                continue
            try:
                # A client sends nothing but its memfd (one byte with it): EOF means it is gone.
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    dead.append(token)
            except BlockingIOError:
                pass
            except OSError:
                dead.append(token)
        with self._lock:
            conns = [self._pending.pop(t)[0] for t in set(dead) if t in self._pending]
        for c in conns:
            c.close()

    @property
    def pending(self) -> int:
        """Greeted connections whose token has not been used yet."""
        with self._lock:
            return len(self._pending)

    def take(self, token: str) -> socket.socket:
        """The connection greeted with `token` (single use); SHM_UNAVAILABLE if unknown."""
        with self._lock:
            entry = self._pending.pop(token, None)
        if entry is None:
            raise InvalidArgumentError("unknown or already used shared-memory token",
                                       reason="SHM_UNAVAILABLE")
        return entry[0]

    def send(self, conn: socket.socket, segment: ShmSegment) -> None:
        """Passes a filled segment to the client and closes the connection."""
        try:
            send_segment(conn, segment)
            self.sent += 1
        finally:
            conn.close()

    def receive(self, conn: socket.socket, nbytes: int) -> ShmSegment:
        """Receives and maps the client's memfd of `nbytes` bytes; closes the connection."""
        try:
            segment = receive_segment(conn, nbytes)
            self.received += 1
            return segment
        finally:
            conn.close()

    def receive_open(self, conn: socket.socket) -> ShmSegment:
        """Receives and maps the client's memfd whatever its size (the caller checks it); the
        connection stays open."""
        segment = receive_segment(conn, 0)
        self.received += 1
        return segment

    def close(self) -> None:
        """Stops accepting and drops every pending connection."""
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=2)
        with self._lock:
            conns = [c for c, _ in self._pending.values()]
            self._pending.clear()
        for c in conns:
            c.close()


class Transport:
    """What the servicer needs to move bytes: message limit and the optional shm channel."""

    def __init__(self, *, max_message_bytes: int, shm: bool = True) -> None:
        self.max_message_bytes = max_message_bytes
        self.shm: ShmChannel | None = None
        if shm and shm_supported():
            try:
                self.shm = ShmChannel()
            except OSError as e:  # e.g. a sandbox without unix sockets
                log.warning("shared-memory transport disabled: %s", e)

    def close(self) -> None:
        """Closes the shm channel."""
        if self.shm is not None:
            self.shm.close()

    def shm_channel(self) -> ShmChannel:
        """The channel; SHM_UNAVAILABLE when disabled."""
        if self.shm is None:
            raise InvalidArgumentError("shared memory is disabled on this server",
                                       reason="SHM_UNAVAILABLE")
        return self.shm
