"""The data channel: raw bytes over a TCP connection beside the gRPC one (any host), wrapped
in TLS with the server's certificate when the gRPC channel uses TLS (protocol and checks in
paramhub._data)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import grpc

from paramhub import _codec, _data, _shm
from paramhub._progress import progress_for
from paramhub._transfer.base import FELL_BACK, GetJob, SetJob, Transport, over_link
from paramhub._transfer.stream import read_tensor_stream
from paramhub.errors import from_rpc_error
from paramhub.common import pb

__all__ = ["DataTransport", "CONNECT_TIMEOUT", "IO_TIMEOUT"]

log = logging.getLogger("paramhub.client")

#: Seconds to connect to the data port and be greeted; a send or receive that makes no progress
#: for IO_TIMEOUT seconds fails (and the transfer falls back to gRPC).
CONNECT_TIMEOUT = 5.0
IO_TIMEOUT = 60.0
_UNAVAILABLE = "DATA_CHANNEL_UNAVAILABLE"


class DataTransport(Transport):
    """Greeted TCP (or TLS) connections to the server's advertised data port."""

    name = "data"

    def __init__(self, client: Any, host: str | None, tls: _data.TlsConfig | None) -> None:
        super().__init__(client)
        self.host = host
        self.tls = tls
        self.wanted = host is not None
        self.link: _data.DataLink | None = None
        self._negotiated = False

    def available(self) -> bool:
        if not self.wanted:
            return False
        if not self._negotiated:
            info = self.client.transport_info()
            with self.client._transport_lock:
                if not self._negotiated and info.data_port:
                    assert self.host is not None
                    link = _data.DataLink(self.host, info.data_port, timeout=CONNECT_TIMEOUT,
                                          tls=self.tls)
                    try:
                        link.keep(link.connect())  # reached and greeted: the channel works
                        self.link = link
                    except OSError as e:  # ssl.SSLError is an OSError too
                        log.debug("data channel unreachable (%s); using gRPC streams", e)
                self._negotiated = True
        return self.link is not None

    def _greet(self) -> _shm.Greeted | None:
        link = self.link
        if link is None:
            return None
        try:
            greeted = link.connect()
        except OSError as e:
            log.debug("data channel connection failed (%s); using gRPC", e)
            self.link = None
            link.close()
            return None
        greeted.conn.settimeout(IO_TIMEOUT)
        return greeted

    def _keep(self, greeted: _shm.Greeted) -> None:
        if self.link is not None:
            self.link.keep(greeted)
        else:
            greeted.close()

    @staticmethod
    def _failed(exc: BaseException) -> None:
        log.warning("data-channel transfer failed (%s); falling back to gRPC", exc)

    def _guard(self, greeted: _shm.Greeted, send: Any) -> Any:
        return over_link(greeted, send, _UNAVAILABLE, self._failed, close_after=False)

    def get(self, job: GetJob) -> Any:
        greeted = self._greet()
        if greeted is None:
            return FELL_BACK
        request = pb.GetTensorRequest()
        request.CopyFrom(job.request)
        request.transfer.data_token = greeted.token
        return self._guard(greeted, lambda: read_tensor_stream(
            self.client, dataclasses.replace(job, request=request), data=greeted,
            keep_data=self._keep))

    def set(self, job: SetJob) -> Any:
        if job.value is None:
            return FELL_BACK
        greeted = self._greet()
        if greeted is None:
            return FELL_BACK
        # Falling back after a broken send is safe: the server applies a request id once.
        result = self._guard(greeted, lambda: self._send(job, greeted))
        if result is not FELL_BACK:
            greeted.close()
        return result

    def _send(self, job: SetJob, data: _shm.Greeted) -> int:
        client, value = self.client, job.value
        assert value is not None
        req = pb.SetSliceRequest()
        req.CopyFrom(job.request)
        req.transfer.data_token = data.token
        req.value.dtype = _codec.dtype_to_proto(value.dtype)
        req.value.shape.extend(value.shape)
        flat = _codec.byte_view(value)  # the tensor's own memory when contiguous
        view = _codec._memory(flat)
        preamble = _data.PREAMBLE.pack(view.nbytes, _data.write_digest(data.token, req))
        client._count(client.stub.SetSlice)
        future = client.stub.SetSlice.future(
            req, timeout=job.timeout if job.timeout is not None else client.timeout,
            metadata=client._metadata)
        conn = data.conn
        # Short send timeouts: a call the server refused (auth, bad name) never reads the
        # connection, and the failed call is noticed between sends instead of after 30 s.
        conn.settimeout(0.5)
        try:
            with progress_for(client.progress, f"SET {req.name}", view.nbytes) as bar:
                for part in (memoryview(preamble), view):
                    pos = 0
                    while pos < part.nbytes and not future.done():
                        try:
                            k = conn.send(part[pos:pos + _data.PIECE])
                        except TimeoutError:
                            continue
                        pos += k
                        if part is view:
                            bar.advance(k)
        except OSError:
            if not future.done():  # our side failed: the server cannot have written anything
                _data.reset(conn)
                future.cancel()
                raise
        try:
            return future.result().version
        except grpc.RpcError as e:
            _data.reset(conn)  # bytes may be left unsent: don't let them hold the connection
            raise from_rpc_error(e) from None
        finally:
            del flat

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
