"""paramhub: PyTorch models served over gRPC, used through the torch.nn.Module API.

    import paramhub
    client = paramhub.connect("127.0.0.1:50051")
    net = client.create_model("mlp", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    net(torch.rand(2, 4)); print(net); net[0].weight.data[0, 0] = 42
"""

from paramhub import optim
from paramhub.client import Client, PushResult, connect
from paramhub.module import is_remote
from paramhub.tensor import RemoteBuffer, RemoteParameter, RemoteTensor, is_remote_tensor
from paramhub.errors import (AlreadyExistsError, AuthError, ConflictError, DeadlineExceededError,
                             FailedPreconditionError, InternalError, InvalidArgumentError,
                             NotFoundError, OutOfRangeError,
                             ParamhubError, PermissionDeniedError, ResourceExhaustedError,
                             UnavailableError, UnimplementedError)

__all__ = [
    "connect", "Client", "PushResult", "optim", "is_remote", "is_remote_tensor",
    "RemoteParameter", "RemoteBuffer", "RemoteTensor",
    "ParamhubError", "NotFoundError", "AlreadyExistsError", "InvalidArgumentError",
    "OutOfRangeError", "ConflictError", "ResourceExhaustedError", "AuthError",
    "PermissionDeniedError", "UnavailableError", "DeadlineExceededError", "InternalError",
    "UnimplementedError", "FailedPreconditionError",
]
__version__ = "0.1.0"
