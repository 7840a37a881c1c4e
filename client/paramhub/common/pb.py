"""The messages and enums of paramhub.v1's ParameterService, under one name: `pb.X`.

protoc puts each proto file's messages in that file's generated module, and the protos are one
file per concept (spec, models, tensors, compute, training, watch, checkpoints, transport, and
the tensor encoding); buf's STANDARD lint forbids the `import public` that would re-export them
from parameter_service_pb2. Callers need not know which file defines a message: they import this
module as `pb`. `pb.DESCRIPTOR` is the service file's descriptor (`services_by_name`). The
service stubs stay in paramhub.v1.parameter_service_pb2_grpc.
"""

from __future__ import annotations

from paramhub.v1.checkpoints_pb2 import *  # noqa: F403
from paramhub.v1.compute_pb2 import *  # noqa: F403
from paramhub.v1.models_pb2 import *  # noqa: F403
from paramhub.v1.spec_pb2 import *  # noqa: F403
from paramhub.v1.tensor_pb2 import *  # noqa: F403
from paramhub.v1.tensors_pb2 import *  # noqa: F403
from paramhub.v1.training_pb2 import *  # noqa: F403
from paramhub.v1.transport_pb2 import *  # noqa: F403
from paramhub.v1.watch_pb2 import *  # noqa: F403
from paramhub.v1.parameter_service_pb2 import DESCRIPTOR  # noqa: E402,F401  (after the stars)
