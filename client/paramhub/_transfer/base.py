"""The interface every transport implements, and the jobs the layer hands them.

A transport moves the bytes of one transfer (a read, a write, a state pull or push) and returns
the result, or `FELL_BACK` when it cannot carry this one (its link is gone, the server refused
it with the link's "unavailable" reason): the layer then tries the next transport of the
policy's order. Any other error is the caller's (a bad index fails the same on every transport).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from paramhub.common import pb
from paramhub.common.errors import ParamhubError
from paramhub.v1 import tensor_pb2 as tpb

if TYPE_CHECKING:
    from paramhub.client import Client

__all__ = ["FELL_BACK", "Transport", "GetJob", "SetJob", "PullJob", "PushJob"]

#: Returned by a transport that cannot carry this transfer: the next one is tried.
FELL_BACK: Any = object()


@dataclass
class GetJob:
    """A read: the request (without link fields), where to put the result, and its size."""

    request: pb.GetTensorRequest
    timeout: float | None
    out: torch.Tensor | None = None
    #: The result's exact size in bytes when known in advance, else None.
    exact: int | None = None


@dataclass
class SetJob:
    """A write of `value` (a tensor; None for a Python number already in request.value)."""

    request: pb.SetSliceRequest
    timeout: float | None
    value: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        v = self.value
        return 0 if v is None else v.numel() * v.element_size()


@dataclass
class PullJob:
    """A PullState request."""

    request: pb.PullStateRequest
    timeout: float | None


@dataclass
class PushJob:
    """A PushState of `tensors` (laid out as `headers`, `total` bytes in all)."""

    header: pb.PushStateHeader
    tensors: Sequence[torch.Tensor]
    headers: Sequence[tpb.TensorHeader]
    total: int
    timeout: float | None
    extra: Mapping[str, Any] = field(default_factory=dict)


def over_link(greeted: Any, send: Callable[[], Any], unavailable: str,
              failed: Callable[[BaseException], None], *, close_after: bool) -> Any:
    """Runs `send` over a greeted side-link connection (shm or data channel): its result, or
    FELL_BACK (connection closed, `failed` told) on the link's `unavailable` answer or a socket
    error; any other answer is raised. `close_after` closes the connection after a success."""
    try:
        result = send()
    except ParamhubError as e:
        greeted.close()
        if e.reason != unavailable:
            raise
        failed(e)
        return FELL_BACK
    except OSError as e:
        greeted.close()
        failed(e)
        return FELL_BACK
    if close_after:
        greeted.close()
    return result


class Transport:
    """One way of moving bytes. Subclasses implement the operations they carry; the others
    answer FELL_BACK. `name` is what the layer records for each transfer."""

    name = ""

    def __init__(self, client: Client) -> None:
        self.client = client

    def available(self) -> bool:
        """Whether this transport can be tried at all (e.g. its link negotiated)."""
        return True

    def get(self, job: GetJob) -> Any:
        """(tensor, version, name of the transport that moved the bytes), or FELL_BACK."""
        return FELL_BACK

    def set(self, job: SetJob) -> Any:
        """The new version, or FELL_BACK."""
        return FELL_BACK

    def pull(self, job: PullJob) -> Any:
        """({name: tensor}, {name: version}, transport name), or FELL_BACK."""
        return FELL_BACK

    def push(self, job: PushJob) -> Any:
        """{name: version}, or FELL_BACK."""
        return FELL_BACK

    def close(self) -> None:
        """Releases links and buffers."""
