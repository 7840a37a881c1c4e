"""Sharded models as every rank holds them (torch only): placements, entries (one per
storage), writes, the element ids a torch index selects, and init-target selection."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from paramhub import _spec
from paramhub.common import spec as spec_lib
from paramhub.common.errors import InvalidArgumentError, NotFoundError
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub_server.core import indexing
from paramhub_server.core.types import BUFFER, PARAMETER  # noqa: F401 - re-exported

#: The only sharding plan built so far (FSDP-style: every tensor on dim 0).
FSDP = "fsdp"


def placement_of(shape: Sequence[int], world: int) -> Shard | Replicate:
    """Shard(0) when dim 0 has a row for every rank, else Replicate (scalars, tiny tensors)."""
    return Shard(0) if len(shape) >= 1 and shape[0] >= world and world > 1 else Replicate()


def placement_text(p: Shard | Replicate) -> str:
    """"shard(0)" or "replicate"."""
    return f"shard({p.dim})" if isinstance(p, Shard) else "replicate"


def local_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the rows of a dim of `n` rows that rank holds under Shard (torch.chunk
    layout, which DTensor uses)."""
    per = -(-n // world) if n else 0
    start = min(n, per * rank)
    return start, min(n, start + per)


@dataclass
class Entry:
    """One storage (tied names share one) of a sharded model."""

    group: int
    names: list[str]
    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    placement: Shard | Replicate
    version: int = 1
    #: This rank's part (the DTensor's local tensor) -- None until created.
    dt: DTensor | None = None

    @property
    def local(self) -> torch.Tensor:
        assert self.dt is not None
        return self.dt.to_local()


@dataclass
class ShardedModel:
    """A model whose tensors are DTensors over every rank; the same metadata on every rank."""

    id: str
    spec: pb.ModelSpec
    entries: list[Entry]
    #: state_dict name -> entry.
    by_name: dict[str, Entry] = field(default_factory=dict)
    version: int = 1
    #: The module tree on the meta device (rank 0 uses it to describe and to run Forward).
    skeleton: nn.Module | None = None

    def __post_init__(self) -> None:
        self.by_name = {n: e for e in self.entries for n in e.names}

    def entry(self, name: str, kind: str | None = None) -> Entry:
        e = self.by_name.get(name)
        if e is None or (kind is not None and e.kind != kind):
            raise NotFoundError(f"model {self.id!r} has no {kind or 'tensor'} {name[:200]!r}",
                                reason="TENSOR_NOT_FOUND",
                                metadata={"model": self.id, "tensor": name[:200]})
        return e

    def local_bytes(self) -> int:
        return sum(e.local.numel() * e.local.element_size() for e in self.entries
                   if e.dt is not None)

    def logical_bytes(self) -> int:
        return sum(numel(e.shape) * e.dtype.itemsize for e in self.entries)


@dataclass
class Write:
    """One slice write of a command: `tensor[index] op= value`."""

    name: str
    kind: str | None
    index: tuple[Any, ...]
    op: str
    value: torch.Tensor
    expected_version: int | None = None


def skeleton_of(spec: pb.ModelSpec) -> nn.Module:
    """The module tree of a spec on the meta device, ties applied."""
    with torch.device("meta"):
        module = _spec.build_module(spec)
    _spec.apply_ties(module, spec)
    return module


def entries_of(skeleton: nn.Module, world: int) -> list[Entry]:
    """One entry per storage of the skeleton's state_dict (tied names grouped), in order."""
    params = {id(p) for _, p in skeleton.named_parameters(remove_duplicate=False)}
    groups: dict[int, Entry] = {}
    for name, t in skeleton.state_dict(keep_vars=True).items():
        if isinstance(t, nn.parameter.UninitializedTensorMixin):
            raise InvalidArgumentError(
                f"{name!r} is not initialized (a lazy module); a sharded model needs every "
                "shape at creation", reason="NOT_SHARDABLE", metadata={"tensor": name[:200]})
        e = groups.get(id(t))
        if e is None:
            groups[id(t)] = e = Entry(len(groups), [], PARAMETER if id(t) in params else BUFFER,
                                      t.dtype, tuple(t.shape), placement_of(t.shape, world))
        e.names.append(name)
    return list(groups.values())


def region_ids(shape: Sequence[int], index: tuple[Any, ...]) -> torch.Tensor:
    """The flat (row-major) ids into a tensor of `shape` of the elements `tensor[index]`
    selects, region-shaped: built by indexing two zero-stride maps (row id, offset in the row)
    exactly as the tensor would be indexed, so the memory is the region's, not the tensor's."""
    shape = tuple(shape)
    if not shape:
        return indexing.apply_index(torch.zeros((), dtype=torch.int64), index)
    per_row = numel(shape[1:])
    ones = [1] * (len(shape) - 1)
    rows = torch.arange(shape[0], dtype=torch.int64).view(shape[0], *ones).expand(shape)
    cols = torch.arange(per_row, dtype=torch.int64).view(1, *shape[1:]).expand(shape)
    r = indexing.apply_index(rows, index)
    c = indexing.apply_index(cols, index)
    return r * per_row + c


def select(m: ShardedModel, targets: Sequence[tuple[str, Any]]) -> list[Entry]:
    """Init targets -> entries, one per storage, in order of first selection (the same
    selectors as a local model: ("parameter", name), ("glob", pattern) or ("module", (path,
    class name, parameter name)))."""
    out: list[Entry] = []

    def add(e: Entry) -> None:
        if e not in out:
            out.append(e)

    for kind, what in targets:
        if kind == "parameter":
            add(m.entry(what, PARAMETER))
        elif kind == "glob":
            matched = [e for n, e in m.by_name.items()
                       if e.kind == PARAMETER and fnmatch.fnmatchcase(n, what)]
            if not matched:
                raise NotFoundError(f"no parameter of {m.id!r} matches {what[:200]!r}",
                                    reason="TENSOR_NOT_FOUND")
            for e in matched:
                add(e)
        elif kind == "module":
            path, cls, param = what
            assert m.skeleton is not None
            sub = spec_lib.get_submodule(m.skeleton, path)
            for mpath, mod in sub.named_modules(prefix=path, remove_duplicate=False):
                if cls and type(mod).__name__ != cls:
                    continue
                prefix = f"{mpath}." if mpath else ""
                for local, p in mod._parameters.items():
                    if p is not None and (not param or local == param):
                        add(m.entry(prefix + local, PARAMETER))
        else:
            raise InvalidArgumentError("an init target has no selector set",
                                       reason="BAD_ARGUMENT")
    if not out:
        raise NotFoundError("the init targets select no parameter", reason="TENSOR_NOT_FOUND")
    return out


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))
