"""User-defined modules: the description a mirror is rebuilt from (DescribeModel's ModuleInfo
list). The pickling half (dumps, loads, allocate) lives in the shared kernel,
paramhub.common.modcode; its names are re-exported here for the SDK.

A mirror is rebuilt from DescribeModel's module list: with the real class when this process has
it (already imported, or importable by its module name), else with a stand-in class of the same
name whose repr shows the recorded extra_repr; plain attributes (numbers, strings, dtypes,
tuples) are restored so that the class's own extra_repr prints as it does locally.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from paramhub import _codec
from paramhub.common.modcode import (_INTERNAL, _NONE, allocate, dumps, loads,
                                     remote_code_refused)
from paramhub.errors import InvalidArgumentError
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub.v1 import tensor_pb2 as tpb

__all__ = ["dumps", "loads", "allocate", "describe_module", "build_from_description",
           "remote_code_refused", "remember_classes"]


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
