"""The data channel: big tensors over a plain TCP connection beside the gRPC one.

grpc-Python hands every message to Python as a new bytes object and takes the GIL per message,
which caps streamed tensors well below what one TCP connection carries. For values of at least
`DATA_MIN_BYTES`, when shared memory is not available (another host), the bytes travel instead
over a TCP connection to the server's data port (advertised by GetTransportInfo, on the gRPC
host): received with recv_into straight into a preallocated tensor, sent with sendall from the
tensor's own memory, never a Python bytes object per chunk.

Negotiation reuses the shared-memory channel's greeting (`paramhub._shm.ShmLink`): the server
greets every connection with a fresh 32-character token; the client names the token in one
gRPC call (the request's `transfer.data_token`; servers also accept the older
GetTensorRequest.data_token / SetSliceRequest.data_token), so authentication,
authorization and limits apply to every transfer exactly as today. A token is single use, bound
to the connection that received it and to the one call that names it, and expires after 60
seconds. A write's bytes are preceded by a preamble binding them to the exact request (byte
count and SHA-256 of token + request); the server refuses a mismatch before writing anything.

Under TLS the channel is TLS too: a TLS server wraps every data connection with its own
certificate (and requires a client certificate from its CA under mTLS), and the SDK verifies it
as the gRPC channel does (`TlsConfig`). A plaintext server's channel is plaintext.
`connect(data_channel=False)` / `paramhub serve --no-data-port` turn it off.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import tempfile
from dataclasses import dataclass
from typing import Any

from paramhub._shm import ShmLink
from paramhub.errors import InvalidArgumentError

__all__ = ["DATA_MIN_BYTES", "PIECE", "DataLink", "TlsConfig", "send_view", "recv_into", "recv_exact",
           "send_length", "recv_length", "write_digest", "reset", "PREAMBLE"]

#: Values of at least this many bytes use the data channel (when shm is not available): the
#: default of the transfer policy's threshold (paramhub._transfer.policy).
DATA_MIN_BYTES = 16 << 20
#: Bytes per send/recv system call (each bounded by the socket timeout).
PIECE = 8 << 20
#: A write's preamble: byte count (little-endian u64) and the 32-byte digest.
PREAMBLE = struct.Struct("<Q32s")
_LENGTH = struct.Struct("<Q")


def write_digest(token: str, request: Any) -> bytes:
    """SHA-256 of the token and the SetSliceRequest with its legacy data_token cleared,
    deterministic bytes. A request naming the token in `transfer` is hashed with it there: the
    token is then covered twice, which binds nothing less, and old and new clients agree with
    the server on the same rule."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.data_token = ""
    return hashlib.sha256(token.encode("ascii")
                          + copy.SerializeToString(deterministic=True)).digest()


def send_view(conn: socket.socket, view: memoryview) -> None:
    """Sends all of `view` (from its own memory) in pieces, each bounded by the timeout."""
    for start in range(0, view.nbytes, PIECE):
        conn.sendall(view[start:start + PIECE])


def recv_into(conn: socket.socket, view: memoryview) -> None:
    """Fills `view` from `conn`; ConnectionError if the peer closes early."""
    pos, n = 0, view.nbytes
    while pos < n:
        k = conn.recv_into(view[pos:], min(n - pos, PIECE))
        if k == 0:
            raise ConnectionError(f"the data connection closed after {pos} of {n} bytes")
        pos += k


def recv_exact(conn: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes (small reads: lengths and preambles)."""
    buf = bytearray(n)
    recv_into(conn, memoryview(buf))
    return bytes(buf)


def send_length(conn: socket.socket, n: int) -> None:
    """The 8-byte length that precedes a read's bytes."""
    conn.sendall(_LENGTH.pack(n))


def recv_length(conn: socket.socket, expected: int) -> None:
    """Reads a read's 8-byte length and checks it is `expected`."""
    (n,) = _LENGTH.unpack(recv_exact(conn, _LENGTH.size))
    if n != expected:
        raise InvalidArgumentError(f"the data channel announced {n} bytes, the header {expected}",
                                   reason="BAD_STREAM")


def reset(conn: socket.socket) -> None:
    """Makes the coming close() reset the connection (RST) instead of a FIN queued behind unsent
    bytes: a server that refused the call never reads them, so a FIN would never arrive and
    the server could not tell the connection is gone."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


@dataclass(frozen=True)
class TlsConfig:
    """How the client verifies (and, under mTLS, presents itself to) a TLS server: the same
    PEM material the gRPC channel was given. `server_name` overrides the host name checked
    against the server's certificate (grpc.ssl_target_name_override)."""

    root_certificates: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    server_name: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client SSLContext verifying the server (system roots when none are given)."""
        ctx = ssl.create_default_context(
            cadata=self.root_certificates.decode("ascii") if self.root_certificates else None)
        if self.client_cert and self.client_key:
            _load_chain(ctx, self.client_cert, self.client_key)
        return ctx


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """ctx.load_cert_chain from PEM bytes (the ssl module only reads files: an anonymous
    memfd where there is one, else a private temporary directory removed at once)."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("paramhub-tls"), os.memfd_create("paramhub-tls")]
        try:
            for fd, pem in zip(fds, (cert, key)):
                os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
            return
        except OSError:
            pass  # e.g. no /proc: fall through
        finally:
            for fd in fds:
                os.close(fd)
    with tempfile.TemporaryDirectory(prefix="paramhub-tls-") as tmp:
        paths = [os.path.join(tmp, n) for n in ("cert.pem", "key.pem")]
        for path, pem in zip(paths, (cert, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        ctx.load_cert_chain(paths[0], paths[1])


class DataLink(ShmLink):
    """The client's end: greeted TCP (or TLS) connections to host:port (kept one at a time)."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0,
                 tls: TlsConfig | None = None) -> None:
        super().__init__(f"{host}:{port}", timeout=timeout)
        self.host = host
        self.port = port
        self.tls = tls
        self._ctx = tls.context() if tls is not None else None

    def _open(self) -> socket.socket:
        conn = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self._ctx is None:
            return conn
        assert self.tls is not None
        try:
            return self._ctx.wrap_socket(conn, server_hostname=self.tls.server_name or self.host)
        except BaseException:
            conn.close()
            raise
