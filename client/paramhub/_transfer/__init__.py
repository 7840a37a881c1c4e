"""The transfer layer: how a tensor's bytes travel between this process and the server.

One module per transport, behind one interface (`base.Transport`):

    inline   one unary message (GetTensorInline; SetSlice carrying the value)
    stream   gRPC streams of raw ~1 MiB frames (every transfer can fall back to it)
    shm      memfd segments over the server's unix socket (same host)
    data     raw bytes over the server's data port, in TLS when the gRPC channel is (any host)

`policy.Policy` (thresholds defined once, advertised by the server's GetTransportInfo) orders
the transports for each transfer; `Transfers` tries them in that order, skipping those this
client does not have and moving on when one answers FELL_BACK, and records which transport
moved the bytes (`Transfers.counts`, e.g. {"get:shm": 2, "set:inline": 5}). The SDK's methods
call `Transfers` and never branch on the transport.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from paramhub import _codec, _data
from paramhub._transfer.base import FELL_BACK, GetJob, PullJob, PushJob, SetJob, Transport
from paramhub._transfer.data import DataTransport
from paramhub._transfer.inline import InlineTransport
from paramhub._transfer.policy import DEFAULT, Policy
from paramhub._transfer.shm import ShmTransport
from paramhub._transfer.stream import StreamTransport
from paramhub.v1 import parameter_service_pb2 as pb

__all__ = ["Transfers", "Policy", "Transport", "FELL_BACK"]


class Transfers:
    """The client's transports and the policy that picks one per transfer."""

    def __init__(self, client: Any, *, shm: bool, data_host: str | None,
                 tls: _data.TlsConfig | None = None) -> None:
        self.client = client
        self.transports: dict[str, Transport] = {
            "inline": InlineTransport(client), "stream": StreamTransport(client),
            "shm": ShmTransport(client, shm), "data": DataTransport(client, data_host, tls)}
        #: Transfers by "operation:transport" (e.g. "get:shm"), counted when they complete.
        self.counts: Counter[str] = Counter()
        #: The transport of this client's last completed transfer ("" before any).
        self.last = ""
        self._lock = threading.Lock()

    @property
    def policy(self) -> Policy:
        """The server's policy once GetTransportInfo was asked, else the defaults."""
        info = self.client._transport_info
        return DEFAULT if info is None else Policy.from_info(info)

    def _policy_for(self, nbytes: int | None) -> Policy:
        # Small transfers decide on the defaults: no round trip just to learn the thresholds.
        if nbytes is None or nbytes >= DEFAULT.smallest_link_bytes:
            self.client.transport_info()
        return self.policy

    def _run(self, op: str, order: Sequence[str], job: Any) -> Any:
        for name in order:
            transport = self.transports[name]
            if not transport.available():
                continue
            result = getattr(transport, op)(job)
            if result is FELL_BACK:
                continue
            moved = result[-1] if op in ("get", "pull") else name
            with self._lock:
                self.counts[f"{op}:{moved}"] += 1
                self.last = moved
            return result[:-1] if op in ("get", "pull") else result
        raise AssertionError(f"no transport carried the {op}")  # stream never falls back

    # ------------------------------------------------------------------ operations

    def get(self, request: pb.GetTensorRequest, timeout: float | None, *,
            out: torch.Tensor | None, whole: int | None) -> tuple[torch.Tensor, int]:
        """Reads the region `request` names. `whole` is the whole tensor's size when known
        (an upper bound for basic indexing)."""
        basic = all(it.WhichOneof("item") != "tensor" for it in request.index)
        exact = (out.numel() * out.element_size() if out is not None
                 else whole if not request.index else None)
        size = exact if exact is not None else whole if basic else None
        order = self._policy_for(size).order_get(size, out=out is not None)
        return self._run("get", order, GetJob(request, timeout, out=out, exact=exact))

    def set(self, request: pb.SetSliceRequest, value: torch.Tensor | None,
            timeout: float | None) -> int:
        """Writes `value` (None: a Python number already in request.value)."""
        if value is None:
            return self._run("set", ["inline"], SetJob(request, timeout))
        job = SetJob(request, timeout, value=value)
        return self._run("set", self._policy_for(job.nbytes).order_set(job.nbytes), job)

    def pull(self, request: pb.PullStateRequest, timeout: float | None
             ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Runs a PullState."""
        return self._run("pull", self._policy_for(None).order_pull(), PullJob(request, timeout))

    def push(self, header: pb.PushStateHeader, tensors: Sequence[torch.Tensor],
             timeout: float | None) -> dict[str, int]:
        """Runs a PushState of `tensors` (named and laid out by header.tensors)."""
        headers = list(header.tensors)
        _, _, total = _codec.state_layout(headers)
        job = PushJob(header, tensors, headers, total, timeout)
        return self._run("push", self._policy_for(total).order_push(total), job)

    # ------------------------------------------------------------------ state

    def uses(self, name: str) -> bool:
        """Whether transport `name` is negotiated and usable (asks the server once)."""
        return self.transports[name].available()

    def close(self) -> None:
        """Closes every transport's links and buffers."""
        for t in self.transports.values():
            t.close()

