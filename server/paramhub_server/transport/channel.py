"""What the shared-memory channel and the data channel share: a listener whose every connection
is greeted with a fresh single-use token, handed to the one gRPC call that names it (so
authentication, authorization and limits apply to every transfer)."""

from __future__ import annotations

import logging
import secrets
import select
import socket
import struct
import threading
import time
import weakref
from typing import Any

from paramhub.errors import InvalidArgumentError

__all__ = ["GreetingChannel", "TOKEN_TTL", "RECV_TIMEOUT", "TOKEN_CHARS"]

log = logging.getLogger("paramhub_server.transport")

#: poll() flag for "the peer shut down its side" (Linux); 0 elsewhere.
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)

#: Seconds a greeted connection waits for the gRPC call that names its token.
TOKEN_TTL = 60.0
#: Seconds the server waits for a client's bytes or memfd on a named connection.
RECV_TIMEOUT = 30.0
#: Length of a token (hex characters).
TOKEN_CHARS = 32


class GreetingChannel:
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
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        """Greets a new connection and registers its token."""
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
                # (The socket's own recv: a TLS socket's refuses flags; EOF is EOF under TLS.)
                if socket.socket.recv(conn, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
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


_GreetingChannel = GreetingChannel
