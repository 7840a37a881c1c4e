"""How tensor bytes travel: raw-frame (de)serializers for the bulk RPCs, the same-host
shared-memory channel and the data channel.

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

Data channel (any host, plaintext servers only): the same greeting over a TCP port on the gRPC
host; a GetTensor or SetSlice naming the token moves the raw bytes over that connection instead
of the gRPC stream (see paramhub._data for the protocol and its checks).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import secrets
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc
import torch
from google.protobuf import message_factory

from paramhub import _codec, _data
from paramhub._shm import (ShmSegment, create_segment, receive_fd, receive_segment,
                           seal_received, send_segment, shm_supported)
from paramhub.common import rpcs
from paramhub.errors import InvalidArgumentError, UnavailableError
from paramhub.v1 import parameter_service_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterService"]

#: poll() flag for "the peer shut down its side" (Linux); 0 elsewhere.
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)

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

__all__ = ["HTTP2_OPTIONS", "add_servicer", "ShmChannel", "DataChannel", "Transport",
           "create_segment", "ShmSegment"]



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
        facts = rpcs.FACTS[method.name]  # raw framing, as declared in the proto
        if facts.raw_response:
            serializer = _passthrough
        if facts.raw_request_field:  # a bytes field: tag = (field number << 3) | 2
            deserializer = _data_or(req, facts.raw_request_field << 3 | 2)
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


class _GreetingChannel:
    """Accepts connections, greets each with a fresh single-use token, and hands the connection
    to the one gRPC call that names it. Subclasses make the listener and move the bytes."""

    #: Greeted connections kept at most, and per peer (a process on the unix socket, an address
    #: on the data port). A new connection past either cap evicts the oldest pending one (of
    #: that peer first) instead of being refused: idle connections that never call cannot
    #: hold the slots, and a client names its token right after its greeting.
    MAX_PENDING = 256
    MAX_PER_PEER = 16
    _thread_name = "paramhub-channel"
    _unavailable = "SHM_UNAVAILABLE"

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        self._listener.settimeout(0.25)
        #: token -> (connection, greeted at, peer); oldest first (dicts keep insertion order).
        self._pending: dict[str, tuple[socket.socket, float, Any]] = {}
        #: Pending connections evicted to make room (for tests and metrics).
        self.evicted = 0
        #: Connections handed to calls (weakly held: each call closes its own), so that
        #: shutdown can break the ones still blocked on a slow or silent peer.
        self._taken: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        #: Transfers sent to and received from clients (for tests and metrics).
        self.sent = 0
        self.received = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=self._thread_name,
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
            peer = self._peer(conn)
            token = secrets.token_hex(TOKEN_CHARS // 2)
            with self._lock:
                evict = self._make_room(peer)
                # Registered before the client can know it: it may name it at once.
                self._pending[token] = (conn, time.monotonic(), peer)
            for old in evict:
                old.close()
            try:
                conn.settimeout(RECV_TIMEOUT)
                conn.sendall(token.encode("ascii"))
            except OSError:
                with self._lock:
                    self._pending.pop(token, None)
                conn.close()

    def _peer(self, conn: socket.socket) -> Any:
        """Who is connecting: the peer's address (TCP), or its process id (unix socket)."""
        try:
            if conn.family == socket.AF_UNIX:
                cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
                return struct.unpack("3i", cred)[0]
            return conn.getpeername()[0]
        except OSError:
            return None

    def _make_room(self, peer: Any) -> list[socket.socket]:
        """Pops the pending connections a new one from `peer` evicts (caller holds the lock)."""
        mine = [t for t, (_, _, p) in self._pending.items() if p == peer]
        out = []
        if len(mine) >= self.MAX_PER_PEER:
            out.append(self._pending.pop(mine[0])[0])
        if len(self._pending) >= self.MAX_PENDING:
            out.append(self._pending.pop(next(iter(self._pending)))[0])
        self.evicted += len(out)
        return out

    def _expire(self) -> None:
        """Drops tokens that are too old or whose client hung up (e.g. it died)."""
        now = time.monotonic()
        with self._lock:
            entries = list(self._pending.items())
        dead = [t for t, (_, at, _) in entries if now - at > TOKEN_TTL]
        poller = select.poll()
        by_fd = {}
        for token, (conn, _, _) in entries:
            try:
                poller.register(conn.fileno(), select.POLLIN | select.POLLHUP | _POLLRDHUP)
                by_fd[conn.fileno()] = (token, conn)
            except (OSError, ValueError):
                dead.append(token)
        for fd, events in poller.poll(0):
            token, conn = by_fd[fd]
            if events & (select.POLLHUP | select.POLLERR | _POLLRDHUP):
                # The client hung up (died, or gave up after its call failed), even if bytes it
                # sent are still unread.
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
        """The connection greeted with `token` (single use); SHM_UNAVAILABLE (or
        DATA_CHANNEL_UNAVAILABLE) if unknown, used or expired."""
        with self._lock:
            entry = self._pending.pop(token, None)
        if entry is None or time.monotonic() - entry[1] > TOKEN_TTL:
            if entry is not None:
                entry[0].close()
            raise InvalidArgumentError(f"unknown, used or expired {self._what} token",
                                       reason=self._unavailable)
        with self._lock:
            self._taken.add(entry[0])
        return entry[0]

    _what = "channel"

    def close(self) -> None:
        """Stops accepting and drops every pending connection."""
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=2)
        with self._lock:
            conns = [c for c, _, _ in self._pending.values()]
            self._pending.clear()
        for c in conns:
            c.close()
        with self._lock:
            taken = list(self._taken)
        for c in taken:
            try:  # wakes a call blocked in recv/send on it: it fails and ends
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its call


