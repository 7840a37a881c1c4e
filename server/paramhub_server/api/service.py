"""ParameterService: the gRPC servicer, one class combining the handlers of each area.

Follow an RPC from the proto to torch: protos/paramhub/v1 -> the handler of the same name in
api/<area>.py (parse with api/serde, call the core, build with api/serde) -> core/.
"""

from __future__ import annotations

from paramhub.v1 import parameter_service_pb2_grpc as pb_grpc
from paramhub_server.api.checkpoints import CheckpointHandlers
from paramhub_server.api.compute import ComputeHandlers
from paramhub_server.api.models import ModelHandlers
from paramhub_server.api.tensors import TensorHandlers
from paramhub_server.api.training import TrainingHandlers
from paramhub_server.api.writes import WriteHandlers


class ParameterService(ModelHandlers, TensorHandlers, WriteHandlers, ComputeHandlers,
                       TrainingHandlers, CheckpointHandlers, pb_grpc.ParameterServiceServicer):
    """The gRPC face of a Registry (constructor: api.base.Handlers)."""
