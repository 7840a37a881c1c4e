"""Same-host shared memory (Linux), the server's end.

The server listens on a random abstract unix socket, advertised by GetTransportInfo. A client
that can connect to it is on the same host (and network namespace); each connection is greeted
with a fresh single-use token, which the client names in one gRPC call. The bytes then travel
in an anonymous memfd passed over that connection with SCM_RIGHTS: a memfd has no name, so
nothing can leak in /dev/shm when either side dies, and each one holds only the bytes of its own
transfer (never other tensors' or models' memory). Received memfds are sealed against shrinking
before they are mapped, so a client cannot crash the server with SIGBUS.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import torch

from paramhub import _codec
from paramhub._shm import (ShmSegment, create_segment, receive_fd, receive_segment,
                           seal_received, send_segment)
from paramhub.common.dtypes import numel
from paramhub.errors import InvalidArgumentError
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.api.framing import chunk_size
from paramhub_server.transport.base import POLICY, Admit, Link, TensorRead
from paramhub_server.transport.channel import GreetingChannel
from paramhub_server.transport.stream import announced, frames_of

__all__ = ["ShmChannel", "ShmLink", "ShmSegment", "create_segment"]


class ShmChannel(GreetingChannel):
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


# ------------------------------------------------------------------------------ transfers

class ShmLink(Link):
    """Transfers whose request names a greeted shared-memory connection (shm_token)."""

    name = "shm"
    volatile = True  # the client still maps the memfd

    def __init__(self, channel: ShmChannel, link: Any) -> None:
        self.channel = channel
        #: The request's Transfer (its shm_token names the greeted connection).
        self.token: str = link.shm_token
        self.client_buffer: bool = link.shm_client_buffer

    def send_tensor(self, read: TensorRead, request: Any) -> Iterator[bytes]:
        if self.client_buffer:
            yield from self._into_client(read, request)
            return
        segments: list[ShmSegment] = []

        def alloc(dtype: Any, shape: tuple[int, ...]) -> Any:
            nbytes = dtype.itemsize * numel(shape)
            if nbytes < POLICY.shm_min_bytes:  # small: inline, the token stays unused
                return torch.empty(shape, dtype=dtype)
            segments.append(create_segment(nbytes))
            return _codec.typed_view(segments[0].flat, nbytes, dtype, shape)

        result = read.run(alloc=alloc)
        if not segments:
            yield from frames_of(result.tensor, read, result.version)
            return
        header = tpb.TensorHeader(
            name=read.name, dtype=_codec.dtype_to_proto(result.tensor.dtype),
            shape=list(result.tensor.shape), version=result.version, shm=True)
        del result
        try:
            conn = self.channel.take(self.token)
        except BaseException:
            segments[0].close()
            raise
        self.channel.send(conn, segments[0])
        yield _codec.encode_chunk(header, wrap=True)

    def _into_client(self, read: TensorRead, request: Any) -> Iterator[bytes]:
        # The client passed a (warm, reusable) buffer: write straight into it. Only the
        # result's bytes of it are mapped (never the whole memfd, never prefaulted).
        conn = self.channel.take(self.token)
        client_segment = None
        fd = -1
        try:
            fd, size = self.channel.receive_open(conn)

            def into_client(dtype: Any, shape: tuple[int, ...]) -> Any:
                nonlocal client_segment, fd
                nbytes = dtype.itemsize * numel(shape)
                if nbytes > size:
                    raise InvalidArgumentError(
                        f"the client's buffer has {size} bytes, the result needs {nbytes}",
                        reason="SHM_BUFFER_TOO_SMALL", metadata={"asked": str(nbytes)})
                client_segment = ShmSegment(fd, max(nbytes, 1), populate=False)
                fd = -1
                return _codec.typed_view(client_segment.flat, nbytes, dtype, shape)

            result = read.run(alloc=into_client)
            header = tpb.TensorHeader(
                name=read.name, dtype=_codec.dtype_to_proto(result.tensor.dtype),
                shape=list(result.tensor.shape), version=result.version, shm=True)
            del result
        finally:
            conn.close()
            if client_segment is not None:
                client_segment.close()
            elif fd >= 0:
                os.close(fd)
        yield _codec.encode_chunk(header, wrap=True)

    def receive_value(self, request: Any, admit: Admit) -> torch.Tensor:
        conn = self.channel.take(self.token)
        try:
            # Names, index, op and sizes are checked before the memfd is mapped.
            dtype, shape = announced(request, "shared-memory", admit)
        except BaseException:
            conn.close()
            raise
        nbytes = dtype.itemsize * numel(shape)
        segment = self.channel.receive(conn, nbytes)
        return _kept(segment, admit, _codec.typed_view(segment.flat, nbytes, dtype, shape))

    def send_state(self, snapshot: Any, request: Any) -> Iterator[bytes]:
        segments: list[ShmSegment] = []

        def alloc(nbytes: int) -> Any:
            if nbytes < POLICY.shm_min_bytes:  # small: inline, the token stays unused
                return torch.empty(nbytes, dtype=torch.uint8)
            segments.append(create_segment(nbytes))
            return segments[0].flat[:nbytes]

        manifest, buf = snapshot(alloc)
        if not segments:
            yield manifest.SerializeToString()
            yield from _codec.iter_data_frames(buf, 0x1A, chunk_size(request.chunk_bytes))
            return
        del buf
        try:
            conn = self.channel.take(self.token)
        except BaseException:
            segments[0].close()
            raise
        self.channel.send(conn, segments[0])
        manifest.shm = True
        yield manifest.SerializeToString()

    def receive_state(self, header: Any, first: Any, rest: Iterator[Any], total: int,
                      admit: Admit) -> torch.Tensor:
        conn = self.channel.take(self.token)
        if first.data or next(rest, None) is not None:
            conn.close()
            raise InvalidArgumentError("a shared-memory PushState carries no data messages",
                                       reason="BAD_STREAM")
        segment = self.channel.receive(conn, total)
        return _kept(segment, admit, segment.flat[:total])


def _kept(segment: ShmSegment, admit: Admit, view: torch.Tensor) -> torch.Tensor:
    """`view` of a received segment as the write keeps it: a copy (the segment is unmapped at
    once), or the view itself, which then holds the mapping until the write is done with it."""
    try:
        value = admit.owned(view)
    except BaseException:
        segment.close()
        raise
    if value is view:
        segment.release_fd()  # the tensor references the mapping; it goes with the tensor
    else:
        segment.close()
    return value
