"""Handlers of compute: Forward, Backward, ZeroGrad, SetTrainingMode, CheckShared."""

from __future__ import annotations

import grpc
import torch
from torch.utils._pytree import tree_flatten

from paramhub import _codec
from paramhub.common.errors import InvalidArgumentError, ResourceExhaustedError
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub_server.core import rng
from paramhub_server.logs import current_role
from paramhub_server.api.base import Handlers
from paramhub_server.errors import rpc



class ComputeHandlers(Handlers):
    """Forward, Backward, ZeroGrad, SetTrainingMode, CheckShared."""

    @rpc
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext
                ) -> pb.ForwardResponse:
        m = self._model(request.model)
        args = [_codec.value_from_proto(v, max_elements=self.max_tensor_elements)
                for v in request.args]
        kwargs = {k: _codec.value_from_proto(v, max_elements=self.max_tensor_elements)
                  for k, v in request.kwargs.items()}
        # Without auth every caller may write; with auth a read token may not update buffers.
        generator = (rng.GeneratorState(request.generator_state)
                     if request.HasField("generator_state") else None)
        out, version, materialized = m.forward(
            request.module_path, args, kwargs,
            may_write=current_role() in (None, "write", "admin"),
            seed=request.seed if request.HasField("seed") else None, generator=generator)
        limit = self.transport.max_message_bytes
        # Bounded from the output's tensors before anything is encoded (an encoding of more
        # than 2 GiB is not even possible).
        asked = sum(t.numel() * t.element_size() for t in tree_flatten(out)[0]
                    if isinstance(t, torch.Tensor))
        if asked > limit:
            raise ResourceExhaustedError(
                f"the forward output holds {asked} bytes of tensors, more than the server's "
                f"max_message_bytes {limit} (paramhub serve --max-message-bytes)",
                reason="MESSAGE_TOO_LARGE",
                metadata={"limit": "max_message_bytes", "limit_bytes": str(limit),
                          "asked": str(asked)})
        try:
            encoded = _codec.value_to_proto(out)
        except InvalidArgumentError:
            raise InvalidArgumentError(f"the module returned a {type(out).__name__}, which "
                                       "cannot be sent", reason="BAD_OUTPUT") from None
        response = pb.ForwardResponse(output=encoded, model_version=version,
                                      materialized=materialized,
                                      generator_state=generator.state if generator else b"")
        if response.ByteSize() > limit:
            raise ResourceExhaustedError(
                f"the forward output needs {response.ByteSize()} bytes, more than the server's "
                f"max_message_bytes {limit} (paramhub serve --max-message-bytes)",
                reason="MESSAGE_TOO_LARGE",
                metadata={"limit": "max_message_bytes", "limit_bytes": str(limit),
                          "asked": str(response.ByteSize())})
        return response

    @rpc
    def CheckShared(self, request: pb.CheckSharedRequest, context: grpc.ServicerContext
                    ) -> pb.CheckSharedResponse:
        m = self._model(request.model)
        shared, groups = m.check_shared(list(request.names))
        return pb.CheckSharedResponse(shared=shared,
                                      groups=[pb.SharedGroup(names=g) for g in groups])

    @rpc
    def SetTrainingMode(self, request: pb.SetTrainingModeRequest, context: grpc.ServicerContext
                        ) -> pb.SetTrainingModeResponse:
        self._model(request.model).set_training(request.module_path, request.training)
        return pb.SetTrainingModeResponse()

    @rpc
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext
                 ) -> pb.BackwardResponse:
        m = self._model(request.model)
        grad_outputs = self._values(request.grad_outputs)
        if any(g is not None and not isinstance(g, torch.Tensor) for g in grad_outputs):
            raise InvalidArgumentError("each output gradient must be a tensor or null",
                                       reason="BAD_ARGUMENT")
        grads, version = m.backward(
            request.module_path, self._values(request.args), self._options(request.kwargs),
            seed=request.seed if request.HasField("seed") else None,
            forward_version=request.forward_model_version, grad_outputs=grad_outputs,
            grad_inputs=list(request.grad_inputs))
        return pb.BackwardResponse(input_grads=[_codec.value_to_proto(g) for g in grads],
                                   model_version=version)

    @rpc
    def ZeroGrad(self, request: pb.ZeroGradRequest, context: grpc.ServicerContext
                 ) -> pb.ZeroGradResponse:
        self._model(request.model).zero_grad(request.module_path, list(request.parameters),
                                             request.fill_zeros)
        return pb.ZeroGradResponse()