class ShmChannel(_GreetingChannel):
    """The server's end of the same-host channel (an abstract unix socket)."""

    _thread_name = "paramhub-shm"
    _what = "shared-memory"

    def __init__(self) -> None:
        self.address = f"paramhub-{os.getpid()}-{secrets.token_hex(8)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind("\0" + self.address)
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        super().__init__(listener)

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

    def receive_open(self, conn: socket.socket) -> tuple[int, int]:
        """Receives the client's memfd and seals its size, without mapping it: (descriptor,
        size). The caller maps only what it writes (`ShmSegment(fd, n, populate=False)`), never
        the whole memfd; the connection stays open."""
        fd = receive_fd(conn)
        try:
            size = seal_received(fd)
        except BaseException:
            os.close(fd)
            raise
        self.received += 1
        return fd, size


class DataChannel(_GreetingChannel):
    """The server's end of the data channel: a TCP port on the gRPC host (see paramhub._data).

    Reads: the servicer copies the region under the read lock (as for every read), releases the
    lock, and only then sends, so writers never wait on a slow reader. Writes: the bytes are
    received into a fresh tensor before the write lock is taken.
    """

    _thread_name = "paramhub-data"
    _unavailable = "DATA_CHANNEL_UNAVAILABLE"
    _what = "data-channel"

    def __init__(self, host: str, port: int = 0) -> None:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(addr)
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        self.port: int = listener.getsockname()[1]
        super().__init__(listener)

    def send_tensor(self, conn: socket.socket, tensor: torch.Tensor) -> None:
        """Sends a read's length and bytes from `tensor`'s memory; closes the connection."""
        try:
            view = _codec._memory(_codec.byte_view(tensor))
            try:
                _data.send_length(conn, view.nbytes)
                _data.send_view(conn, view)
            except OSError as e:  # the client went away (or stalled past the timeout)
                raise UnavailableError(f"the data-channel connection broke: {e}",
                                       reason="DATA_CHANNEL_BROKEN") from None
            self.sent += 1
        finally:
            conn.close()

    def receive_tensor(self, conn: socket.socket, dtype: torch.dtype, shape: tuple[int, ...],
                       digest: bytes) -> torch.Tensor:
        """Receives a write's bytes into a new tensor after checking the preamble; closes the
        connection. INVALID_ARGUMENT (DATA_CHANNEL_MISMATCH) if the preamble names another
        transfer, (BAD_STREAM) if the client stops early."""
        try:
            nbytes = dtype.itemsize * math.prod(shape)
            try:
                n, got = _data.PREAMBLE.unpack(_data.recv_exact(conn, _data.PREAMBLE.size))
            except (OSError, ConnectionError) as e:
                raise InvalidArgumentError(f"no data-channel preamble arrived: {e}",
                                           reason="BAD_STREAM") from None
            if n != nbytes or not hmac.compare_digest(got, digest):
                raise InvalidArgumentError(
                    "the data-channel bytes were sent for another transfer (tensor, index, op, "
                    "shape or size differ from this call)", reason="DATA_CHANNEL_MISMATCH")
            out = _codec.empty(shape, dtype)
            try:
                _data.recv_into(conn, _codec._memory(_codec.byte_view(out)))
            except (OSError, ConnectionError) as e:
                raise InvalidArgumentError(f"the data-channel transfer failed: {e}",
                                           reason="BAD_STREAM") from None
            self.received += 1
            return out
        finally:
            conn.close()


class Transport:
    """What the servicer needs to move bytes: message limit, the optional shm channel and the
    optional data channel (a TCP port on `data_host`; None = off)."""

    def __init__(self, *, max_message_bytes: int, shm: bool = True,
                 data_host: str | None = None, data_port: int = 0) -> None:
        self.max_message_bytes = max_message_bytes
        self.shm: ShmChannel | None = None
        self.data: DataChannel | None = None
        if shm and shm_supported():
            try:
                self.shm = ShmChannel()
            except OSError as e:  # e.g. a sandbox without unix sockets
                log.warning("shared-memory transport disabled: %s", e)
        if data_host is not None:
            try:
                self.data = DataChannel(data_host, data_port)
                log.info("data channel on port %d", self.data.port)
            except OSError as e:
                log.warning("data channel disabled: %s", e)

    def close(self) -> None:
        """Closes the shm and data channels."""
        if self.shm is not None:
            self.shm.close()
        if self.data is not None:
            self.data.close()

    def data_channel(self) -> DataChannel:
        """The data channel; DATA_CHANNEL_UNAVAILABLE when disabled."""
        if self.data is None:
            raise InvalidArgumentError("the data channel is disabled on this server",
                                       reason="DATA_CHANNEL_UNAVAILABLE")
        return self.data

    def shm_channel(self) -> ShmChannel:
        """The channel; SHM_UNAVAILABLE when disabled."""
        if self.shm is None:
            raise InvalidArgumentError("shared memory is disabled on this server",
                                       reason="SHM_UNAVAILABLE")
        return self.shm
