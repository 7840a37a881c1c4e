"""gRPC handlers of compute on sharded models (parse -> cluster/compute.py -> build): Forward,
Backward, ZeroGrad, gradient reads and the optimizer RPCs. A mixin of ClusterParameterService:
a call naming a model that is not sharded is the plain handler's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import torch

from paramhub import _codec
from paramhub.common import pb
from paramhub.common.errors import InvalidArgumentError, ResourceExhaustedError
from paramhub_server.api import serde
from paramhub_server.api.base import Handlers
from paramhub_server.api.service import ParameterService
from paramhub_server.errors import rpc


def _plain(method: Any) -> Any:
    """The plain handler under the error-mapping decorator."""
    return method.__wrapped__


class ShardedComputeHandlers(Handlers):
    """Forward, Backward, ZeroGrad, CreateOptimizer, OptimizerStep, GetOptimizerState and
    gradient reads for sharded models (uses ClusterParameterService's `cluster`, `_sharded`)."""

    cluster: Any

    def _sharded(self, model_id: str) -> Any:  # ClusterParameterService's
        raise NotImplementedError

    @rpc
    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext
                ) -> pb.ForwardResponse:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            return _plain(ParameterService.Forward)(self, request, context)
        from paramhub_server.cluster import compute

        out, version = compute.forward(
            self.cluster, m.id, request.module_path, self._values(request.args),
            self._options(request.kwargs), request.seed if request.HasField("seed") else None)
        try:
            encoded = _codec.value_to_proto(out)
        except InvalidArgumentError:
            raise InvalidArgumentError(f"the module returned a {type(out).__name__}, which "
                                       "cannot be sent", reason="BAD_OUTPUT") from None
        response = pb.ForwardResponse(output=encoded, model_version=version)
        limit = self.transport.max_message_bytes
        if response.ByteSize() > limit:
            raise ResourceExhaustedError(
                f"the forward output needs {response.ByteSize()} bytes, more than the server's "
                f"max_message_bytes {limit} (paramhub serve --max-message-bytes)",
                reason="MESSAGE_TOO_LARGE",
                metadata={"limit": "max_message_bytes", "limit_bytes": str(limit),
                          "asked": str(response.ByteSize())})
        return response

    @rpc
    def Backward(self, request: pb.BackwardRequest, context: grpc.ServicerContext
                 ) -> pb.BackwardResponse:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            return _plain(ParameterService.Backward)(self, request, context)
        from paramhub_server.cluster import compute

        grad_outputs = self._values(request.grad_outputs)
        if any(g is not None and not isinstance(g, torch.Tensor) for g in grad_outputs):
            raise InvalidArgumentError("each output gradient must be a tensor or null",
                                       reason="BAD_ARGUMENT")
        grads, version = compute.backward(
            self.cluster, m.id, request.module_path, self._values(request.args),
            self._options(request.kwargs),
            seed=request.seed if request.HasField("seed") else None,
            forward_version=request.forward_model_version, grad_outputs=grad_outputs,
            grad_inputs=list(request.grad_inputs))
        return pb.BackwardResponse(input_grads=[_codec.value_to_proto(g) for g in grads],
                                   model_version=version)

    @rpc
    def ZeroGrad(self, request: pb.ZeroGradRequest, context: grpc.ServicerContext
                 ) -> pb.ZeroGradResponse:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            return _plain(ParameterService.ZeroGrad)(self, request, context)
        from paramhub_server.cluster import compute

        compute.zero_grad(self.cluster, m.id, request.module_path, list(request.parameters),
                          request.fill_zeros)
        return pb.ZeroGradResponse()

    def _sharded_grad_read(self, name: str, index_msg: Any
                           ) -> tuple[str, torch.Tensor, int] | None:
        """(name, `parameter.grad[index]`, its version) of a sharded model, else None."""
        model_id, kind, tname = serde.tensor_name_of(name)
        m = self._sharded(model_id)
        if m is None:
            return None
        from paramhub_server.cluster import compute

        index = _codec.index_from_proto(index_msg, max_elements=self.max_tensor_elements)
        t = compute.read_grad(self.cluster, model_id, tname, kind, index)
        return tname, t, m.entry(tname, kind).version

    @rpc
    def CreateOptimizer(self, request: pb.CreateOptimizerRequest, context: grpc.ServicerContext
                        ) -> pb.CreateOptimizerResponse:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            return _plain(ParameterService.CreateOptimizer)(self, request, context)
        from paramhub_server.cluster import optim

        groups = [(list(g.parameters), self._options(g.options)) for g in request.param_groups]
        opt, created = optim.create_optimizer(self.cluster, m.id, request.type, groups,
                                                self._options(request.defaults),
                                                request.replace)
        return pb.CreateOptimizerResponse(optimizer=serde.optimizer_info(opt), created=created)

    @rpc
    def OptimizerStep(self, request: pb.OptimizerStepRequest, context: grpc.ServicerContext
                      ) -> pb.OptimizerStepResponse:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            return _plain(ParameterService.OptimizerStep)(self, request, context)
        from paramhub_server.cluster import optim

        version, steps = optim.optimizer_step(self.cluster, m.id)
        return pb.OptimizerStepResponse(model_version=version, steps=steps)

    @rpc
    def GetOptimizerState(self, request: pb.GetOptimizerStateRequest,
                          context: grpc.ServicerContext
                          ) -> Iterator[pb.GetOptimizerStateResponse]:
        m = self._sharded(serde.model_id_of(request.model))
        if m is None:
            yield from _plain(ParameterService.GetOptimizerState)(self, request, context)
            return
        from paramhub_server.cluster import optim

        tensors: dict[str, torch.Tensor] = {}
        if request.config_only:
            opt = optim.optimizer_of(self.cluster, m.id)
        else:
            opt, tensors = optim.optimizer_state(self.cluster, m.id)
        yield pb.GetOptimizerStateResponse(optimizer=serde.optimizer_info(opt))
        for name, t in tensors.items():
            for chunk in _codec.iter_tensor_chunks(t, name=name):
                yield pb.GetOptimizerStateResponse(chunk=chunk)
