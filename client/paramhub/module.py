"""The local mirror of a served model: a real torch.nn.Module tree on the meta device whose
parameters and buffers are remote handles (STYLE.md §6).

`attach(client, model_id)` makes one DescribeModel call and builds the skeleton from the spec
the server returns, with the same classes, names and shared module objects; tied weights get one
handle per server-side storage. From then on, printing, indexing and listing make no RPC; only
values move, on demand. Calling any module of the tree runs Forward on the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from paramhub import _codec, _spec
from paramhub.errors import InvalidArgumentError
from paramhub.tensor import RemoteBuffer, RemoteParameter, _materialize, _Ref
from paramhub.v1 import parameter_service_pb2 as pb

if TYPE_CHECKING:
    from paramhub.client import Client

__all__ = ["attach", "is_remote", "model_id_of"]

# Module methods that would move or convert tensors locally: on a served model they would
# silently detach the mirror from the server, so they raise and name the alternative.
_LOCAL_ONLY = ("to", "cuda", "cpu", "float", "double", "half", "bfloat16", "type", "to_empty",
               "share_memory", "requires_grad_", "ipu", "xpu", "mtia")


class _RemoteForward:
    """`module(*args)` -> Forward RPC on the module's path; inputs are sent, outputs fetched."""

    def __init__(self, client: Client, model_id: str, path: str) -> None:
        self.client, self.model_id, self.path = client, model_id, path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.client.forward(self.model_id, *_materialize(args), module_path=self.path,
                                   **_materialize(kwargs))


class _RemoteTrain:
    """`module.train(mode)` -> one SetTrainingMode RPC, then the local flags of the subtree."""

    def __init__(self, client: Client, model_id: str, path: str, module: nn.Module) -> None:
        self.client, self.model_id, self.path = client, model_id, path
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.client.set_training(self.model_id, mode, self.path)
        for m in self.module.modules():
            m.training = mode
        return self.module


def _local_only(name: str) -> Any:
    def method(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{name}() would move a served model's tensors into this process; use net.pull() "
            "for a local copy, or create the model with device=... on the server")
    return method


def is_remote(module: nn.Module) -> bool:
    """Whether `module` is (part of) a served model's mirror."""
    return getattr(module, "_paramhub_model_id", None) is not None


def model_id_of(module: nn.Module) -> str:
    """The served model id of a mirror (root or submodule)."""
    model_id = getattr(module, "_paramhub_model_id", None)
    if model_id is None:
        raise InvalidArgumentError(f"{type(module).__name__} is not a served model",
                                   reason="BAD_ARGUMENT")
    return model_id


def attach(client: Client, model_id: str) -> nn.Module:
    """Builds the mirror of a served model (one DescribeModel call)."""
    desc = client.describe_model(model_id)
    with torch.device("meta"):
        root = _spec.build_module(desc.spec)
    handles: dict[int, Any] = {}  # storage group -> handle
    for info in desc.tensors:
        owner_path, _, local = info.name.rpartition(".")
        owner = root.get_submodule(owner_path)
        handle = handles.get(info.storage_group)
        if handle is None:
            dtype = _codec.dtype_from_proto(info.dtype)
            meta = torch.empty(tuple(info.shape), dtype=dtype, device="meta")
            kind = "parameters" if info.kind == pb.TENSOR_KIND_PARAMETER else "buffers"
            ref = _Ref(client, model_id, info.name, kind, torch.device(info.device),
                       info.version, meta.shape)
            handle = (RemoteParameter._make(meta, ref, info.requires_grad)
                      if kind == "parameters" else RemoteBuffer._make(meta, ref))
            handles[info.storage_group] = handle
        table = owner._parameters if info.kind == pb.TENSOR_KIND_PARAMETER else owner._buffers
        if local not in table:
            raise InvalidArgumentError(
                f"the served model's {info.name!r} does not exist in the local rebuild; the "
                "client's torch may differ from the server's", reason="BAD_SPEC")
        table[local] = handle
    # Leftover meta tensors would mean the local rebuild has names the server lacks.
    described = {t.name for t in desc.tensors}
    extra = [n for n, _ in root.named_parameters(remove_duplicate=False) if n not in described]
    if extra:
        raise InvalidArgumentError(f"the local rebuild has parameters the server lacks: {extra}",
                                   reason="BAD_SPEC")
    training = {m.path: m.training for m in desc.modules}
    for path, m in root.named_modules(remove_duplicate=False):
        m.training = training.get(path, m.training)
    seen: set[int] = set()
    for path, m in root.named_modules(remove_duplicate=False):
        if id(m) in seen:
            continue
        seen.add(id(m))
        m.forward = _RemoteForward(client, model_id, path)
        m.train = _RemoteTrain(client, model_id, path, m)
        for name in _LOCAL_ONLY:
            setattr(m, name, _local_only(name))
        m._paramhub_model_id = model_id
        m._paramhub_path = path
        m._paramhub_client = client
    _install_root_methods(root, client, model_id)
    return root


def _install_root_methods(root: nn.Module, client: Client, model_id: str) -> None:
    def pull() -> nn.Module:
        """A local nn.Module copy of the served model with its current values."""
        desc = client.describe_model(model_id)
        local = _spec.build_module(desc.spec)
        state = {}
        for name in local.state_dict().keys():
            kind = "parameters" if name in dict(local.named_parameters(
                remove_duplicate=False)) else "buffers"
            state[name], _ = client.get_tensor(model_id, name, kind=kind)
        local.load_state_dict(state)
        local.train(root.training)
        return local

    def named_remote_tensors() -> Iterator[tuple[str, Any]]:
        """(name, handle) for every parameter and buffer, tied names included."""
        yield from root.named_parameters(remove_duplicate=False)
        yield from root.named_buffers(remove_duplicate=False)

    root.pull = pull
    root.named_remote_tensors = named_remote_tensors
    root.paramhub_client = client
    root.model_id = model_id
