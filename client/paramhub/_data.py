"""The data channel: big tensors over a plain TCP connection beside the gRPC one.

grpc-Python hands every message to Python as a new bytes object and takes the GIL per message,
which caps streamed tensors well below what one TCP connection carries. For values of at least
`DATA_MIN_BYTES`, when shared memory is not available (another host), the bytes travel instead
over a TCP connection to the server's data port (advertised by GetTransportInfo, on the gRPC
host): received with recv_into straight into a preallocated tensor, sent with sendall from the
tensor's own memory, never a Python bytes object per chunk.

Negotiation reuses the shared-memory channel's greeting (`paramhub._shm.ShmLink`): the server
greets every connection with a fresh 32-character token; the client names the token in one
gRPC call (GetTensorRequest.data_token / SetSliceRequest.data_token), so authentication,
authorization and limits apply to every transfer exactly as today. A token is single use, bound
to the connection that received it and to the one call that names it, and expires after 60
seconds. A write's bytes are preceded by a preamble binding them to the exact request (byte
count and SHA-256 of token + request); the server refuses a mismatch before writing anything.

The channel is plaintext: servers never offer it under TLS, and `connect(data_channel=False)` /
`paramhub serve --no-data-port` turn it off.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from typing import Any

from paramhub._shm import ShmLink
from paramhub.errors import InvalidArgumentError

__all__ = ["DATA_MIN_BYTES", "PIECE", "DataLink", "send_view", "recv_into", "recv_exact",
           "send_length", "recv_length", "write_digest", "reset", "PREAMBLE"]

#: Values of at least this many bytes use the data channel (when shm is not available).
DATA_MIN_BYTES = 16 << 20
#: Bytes per send/recv system call (each bounded by the socket timeout).
PIECE = 8 << 20
#: A write's preamble: byte count (little-endian u64) and the 32-byte digest.
PREAMBLE = struct.Struct("<Q32s")
_LENGTH = struct.Struct("<Q")


def write_digest(token: str, request: Any) -> bytes:
    """SHA-256 of the token and the SetSliceRequest (data_token cleared), deterministic bytes."""
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


class DataLink(ShmLink):
    """The client's end: greeted TCP connections to host:port (kept one at a time)."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0) -> None:
        super().__init__(f"{host}:{port}", timeout=timeout)
        self.host = host
        self.port = port

    def _open(self) -> socket.socket:
        conn = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return conn
