"""paramhub: PyTorch models served over gRPC, used through the torch.nn.Module API.

    import paramhub
    client = paramhub.connect("127.0.0.1:50051")
    net = client.create_model("mlp", nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
    net(torch.rand(2, 4)); print(net); net[0].weight.data[0, 0] = 42

The package namespace is lazy (PEP 562): `import paramhub` loads nothing, and a name of
`__all__` imports its module on first use. So `import paramhub.common.tensors` (the shared kernel,
which the server imports too) loads neither grpc nor the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "connect": "paramhub.client", "Client": "paramhub.client", "PushResult": "paramhub.client",
    "is_remote": "paramhub.module", "RemoteModule": "paramhub.module",
    "is_remote_tensor": "paramhub.tensor", "RemoteParameter": "paramhub.tensor",
    "RemoteBuffer": "paramhub.tensor", "RemoteTensor": "paramhub.tensor",
    **{name: "paramhub.errors" for name in (
        "ParamhubError", "NotFoundError", "AlreadyExistsError", "InvalidArgumentError",
        "OutOfRangeError", "ConflictError", "ResourceExhaustedError", "AuthError",
        "PermissionDeniedError", "UnavailableError", "DeadlineExceededError", "InternalError",
        "UnimplementedError", "FailedPreconditionError")},
}
_SUBMODULES = ("optim",)

__all__ = [
    "connect", "Client", "PushResult", "optim", "is_remote", "is_remote_tensor", "RemoteModule",
    "RemoteParameter", "RemoteBuffer", "RemoteTensor",
    "ParamhubError", "NotFoundError", "AlreadyExistsError", "InvalidArgumentError",
    "OutOfRangeError", "ConflictError", "ResourceExhaustedError", "AuthError",
    "PermissionDeniedError", "UnavailableError", "DeadlineExceededError", "InternalError",
    "UnimplementedError", "FailedPreconditionError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value: Any = importlib.import_module(f"paramhub.{name}")
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'paramhub' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from paramhub import optim
    from paramhub.client import Client, PushResult, connect
    from paramhub.errors import (AlreadyExistsError, AuthError, ConflictError,
                                 DeadlineExceededError, FailedPreconditionError, InternalError,
                                 InvalidArgumentError, NotFoundError, OutOfRangeError,
                                 ParamhubError, PermissionDeniedError, ResourceExhaustedError,
                                 UnavailableError, UnimplementedError)
    from paramhub.module import RemoteModule, is_remote
    from paramhub.tensor import (RemoteBuffer, RemoteParameter, RemoteTensor,
                                 is_remote_tensor)
