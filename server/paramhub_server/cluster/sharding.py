"""Sharded models as every rank holds them (torch only): plans (FSDP, tensor-parallel styles)
and the placements they give, the region math of any Shard(d) (torch's chunk layout, so uneven
splits match distribute_tensor), entries (one per storage), writes, the element ids a torch
index selects, and init-target selection."""

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
from paramhub.common import pb
from paramhub_server.core import indexing
from paramhub_server.core.types import BUFFER, PARAMETER  # noqa: F401 - re-exported

#: The FSDP-style plan: every tensor on dim 0.
FSDP = "fsdp"

#: torch's tensor-parallel styles (torch.distributed.tensor.parallel's ColwiseParallel and
#: RowwiseParallel): style -> module type -> {parameter: the dim it is sharded on, or None
#: for Replicate}. A module a plan does not name keeps every tensor replicated.
STYLES: dict[str, dict[type[nn.Module], dict[str, int | None]]] = {
    "colwise": {nn.Linear: {"weight": 0, "bias": 0}, nn.Embedding: {"weight": 1}},
    "rowwise": {nn.Linear: {"weight": 1, "bias": None}, nn.Embedding: {"weight": 0}},
}

#: A sharding plan: FSDP, or {module path (fnmatch wildcards per dotted atom): style}.
Plan = str | dict[str, str]


def _bad_plan(why: str, **metadata: str) -> InvalidArgumentError:
    return InvalidArgumentError(why, reason="BAD_SHARD",
                                metadata={k: v[:200] for k, v in metadata.items()})


def parse_plan(text: str) -> Plan:
    """The wire form of a plan (call metadata x-paramhub-shard) -> a plan: "fsdp", or a JSON
    object {module path: "colwise" | "rowwise"}. Raises InvalidArgumentError (BAD_SHARD)."""
    if text == FSDP:
        return FSDP
    import json

    try:
        plan = json.loads(text) if text.lstrip().startswith("{") else None
    except ValueError:
        plan = None
    if not isinstance(plan, dict):
        raise _bad_plan(f"unknown sharding plan {text[:50]!r}; built: 'fsdp', or a JSON object "
                        "{module path: 'colwise' | 'rowwise'}", shard=text[:50])
    for path, style in plan.items():
        if not isinstance(style, str) or style not in STYLES:
            raise _bad_plan(f"module {path[:200]!r}: unknown tensor-parallel style "
                            f"{str(style)[:50]!r}; built: {', '.join(sorted(STYLES))}",
                            module=path, style=str(style)[:50])
    return plan


def plan_text(plan: Plan) -> str:
    """The canonical wire form of a plan (what parse_plan reads)."""
    import json

    return plan if isinstance(plan, str) else json.dumps(plan, sort_keys=True,
                                                         separators=(",", ":"))


def _matches(key: str, path: str) -> bool:
    """Whether a plan key names a module path: fnmatch per dotted atom, as torch's
    parallelize_module matches its plan's keys ("layers.*.w1")."""
    k, p = key.split(".") if key else [], path.split(".") if path else []
    return len(k) == len(p) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p, k))


def plan_dims(skeleton: nn.Module, plan: dict[str, str]) -> dict[int, int | None]:
    """id(tensor) -> the dim a tensor-parallel plan shards it on (None: Replicate), for the
    tensors of the modules the plan names. Raises InvalidArgumentError (BAD_SHARD) for a key
    that names no module, a module type its style does not support, or a storage (tied
    weights) that two entries would place differently."""
    modules = list(skeleton.named_modules(remove_duplicate=False))
    out: dict[int, int | None] = {}
    who: dict[int, str] = {}
    for key, style in plan.items():
        found = [(p, m) for p, m in modules if _matches(key, p)]
        if not found:
            raise _bad_plan(f"the plan names module {key[:200]!r}, which the model does not "
                            "have", module=key)
        for path, mod in found:
            per_type = next((v for t, v in STYLES[style].items() if isinstance(mod, t)), None)
            if per_type is None:
                kinds = " and ".join(f"nn.{t.__name__}" for t in STYLES[style])
                raise _bad_plan(f"module {path[:200]!r} is a {type(mod).__name__}; "
                                f"{style!r} applies to {kinds} only", module=path, style=style)
            for pname, dim in per_type.items():
                t = mod._parameters.get(pname)
                if t is None:
                    continue
                where = f"{path}.{pname}" if path else pname
                if id(t) in out and out[id(t)] != dim:
                    raise _bad_plan(f"{where!r} is tied to {who[id(t)]!r}, which the plan "
                                    "places differently", tensor=where)
                out[id(t)], who[id(t)] = dim, where
    return out


def placement_of(shape: Sequence[int], world: int, dim: int | None = 0
                 ) -> tuple[Shard | Replicate, str]:
    """(placement, why it is replicated or ""): Shard(dim) when that dim has an index for
    every rank, else Replicate (scalars, tiny tensors, dims too small to split)."""
    if dim is None:
        return Replicate(), ""
    if world <= 1:
        return Replicate(), "one rank"
    if len(shape) <= dim:
        return Replicate(), f"{len(shape)}-d: no dim {dim} to split"
    if shape[dim] < world:
        return Replicate(), f"dim {dim} has {shape[dim]} < {world} ranks: replicated"
    return Shard(dim), ""


