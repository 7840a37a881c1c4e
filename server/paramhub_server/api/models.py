"""Handlers of the model RPCs: create, delete, list, describe, list parameters, watch, probe."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterator

import grpc

from paramhub import _code, _codec
from paramhub.common.errors import InvalidArgumentError, PermissionDeniedError, ResourceExhaustedError
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub_server.api.framing import header_then_chunks, once
from paramhub_server.api.serde import (WireSpec, event_bytes, model_id_of, model_info,
                                       module_infos, program_request, spec_message,
                                       stats_to_proto,
                                       tensor_info)
from paramhub_server.core import probe, watch
from paramhub_server.core.model import BUFFER, PARAMETER
from paramhub_server.logs import current_role
from paramhub_server.api.base import Handlers
from paramhub_server.errors import rpc

log = logging.getLogger(__name__)
#: How often a watch stream with no events checks whether its client is still there (seconds).
#: Only a safety net: the call's termination callback closes the watcher at once. Polling each
#: second cost 1,000 parked watchers 1,000 thread wake-ups a second (each taking the GIL).
_WATCH_POLL = 30.0


class ModelHandlers(Handlers):
    """CreateModel, DeleteModel, ListModels, DescribeModel, ListParameters, WatchModel, Probe."""

    @rpc
    def CreateModel(self, request_iterator: Iterator[pb.CreateModelRequest],
                    context: grpc.ServicerContext) -> pb.CreateModelResponse:
        header, chunks = header_then_chunks(request_iterator, "CreateModel")

        try:
            # An uploaded tensor larger than the whole model is refused from its header,
            # before it is allocated.
            values = {a.name: a.finish() for a in _codec.assemble_tensors(
                chunks, check=once(), max_elements=self.max_tensor_elements,
                max_bytes=self.registry.max_model_bytes)}
        except ResourceExhaustedError as e:
            if e.metadata.get("limit") != "max_bytes":
                raise
            raise ResourceExhaustedError(
                f"an uploaded tensor of {e.metadata['asked']} bytes exceeds --max-model-bytes "
                f"{self.registry.max_model_bytes}", reason="MODEL_TOO_LARGE",
                metadata={"limit": "max_model_bytes", "asked": e.metadata["asked"],
                          "limit_value": str(self.registry.max_model_bytes)}) from None
        if header.exported_program:  # a torch.export program: nothing unpickled, no trust
            model = self.registry.create_program(header.model_id, program_request(header),
                                                 values=values)
        elif header.module_pickle:
            if current_role() not in (None, "admin"):  # None: no auth (a loopback server)
                raise PermissionDeniedError("sending module code needs the admin role",
                                            reason="ROLE_TOO_LOW", metadata={"needed": "admin"})
            model = self.registry.create_code(header.model_id, header.module_pickle,
                                              device=header.device, values=values.items())
        else:
            model = self.registry.create(header.model_id,
                                         WireSpec(header.spec),
                                         seed=header.seed if header.HasField("seed") else None,
                                         device=header.device, values=values.items())
        log.info("created model %s on %s", model.id, model.device)
        return pb.CreateModelResponse(model=model_info(model))

    @rpc
    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext
                    ) -> pb.DeleteModelResponse:
        self.registry.delete(model_id_of(request.name))
        return pb.DeleteModelResponse()

    @rpc
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext
                   ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(m) for m in self.registry.list()])

    @rpc
    def DescribeModel(self, request: pb.DescribeModelRequest, context: grpc.ServicerContext
                      ) -> pb.DescribeModelResponse:
        m = self._model(request.name)
        with m.lock.read():
            groups: dict[int, int] = {}
            modules = []
            if m.program is not None:  # the tree as exported, with the served modes
                training = {p: mod.training
                            for p, mod in m.module.named_modules(remove_duplicate=False)}
                for info in module_infos(m.program.tree):
                    modules.append(pb.ModuleInfo())
                    modules[-1].CopyFrom(info)
                    modules[-1].training = training.get(info.path, info.training)
            for path, mod in ([] if m.program is not None
                              else m.module.named_modules(remove_duplicate=False)):
                modules.append(_code.describe_module(
                    path, mod, groups.setdefault(id(mod), len(groups))))
            lazy = m.uninitialized
            return pb.DescribeModelResponse(
                model=model_info(m), spec=spec_message(m.spec), modules=modules,
                tensors=[tensor_info(m, n) for n in m.names()],
                uninitialized_parameters=[n for n, k in lazy if k == PARAMETER],
                uninitialized_buffers=[n for n, k in lazy if k == BUFFER])

    @rpc
    def ListParameters(self, request: pb.ListParametersRequest, context: grpc.ServicerContext
                       ) -> pb.ListParametersResponse:
        m = self._model(request.model)
        names = [n for n in m.names(include_buffers=request.include_buffers)
                 if n.startswith(request.prefix)
                 and (not request.glob or fnmatch.fnmatchcase(n, request.glob))]
        return pb.ListParametersResponse(tensors=[tensor_info(m, n) for n in names])

    @rpc
    def WatchModel(self, request: pb.WatchModelRequest, context: grpc.ServicerContext
                   ) -> Iterator[bytes]:
        # Yields WatchModelResponse wire bytes (transport.add_servicer passes them through).
        m = self._model(request.name)
        if request.max_queue < 0:
            raise InvalidArgumentError("max_queue must be >= 0", reason="BAD_ARGUMENT")
        watcher = m.watch(request.max_queue)
        context.add_callback(watcher.close)  # the client went away: stop queueing for it
        try:
            while True:
                ev = watcher.get(_WATCH_POLL)
                if ev is None:
                    if not context.is_active():
                        return
                    continue
                if ev.kind == watch.CLOSED:
                    return
                yield event_bytes(ev)
        finally:
            watcher.close()

    @rpc
    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        hmin = request.histogram_min if request.HasField("histogram_min") else None
        hmax = request.histogram_max if request.HasField("histogram_max") else None
        if request.name.count("/") == 1:
            if request.index:
                raise InvalidArgumentError("a whole-model probe takes no index",
                                           reason="BAD_INDEX")
            stats, each, version = probe.probe_model(
                self._model(request.name), include_buffers=request.include_buffers,
                bins=request.histogram_bins, hmin=hmin, hmax=hmax, per_tensor=request.per_tensor)
            return pb.ProbeResponse(stats=stats_to_proto(stats),
                                    tensors=[stats_to_proto(s) for s in each],
                                    model_version=version)
        m, kind, name = self._tensor(request.name)
        index = _codec.index_from_proto(request.index, max_elements=self.max_tensor_elements)
        self._check_index(m, name, kind, index)
        stats, version = probe.probe_tensor(m, name, index, kind=kind,
                                            grad=request.field == pb.TENSOR_FIELD_GRAD,
                                            bins=request.histogram_bins, hmin=hmin, hmax=hmax)
        return pb.ProbeResponse(stats=stats_to_proto(stats), model_version=version)
