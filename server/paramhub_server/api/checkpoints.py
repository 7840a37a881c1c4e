"""Handlers of durability: checkpoints (create, list, restore, delete, export) and compaction."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from paramhub.common import pb
from paramhub_server.api.serde import checkpoint_info, versions, write_context
from paramhub_server.core import store
from paramhub_server.api.base import Handlers
from paramhub_server.errors import rpc



class CheckpointHandlers(Handlers):
    """CreateCheckpoint, ListCheckpoints, RestoreCheckpoint, DeleteCheckpoint, ExportCheckpoint, CompactModel."""

    @rpc
    def CreateCheckpoint(self, request: pb.CreateCheckpointRequest,
                         context: grpc.ServicerContext) -> pb.CreateCheckpointResponse:
        info = store.create_checkpoint(self._model(request.model), request.checkpoint)
        return pb.CreateCheckpointResponse(checkpoint=checkpoint_info(info))

    @rpc
    def ListCheckpoints(self, request: pb.ListCheckpointsRequest,
                        context: grpc.ServicerContext) -> pb.ListCheckpointsResponse:
        return pb.ListCheckpointsResponse(
            checkpoints=[checkpoint_info(c) for c in
                         store.journal_of(self._model(request.model)).list_checkpoints()])

    @rpc
    def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest,
                          context: grpc.ServicerContext) -> pb.RestoreCheckpointResponse:
        result = store.restore_checkpoint(
            self._model(request.model), store.check_checkpoint_name(request.checkpoint),
            request.expected_model_version if request.HasField("expected_model_version")
            else None, write_context(request.request_id, context))
        return pb.RestoreCheckpointResponse(updated=versions(result.updated),
                                            model_version=result.model_version)

    @rpc
    def DeleteCheckpoint(self, request: pb.DeleteCheckpointRequest,
                         context: grpc.ServicerContext) -> pb.DeleteCheckpointResponse:
        store.journal_of(self._model(request.model)).delete_checkpoint(
            store.check_checkpoint_name(request.checkpoint))
        return pb.DeleteCheckpointResponse()

    @rpc
    def ExportCheckpoint(self, request: pb.ExportCheckpointRequest,
                         context: grpc.ServicerContext) -> Iterator[pb.ExportCheckpointResponse]:
        m = self._model(request.model)
        if request.checkpoint:
            store.check_checkpoint_name(request.checkpoint)
        for data in store.export_bytes(m, request.checkpoint):
            yield pb.ExportCheckpointResponse(data=data)

    @rpc
    def CompactModel(self, request: pb.CompactModelRequest, context: grpc.ServicerContext
                     ) -> pb.CompactModelResponse:
        version, folded = store.compact(self._model(request.model))
        return pb.CompactModelResponse(model_version=version, log_bytes=folded)
