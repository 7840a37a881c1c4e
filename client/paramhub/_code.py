"""User-defined modules ("trusted code"): a module's structure pickled without its tensors, and
the description a mirror is rebuilt from.

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

import importlib
import io
import pickle
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from paramhub import _codec
from paramhub.errors import FailedPreconditionError, InvalidArgumentError
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub.v1 import tensor_pb2 as tpb

__all__ = ["dumps", "loads", "describe_module", "build_from_description", "remote_code_refused"]

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
                t = torch.empty(_codec.check_shape(list(shape)), dtype=dtype, device="meta")
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


# ------------------------------------------------------------------------------ description


#: Largest tensor attribute (not a parameter or buffer, e.g. a constant) a description carries.
_MAX_ATTRIBUTE_TENSOR_BYTES = 1 << 20


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(v, torch.Tensor):  # a constant a local copy (`pull`) computes with
        return (type(v) is torch.Tensor and not v.is_meta and v.layout is torch.strided
                and v.numel() * v.element_size() <= _MAX_ATTRIBUTE_TENSOR_BYTES)
    if isinstance(v, (tuple, list)) and len(v) <= 64:
        return all(_plain(x) for x in v)
    return False


def attributes(m: nn.Module) -> dict[str, tpb.Value]:
    """A module's plain attributes as Values (what a mirror built with the class needs):
    numbers, strings, dtypes, tuples of them and small constant tensors."""
    out = {k: _codec.value_to_proto(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
           for k, v in m.__dict__.items()
           if k not in _INTERNAL and _plain(v)}
    if m._non_persistent_buffers_set:
        out["_non_persistent_buffers_set"] = _codec.value_to_proto(
            sorted(m._non_persistent_buffers_set))
    # Parameters, buffers and submodules registered as None (e.g. Linear(bias=False)'s bias).
    for table in ("_parameters", "_buffers", "_modules"):
        none = [k for k, v in getattr(m, table).items() if v is None]
        if none:
            out[f"{_NONE}{table}"] = _codec.value_to_proto(none)
    return out


def describe_module(path: str, m: nn.Module, group: int) -> pb.ModuleInfo:
    """The ModuleInfo of one module of a served tree."""
    cls = type(m)
    return pb.ModuleInfo(path=path, class_name=cls.__name__, extra_repr=m.extra_repr(),
                         children=list(m._modules), training=m.training, module_group=group,
                         class_module=cls.__module__, class_qualname=cls.__qualname__,
                         attributes=attributes(m))


_STAND_INS: dict[tuple[str, str], type[nn.Module]] = {}
#: Classes of the modules this process served as code (found even when not importable by name,
#: e.g. defined inside a function).
_KNOWN: dict[tuple[str, str], type[nn.Module]] = {}


def remember_classes(module: nn.Module) -> None:
    """Records the classes of a module tree this process serves, for its mirrors."""
    for m in module.modules():
        _KNOWN[(type(m).__module__, type(m).__qualname__)] = type(m)


def _find_class(module: str, qualname: str) -> type[nn.Module] | None:
    known = _KNOWN.get((module, qualname))
    if known is not None:
        return known
    mod = sys.modules.get(module)
    if mod is None and module != "__main__":
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001 - not importable here: a stand-in is used
            return None
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def _stand_in(info: pb.ModuleInfo) -> type[nn.Module]:
    key = (info.class_module, info.class_qualname or info.class_name)
    cls = _STAND_INS.get(key)
    if cls is None:
        cls = type(info.class_name, (nn.Module,), {
            "__module__": info.class_module, "__qualname__": key[1],
            "__doc__": "Stand-in for a served module class this process does not have."})
        _STAND_INS[key] = cls
    return cls


def _make(info: pb.ModuleInfo) -> nn.Module:
    cls = _find_class(info.class_module, info.class_qualname) if info.class_qualname else None
    cls = cls or _stand_in(info)
    obj = cls.__new__(cls)
    nn.Module.__init__(obj)
    for k, v in info.attributes.items():
        value = _codec.value_from_proto(v)
        if isinstance(value, torch.Tensor):
            value = value.clone()  # own memory (the decoded tensor may view the message)
        if k == "_non_persistent_buffers_set":
            value = set(value)
        if k.startswith(_NONE):
            table = obj.__dict__[k.removeprefix(_NONE)]
            for name in value:
                table[name] = None
            continue
        obj.__dict__[k] = value
    obj.training = info.training
    try:
        same = obj.extra_repr() == info.extra_repr
    except Exception:  # noqa: BLE001 - an attribute the description could not carry
        same = False
    if not same:
        text = info.extra_repr
        obj.extra_repr = lambda: text  # the server's own text
    return obj


def build_from_description(modules: Iterable[pb.ModuleInfo]) -> nn.Module:
    """The module tree DescribeModel lists (pre-order, shared modules at each path), without
    parameters or buffers; shared modules are one object."""
    by_group: dict[int, nn.Module] = {}
    by_path: dict[str, nn.Module] = {}
    root: nn.Module | None = None
    for info in modules:
        m = by_group.get(info.module_group)
        if m is None:
            m = by_group[info.module_group] = _make(info)
        by_path[info.path] = m
        if info.path == "":
            root = m
        else:
            parent_path, _, name = info.path.rpartition(".")
            by_path[parent_path]._modules[name] = m
    if root is None:
        raise InvalidArgumentError("the description has no root module", reason="BAD_SPEC")
    return root
