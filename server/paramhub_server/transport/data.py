"""The data channel, the server's end (any host): the greeting of the shared-memory channel over
a TCP port on the gRPC host; a GetTensor or SetSlice naming the token moves the raw bytes over
that connection instead of the gRPC stream (see paramhub._data for the protocol and its checks).
A TLS server wraps each data connection in TLS with its own certificate (and, under mTLS,
requires a client certificate from its CA) before greeting it; the handshake runs off the accept
thread, so a silent client cannot stall it.
"""

from __future__ import annotations

import hmac
import logging
import math
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import torch

from paramhub import _codec, _data
from paramhub.errors import InvalidArgumentError, UnavailableError
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.transport.base import POLICY, Admit, Link, TensorRead
from paramhub_server.transport.channel import GreetingChannel
from paramhub_server.transport.stream import announced, frames_of

__all__ = ["DataChannel", "DataLink", "server_tls_context"]

log = logging.getLogger("paramhub_server.transport")


class DataChannel(GreetingChannel):
    """The server's end of the data channel: a TCP port on the gRPC host (see paramhub._data).

    Reads: the servicer copies the region under the read lock (as for every read), releases the
    lock, and only then sends, so writers never wait on a slow reader. Writes: the bytes are
    received into a fresh tensor before the write lock is taken.
    """

    _thread_name = "paramhub-data"
    _unavailable = "DATA_CHANNEL_UNAVAILABLE"
    _what = "data-channel"
    #: TLS handshakes in progress at once; a connection past it is closed (the client falls
    #: back to gRPC). Each one ends within HANDSHAKE_TIMEOUT seconds.
    MAX_HANDSHAKES = 32
    HANDSHAKE_TIMEOUT = 10.0

    def __init__(self, host: str, port: int = 0, *, tls: ssl.SSLContext | None = None) -> None:
        #: The server-side TLS context (None: plaintext).
        self.tls = tls
        self._handshakes = threading.BoundedSemaphore(self.MAX_HANDSHAKES)
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

    def _admit(self, conn: socket.socket) -> None:
        if self.tls is None:
            super()._admit(conn)
            return
        if not self._handshakes.acquire(blocking=False):
            conn.close()
            return
        threading.Thread(target=self._handshake, args=(conn,), name="paramhub-data-tls",
                         daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        try:
            assert self.tls is not None
            conn.settimeout(self.HANDSHAKE_TIMEOUT)
            try:
                wrapped = self.tls.wrap_socket(conn, server_side=True)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                log.debug("data-channel TLS handshake failed: %s", e)
                conn.close()
                return
            if self._stop.is_set():
                wrapped.close()
                return
            super()._admit(wrapped)
        finally:
            self._handshakes.release()

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


def server_tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """The data channel's TLS context: the gRPC server's certificate and key, and under mTLS
    its client CA (a client certificate is then required, as on the gRPC port)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


# ------------------------------------------------------------------------------ transfers

class DataLink(Link):
    """Transfers whose request names a greeted data-channel connection (data_token).

    Reads: the region is copied under the read lock (as for every read), the lock released,
    and only then sent, so writers never wait on a slow reader. Writes: the bytes are received
    into a fresh tensor before the write lock is taken.
    """

    name = "data"

    def __init__(self, channel: DataChannel, writes: threading.BoundedSemaphore,
                 link: Any) -> None:
        self.channel = channel
        #: The request's Transfer's data_token (names the greeted connection).
        self.token: str = link.data_token
        #: Data-channel SetSlice calls receiving at once (each holds a unary thread meanwhile).
        self._writes = writes

    def send_tensor(self, read: TensorRead, request: Any) -> Iterator[bytes]:
        result = read.run(share=True)
        tensor = result.tensor
        if tensor.numel() * tensor.element_size() < POLICY.data_min_bytes:
            # Small: inline, the token stays unused (the client keeps its connection).
            yield from frames_of(tensor, read, result.version)
            return
        conn = self.channel.take(self.token)
        try:
            header = tpb.TensorHeader(
                name=read.name, dtype=_codec.dtype_to_proto(tensor.dtype),
                shape=list(tensor.shape), version=result.version, data_channel=True)
            del result
            yield _codec.encode_chunk(header, wrap=True)
            self.channel.send_tensor(conn, tensor)
        finally:
            conn.close()

    def receive_value(self, request: Any, admit: Admit) -> torch.Tensor:
        # Names, index, op and limits are checked before any byte is accepted.
        dtype, shape = announced(request, "data-channel", admit)
        # A unary call that waits on its client's bytes: at most half the unary threads may do
        # so, or slow producers would starve every other call. Past that the SDK sends the
        # value over a gRPC stream instead (a transfer, admitted as such).
        if not self._writes.acquire(blocking=False):
            raise InvalidArgumentError(
                "the data channel is busy with other writes; send the value over gRPC",
                reason="DATA_CHANNEL_UNAVAILABLE", metadata={"busy": "true"})
        try:
            conn = self.channel.take(self.token)
            return self.channel.receive_tensor(conn, dtype, tuple(shape),
                                               _data.write_digest(self.token, request))
        finally:
            self._writes.release()
