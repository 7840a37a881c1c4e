"""The server's side of the transfer layer: how tensor bytes travel.

    frames.py    raw-frame (de)serializers of the bulk RPCs (add_servicer), HTTP/2 options
    channel.py   the greeted, single-use-token listener both side links share
    base.py      the interface: TensorRead, Admit, Link; the policy's thresholds (POLICY)
    stream.py    the gRPC messages themselves (inline values, raw-frame streams)
    shm.py       same-host shared memory (memfds over an abstract unix socket)
    data.py      the data channel (raw TCP beside gRPC; in TLS on TLS servers)

Handlers validate a request, then hand it to `Transport.link_for(request)`, the one place that
picks a transport (the one the client named); they never branch on the transport themselves.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

from paramhub._shm import shm_supported
from paramhub.errors import InvalidArgumentError
from paramhub_server.transport.base import POLICY, Admit, Link, TensorRead, link_of, names_link
from paramhub_server.transport.channel import GreetingChannel
from paramhub_server.transport.data import DataChannel, DataLink, server_tls_context
from paramhub_server.transport.frames import HTTP2_OPTIONS, add_servicer
from paramhub_server.transport.shm import ShmChannel, ShmLink, ShmSegment, create_segment
from paramhub_server.transport.stream import StreamLink

__all__ = ["HTTP2_OPTIONS", "add_servicer", "ShmChannel", "DataChannel", "Transport",
           "create_segment", "ShmSegment", "server_tls_context", "Admit", "Link", "TensorRead",
           "GreetingChannel", "POLICY", "link_of", "names_link"]

log = logging.getLogger(__name__)

#: The old private name (tests reach for it).
_GreetingChannel = GreetingChannel


class Transport:
    """What the handlers need to move bytes: the message limit, the optional shm channel, the
    optional data channel (a TCP port on `data_host`; None = off), and `link_for`, the one
    place that picks the transport a request asked for."""

    def __init__(self, *, max_message_bytes: int, shm: bool = True,
                 data_host: str | None = None, data_port: int = 0,
                 data_tls: ssl.SSLContext | None = None, max_data_writes: int = 8) -> None:
        self.max_message_bytes = max_message_bytes
        self._stream = StreamLink()
        self._data_writes = threading.BoundedSemaphore(max(1, max_data_writes))
        self.shm: ShmChannel | None = None
        self.data: DataChannel | None = None
        if shm and shm_supported():
            try:
                self.shm = ShmChannel()
            except OSError as e:  # e.g. a sandbox without unix sockets
                log.warning("shared-memory transport disabled: %s", e)
        if data_host is not None:
            try:
                self.data = DataChannel(data_host, data_port, tls=data_tls)
                log.info("data channel on port %d%s", self.data.port,
                         " (TLS)" if data_tls is not None else "")
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

    def link_for(self, request: Any) -> Link:
        """The transport a request (or PushState header) names: shared memory for an
        shm_token, the data channel for a data_token, else the gRPC messages themselves.
        SHM_UNAVAILABLE / DATA_CHANNEL_UNAVAILABLE when the named one is disabled here. The
        tokens come from `request.transfer`, or from the older per-request fields."""
        link = link_of(request)
        if link.shm_token:
            return ShmLink(self.shm_channel(), link)
        if link.data_token:
            return DataLink(self.data_channel(), self._data_writes, link)
        return self._stream

    def release(self, request: Any) -> None:
        """Closes the shared-memory connection a refused request named (its client falls back
        at once instead of waiting for the token to expire)."""
        token = link_of(request).shm_token
        if token and self.shm is not None:
            try:
                self.shm.take(token).close()
            except InvalidArgumentError:
                pass  # unknown or used: nothing to close

    def info(self) -> dict[str, int | str]:
        """What GetTransportInfo advertises: limits, thresholds, side-link addresses."""
        return dict(max_message_bytes=self.max_message_bytes,
                    shm_address=self.shm.address if self.shm else "",
                    data_port=self.data.port if self.data else 0,
                    inline_bytes=POLICY.inline_bytes,
                    inline_read_bytes=POLICY.inline_read_bytes,
                    shm_min_bytes=POLICY.shm_min_bytes, data_min_bytes=POLICY.data_min_bytes)

