"""Handlers of the model-wide writes: ApplyInit (torch.nn.init schemes) and ApplyBatch (many
writes, atomically)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import torch

from paramhub import _codec
from paramhub.common.errors import InvalidArgumentError, ResourceExhaustedError
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.api.framing import first_header
from paramhub_server.api.serde import (init_write, model_id_of, slice_write, versions,
                                       write_context)
from paramhub_server.core import rng
from paramhub_server.core.model import InitWrite, ServedModel, SliceWrite
from paramhub_server.api.base import Handlers
from paramhub_server.errors import rpc

def _nbytes(value: tpb.Tensor, max_elements: int | None) -> int:
    dtype = _codec.dtype_from_proto(value.dtype)
    n = 1
    for s in _codec.check_shape(value.shape, max_elements=max_elements):
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class WriteHandlers(Handlers):
    """ApplyInit, ApplyBatch."""

    @rpc
    def ApplyInit(self, request: pb.ApplyInitRequest, context: grpc.ServicerContext
                  ) -> pb.ApplyInitResponse:
        m = self._model(request.model)
        w = init_write(request, self.max_tensor_elements)
        generator = (rng.GeneratorState(request.generator_state)
                     if request.HasField("generator_state") and w.seed is None else None)
        updated, model_version = m.apply_init(
            w.targets, w.scheme, w.args, seed=w.seed,
            expected_model_version=w.expected_model_version,
            ctx=write_context(request.request_id, context), generator=generator)
        return pb.ApplyInitResponse(updated=versions(updated), model_version=model_version,
                                    generator_state=generator.state if generator else b"")

    @rpc
    def ApplyBatch(self, request_iterator: Iterator[pb.ApplyBatchRequest],
                   context: grpc.ServicerContext) -> pb.ApplyBatchResponse:
        header = first_header(request_iterator, "ApplyBatch")
        m = self._model(header.model)
        writes: list[SliceWrite | InitWrite] = []
        pending: tuple[SliceWrite, _codec.TensorAssembler] | None = None
        # Value bytes a batch may hold while it arrives: every tensor of the model once, plus
        # one message; counted from each value's announced size, before it is allocated.
        budget = m.stats()[1] + self.transport.max_message_bytes
        held = 0

        def take(nbytes: int) -> None:
            nonlocal held
            held += nbytes
            if held > budget:
                raise ResourceExhaustedError(
                    f"the batch's values exceed {budget} bytes (the model's size plus "
                    f"max_message_bytes)", reason="BATCH_TOO_LARGE",
                    metadata={"limit": "batch_bytes", "limit_bytes": str(budget),
                              "asked": str(held)})

        def finish_pending() -> None:
            nonlocal pending
            if pending is not None:
                w, asm = pending
                w.value = asm.finish()
                writes.append(w)
                pending = None

        for msg in request_iterator:
            part = msg.WhichOneof("part")
            if part == "data":
                if pending is None:
                    raise InvalidArgumentError("value bytes without a preceding streamed write",
                                               reason="BAD_STREAM")
                pending[1].add(msg.data)
                continue
            finish_pending()
            if part != "write":
                raise InvalidArgumentError("only the first ApplyBatch message may carry the "
                                           "header", reason="BAD_STREAM")
            which = msg.write.WhichOneof("write")
            if which == "set_slice":
                req = msg.write.set_slice
                nbytes = _nbytes(req.value, self.max_tensor_elements)
                w = self._batch_slice(m, req, None)
                self._check_upload(m, w, tuple(req.value.shape))
                take(nbytes)
                if nbytes and not req.value.data:
                    pending = (w, _codec.TensorAssembler(
                        tpb.TensorHeader(dtype=req.value.dtype, shape=req.value.shape),
                        max_elements=self.max_tensor_elements))
                else:
                    w.value = _codec.tensor_from_proto(req.value,
                                                       max_elements=self.max_tensor_elements)
                    writes.append(w)
            elif which == "apply_init":
                if request_model := msg.write.apply_init.model:
                    if model_id_of(request_model) != m.id:
                        raise InvalidArgumentError("every write of a batch must target the "
                                                   "batch's model", reason="BAD_BATCH")
                writes.append(init_write(msg.write.apply_init, self.max_tensor_elements))
            else:
                raise InvalidArgumentError("a batch write has no write set", reason="BAD_BATCH")
        finish_pending()
        result = m.apply_batch(
            writes, header.expected_model_version if header.HasField("expected_model_version")
            else None, ctx=write_context(header.request_id, context))
        return pb.ApplyBatchResponse(updated=versions(result.updated),
                                     model_version=result.model_version)

    def _batch_slice(self, m: ServedModel, req: pb.SetSliceRequest, value: Any) -> SliceWrite:
        model_id, w = slice_write(req, value, self.max_tensor_elements)
        if model_id != m.id:
            raise InvalidArgumentError("every write of a batch must target the batch's model",
                                       reason="BAD_BATCH")
        return w
