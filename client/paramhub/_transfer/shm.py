"""Same-host shared memory: the bytes travel in memfd segments passed over the server's unix
socket (protocol and safety in paramhub._shm).

Reads: a process's first read of a size takes the server's own segment and returns a tensor
living in it (no copy on this side, nothing to fault in twice); later reads of a size already
seen lend the server one of our warm pooled segments to write into, then copy out (a warm copy
costs less than faulting in a fresh segment each time).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from paramhub import _codec, _shm
from paramhub._transfer.base import (FELL_BACK, GetJob, PullJob, PushJob, SetJob, Transport,
                                     over_link)
from paramhub._transfer.stream import check_out, read_state_stream, read_tensor_stream
from paramhub.errors import InvalidArgumentError, ParamhubError
from paramhub.common import pb

__all__ = ["ShmTransport"]

log = logging.getLogger("paramhub.client")

_UNAVAILABLE = "SHM_UNAVAILABLE"


class ShmTransport(Transport):
    """memfd segments over the server's abstract unix socket (Linux, same host)."""

    name = "shm"

    def __init__(self, client: Any, wanted: bool) -> None:
        super().__init__(client)
        self.wanted = wanted and _shm.shm_supported()
        self.link: _shm.ShmLink | None = None
        self._negotiated = False
        self.pool = _shm.SegmentPool()
        #: Result sizes read through shm before: these use a pooled (warm) segment.
        self._read_sizes: set[int] = set()

    # ------------------------------------------------------------------ the link

    def available(self) -> bool:
        if not self.wanted:
            return False
        if not self._negotiated:
            info = self.client.transport_info()
            with self.client._transport_lock:
                if not self._negotiated and info.shm_address:
                    link = _shm.ShmLink(info.shm_address)
                    try:
                        # Reaching the advertised socket and being greeted proves we share
                        # the host (and network namespace) with the server.
                        link.keep(link.connect())
                        self.link = link
                    except OSError as e:
                        log.debug("shared memory unavailable (%s); using gRPC", e)
                self._negotiated = True
        return self.link is not None

    def _greet(self) -> _shm.Greeted | None:
        link = self.link
        if link is None:
            return None
        try:
            return link.connect()
        except OSError as e:
            log.debug("shared memory connection failed (%s); using gRPC", e)
            self.link = None
            link.close()
            return None

    def _keep(self, greeted: _shm.Greeted) -> None:
        if self.link is not None:
            self.link.keep(greeted)
        else:
            greeted.close()

    def _over(self, greeted: _shm.Greeted, send: Callable[[], Any], *, close_after: bool
              ) -> Any:
        return over_link(greeted, send, _UNAVAILABLE, self._failed, close_after=close_after)

    @staticmethod
    def _failed(exc: BaseException) -> None:
        log.warning("shared-memory transfer failed (%s); falling back to gRPC", exc)

    # ------------------------------------------------------------------ transfers

    def get(self, job: GetJob) -> Any:
        exact = job.exact
        if exact is not None and exact in self._read_sizes:
            result = self._get_pooled(job, exact)
            if result is not FELL_BACK:
                return result
        greeted = self._greet()
        if greeted is None:
            return FELL_BACK
        request = pb.GetTensorRequest()
        request.CopyFrom(job.request)
        request.transfer.shm_token = greeted.token
        result = self._over(greeted, lambda: read_tensor_stream(
            self.client, dataclasses.replace(job, request=request), shm=greeted,
            keep_shm=self._keep), close_after=False)
        if result is not FELL_BACK and result[2] == self.name:
            self._read_sizes.add(result[0].numel() * result[0].element_size())
        return result

    def _get_pooled(self, job: GetJob, nbytes: int) -> Any:
        greeted = self._greet()
        if greeted is None:
            return FELL_BACK
        segment = self.pool.acquire(nbytes)
        try:
            _shm.pass_segment(greeted.conn, segment)
            request = pb.GetTensorRequest()
            request.CopyFrom(job.request)
            request.transfer.shm_token = greeted.token
            request.transfer.shm_client_buffer = True
            chunks = self.client._stream(self.client._get_tensor_raw, request, job.timeout)
            first = next(chunks, None)
            if first is None or first.header is None or not first.header.shm:
                raise InvalidArgumentError("the server did not fill the shared buffer",
                                           reason="BAD_STREAM")
            for _ in chunks:
                pass
            asm = _codec.TensorAssembler(first.header, allocate=False)
            if asm.nbytes > nbytes:
                raise InvalidArgumentError("the server wrote past the shared buffer",
                                           reason="BAD_STREAM")
            out = job.out
            if out is None:
                out = _codec.empty(asm.shape, asm.dtype)
            else:
                check_out(out, asm)
            out.copy_(_codec.typed_view(segment.flat, asm.nbytes, asm.dtype, asm.shape))
            if not request.index:
                self.client._note_size(request.name, request.field, asm.nbytes)
            return out, first.header.version, self.name
        except ParamhubError as e:
            if e.reason not in (_UNAVAILABLE, "SHM_BUFFER_TOO_SMALL"):
                raise
            if e.reason == _UNAVAILABLE:
                self._failed(e)
            return FELL_BACK
        except OSError as e:
            self._failed(e)
            return FELL_BACK
        finally:
            self.pool.release(segment)
            greeted.close()

    def set(self, job: SetJob) -> Any:
        value = job.value
        if value is None:
            return FELL_BACK
        greeted = self._greet()
        if greeted is None:
            return FELL_BACK

        def send() -> int:
            nbytes = value.numel() * value.element_size()
            segment = self.pool.acquire(nbytes)
            try:
                _codec.typed_view(segment.flat, nbytes, value.dtype, value.shape).copy_(
                    value.detach())
                _shm.pass_segment(greeted.conn, segment)
                request = pb.SetSliceRequest()
                request.CopyFrom(job.request)
                request.transfer.shm_token = greeted.token
                request.value.dtype = _codec.dtype_to_proto(value.dtype)
                request.value.shape.extend(value.shape)
                return self.client._call(self.client.stub.SetSlice, request,
                                         job.timeout).version
            finally:
                self.pool.release(segment)

        return self._over(greeted, send, close_after=True)

    def pull(self, job: PullJob) -> Any:
        greeted = self._greet()
        if greeted is None:
            return FELL_BACK
        request = pb.PullStateRequest()
        request.CopyFrom(job.request)
        request.transfer.shm_token = greeted.token
        return self._over(greeted, lambda: read_state_stream(
            self.client, dataclasses.replace(job, request=request), shm=greeted,
            keep_shm=self._keep), close_after=False)

    def push(self, job: PushJob) -> Any:
        greeted = self._greet()
        if greeted is None:
            return FELL_BACK
        segment = self.pool.acquire(job.total)
        try:
            _codec.pack_state(job.tensors, out=segment.flat, headers=job.headers)
            _shm.pass_segment(greeted.conn, segment)
            header = pb.PushStateHeader()
            header.CopyFrom(job.header)
            header.transfer.shm_token = greeted.token
            response = self.client._call(self.client._push_state_raw,
                                         iter([pb.PushStateRequest(header=header)]), job.timeout)
            return {u.name: u.version for u in response.updated}
        except ParamhubError as e:
            if e.reason != _UNAVAILABLE:
                raise
            self._failed(e)
            return FELL_BACK
        except OSError as e:
            self._failed(e)
            return FELL_BACK
        finally:
            self.pool.release(segment)
            greeted.close()

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        self.pool.close()
