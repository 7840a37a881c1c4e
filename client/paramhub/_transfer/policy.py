"""Which transport moves a transfer: the thresholds, defined once, and the order of preference.

The server advertises its thresholds in GetTransportInfo (fields it does not set, e.g. an older
server, keep these defaults); the client asks for them only when a transfer is big enough for
a side link to matter, so small calls never pay for an extra round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from paramhub import _data

__all__ = ["Policy", "DEFAULT", "INLINE_BYTES", "INLINE_READ_BYTES", "SHM_MIN_BYTES",
           "DATA_MIN_BYTES"]

#: Values up to this many bytes travel inside one SetSlice message; larger ones are streamed.
INLINE_BYTES = 4 << 20
#: Reads of tensors known to be at most this big use the unary GetTensorInline (a stream costs
#: ~1.5x a unary call).
INLINE_READ_BYTES = 1 << 20
#: Transfers of at least this many bytes use shared memory when the server is on this host.
SHM_MIN_BYTES = 1 << 20
#: Transfers of at least this many bytes use the data channel when shared memory does not apply
#: (defined with the data channel's protocol).
DATA_MIN_BYTES = _data.DATA_MIN_BYTES


@dataclass(frozen=True)
class Policy:
    """Thresholds in bytes; `order_*` return transport names, most preferred first (the layer
    skips those this client does not have and falls through on a transport's refusal)."""

    inline_bytes: int = INLINE_BYTES
    inline_read_bytes: int = INLINE_READ_BYTES
    shm_min_bytes: int = SHM_MIN_BYTES
    data_min_bytes: int = DATA_MIN_BYTES

    @classmethod
    def from_info(cls, info: Any) -> Policy:
        """The policy a GetTransportInfoResponse advertises (unset fields: the defaults)."""
        policy = DEFAULT
        for name in ("inline_bytes", "inline_read_bytes", "shm_min_bytes", "data_min_bytes"):
            value = getattr(info, name, 0)
            if value > 0:
                policy = replace(policy, **{name: int(value)})
        return policy

    @property
    def smallest_link_bytes(self) -> int:
        """Below this, no side link can be chosen (no need to ask the server)."""
        return min(self.shm_min_bytes, self.data_min_bytes)

    def order_get(self, size: int | None, *, out: bool) -> list[str]:
        """Reads: `size` bounds the result's bytes when known in advance (the whole tensor's
        size for basic indexing, or the exact size), else None."""
        order = []
        if size is not None and size <= self.inline_read_bytes and not out:
            order.append("inline")
        if size is None or size >= self.shm_min_bytes:
            order.append("shm")  # a small result still comes inline on the stream
        if size is None or size >= self.data_min_bytes:
            order.append("data")
        order.append("stream")
        return order

    def order_set(self, nbytes: int) -> list[str]:
        """Writes of a value of `nbytes` bytes."""
        order = []
        if nbytes >= self.shm_min_bytes:
            order.append("shm")
        if nbytes >= self.data_min_bytes:
            order.append("data")
        order.append("inline" if nbytes <= self.inline_bytes else "stream")
        return order

    def order_pull(self) -> list[str]:
        """PullState (the size is only known to the server)."""
        return ["shm", "stream"]

    def order_push(self, nbytes: int) -> list[str]:
        """PushState of `nbytes` bytes."""
        return ["shm", "stream"] if nbytes >= self.shm_min_bytes else ["stream"]


DEFAULT = Policy()
