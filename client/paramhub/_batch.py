"""Atomic batches: writes collected on the client and applied by the server as one write.

    with client.batch("mlp") as b:
        client.set_slice("mlp", "0.weight", (0, 0), 1.0)      # collected, returns None
        b.apply_init("zeros_", [paramhub.init_target(parameter="0.bias")])
    b.model_version, b.updated                                 # known after the block

Inside the block, on the thread that opened it, every `Client.set_slice` / `Client.apply_init`
for that model is routed into the batch (see `Client._active_batch`), which is how the module
mirror's tensor writes join a batch. At a normal exit the writes are sent in one ApplyBatch
call: the server applies all of them or none, under one write lock, as one new model version,
and readers see all of them or none. If the block raises, nothing is sent.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from paramhub import _codec
from paramhub._transfer import policy as _policy
from paramhub.errors import InvalidArgumentError
from paramhub.v1 import parameter_service_pb2 as pb

if TYPE_CHECKING:
    from paramhub.client import Client

#: A value up to this many bytes travels inside its write's message (the transfer policy's inline
#: limit); larger values follow it as `data` messages of DATA_CHUNK bytes.
INLINE_BYTES = _policy.INLINE_BYTES
DATA_CHUNK = 1 << 20


class _Active(threading.local):
    def __init__(self) -> None:
        self.batches: dict[tuple[int, str], Batch] = {}


_ACTIVE = _Active()


def active(client: Client, model_id: str) -> Batch | None:
    """The batch open on this thread for (client, model), if any."""
    return _ACTIVE.batches.get((id(client), model_id))


class Batch:
    """Writes to one model, sent as one atomic ApplyBatch at the end of a `with` block.

    Attributes (after a successful exit):
        model_version: the model's version after the batch.
        updated: {first name of each changed storage: its new version}.
        request_id: the batch's id; a retry with it is applied once.
    """

    def __init__(self, client: Client, model_id: str, *,
                 expected_model_version: int | None = None, request_id: str | None = None,
                 timeout: float | None = None) -> None:
        self._client = client
        self.model_id = model_id
        self.expected_model_version = expected_model_version
        self.request_id = request_id or uuid.uuid4().hex
        self.timeout = timeout
        self._writes: list[tuple[pb.BatchWrite, torch.Tensor | None]] = []
        self._outer: Batch | None = None
        self._sent = False
        self.model_version: int | None = None
        self.updated: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._writes)

    # ------------------------------------------------------------------ collecting

    def set_slice(self, name: str, index: Any, value: Any, op: str = "assign", *,
                  kind: str = "parameters", expected_version: int | None = None) -> None:
        """Adds `tensor[index] (op)= value` (index None = the whole tensor).

        `expected_version` is compared with the tensor's version before the batch.
        """
        from paramhub.client import _OPS, tensor_name

        if op not in _OPS:
            raise InvalidArgumentError(f"unknown op {op!r}; one of {sorted(_OPS)}",
                                       reason="BAD_OP")
        value_t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        req = pb.SetSliceRequest(name=tensor_name(self.model_id, name, kind),
                                 index=_codec.index_to_proto(index) if index is not None else [],
                                 op=_OPS[op])
        if expected_version is not None:
            req.expected_version = expected_version
        nbytes = value_t.numel() * value_t.element_size()
        if nbytes <= INLINE_BYTES:
            req.value.CopyFrom(_codec.tensor_to_proto(value_t))
            self._writes.append((pb.BatchWrite(set_slice=req), None))
        else:
            req.value.dtype = _codec.dtype_to_proto(value_t.dtype)
            req.value.shape.extend(value_t.shape)
            # Keep a private copy: the caller may change its tensor before the batch is sent.
            self._writes.append((pb.BatchWrite(set_slice=req), value_t.detach().clone()))

    def assign(self, name: str, value: Any, *, kind: str = "parameters") -> None:
        """Adds a whole-tensor assignment."""
        self.set_slice(name, None, value, "assign", kind=kind)

    def apply_init(self, scheme: str, targets: Sequence[pb.InitTarget],
                   args: Mapping[str, Any] | None = None, *, seed: int | None = None,
                   expected_model_version: int | None = None) -> None:
        """Adds a torch.nn.init scheme over targets (see Client.apply_init)."""
        from paramhub.client import model_name

        req = pb.ApplyInitRequest(model=model_name(self.model_id), scheme=scheme,
                                  targets=targets)
        for k, v in (args or {}).items():
            req.args[k].CopyFrom(_codec.value_to_proto(v))
        if seed is not None:
            req.seed = seed
        if expected_model_version is not None:
            req.expected_model_version = expected_model_version
        self._writes.append((pb.BatchWrite(apply_init=req), None))

    # ------------------------------------------------------------------ sending

    def _requests(self) -> Iterator[pb.ApplyBatchRequest]:
        from paramhub.client import model_name

        header = pb.ApplyBatchHeader(model=model_name(self.model_id),
                                     request_id=self.request_id)
        if self.expected_model_version is not None:
            header.expected_model_version = self.expected_model_version
        yield pb.ApplyBatchRequest(header=header)
        for write, big in self._writes:
            yield pb.ApplyBatchRequest(write=write)
            if big is not None:
                for chunk in _codec.iter_tensor_chunks(big, chunk_bytes=DATA_CHUNK):
                    yield pb.ApplyBatchRequest(data=chunk.data)

    def commit(self) -> pb.ApplyBatchResponse:
        """Sends the collected writes now (the `with` block does this at its end).

        Raises:
            InvalidArgumentError: the batch is empty or a write is invalid (nothing applied).
            ConflictError: an expected version did not match (nothing applied).
            NotFoundError / OutOfRangeError: a bad name or index (nothing applied).
        """
        if self._sent:
            raise InvalidArgumentError("this batch was already sent", reason="BATCH_SENT")
        if not self._writes:
            raise InvalidArgumentError("a batch needs at least one write", reason="EMPTY_BATCH")
        response = self._client._call(self._client.stub.ApplyBatch, self._requests(),
                                      self.timeout)
        self._sent = True
        self.model_version = response.model_version
        self.updated = {t.name: t.version for t in response.updated}
        return response

    def __enter__(self) -> Batch:
        key = (id(self._client), self.model_id)
        outer = _ACTIVE.batches.get(key)
        if outer is not None:
            # Nested batch on the same model: its writes join the outer one.
            self._outer = outer
            return outer
        _ACTIVE.batches[key] = self
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._outer is not None:
            return
        del _ACTIVE.batches[(id(self._client), self.model_id)]
        if exc_type is None and self._writes:
            self.commit()
