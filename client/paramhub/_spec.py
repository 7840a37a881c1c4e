"""Model specs for the SDK: the ModelSpec message <-> paramhub.common.spec's dataclasses.

The spec logic (allow-list, building, describing a local module, limits) lives in the shared
kernel, paramhub.common.spec, on plain dataclasses; this module is its face in protobuf: the
SDK sends and receives ModelSpec messages, and the server's API layer converts with the same
two functions.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from paramhub.common import spec as _plain
from paramhub.common.spec import (ALLOWED_MODULES, CONTAINERS, MAX_SPEC_DEPTH, MAX_SPEC_NODES,
                                  ModelSpec, ModuleChild, ModuleNode, ParameterTie,
                                  check_spec_limits, get_submodule, validate_spec)
from paramhub.common.tensors import value_from_proto, value_to_proto
from paramhub.v1 import parameter_service_pb2 as pb

__all__ = ["ALLOWED_MODULES", "CONTAINERS", "build_module", "spec_from_module", "spec_to_proto",
           "spec_from_proto", "validate_spec", "check_spec_limits", "get_submodule",
           "MAX_SPEC_NODES", "MAX_SPEC_DEPTH"]


def spec_to_proto(spec: ModelSpec) -> pb.ModelSpec:
    """The ModelSpec message of a spec."""
    msg = pb.ModelSpec(root=spec.root)
    for n in spec.nodes:
        node = msg.nodes.add(type=n.type, args=[value_to_proto(a) for a in n.args])
        for k, v in n.kwargs.items():
            node.kwargs[k].CopyFrom(value_to_proto(v))
        for c in n.children:
            node.children.add(name=c.name, node=c.node)
    for t in spec.ties:
        msg.ties.add(parameter=t.parameter, source=t.source)
    return msg


def spec_from_proto(msg: pb.ModelSpec, *, max_elements: int | None = None) -> ModelSpec:
    """The spec a ModelSpec message describes (every value decoded and validated)."""
    return ModelSpec(
        nodes=[ModuleNode(type=n.type,
                          args=[value_from_proto(a, max_elements=max_elements) for a in n.args],
                          kwargs={k: value_from_proto(v, max_elements=max_elements)
                                  for k, v in n.kwargs.items()},
                          children=[ModuleChild(c.name, c.node) for c in n.children])
               for n in msg.nodes],
        root=msg.root, ties=[ParameterTie(t.parameter, t.source) for t in msg.ties])


def _as_plain(spec: Any) -> ModelSpec:
    return spec_from_proto(spec) if isinstance(spec, pb.ModelSpec) else spec


def spec_from_module(root: nn.Module) -> pb.ModelSpec:
    """Describes a local module tree as a ModelSpec message (see
    paramhub.common.spec.spec_from_module).

    Raises:
        InvalidArgumentError: a class is not allow-listed, or an argument cannot be recovered.
    """
    return spec_to_proto(_plain.spec_from_module(root))


def build_module(spec: pb.ModelSpec | ModelSpec) -> nn.Module:
    """Builds the module tree a spec (message or dataclass) describes, on the current default
    device (see paramhub.common.spec.build_module).

    Raises:
        InvalidArgumentError: unknown class, bad arguments, bad graph or bad tie.
    """
    return _plain.build_module(_as_plain(spec))


def apply_ties(root: nn.Module, spec: pb.ModelSpec | ModelSpec) -> None:
    """Makes each tied parameter the same object as its source."""
    _plain.apply_ties(root, _as_plain(spec))
