"""User-defined modules ("trusted code"): a module's structure pickled without its tensors.
No protobuf: the server's core unpickles and re-pickles with it. (paramhub._code holds the other
half, the description a mirror is rebuilt from.)

The client pickles the module with cloudpickle, which carries classes defined in `__main__` or a
notebook by value and importable ones by name; every parameter and buffer becomes a persistent
id (name, kind, dtype, shape) and its values travel separately through the tensor codec. The
server unpickles that only when its operator allowed it (`paramhub serve --trust-remote-code`:
any class, i.e. it runs the client's code; or `--model-package PKG`: only classes from torch.nn
and the listed packages, which the operator installed). Tied parameters keep one object (one
persistent id per tensor object).

A mirror is rebuilt from DescribeModel's module list: with the real class when this process has
it (already imported, or importable by its module name), else with a stand-in class of the same
name whose repr shows the recorded extra_repr; plain attributes (numbers, strings, dtypes,
tuples) are restored so that the class's own extra_repr prints as it does locally.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from paramhub.common.dtypes import check_shape
from paramhub.common.errors import FailedPreconditionError, InvalidArgumentError

__all__ = ["dumps", "loads", "allocate", "remote_code_refused"]

_PROTOCOL = 4
# Attribute-key prefix of the names a module registered as None ("<none>_parameters": [...]).
_NONE = "<none>"
_LAZY = nn.parameter.UninitializedTensorMixin

# Module.__dict__ entries that are torch's bookkeeping, never attributes of the model.
_INTERNAL = {"training", "_parameters", "_buffers", "_modules", "_backward_pre_hooks",
             "_backward_hooks", "_is_full_backward_hook", "_forward_hooks",
             "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
             "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
             "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
             "_non_persistent_buffers_set"}


def remote_code_refused(detail: str = "") -> FailedPreconditionError:
    """The error a server that does not run client code answers a user-defined module with."""
    return FailedPreconditionError(
        "this server does not run client code" + (f" ({detail})" if detail else "") + ": "
        "start it with `paramhub serve --trust-remote-code` to serve user-defined nn.Module "
        "classes (it runs their Python code; admin callers only), or list the package that "
        "defines them with --model-package PKG; a model of built-in torch.nn layers needs "
        "neither, and an exportable model can be sent as a torch.export program "
        "(client.create_model(name, module, example_inputs=(x,))), which runs no client code",
        reason="REMOTE_CODE_DISABLED", metadata={"flag": "--trust-remote-code"})


# ------------------------------------------------------------------------------------ pickling


def dumps(module: nn.Module) -> tuple[bytes, dict[str, torch.Tensor]]:
    """(the module pickled without its parameters and buffers, {first name: value} of each
    tensor storage). Raises InvalidArgumentError if it cannot be pickled."""
    import cloudpickle

    names: dict[int, str] = {}
    for n, t in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)):
        if not isinstance(t, _LAZY):
            names.setdefault(id(t), n)
    values = {n: t for n, t in module.state_dict(keep_vars=True).items()
              if not isinstance(t, _LAZY) and names.get(id(t)) == n}

    class _Pickler(cloudpickle.CloudPickler):
        def persistent_id(self, obj: Any) -> Any:  # noqa: D102
            if isinstance(obj, torch.Tensor) and id(obj) in names:
                return ("tensor", names[id(obj)], isinstance(obj, nn.Parameter),
                        bool(obj.requires_grad), str(obj.dtype).removeprefix("torch."),
                        tuple(obj.shape))
            return None

    buf = io.BytesIO()
    try:
        _Pickler(buf, protocol=_PROTOCOL).dump(module)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise InvalidArgumentError(f"the module cannot be pickled: {str(e).splitlines()[0]}",
                                   reason="BAD_MODULE") from None
    # Every storage, including buffers left out of state_dict (persistent=False).
    for n in names.values():
        if n not in values:
            owner, _, local = n.rpartition(".")
            sub = module.get_submodule(owner)
            values[n] = sub._parameters.get(local, sub._buffers.get(local))
    return buf.getvalue(), {n: t.detach() for n, t in values.items()}


#: Globals a server without --trust-remote-code resolves besides classes of torch.nn and of the
#: listed packages: what pickling an nn.Module tree needs, none of which runs model code.
_SAFE_GLOBALS = {("collections", "OrderedDict"), ("copyreg", "_reconstructor"),
                 ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"),
                 ("torch", "Size")}


def loads(data: bytes, *, trust_remote_code: bool, packages: Sequence[str]) -> nn.Module:
    """The module `dumps` pickled, its tensors empty on the meta device (tied ones one object).

    With `trust_remote_code` any class may be loaded (the client's code runs here); otherwise
    only classes of torch.nn and of `packages`. Raises FailedPreconditionError
    (REMOTE_CODE_DISABLED) for a class the policy refuses, InvalidArgumentError for bad data.
    """
    if not trust_remote_code and not packages:
        raise remote_code_refused()
    made: dict[str, torch.Tensor] = {}

    def allowed(module: str) -> bool:
        return module == "torch.nn" or module.startswith("torch.nn.") or any(
            module == p or module.startswith(p + ".") for p in packages)

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:  # noqa: D102
            if trust_remote_code:
                return super().find_class(module, name)
            if (module, name) in _SAFE_GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if allowed(module):
                obj = super().find_class(module, name)
                if isinstance(obj, type) or module.split(".")[0] != "torch" or (
                        module == "torch.nn.functional" and callable(obj)):
                    return obj
            raise remote_code_refused(f"it names {module}.{name}, which is not in torch.nn "
                                      "or a --model-package")

        def persistent_load(self, pid: Any) -> Any:  # noqa: D102
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "tensor"):
                raise InvalidArgumentError("bad persistent id in the module pickle",
                                           reason="BAD_MODULE")
            _, name, is_param, requires_grad, dtype_name, shape = pid
            t = made.get(name)
            if t is None:
                dtype = getattr(torch, str(dtype_name), None)
                if not isinstance(dtype, torch.dtype):
                    raise InvalidArgumentError(f"bad dtype {dtype_name!r} in the module pickle",
                                               reason="BAD_MODULE")
                t = torch.empty(check_shape(list(shape)), dtype=dtype, device="meta")
                if is_param:
                    t = nn.Parameter(t, requires_grad=bool(requires_grad))
                made[name] = t
            return t

    try:
        module = _Unpickler(io.BytesIO(data)).load()
    except (FailedPreconditionError, InvalidArgumentError):
        raise
    except Exception as e:  # noqa: BLE001 - any failure of unpickling is the client's data
        raise InvalidArgumentError(f"cannot load the module: {type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}",
                                   reason="BAD_MODULE") from None
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(f"the pickle holds a {type(module).__name__}, not an "
                                   "nn.Module", reason="BAD_MODULE")
    return module


def allocate(module: nn.Module, device: torch.device) -> None:
    """Replaces every meta parameter and buffer with an empty tensor on `device`, in place;
    a tensor shared by several modules stays one object (unlike Module.to_empty)."""
    new: dict[int, torch.Tensor] = {}
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is None or isinstance(t, _LAZY) or not t.is_meta:
                    continue
                n = new.get(id(t))
                if n is None:
                    n = torch.empty_like(t, device=device)
                    if isinstance(t, nn.Parameter):
                        n = nn.Parameter(n, requires_grad=t.requires_grad)
                    new[id(t)] = n
                table[k] = n