def placement_text(p: Shard | Replicate) -> str:
    """"shard(d)" or "replicate"."""
    return f"shard({p.dim})" if isinstance(p, Shard) else "replicate"


def local_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the indices of a dim of size `n` that rank holds under Shard (torch.chunk
    layout, which DTensor uses: ceil(n / world) per rank, the last ranks fewer or none)."""
    per = -(-n // world) if n else 0
    start = min(n, per * rank)
    return start, min(n, start + per)


def local_bounds(shape: Sequence[int], p: Shard | Replicate, world: int, rank: int
                 ) -> tuple[int, int]:
    """[start, stop) along the sharded dim that rank holds (the whole dim 0, or 0, 0 for a
    scalar, when replicated)."""
    if isinstance(p, Shard):
        return local_rows(shape[p.dim], world, rank)
    return 0, shape[0] if len(shape) else 0


def local_shape(shape: Sequence[int], p: Shard | Replicate, world: int, rank: int
                ) -> tuple[int, ...]:
    """The shape of rank's part."""
    out = list(shape)
    if isinstance(p, Shard):
        start, stop = local_rows(shape[p.dim], world, rank)
        out[p.dim] = stop - start
    return tuple(out)


def to_local(shape: Sequence[int], p: Shard | Replicate, world: int, rank: int,
             ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, local ids): which of the logical tensor's flat (row-major) `ids` rank holds, and
    their flat ids into rank's (contiguous) part, i.e. `ids[mask]` mapped. For Shard(d) an id is
    (outer, i, inner) with i the index along d; rank holds it when i is in its [start, stop)."""
    if not isinstance(p, Shard):
        return torch.ones(ids.shape, dtype=torch.bool), ids.reshape(-1)
    d = p.dim
    n, inner = shape[d], numel(shape[d + 1:])
    start, stop = local_rows(n, world, rank)
    along = (ids // inner) % n
    mask = (along >= start) & (along < stop)
    g = ids[mask]
    outer, i, k = g // (inner * n), (g // inner) % n, g % inner
    return mask, (outer * (stop - start) + (i - start)) * inner + k


def local_run(shape: Sequence[int], p: Shard | Replicate, world: int, rank: int,
              index: tuple[Any, ...]
              ) -> tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...], slice] | None:
    """For an index of step-1 slices (a box of the logical tensor) whose elements in rank's
    part are one contiguous run of it: (the region's shape, the box in rank's part, the slices
    of the region-shaped value that land there, the run of flat ids into rank's part). None
    for any other index (ints, masks, fancy indexing, steps) or a box that is not one run
    there: those take region_ids + to_local."""
    shape = tuple(shape)
    if (not shape or len(index) > len(shape)
            or not all(isinstance(i, slice) and i.step in (None, 1)
                       and all(b is None or type(b) is int for b in (i.start, i.stop))
                       for i in index)):
        return None
    box = []
    for n, s in zip(shape, tuple(index) + (slice(None),) * (len(shape) - len(index))):
        start, stop, _ = s.indices(n)
        box.append((start, max(start, stop)))
    region = tuple(b - a for a, b in box)
    part, have = list(box), list(shape)
    vsel = [slice(None)] * len(shape)
    if isinstance(p, Shard):
        d = p.dim
        lo, hi = local_rows(shape[d], world, rank)
        a, b = box[d]
        a2 = min(max(a, lo), hi)
        b2 = max(a2, min(b, hi))
        part[d], have[d], vsel[d] = (a2 - lo, b2 - lo), hi - lo, slice(a2 - a, b2 - a)
    lens = [b - a for a, b in part]
    count = numel(lens)
    if count == 0:
        run = slice(0, 0)
    else:
        # One run: the dims after the last partial one are whole, those before it hold 1.
        last = max((i for i in range(len(lens)) if lens[i] != have[i]), default=-1)
        if any(lens[i] != 1 for i in range(last)):
            return None
        start = sum(a * st for (a, _), st in zip(part, contiguous_strides(have)))
        run = slice(start, start + count)
    return region, tuple(slice(a, b) for a, b in part), tuple(vsel), run


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
    #: Why a tensor the plan would shard is replicated ("" otherwise).
    note: str = ""
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
    #: The plan's wire form (plan_text): "fsdp" or a JSON tensor-parallel plan.
    plan: str = FSDP

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


def entries_of(skeleton: nn.Module, world: int, plan: Plan = FSDP) -> list[Entry]:
    """One entry per storage of the skeleton's state_dict (tied names grouped), in order,
    placed by the plan (BAD_SHARD for a plan that does not fit the model)."""
    params = {id(p) for _, p in skeleton.named_parameters(remove_duplicate=False)}
    dims = plan_dims(skeleton, plan) if isinstance(plan, dict) else None
    groups: dict[int, Entry] = {}
    for name, t in skeleton.state_dict(keep_vars=True).items():
        if nn.parameter.is_lazy(t):
            raise InvalidArgumentError(
                f"{name!r} is not initialized (a lazy module); a sharded model needs every "
                "shape at creation", reason="NOT_SHARDABLE", metadata={"tensor": name[:200]})
        e = groups.get(id(t))
        if e is None:
            dim = 0 if dims is None else dims.get(id(t))
            placement, note = placement_of(t.shape, world, dim)
            groups[id(t)] = e = Entry(len(groups), [], PARAMETER if id(t) in params else BUFFER,
                                      t.dtype, tuple(t.shape), placement, note=note)
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
