"""The interface of the server's transports: what a handler hands a transport (a validated
read, the checks a write must pass before its bytes are accepted) and what each transport
implements."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from paramhub._transfer.policy import DEFAULT
from paramhub.v1 import tensor_pb2 as tpb

__all__ = ["TensorRead", "Admit", "Link", "POLICY", "link_of", "names_link"]

#: The thresholds this server applies and advertises in GetTransportInfo (the SDK's defaults).
POLICY = DEFAULT


def link_of(request: Any) -> Any:
    """The Transfer a request (GetTensor, SetSlice, PullState, or a PushState header) names:
    its `transfer` field, or, when that is unset, one made of the older per-request fields
    (shm_token, shm_client_buffer, data_token) that earlier clients send."""
    if request.HasField("transfer"):
        return request.transfer
    return tpb.Transfer(shm_token=getattr(request, "shm_token", ""),
                        shm_client_buffer=getattr(request, "shm_client_buffer", False),
                        data_token=getattr(request, "data_token", ""))


def names_link(request: Any) -> bool:
    """Whether a request asks for its bytes to travel by a side link (shm or data channel)."""
    link = link_of(request)
    return bool(link.shm_token or link.data_token)


@dataclass
class TensorRead:
    """A read the handler validated: `model.read(name, index, ...)` of one region."""

    model: Any
    name: str
    index: tuple[Any, ...]
    grad: bool
    kind: str | None
    chunk_bytes: int

    def run(self, *, alloc: Callable[..., torch.Tensor] | None = None,
            share: bool = False) -> Any:
        """The region's copy (into `alloc`'s destination when given) and its version."""
        return self.model.read(self.name, self.index, grad=self.grad, kind=self.kind,
                               alloc=alloc, share=share)


@dataclass
class Admit:
    """The handler's checks on a write, run by the transport before it accepts any byte."""

    #: A value announced as (dtype, shape) that travels beside the call (raises to refuse).
    announced: Callable[[torch.dtype, tuple[int, ...]], None]
    #: A value that came decoded in the message itself.
    inline: Callable[[torch.Tensor], None]
    #: Makes a view of the client's memory safe to keep (copies it when the write is logged).
    owned: Callable[[torch.Tensor], torch.Tensor]
    #: --max-tensor-elements.
    max_elements: int | None


class Link:
    """One way bytes travel on the server's side; `name` is what is counted per transfer."""

    name = ""
    #: Whether a value this link receives stays in memory the client can still change (shared
    #: memory): the write must then apply it only through its log (see set_slice's volatile).
    volatile = False

    def send_tensor(self, read: TensorRead, request: Any) -> Iterator[bytes]:
        """GetTensorResponse wire messages for a read (and the bytes, by this link)."""
        raise NotImplementedError

    def receive_value(self, request: Any, admit: Admit) -> torch.Tensor:
        """The value of a SetSlice, received by this link after `admit` accepted it."""
        raise NotImplementedError

    def send_state(self, snapshot: Callable[..., tuple[Any, torch.Tensor]], request: Any
                   ) -> Iterator[bytes]:
        """PullStateResponse wire messages of `snapshot(alloc=None)`: (the manifest message,
        the flat bytes, copied into `alloc(nbytes)` when given)."""
        raise NotImplementedError

    def receive_state(self, header: Any, first: Any, rest: Iterator[Any], total: int,
                      admit: Admit) -> torch.Tensor:
        """A PushState's bytes, flat (`total` bytes)."""
        raise NotImplementedError
