"""One unary message: small reads (GetTensorInline) and small writes (SetSlice with the value,
or a Python number, inside the request)."""

from __future__ import annotations

from typing import Any

from paramhub import _codec
from paramhub._transfer.base import FELL_BACK, GetJob, SetJob, Transport
from paramhub.errors import InvalidArgumentError, ResourceExhaustedError, UnimplementedError
from paramhub.v1 import parameter_service_pb2 as pb

__all__ = ["InlineTransport"]


class InlineTransport(Transport):
    """GetTensorInline / SetSlice with the value in the message."""

    name = "inline"

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._read_ok = True  # False once an older server answered UNIMPLEMENTED

    def get(self, job: GetJob) -> Any:
        if not self._read_ok:
            return FELL_BACK
        request = job.request
        try:
            chunk = self.client._call(self.client._get_inline_raw, pb.GetTensorInlineRequest(
                name=request.name, index=request.index, field=request.field), job.timeout)
        except UnimplementedError:
            self._read_ok = False  # an older server
            return FELL_BACK
        except ResourceExhaustedError as e:
            if e.reason != "MESSAGE_TOO_LARGE":
                raise
            return FELL_BACK
        header = chunk.header
        if header is None:
            raise InvalidArgumentError("GetTensorInline answered without a header",
                                       reason="BAD_TENSOR_BYTES")
        return (_codec.tensor_from_parts(header.dtype, header.shape, chunk.data),
                header.version, self.name)

    def set(self, job: SetJob) -> Any:
        if job.value is not None:
            job.request.value.CopyFrom(_codec.tensor_to_proto(job.value))
        return self.client._call(self.client.stub.SetSlice, job.request, job.timeout).version
