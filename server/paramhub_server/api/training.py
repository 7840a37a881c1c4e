"""Handlers of training: optimizers, training modes, PullModel and PushGrads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from paramhub import _codec
from paramhub.common.errors import InvalidArgumentError
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.api.framing import header_then_chunks
from paramhub_server.api.serde import _MODES, _OUTCOMES, _POLICIES, optimizer_info, training_config
from paramhub_server.core import training
from paramhub_server.core.model import PARAMETER
from paramhub_server.api.base import Handlers
from paramhub_server.errors import rpc



class TrainingHandlers(Handlers):
    """CreateOptimizer, OptimizerStep, GetOptimizerState, ConfigureTraining, PullModel, PushGrads."""

    @rpc
    def CreateOptimizer(self, request: pb.CreateOptimizerRequest, context: grpc.ServicerContext
                        ) -> pb.CreateOptimizerResponse:
        m = self._model(request.model)
        groups = [(list(g.parameters), self._options(g.options)) for g in request.param_groups]
        opt, created = training.create_optimizer(m, request.type, groups,
                                                 self._options(request.defaults),
                                                 replace=request.replace)
        return pb.CreateOptimizerResponse(optimizer=optimizer_info(opt), created=created)

    @rpc
    def OptimizerStep(self, request: pb.OptimizerStepRequest, context: grpc.ServicerContext
                      ) -> pb.OptimizerStepResponse:
        version, steps = training.step(self._model(request.model))
        return pb.OptimizerStepResponse(model_version=version, steps=steps)

    @rpc
    def GetOptimizerState(self, request: pb.GetOptimizerStateRequest,
                          context: grpc.ServicerContext
                          ) -> Iterator[pb.GetOptimizerStateResponse]:
        m = self._model(request.model)
        opt = training.trainer(m).optimizer
        if request.config_only or opt is None:
            # optimizer_of raises OPTIMIZER_NOT_FOUND when there is none.
            yield pb.GetOptimizerStateResponse(optimizer=optimizer_info(training.optimizer_of(m)))
            return
        _, tensors = training.export_optimizer(m)
        yield pb.GetOptimizerStateResponse(optimizer=optimizer_info(opt))
        for name, t in tensors.items():
            for chunk in _codec.iter_tensor_chunks(t, name=name):
                yield pb.GetOptimizerStateResponse(chunk=chunk)

    @rpc
    def ConfigureTraining(self, request: pb.ConfigureTrainingRequest,
                          context: grpc.ServicerContext) -> pb.ConfigureTrainingResponse:
        m = self._model(request.model)
        c = request.config
        mode = _MODES.get(c.mode)
        policy = _POLICIES.get(c.stale_policy)
        if mode is None or policy is None:
            raise InvalidArgumentError("unknown training mode or stale policy",
                                       reason="BAD_TRAINING_MODE")
        cfg = training.configure(m, mode, sync_workers=c.sync_workers,
                                 max_staleness=c.max_staleness, stale_policy=policy,
                                 max_waiters=self.registry.max_round_waiters)
        return pb.ConfigureTrainingResponse(config=training_config(cfg))

    @rpc
    def PullModel(self, request: pb.PullModelRequest, context: grpc.ServicerContext
                  ) -> Iterator[pb.PullModelResponse]:
        m = self._model(request.model)
        tensors, version = m.snapshot(include_buffers=request.include_buffers)
        yield pb.PullModelResponse(header=pb.PullModelHeader(model_version=version,
                                                             num_tensors=len(tensors)))
        for name, t in tensors:
            for chunk in _codec.iter_tensor_chunks(t, name=name, version=version):
                yield pb.PullModelResponse(chunk=chunk)

    @rpc
    def PushGrads(self, request_iterator: Iterator[pb.PushGradsRequest],
                  context: grpc.ServicerContext) -> pb.PushGradsResponse:
        header, chunks = header_then_chunks(request_iterator, "PushGrads")
        m = self._model(header.model)

        grads: dict[str, Any] = {}

        def check(header: tpb.TensorHeader) -> None:
            # Before the gradient is allocated: a known parameter, once, of its shape.
            if header.name in grads:
                raise InvalidArgumentError(f"gradient for {header.name!r} sent twice",
                                           reason="DUPLICATE_PARAMETER")
            p = m.ref(header.name, PARAMETER).get()
            shape = _codec.check_shape(header.shape, max_elements=self.max_tensor_elements)
            if shape != tuple(p.shape):
                raise InvalidArgumentError(f"gradient for {header.name!r} is {list(shape)}, "
                                           f"the parameter is {list(p.shape)}",
                                           reason="BAD_SHAPE",
                                           metadata={"parameter": header.name})

        for asm in _codec.assemble_tensors(chunks, check=check,
                                          max_elements=self.max_tensor_elements,
                                          max_bytes=self.registry.max_model_bytes):
            grads[asm.name] = asm.finish()
        result = training.push_grads(m, header.model_version, grads,
                                     timeout=context.time_remaining(), alive=context.is_active)
        return pb.PushGradsResponse(outcome=_OUTCOMES[result.outcome],
                                    staleness=result.staleness, scale=result.scale,
                                    model_version=result.model_version, steps=result.steps)
