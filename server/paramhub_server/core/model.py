"""A served model: one torch module, its tensors' versions, and the operations clients run.

Locking: every model has a reader/writer lock. Reads (GetTensor, Forward in eval mode,
describe) share it and copy what they return before releasing it; writes (SetSlice, ApplyInit,
ApplyBatch, checkpoint restore, training-mode Forward that updates buffers) hold it alone and
compute their result completely before changing any tensor, so a failed write changes nothing
and readers never see half of one.

Versions: each storage has a version that grows by one with every committed write to it; the
model's version grows by one with every committed write (a batch is one write). Writes may carry
a client request id: a write whose id the model remembers (the last MAX_RECENT_REQUESTS ids) is
not applied again, the original result is returned. With a journal (see store.py) every write is
logged before it is applied, and the remembered ids are persisted with it.

Gradients: Backward re-runs the pass with autograd under the read lock (several backward passes
compute at once) and accumulates into `.grad` under the write lock; reading or clearing `.grad`
takes the lock like any other read or write.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from paramhub.common import modcode as _code
from paramhub.common import spec as _spec
from paramhub.common import buffers, dtypes
from paramhub.common import state as packing
from paramhub.common.errors import (ConflictError, InvalidArgumentError, NotFoundError,
                             PermissionDeniedError)
from paramhub_server.core import indexing, inits, rng, watch
from paramhub_server.core.rwlock import RWLock

log = logging.getLogger(__name__)

PARAMETER = "parameter"
BUFFER = "buffer"

SLICE_OPS = ("assign", "add", "sub", "mul", "div")

#: Request ids remembered per model for idempotent retries (least recently used dropped first).
MAX_RECENT_REQUESTS = 4096
#: Longest accepted request id.
MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class WriteContext:
    """Who asked for a write: the client's request id (for retries) and writer id (for watch)."""

    request_id: str = ""
    writer: str = ""

    def __post_init__(self) -> None:
        if len(self.request_id) > MAX_REQUEST_ID:
            raise InvalidArgumentError(f"request id longer than {MAX_REQUEST_ID} characters",
                                       reason="BAD_REQUEST_ID")


NO_CONTEXT = WriteContext()


@dataclass
class SliceWrite:
    """`tensor[index] (op)= value` as one write of a batch."""

    name: str
    index: tuple[Any, ...]
    op: str
    value: torch.Tensor
    expected_version: int | None = None
    kind: str | None = None


@dataclass
class InitWrite:
    """An init scheme over targets as one write of a batch."""

    targets: list[tuple[str, Any]]
    scheme: str
    args: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    expected_model_version: int | None = None
    #: The client's generator to draw from (when no seed is given); advanced by the draws.
    generator: rng.GeneratorState | None = None


@dataclass(frozen=True)
class Change:
    """A planned (or logged) change: `ref's tensor[index] = value`; () is the whole tensor."""

    ref: TensorRef
    index: tuple[Any, ...]
    value: torch.Tensor


@dataclass
class Program:
    """What an exported program model was built from (kept to persist and rebuild it)."""

    program: bytes  # torch._export.serde JSON
    #: the module tree as the client described it: ModuleInfo messages in their JSON form
    #: (json_format.MessageToDict; the API layer converts)
    tree: list[dict[str, Any]]
    ties: list[tuple[str, str]]  # (state name, the earlier name it is the same tensor as)
    constants: dict[str, torch.Tensor]
    #: state name -> (dtype, shape) of each tensor the program was built with (untied names).
    state: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteResult:
    """What a committed write answered: the RPC kind it came from, [(first name of each
    changed storage, its new version)] in the order the write first touched them, and the new
    model version."""

    rpc: str
    updated: list[tuple[str, int]]
    model_version: int


#: State that is not a tensor of the model but changes with a write and must be logged in the
#: same record (an optimizer step's new optimizer state): (JSON-able header, [(key, tensor)]).
Extra = tuple[dict[str, Any], Sequence[tuple[str, torch.Tensor]]]


class Journal(Protocol):
    """Durability hooks (implemented by store.ModelStore). Called under the model's locks."""

    def log_write(self, model: ServedModel, op: str, rpc: str, changes: Sequence[Change],
                  result: WriteResult, ctx: WriteContext, time_ns: int,
                  extra: Extra | None = None) -> None: ...

    def log_training(self, model: ServedModel, path: str, training: bool) -> None: ...

    def prewrite(self, ref: TensorRef, index: tuple[Any, ...], op: str,
                 value: torch.Tensor) -> None: ...

    def reserve(self, nbytes: int) -> None: ...

    def log_record(self, model: ServedModel, header: dict[str, Any],
                   tensors: Sequence[tuple[str, torch.Tensor]] = ()) -> None: ...

    def after_commit(self, model: ServedModel) -> None: ...

    def snapshot(self, model: ServedModel) -> int: ...

    def prepare_snapshot(self, model: ServedModel, override: SnapshotState | None = None
                         ) -> Any: ...

    def commit_snapshot(self, prepared: Any) -> int: ...


@dataclass(frozen=True)
class SnapshotState:
    """The state a snapshot records instead of the model's current one (a checkpoint restore
    is made durable before it is applied): values by first name, the write's result (new
    versions and model version) and its request id."""

    values: dict[str, torch.Tensor]
    result: WriteResult
    request_id: str


class StateHeader(NamedTuple):
    """One tensor of a state snapshot: its name, wire dtype (DType value) and shape."""

    name: str
    dtype: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StateManifest:
    """What a state snapshot holds: headers (one object per selection while cached), each
    tensor's version, and the model version; the API layer builds the PullState manifest."""

    headers: tuple[StateHeader, ...]
    versions: list[int]
    model_version: int


@dataclass(frozen=True)
class TensorRef:
    """One state_dict name of a model. Tied names share `group` (one storage)."""

    name: str
    kind: str  # PARAMETER or BUFFER
    owner: nn.Module
    local: str
    group: int

    def get(self) -> torch.Tensor:
        """The live tensor object (the Parameter itself for parameters)."""
        table = self.owner._parameters if self.kind == PARAMETER else self.owner._buffers
        t = table[self.local]
        assert t is not None
        return t


@dataclass(frozen=True)
class ReadResult:
    """A copy of (a region of) a tensor and the version it was read at."""

    tensor: torch.Tensor
    version: int


class ServedModel:
    """A model held by the server."""

    def __init__(self, model_id: str, module: nn.Module, spec: _spec.ModelSpec, device: torch.device
                 ) -> None:
        self.id = model_id
        self.module = module
        self.spec = spec
        #: A user-defined module's pickle (paramhub._code); empty for a spec model.
        self.source = b""
        #: An exported program's definition (paramhub._program); None for other models.
        self.program: Program | None = None
        self.device = device
        self.lock = RWLock()
        if device.type == "cuda":
            guard_device_indexing(module)
        self.version = 0
        self._refs: dict[str, TensorRef] = {}
        self._group_of: dict[int, int] = {}  # id(tensor) -> storage group, kept for life
        self.versions: list[int] = []
        #: Names of the parameters and buffers of lazy modules not yet materialized (by their
        #: first Forward): they have no shape and no storage, so they are left out of every
        #: table until then, and `ref` answers torch's own error for them.
        self._uninitialized: dict[str, str] = {}
        self._layouts: dict[tuple[str, ...], Any] = {}
        #: Modules holding buffers, per Forward path (the tree changes only when lazy modules
        #: materialize, which clears this; only the modes are read per pass).
        self._buffered: dict[str, list[nn.Module]] = {}
        self._index()
        self.recent: OrderedDict[str, WriteResult] = OrderedDict()
        self.watchers = watch.WatchHub()
        self.journal: Journal | None = None
        #: The model version of the latest committed write to any parameter (Backward refuses
        #: to backpropagate through a Forward that ran before it).
        self.params_written_at = 0
        #: Server-side optimizer and parameter-server state (core/training.py); created lazily.
        self.train_state: Any = None
        #: Whole-tensor read copies still held by a reader, by storage group: readers of the
        #: same unchanged tensor share one (N slow readers of 256 MiB hold 256 MiB, not N
        #: copies). Weakly held: the copy is freed with its last reader.
        self._shared_reads: dict[int, tuple[Any, int, int, weakref.ref[torch.Tensor]]] = {}

    def _index(self) -> list[str]:
        """(Re)builds the name tables from the module tree; returns the names that were not
        indexed before (those of newly materialized lazy modules). Storage groups and their
        versions are kept: a group number is given once per tensor object."""
        module = self.module
        before = set(self._refs)
        self._refs = {}
        self._uninitialized = {}
        for kind, items in ((PARAMETER, module.named_parameters(remove_duplicate=False)),
                            (BUFFER, module.named_buffers(remove_duplicate=False))):
            for name, t in items:
                if is_uninitialized(t):
                    self._uninitialized[name] = kind
                    continue
                owner_path, _, local = name.rpartition(".")
                group = self._group_of.setdefault(id(t), len(self._group_of))
                self._refs[name] = TensorRef(name, kind, module.get_submodule(owner_path), local,
                                             group)
        self.versions += [0] * (len(self._group_of) - len(self.versions))
        # state_dict order: torch lists each module's parameters then buffers, module by module.
        order = list(module.state_dict(keep_vars=True).keys())
        self._order = [n for n in order if n in self._refs] + [
            n for n in self._refs if n not in set(order)]
        # First name (state_dict order) of every storage, and each storage's rank in that order.
        self._first: dict[int, str] = {}
        for n in self._order:
            self._first.setdefault(self._refs[n].group, n)
        self._group_rank = {g: i for i, g in enumerate(self._first)}
        self._param_groups = {r.group for r in self._refs.values() if r.kind == PARAMETER}
        self._layouts = {}
        self._buffered = {}
        #: Paths of modules that are still of a lazy class (their first Forward changes them).
        self._lazy_paths = {p for p, m in module.named_modules()
                            if isinstance(m, nn.modules.lazy.LazyModuleMixin)}
        return [n for n in self._order if n not in before]

    def materialize_shapes(self, shapes: dict[str, Sequence[int]]) -> list[str]:
        """Materializes lazy modules' uninitialized tensors with the given shapes, as torch's
        load_state_dict does (values not set); returns the names newly indexed. Used by
        PushState and by recovery from a snapshot. Caller holds the write lock (or the model
        is not served yet)."""
        for name, shape in shapes.items():
            owner_path, _, local = name.rpartition(".")
            owner = self.module.get_submodule(owner_path)
            t = owner._parameters.get(local)
            if t is None:
                t = owner._buffers.get(local)
            if t is not None and is_uninitialized(t):
                t.materialize(tuple(shape))
        return self._index()

    # ----------------------------------------------------------------------------- metadata

    @property
    def name(self) -> str:
        """Resource name "models/{id}"."""
        return f"models/{self.id}"

    @property
    def uninitialized(self) -> list[tuple[str, str]]:
        """(name, PARAMETER or BUFFER) of the lazy modules' tensors no Forward materialized."""
        return list(self._uninitialized.items())

    def names(self, *, include_buffers: bool = True) -> list[str]:
        """Every state_dict name (tied duplicates included) in state_dict order."""
        return [n for n in self._order if include_buffers or self._refs[n].kind == PARAMETER]

    def ref(self, name: str, kind: str | None = None) -> TensorRef:
        """The TensorRef of a name; NotFoundError (TENSOR_NOT_FOUND) if there is none."""
        r = self._refs.get(name)
        if r is None and name in self._uninitialized and kind in (None, self._uninitialized[name]):
            raise InvalidArgumentError(uninitialized_text(self.module, name),
                                       reason="UNINITIALIZED_TENSOR",
                                       metadata={"model": self.id, "tensor": name[:200]})
        if r is None or (kind is not None and r.kind != kind):
            what = kind or "parameter or buffer"
            raise NotFoundError(f"model {self.id!r} has no {what} {name[:200]!r}",
                                reason="TENSOR_NOT_FOUND",
                                metadata={"model": self.id, "tensor": name[:200]})
        return r

    def tensor_version(self, name: str) -> int:
        """Current version of a name's storage."""
        return self.versions[self.ref(name).group]

    def stats(self) -> tuple[int, int]:
        """(number of parameter elements, bytes of parameters and buffers), ties counted once."""
        seen: set[int] = set()
        numel = nbytes = 0
        for r in self._refs.values():
            if r.group in seen:
                continue
            seen.add(r.group)
            t = r.get()
            nbytes += t.numel() * t.element_size()
            if r.kind == PARAMETER:
                numel += t.numel()
        return numel, nbytes

    def shared_groups(self) -> list[list[str]]:
        """Every group of two or more names over one storage, in state_dict order."""
        by_group: dict[int, list[str]] = {}
        for n in self._order:
            by_group.setdefault(self._refs[n].group, []).append(n)
        return [names for names in by_group.values() if len(names) > 1]

    def check_shared(self, names: Sequence[str]) -> tuple[bool, list[list[str]]]:
        """Whether all `names` share one storage, and every shared group."""
        if len(names) < 2:
            raise InvalidArgumentError("CheckShared needs two or more names",
                                       reason="BAD_ARGUMENT")
        groups = {self.ref(n).group for n in names}
        return len(groups) == 1, self.shared_groups()

    # ----------------------------------------------------------------------------- reads

    def read(self, name: str, index: tuple[Any, ...], *, grad: bool = False,
             kind: str | None = None,
             alloc: Callable[[torch.dtype, tuple[int, ...]], torch.Tensor] | None = None,
             share: bool = False) -> ReadResult:
        """A contiguous CPU copy of `tensor[index]` (or of its gradient) and its version.

        The copy is made under the read lock (so it never shows half of a write) and is the only
        copy: `alloc(dtype, shape)` may supply its destination (e.g. a shared-memory segment);
        by default it is a fresh CPU tensor, pinned when the model lives on a CUDA device so the
        device-to-host copy runs at full DMA speed. With `share`, a whole-tensor read may return
        the copy another reader still holds (the caller must not change it): N readers of an
        unchanged tensor then hold one copy.
        """
        ref = self.ref(name, kind)
        shared = share and alloc is None and not grad and not index
        with self.lock.read():
            if shared:
                hit = self._shared_read(ref)
                if hit is not None:
                    return hit
            t, region = self._region(ref, index, grad)
            # Copy while holding the lock: the bytes are sent after it is released, so slow
            # network readers never hold writers up.
            if alloc is not None:
                out = alloc(region.dtype, tuple(region.shape))
                out.copy_(region)
            elif region.device.type == "cpu":
                if _shares_memory(region, t) or not region.is_contiguous():
                    out = buffers.empty(region.shape, region.dtype)
                    out.copy_(region)
                else:
                    out = region  # advanced indexing already made a private copy
            else:
                out = torch.empty(region.shape, dtype=region.dtype, pin_memory=True)
                out.copy_(region)
            if shared:
                live = ref.get()
                self._shared_reads[ref.group] = (weakref.ref(live), live._version,
                                                 self.versions[ref.group], weakref.ref(out))
            return ReadResult(out, self.versions[ref.group])

    def _shared_read(self, ref: TensorRef) -> ReadResult | None:
        """The whole-tensor copy another reader still holds, if the tensor has not changed
        since: same tensor object, same torch version counter (every in-place change bumps
        it) and same paramhub version (restores set it). Caller holds the read lock."""
        entry = self._shared_reads.get(ref.group)
        if entry is None:
            return None
        live = ref.get()
        owner, counter, version, copy = entry
        out = copy()
        if (out is None or owner() is not live or counter != live._version
                or version != self.versions[ref.group]):
            return None
        return ReadResult(out, version)

    def read_bytes(self, name: str, index: tuple[Any, ...], *, grad: bool = False,
                   kind: str | None = None,
                   check: Callable[[torch.dtype, tuple[int, ...]], None] | None = None
                   ) -> tuple[bytes, torch.dtype, tuple[int, ...], int]:
        """`tensor[index]` (or its gradient) as (bytes, dtype, shape, version), for small reads:
        the bytes are copied once, under the read lock, with no intermediate tensor.
        `check(dtype, shape)` may refuse the read (raise) before anything is copied."""
        ref = self.ref(name, kind)
        with self.lock.read():
            _, region = self._region(ref, index, grad)
            shape = tuple(region.shape)
            if check is not None:
                check(region.dtype, shape)
            return buffers.tensor_bytes(region), region.dtype, shape, self.versions[ref.group]

    def _region(self, ref: TensorRef, index: tuple[Any, ...], grad: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tensor or its gradient, detached; `[index]` of it). Caller holds the lock."""
        t = ref.get()
        if grad:
            if ref.kind != PARAMETER or t.grad is None:
                raise NotFoundError(f"{ref.name!r} has no gradient", reason="GRAD_NOT_SET",
                                    metadata={"model": self.id, "tensor": ref.name[:200]})
            t = t.grad
        t = t.detach()
        return t, indexing.apply_index(t, index)

    def region_shape(self, name: str, index: tuple[Any, ...], *, kind: str | None = None
                     ) -> tuple[int, ...] | None:
        """The shape `tensor[index]` would have, computed without building it (shapes never
        change after creation, so no lock is needed); None if the index is invalid."""
        return indexing.index_result_shape(tuple(self.ref(name, kind).get().shape), index)

    def select_names(self, names: Sequence[str] = (), *, prefix: str = "", glob: str = "",
                     parameters_only: bool = False) -> list[str]:
        """state_dict keys for a bulk read: `names` in order (checked), else every key passing
        prefix and glob, in state_dict order."""
        if names:
            if len(set(names)) != len(names):
                raise InvalidArgumentError("a name is repeated", reason="DUPLICATE_TENSOR")
            for n in names:
                self.ref(n, PARAMETER if parameters_only else None)
            return list(names)
        return [n for n in self.names(include_buffers=not parameters_only)
                if n.startswith(prefix) and (not glob or fnmatch.fnmatchcase(n, glob))]

    def snapshot_state(self, names: Sequence[str],
                       alloc: Callable[[int], torch.Tensor] | None = None
                       ) -> tuple[StateManifest, torch.Tensor]:
        """Copies many tensors into one buffer laid out by paramhub.common.state.state_layout,
        under one read lock (a consistent snapshot). Returns (the manifest: a header and version
        per tensor and the model version; the buffer).

        `alloc(nbytes)` may supply the uint8 destination (e.g. shared memory).
        """
        refs = [self.ref(n) for n in names]
        with self.lock.read():
            tensors = [r.get() for r in refs]
            versions = self.versions
            # Shapes and dtypes never change after creation: the layout and the headers are
            # built once per selection (the same `headers` object while cached, so the API
            # layer can keep the messages it builds from them).
            key = tuple(names)
            cached = self._layouts.get(key)
            if cached is None:
                if len(self._layouts) > 64:
                    self._layouts.clear()
                headers = tuple(StateHeader(r.name, dtypes.dtype_to_proto(t.dtype),
                                            tuple(t.shape)) for r, t in zip(refs, tensors))
                cached = self._layouts[key] = (headers, packing.state_layout(headers))
            headers, layout = cached
            manifest = StateManifest(headers, [versions[r.group] for r in refs], self.version)
            total = layout[2]
            if alloc is not None:
                buf = alloc(total)
            elif self.device.type == "cuda":
                buf = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            else:
                buf = buffers.empty((total,), torch.uint8)
            with torch.no_grad():
                packing.pack_state(tensors, out=buf, layout=layout)
            return manifest, buf

    def check_state(self, headers: Sequence[Any]) -> list[TensorRef]:
        """Validates a bulk write's manifest against the model before any byte is received."""
        seen: set[str] = set()
        refs = []
        for h in headers:
            if h.name in seen:
                raise InvalidArgumentError(f"{h.name[:200]!r} is pushed twice",
                                           reason="DUPLICATE_TENSOR",
                                           metadata={"tensor": h.name[:200]})
            seen.add(h.name)
            dtype = dtypes.dtype_from_proto(h.dtype)
            shape = dtypes.check_shape(h.shape)
            if h.name in self._uninitialized:
                # A lazy module's tensor takes the loaded shape, as in torch's load_state_dict
                # (materialized under the write lock by load_state).
                owner_path, _, local = h.name.rpartition(".")
                refs.append(TensorRef(h.name, self._uninitialized[h.name],
                                      self.module.get_submodule(owner_path), local, -1))
                continue
            ref = self.ref(h.name)
            t = ref.get()
            if shape != tuple(t.shape):
                raise InvalidArgumentError(
                    f"value for {h.name!r} has shape {list(shape)}, the model's is "
                    f"{list(t.shape)}", reason="BAD_SHAPE", metadata={"tensor": h.name})
            if dtype.is_complex and not t.dtype.is_complex:
                raise InvalidArgumentError(
                    f"cannot copy {dtype} values into {h.name!r} of dtype {t.dtype}",
                    reason="BAD_DTYPE", metadata={"tensor": h.name})
            refs.append(ref)
        return refs

    def load_state(self, refs: Sequence[TensorRef], values: Sequence[torch.Tensor],
                   expected_model_version: int | None = None, *,
                   ctx: WriteContext = NO_CONTEXT) -> tuple[list[tuple[str, int]], int]:
        """Copies values into tensors as one write, all or nothing, under the write lock (torch's
        load_state_dict semantics: Tensor.copy_, which casts dtypes; for tied names pushed
        twice the last value wins). Returns ([(first name of each written storage, its
        version)], model version)."""
        with self.lock.write():
            result = self._recall(ctx, "push_state")
            if result is None:
                self._check_model_expected(expected_model_version)
                lazy = {r.name: tuple(v.shape) for r, v in zip(refs, values) if r.group < 0}
                if lazy:  # lazy modules' tensors: materialized with the loaded shapes first
                    self.materialize_shapes(lazy)
                    refs = [self.ref(r.name) if r.group < 0 else r for r in refs]
                # Cast (and move to the device) first, so nothing changes if any cast fails.
                staged: dict[int, Change] = {}
                for ref, v in zip(refs, values):
                    t = ref.get()
                    try:
                        cast = v.to(device=t.device, dtype=t.dtype)
                    except RuntimeError as e:
                        raise InvalidArgumentError(f"value for {ref.name!r}: "
                                                   f"{str(e).splitlines()[0]}",
                                                   reason="BAD_DTYPE",
                                                   metadata={"tensor": ref.name}) from None
                    staged.pop(ref.group, None)
                    staged[ref.group] = Change(ref, (), cast)
                if not staged:
                    return [], self.version
                if lazy:  # the structure changed: one snapshot instead of a log record
                    result = self._commit_restructured("push_state", "push_state",
                                                       list(staged.values()), ctx)
                else:
                    result = self._commit("push_state", "push_state", list(staged.values()),
                                          ctx)
            return result.updated, result.model_version

    # ----------------------------------------------------------------------------- writes
    #
    # Every write goes through `_plan` (compute the new values without touching any tensor; may
    # fail, changing nothing) and `_commit` (log to the journal, then copy in, bump versions,
    # remember the request id, publish the watch event), both under the write lock.

    def _check_expected(self, ref: TensorRef, expected: int | None) -> None:
        if expected is not None and self.versions[ref.group] != expected:
            raise ConflictError(
                f"{ref.name!r} is at version {self.versions[ref.group]}, not {expected}",
                reason="VERSION_MISMATCH",
                metadata={"tensor": ref.name, "version": str(self.versions[ref.group])})

    def _check_model_expected(self, expected: int | None) -> None:
        if expected is not None and self.version != expected:
            raise ConflictError(f"model {self.id!r} is at version {self.version}, not "
                                f"{expected}", reason="VERSION_MISMATCH",
                                metadata={"version": str(self.version)})

    def _recall(self, ctx: WriteContext, rpc: str) -> WriteResult | None:
        """The result of an already applied write with this request id, if any."""
        if not ctx.request_id:
            return None
        seen = self.recent.get(ctx.request_id)
        if seen is None:
            return None
        if seen.rpc != rpc:
            raise InvalidArgumentError(
                f"request id {ctx.request_id!r} was already used by a {seen.rpc} write",
                reason="REQUEST_ID_REUSED", metadata={"request_id": ctx.request_id})
        self.recent.move_to_end(ctx.request_id)
        return seen

    def remember(self, request_id: str, result: WriteResult) -> None:
        """Records a write's result under its request id (bounded, least recently used out)."""
        if not request_id:
            return
        self.recent[request_id] = result
        self.recent.move_to_end(request_id)
        while len(self.recent) > MAX_RECENT_REQUESTS:
            self.recent.popitem(last=False)

    def _plan(self, writes: Sequence[SliceWrite | InitWrite]) -> list[Change]:
        """The changes `writes` make, in order, computed without modifying any tensor.

        A storage written by several writes of one batch is staged in a copy, so later writes
        see earlier ones; it then becomes one whole-tensor change.
        """
        if len(writes) == 1 and isinstance(writes[0], SliceWrite):
            # The common single write (SetSlice): the general path below without its
            # bookkeeping (no staging or ordering applies to one write).
            w = writes[0]
            if w.op not in SLICE_OPS:
                raise InvalidArgumentError(f"unknown slice op {w.op!r}", reason="BAD_OP")
            ref = self.ref(w.name, w.kind)
            self._check_expected(ref, w.expected_version)
            live = ref.get().detach()
            region = indexing.apply_index(live, w.index)
            return [Change(ref, w.index, _combine(region, w.op, w.value.to(live.device),
                                                  ref.name))]
        resolved: list[tuple[SliceWrite | InitWrite, list[TensorRef]]] = []
        touches: dict[int, int] = {}
        for w in writes:
            if isinstance(w, SliceWrite):
                if w.op not in SLICE_OPS:
                    raise InvalidArgumentError(f"unknown slice op {w.op!r}", reason="BAD_OP")
                refs = [self.ref(w.name, w.kind)]
            else:
                scheme = inits.get_scheme(w.scheme)
                w.args = scheme.check_args(w.args)
                refs = self.select(w.targets)
            resolved.append((w, refs))
            for r in refs:
                touches[r.group] = touches.get(r.group, 0) + 1
        staged: dict[int, tuple[TensorRef, torch.Tensor]] = {}
        changes: list[Change] = []
        for w, refs in resolved:
            if isinstance(w, SliceWrite):
                ref = refs[0]
                self._check_expected(ref, w.expected_version)
                live = ref.get().detach()
                multi = touches[ref.group] > 1
                base = (staged.setdefault(ref.group, (ref, live.clone()))[1] if multi else live)
                region = indexing.apply_index(base, w.index)
                new = _combine(region, w.op, w.value.to(base.device), ref.name)
                if multi:
                    _put(base, w.index, new)
                else:
                    changes.append(Change(ref, w.index, new))
            else:
                self._check_model_expected(w.expected_model_version)
                scheme = inits.get_scheme(w.scheme)
                with (rng.drawing_from(w.generator) if w.generator is not None
                      else rng.seeded(w.seed)):
                    values = [scheme.run(r.get(), w.args) for r in refs]
                for r, v in zip(refs, values):
                    if touches[r.group] > 1:
                        staged.setdefault(r.group, (r, r.get().detach().clone()))[1].copy_(v)
                    else:
                        changes.append(Change(r, (), v))
        for ref, t in staged.values():
            changes.append(Change(ref, (), t))
        # One change per storage; report them in the order the writes first touched them.
        first_touch = {g: i for i, g in enumerate(touches)}  # dicts keep insertion order
        return sorted(changes, key=lambda c: first_touch[c.ref.group])

    def _bump(self, groups: Sequence[int], op: str = "optimizer.step",
              extra: Extra | None = None) -> WriteResult:
        """Commits changes already made in place to these storages (optimizer steps,
        training-mode Forward's buffers): logs their whole values (and `extra`, the optimizer
        state the step changed, in the same record), bumps versions, publishes the watch event.
        Caller holds the write lock."""
        changes = []
        for g in dict.fromkeys(groups):
            ref = self._refs[self._first[g]]
            changes.append(Change(ref, (), ref.get().detach()))
        return self._commit(op, "applied", changes, NO_CONTEXT, applied=True, extra=extra)

    def _commit(self, op: str, rpc: str, changes: Sequence[Change], ctx: WriteContext, *,
                applied: bool = False, extra: Extra | None = None) -> WriteResult:
        """Makes planned changes visible and durable. Caller holds the write lock.

        Order: the journal record first (fsynced under the default policy; if logging fails,
        nothing was applied), then the tensors, versions, request id and watch event.
        `applied` changes are already in the tensors (training-mode Forward's buffers).
        `extra` is logged in the same record (one record per write: replay never sees half).
        """
        groups: list[int] = []  # in the order of `changes`
        for c in changes:
            if c.ref.group not in groups:
                groups.append(c.ref.group)
        result = WriteResult(rpc, [(self._first[g], self.versions[g] + 1) for g in groups],
                             self.version + 1)
        time_ns = time.time_ns()
        if self.journal is not None:
            self.journal.log_write(self, op, rpc, changes, result, ctx, time_ns, extra)
        if not applied:
            for c in changes:
                _put(c.ref.get().detach(), c.index, c.value)
        self.version = result.model_version
        for g in groups:
            self.versions[g] += 1
        if any(g in self._param_groups for g in groups):
            self.params_written_at = self.version
        self.remember(ctx.request_id, result)
        # Subscribing takes the read lock and we hold the write lock: with no watcher now, none
        # can miss this event, and building it is skipped.
        if self.watchers:
            self._publish_write(op, ctx, time_ns, changes, groups)
        if self.journal is not None:
            self.journal.after_commit(self)
        return result

    def _publish_write(self, op: str, ctx: WriteContext, time_ns: int,
                       changes: Sequence[Change], groups: Sequence[int]) -> None:
        by_group: dict[int, list[str]] = {}
        for c in changes:
            by_group.setdefault(c.ref.group, []).append(region_text(c.index))
        self.watchers.publish(watch.Event(
            watch.WRITE, self.version, op=op, writer=ctx.writer, time_ns=time_ns,
            request_id=ctx.request_id,
            changes=tuple(watch.Change(self._first[g], self.versions[g],
                                       by_group[g][0] if len(by_group[g]) == 1 else "[...]")
                          for g in groups)))

    def set_slice(self, name: str, index: tuple[Any, ...], op: str, value: torch.Tensor,
                  expected_version: int | None = None, *, kind: str | None = None,
                  ctx: WriteContext = NO_CONTEXT) -> tuple[int, int]:
        """`tensor[index] (op)= value`, atomically. Returns (tensor version, model version)."""
        if op not in SLICE_OPS:
            raise InvalidArgumentError(f"unknown slice op {op!r}", reason="BAD_OP")
        ref = self.ref(name, kind)
        journal = self.journal
        if journal is not None:  # a big whole-tensor value goes to disk before the lock
            journal.prewrite(ref, index, op, value)
        with self.lock.write():
            result = self._recall(ctx, "set_slice")
            if result is None:
                changes = self._plan([SliceWrite(name, index, op, value, expected_version,
                                                 kind)])
                result = self._commit(f"set_slice.{op}", "set_slice", changes, ctx)
            return (result.updated[0][1] if result.updated else self.versions[ref.group],
                    result.model_version)

    def apply_batch(self, writes: Sequence[SliceWrite | InitWrite],
                    expected_model_version: int | None = None, *,
                    ctx: WriteContext = NO_CONTEXT) -> WriteResult:
        """Applies several writes as one: all or nothing, one model version step, one watch
        event. Per-write expected versions are compared with the versions before the batch."""
        if not writes:
            raise InvalidArgumentError("a batch needs at least one write", reason="EMPTY_BATCH")
        with self.lock.write():
            result = self._recall(ctx, "batch")
            if result is not None:
                return result
            self._check_model_expected(expected_model_version)
            changes = self._plan(writes)
            return self._commit("batch", "batch", changes, ctx)

    def load_tensors(self, values: dict[str, torch.Tensor]) -> None:
        """Copies whole tensors in (used at creation). Every value is checked before any copy."""
        refs = [(self.ref(n), v) for n, v in values.items()]
        for ref, v in refs:
            t = ref.get()
            if tuple(v.shape) != tuple(t.shape) or v.dtype != t.dtype:
                raise InvalidArgumentError(
                    f"value for {ref.name!r} is {tuple(v.shape)} {v.dtype}, the model's is "
                    f"{tuple(t.shape)} {t.dtype}", reason="BAD_VALUE",
                    metadata={"tensor": ref.name})
        with self.lock.write(), torch.no_grad():
            for ref, v in refs:
                ref.get().copy_(v)

    def select(self, targets: Sequence[tuple[str, Any]]) -> list[TensorRef]:
        """Resolves init targets to refs, one per storage, in order of first selection.

        Targets are ("parameter", name), ("glob", pattern) or ("module", (path, class, param)).
        """
        out: list[TensorRef] = []
        seen: set[int] = set()

        def add(ref: TensorRef) -> None:
            if ref.group not in seen:
                seen.add(ref.group)
                out.append(ref)

        for kind, what in targets:
            if kind == "parameter":
                add(self.ref(what))
            elif kind == "glob":
                matched = [self._refs[n] for n in self._order
                           if self._refs[n].kind == PARAMETER and fnmatch.fnmatchcase(n, what)]
                if not matched:
                    raise NotFoundError(f"no parameter of {self.id!r} matches {what[:200]!r}",
                                        reason="TENSOR_NOT_FOUND")
                for r in matched:
                    add(r)
            elif kind == "module":
                path, cls, param = what
                sub = _spec.get_submodule(self.module, path)
                for mpath, m in sub.named_modules(prefix=path, remove_duplicate=False):
                    if cls and type(m).__name__ != cls:
                        continue
                    mprefix = f"{mpath}." if mpath else ""
                    for local, p in m._parameters.items():
                        if p is None or (param and local != param):
                            continue
                        add(self.ref(mprefix + local))
            else:
                raise InvalidArgumentError("an init target has no selector set",
                                           reason="BAD_ARGUMENT")
        if not out:
            raise NotFoundError("the init targets select no parameter", reason="TENSOR_NOT_FOUND")
        return out

    def apply_init(self, targets: Sequence[tuple[str, Any]], scheme_name: str,
                   args: dict[str, Any], seed: int | None,
                   expected_model_version: int | None = None, *,
                   ctx: WriteContext = NO_CONTEXT, generator: rng.GeneratorState | None = None
                   ) -> tuple[list[tuple[str, int]], int]:
        """Runs an init scheme over the targets, all or nothing. Returns ([(name, version)],
        model version). With `generator` (and no seed) the draws come from the client's
        generator state, which then holds the advanced state."""
        scheme = inits.get_scheme(scheme_name)
        args = scheme.check_args(args)
        self.select(targets)
        with self.lock.write():
            result = self._recall(ctx, "apply_init")
            if result is None:
                self._check_model_expected(expected_model_version)
                changes = self._plan([InitWrite(list(targets), scheme_name, args, seed,
                                                generator=generator)])
                result = self._commit(f"apply_init.{scheme_name}", "apply_init", changes, ctx)
            return list(result.updated), result.model_version

    def set_training(self, path: str, training: bool) -> None:
        """Module.train(training) on the module at `path`."""
        sub = _spec.get_submodule(self.module, path)
        with self.lock.write():
            if self.journal is not None:
                self.journal.log_training(self, path, training)
            sub.train(training)

    def watch(self, max_queue: int = 0) -> watch.Watcher:
        """Subscribes to this model's committed writes (first event: STARTED at the current
        version)."""
        with self.lock.read():
            return self.watchers.subscribe(self.version, max_queue)

    def state_entries(self, *, every_name: bool) -> list[tuple[str, torch.Tensor]]:
        """(name, live tensor) in state_dict order: every name (a loadable state_dict, tied
        storages repeated) or each storage once under its first name. Hold a lock while using
        the tensors."""
        names = self._order if every_name else [self._first[g] for g in
                                                sorted(self._group_rank,
                                                       key=self._group_rank.__getitem__)]
        return [(n, self._refs[n].get().detach()) for n in names]

    def training_flags(self) -> dict[str, bool]:
        """Module.training of every module path."""
        return {p: m.training for p, m in self.module.named_modules(remove_duplicate=False)}

    def restore_state(self, values: dict[str, torch.Tensor], versions: dict[str, int],
                      model_version: int, training: dict[str, bool] | None = None) -> None:
        """Loads recovered state (values by first name, versions by first name). Used before
        the model is served, and by checkpoint restore under the write lock."""
        with torch.no_grad():
            for g, name in self._first.items():
                if name in values:
                    self._refs[name].get().detach().copy_(values[name])
                if name in versions:
                    self.versions[g] = int(versions[name])
        self.version = int(model_version)
        for path, flag in (training or {}).items():
            try:
                _spec.get_submodule(self.module, path).training = bool(flag)
            except (NotFoundError, InvalidArgumentError):
                pass

    def replay(self, changes: Sequence[Change], result: WriteResult) -> None:
        """Re-applies a logged write during recovery (no lock, no journal, no event)."""
        with torch.no_grad():
            for c in changes:
                _put(c.ref.get().detach(), c.index, c.value)
        for name, v in result.updated:
            self.versions[self._refs[name].group] = v
        self.version = result.model_version

    def restore_values(self, values: dict[str, torch.Tensor], op: str,
                       expected_model_version: int | None = None, *,
                       ctx: WriteContext = NO_CONTEXT,
                       before_commit: Callable[[], None] | None = None,
                       undo: Callable[[], None] | None = None) -> WriteResult:
        """Replaces every storage's value (checkpoint rollback) as one write. The journal makes
        it durable with a snapshot instead of a (model-sized) log record.

        `before_commit` runs under the write lock once the values are checked, before they are
        applied and the snapshot is written (checkpoint restore installs the checkpoint's
        optimizer there, so the snapshot holds both); it must not fail. `undo` reverts it if
        the snapshot cannot be written."""
        with self.lock.write():
            result = self._recall(ctx, "restore")
            if result is not None:
                return result
            self._check_model_expected(expected_model_version)
            changes = []
            for g, name in self._first.items():
                t = self._refs[name].get()
                v = values.get(name)
                if v is None or tuple(v.shape) != tuple(t.shape) or v.dtype != t.dtype:
                    raise InvalidArgumentError(
                        f"the checkpoint does not match {name!r} {list(t.shape)} {t.dtype}",
                        reason="CHECKPOINT_MISMATCH", metadata={"tensor": name})
                changes.append(Change(self._refs[name], (), v))
            if before_commit is not None:
                before_commit()
            journal = self.journal
            prepared = None
            if journal is not None:
                # Durable before visible: the snapshot of the restored state is written (and
                # fsynced) first; if that fails (a full disk) nothing is applied.
                expect = WriteResult("restore", [(self._first[g], self.versions[g] + 1)
                                                 for g in self._first], self.version + 1)
                try:
                    prepared = journal.prepare_snapshot(
                        self, SnapshotState({c.ref.name: c.value for c in changes}, expect,
                                            ctx.request_id))
                except BaseException:
                    if undo is not None:
                        undo()
                    raise
            self.journal = None
            try:
                result = self._commit(op, "restore", changes, ctx)
            finally:
                self.journal = journal
            if prepared is not None:
                journal.commit_snapshot(prepared)
            return result

    # ----------------------------------------------------------------------------- forward

    def forward(self, path: str, args: list[Any], kwargs: dict[str, Any], *,
                may_write: bool = True, seed: int | None = None,
                generator: rng.GeneratorState | None = None) -> tuple[Any, int, bool]:
        """Runs the (sub)module on inputs; returns (output moved to CPU, model version, whether
        the caller should re-describe the model: the pass materialized lazy modules, or the
        caller sent a `generator` for lazy modules that are no longer there).

        A pass that would update buffers (training mode) is a write: with `may_write` False
        (a caller holding only the read role) it is refused with PermissionDeniedError.
        With `seed`, random modules (dropout) draw from a generator seeded with it, so that
        `backward` with the same seed replays the same pass.

        A pass through lazy modules not yet materialized is a write as well: torch infers their
        shapes from the inputs and initializes them (drawing from `generator`, the client's
        state, when given); the model's structure then changes (`spec` is re-described, the new
        tensors get versions) and the journal writes a snapshot, since its records name tensors
        of a fixed shape. As in torch, lazy modules stay materialized even if a later layer of
        the pass fails.
        """
        sub = _spec.get_submodule(self.module, path)
        args = _to_device(args, self.device)
        kwargs = _to_device(kwargs, self.device) if kwargs else kwargs
        # In training mode, modules such as BatchNorm update their buffers: that is a write.
        # The mode is read again under the lock, since SetTrainingMode may have run between.
        while True:
            buffered = self._buffered.get(path)
            if buffered is None:
                buffered = self._buffered[path] = _with_buffers(sub)
            prefix = f"{path}." if path else ""
            lazy = any(n.startswith(prefix) for n in self._uninitialized) or any(
                p == path or p.startswith(prefix) for p in self._lazy_paths)
            mutating = [m for m in buffered if m.training]
            if (mutating or lazy) and not may_write:
                what = ("materializes lazy modules" if lazy else
                        "in training mode updates buffers (e.g. BatchNorm running stats)")
                raise PermissionDeniedError(
                    f"Forward of {path or 'the model'} {what}, which needs the write role"
                    + ("" if lazy else "; call eval() first"),
                    reason="ROLE_TOO_LOW", metadata={"needed": "write"})
            lock = self.lock.write() if mutating or lazy else self.lock.read()
            if lazy:
                replay: Any = rng.drawing_from(generator)
            elif seed is not None and _draws_random(sub):
                replay = rng.seeded_on(seed, self.device)
            else:
                replay = nullcontext()
            with lock:
                if not (mutating or lazy) and any(m.training for m in buffered):
                    continue  # switched to training mode meanwhile: retry under the write lock
                # A failed pass must change nothing: keep copies of the buffers it may update.
                saved = [(b, b.clone()) for m in mutating for b in m.buffers(recurse=False)
                         if not is_uninitialized(b)]
                try:
                    with torch.no_grad(), replay:
                        out = sub(*args, **kwargs)
                except Exception as e:
                    with torch.no_grad():
                        for b, copy in saved:
                            b.copy_(copy)
                    if lazy:
                        self._materialized([])
                    if not isinstance(e, (RuntimeError, TypeError, ValueError, IndexError,
                                          AssertionError)):
                        raise
                    text = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise InvalidArgumentError(f"forward of {path or 'the model'} failed: {text}",
                                               reason="BAD_INPUT") from None
                names = []
                if mutating:
                    names = sorted({self._first[self._refs[n].group] for n, _ in
                                    sub.named_buffers(prefix=path, remove_duplicate=False)
                                    if n in self._refs},
                                   key=self._order.index)
                if lazy and self._materialized(names):
                    return _to_device(out, torch.device("cpu")), self.version, True
                if mutating:
                    changes = [Change(self._refs[n], (), self._refs[n].get().detach())
                               for n in names]
                    try:
                        self._commit("forward.train", "forward", changes, NO_CONTEXT,
                                     applied=True)
                    except BaseException:  # not logged (a full disk): not applied either
                        for b, copy in saved:
                            b.copy_(copy)
                        raise
                # A caller that sent its generator expected lazy modules here: if there are
                # none left (another client's pass materialized them), it must re-describe.
                stale = generator is not None and not lazy
                return _to_device(out, torch.device("cpu")), self.version, stale

    def _materialized(self, buffers: Sequence[str]) -> bool:
        """After a pass through lazy modules (write lock held): indexes what it materialized,
        re-describes the model and commits the new tensors (and the pass's buffer updates) as
        one write, made durable by a snapshot. Returns whether the structure changed."""
        lazy_before = self._lazy_paths
        new = self._index()
        if not new and self._lazy_paths == lazy_before:
            return False
        names = list(dict.fromkeys(
            [self._first[self._refs[n].group] for n in new] + list(buffers)))
        changes = [Change(self._refs[n], (), self._refs[n].get().detach()) for n in names]
        self._commit_restructured("forward.materialize", "forward", changes, NO_CONTEXT,
                                  applied=True)
        return True

    def _commit_restructured(self, op: str, rpc: str, changes: Sequence[Change],
                             ctx: WriteContext, *, applied: bool = False) -> WriteResult:
        """Commits a write that changed the model's structure (lazy modules materialized):
        re-describes it (spec, or a user-defined module's pickle), and makes it durable with a
        snapshot, since log records name tensors of a fixed shape. Write lock held."""
        if self.source:  # a user-defined module: pickled again, with its new classes/shapes
            self.source = _code.dumps(self.module)[0]
        else:
            try:
                self.spec = _spec.spec_from_module(self.module)
            except InvalidArgumentError:
                # A lazy module loaded but not yet run (torch keeps its lazy class): the old
                # spec stays, and recovery materializes it from the snapshot's shapes.
                log.debug("model %s keeps its spec: lazy modules are partly materialized",
                          self.id)
        journal, self.journal = self.journal, None
        try:
            result = self._commit(op, rpc, changes, ctx, applied=applied)
        finally:
            self.journal = journal
        if journal is not None:
            journal.snapshot(self)
        return result

    # ----------------------------------------------------------------------------- gradients

    def _grad_params(self, sub: nn.Module, path: str) -> list[tuple[int, nn.Parameter]]:
        """(storage group, Parameter) of every parameter of `sub` that requires grad, once per
        storage, in state_dict order."""
        out: list[tuple[int, nn.Parameter]] = []
        seen: set[int] = set()
        prefix = f"{path}." if path else ""
        for local, p in sub.named_parameters(remove_duplicate=False):
            ref = self._refs.get(prefix + local)
            if ref is None:  # a lazy module's parameter the pass did not materialize
                continue
            g = ref.group
            if g not in seen and p.requires_grad:
                seen.add(g)
                out.append((g, p))
        return out

    def backward(self, path: str, args: list[Any], kwargs: dict[str, Any], seed: int | None,
                 forward_version: int, grad_outputs: list[torch.Tensor | None],
                 grad_inputs: Sequence[int]) -> tuple[list[torch.Tensor | None], int]:
        """Re-runs Forward with autograd and backpropagates `grad_outputs`.

        Accumulates into `.grad` of the module's parameters that require grad (as local
        `loss.backward()` does) and returns (gradients of the selected inputs on CPU, model
        version). The pass is replayed, not remembered: the server keeps no state per Forward.
        Buffers updated by a training-mode pass (BatchNorm statistics) are not updated again:
        the replay runs on copies of them.
        """
        sub = _spec.get_submodule(self.module, path)
        flat, treespec = tree_flatten(_to_device(args, self.device))
        positions = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
        if len(set(grad_inputs)) != len(grad_inputs):
            raise InvalidArgumentError("grad_inputs repeats a position", reason="BAD_ARGUMENT")
        wanted: list[torch.Tensor] = []
        for j in grad_inputs:
            if not 0 <= j < len(positions):
                raise InvalidArgumentError(
                    f"grad_inputs position {j} is not one of the {len(positions)} input tensors",
                    reason="BAD_ARGUMENT")
            x = flat[positions[j]]
            if not (x.is_floating_point() or x.is_complex()):
                raise InvalidArgumentError(f"input tensor {j} is {x.dtype}: only floating point "
                                           "inputs have gradients", reason="BAD_DTYPE")
            flat[positions[j]] = x = x.detach().requires_grad_(True)
            wanted.append(x)
        args = tree_unflatten(flat, treespec)
        kwargs = _to_device(kwargs, self.device)
        params = self._grad_params(sub, path)
        mutating = {f"{mpath}.{n}" if mpath else n: b
                    for mpath, m in sub.named_modules(remove_duplicate=False) if m.training
                    for n, b in m._buffers.items() if b is not None}
        replay = rng.seeded_on(seed, self.device) if seed is not None and _draws_random(sub) \
            else nullcontext()
        with self.lock.read():
            if self.params_written_at > forward_version:
                raise ConflictError(
                    f"a parameter of model {self.id!r} was written after this Forward (version "
                    f"{forward_version}, parameters written at {self.params_written_at}); run "
                    "the forward pass again", reason="PARAMETERS_CHANGED",
                    metadata={"model": self.id, "version": str(self.version)})
            with torch.enable_grad(), replay:
                if mutating:
                    copies = {n: b.clone() for n, b in mutating.items()}
                    out = _run(sub, path, args, kwargs,
                               call=lambda a, k: torch.func.functional_call(sub, copies, a, k))
                else:
                    out = _run(sub, path, args, kwargs)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if len(grad_outputs) != len(outs):
                raise InvalidArgumentError(
                    f"{len(grad_outputs)} output gradients for {len(outs)} output tensors",
                    reason="BAD_ARGUMENT")
            pairs = []
            for i, (o, g) in enumerate(zip(outs, grad_outputs)):
                if g is None:
                    continue
                if tuple(g.shape) != tuple(o.shape):
                    raise InvalidArgumentError(
                        f"gradient of output {i} is {list(g.shape)}, the output is "
                        f"{list(o.shape)}", reason="BAD_SHAPE")
                if o.requires_grad:
                    pairs.append((o, g.to(device=o.device, dtype=o.dtype)))
            targets = [p for _, p in params] + wanted
            if pairs and targets:
                try:
                    grads = list(torch.autograd.grad([o for o, _ in pairs], targets,
                                                     [g for _, g in pairs], allow_unused=True))
                except RuntimeError as e:
                    raise InvalidArgumentError(
                        f"backward of {path or 'the model'} failed: {str(e).splitlines()[0]}",
                        reason="BAD_INPUT") from None
            else:
                grads = [None] * len(targets)
            version = self.version
        param_grads, input_grads = grads[:len(params)], grads[len(params):]
        with self.lock.write():
            for (_, p), g in zip(params, param_grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach()
                else:
                    p.grad.add_(g)
        return [None if g is None else g.detach().to("cpu") for g in input_grads], version

    def zero_grad(self, path: str, names: Sequence[str], fill_zeros: bool) -> None:
        """Clears gradients of the named parameters, or else of every parameter of `path`."""
        if names:
            refs = [self.ref(n, PARAMETER) for n in names]
            tensors = {r.group: r.get() for r in refs}
        else:
            sub = _spec.get_submodule(self.module, path)
            prefix = f"{path}." if path else ""
            tensors = {self._refs[prefix + n].group: p
                       for n, p in sub.named_parameters(remove_duplicate=False)}
        with self.lock.write():
            for p in tensors.values():
                if p.grad is None:
                    continue
                if fill_zeros:
                    p.grad.detach_().zero_()
                else:
                    p.grad = None

    def snapshot(self, *, include_buffers: bool) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """CPU copies of every storage (under its first name) read on one version, and that
        version."""
        out: list[tuple[str, torch.Tensor]] = []
        seen: set[int] = set()
        with self.lock.read():
            for n in self._order:
                r = self._refs[n]
                if r.group in seen or (r.kind == BUFFER and not include_buffers):
                    continue
                seen.add(r.group)
                t = r.get().detach()
                out.append((n, t.to("cpu", copy=True) if t.device.type == "cpu"
                            else t.to("cpu")))
            return out, self.version


#: Module classes that draw random numbers in training mode.
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout, nn.RReLU)


def _draws_random(sub: nn.Module) -> bool:
    """Whether a pass of `sub` in its current modes draws random numbers."""
    for m in sub.modules():
        if not m.training:
            continue
        if isinstance(m, _RANDOM_MODULES) and getattr(m, "p", 1.0) != 0:
            return True
        # RNN/LSTM/GRU and MultiheadAttention keep their dropout as a float attribute.
        if isinstance(getattr(m, "dropout", None), float) and m.dropout > 0:
            return True
    return False


def _run(sub: nn.Module, path: str, args: Any, kwargs: Any, call: Any = None) -> Any:
    """sub(*args, **kwargs), with torch's input errors turned into INVALID_ARGUMENT."""
    try:
        return call(tuple(args), kwargs) if call is not None else sub(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidArgumentError(f"forward of {path or 'the model'} failed: {text}",
                                   reason="BAD_INPUT") from None


def _put(t: torch.Tensor, index: tuple[Any, ...], value: torch.Tensor) -> None:
    """`t[index] = value` in place (the whole tensor for an empty index). `t` is a detached
    tensor and `value` is detached here, so autograd records nothing (no grad-mode switch)."""
    if value.requires_grad:
        value = value.detach()
    if not index:
        t.copy_(value)
    elif all(type(i) is int for i in index):  # the common scalar write: no index to move
        t[index] = value.to(t.device)
    else:
        t[tuple(i.to(t.device) if isinstance(i, torch.Tensor) else i
                for i in index)] = value.to(t.device)


def region_text(index: tuple[Any, ...]) -> str:
    """A short torch-style text of an index for watch events, e.g. "[0:2, 3]"."""
    if not index:
        return "[...]"
    parts = []
    for i in index:
        if i is Ellipsis:
            parts.append("...")
        elif i is None:
            parts.append("None")
        elif isinstance(i, slice):
            text = f"{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}"
            parts.append(text + (f":{i.step}" if i.step is not None else ""))
        elif isinstance(i, torch.Tensor):
            parts.append(f"<{str(i.dtype).removeprefix('torch.')} index {list(i.shape)}>")
        else:
            parts.append(str(i))
    return "[" + ", ".join(parts) + "]"


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _combine(region: torch.Tensor, op: str, value: torch.Tensor, name: str) -> torch.Tensor:
    """The new contents of `region` after `op` with `value`, computed without touching it."""
    try:
        if op == "assign":
            if not torch.can_cast(value.dtype, region.dtype):
                raise InvalidArgumentError(
                    f"cannot assign {value.dtype} values into {name!r} of dtype {region.dtype}",
                    reason="BAD_DTYPE")
            cast = value.to(region.dtype)
            if cast.shape == region.shape and not _shares_memory(cast, region):
                return cast  # already a private tensor of the region's shape: no second copy
            return cast.expand(region.shape).clone()
        out = region.clone()
        with torch.no_grad():
            {"add": out.add_, "sub": out.sub_, "mul": out.mul_, "div": out.div_}[op](value)
        return out
    except RuntimeError as e:
        text = str(e).splitlines()[0]
        reason = "BAD_DTYPE" if "cast" in text or "dtype" in text.lower() else "BAD_SHAPE"
        raise InvalidArgumentError(f"{op} into {name!r} {list(region.shape)} {region.dtype} "
                                   f"with {list(value.shape)} {value.dtype}: {text}",
                                   reason=reason) from None


def _with_buffers(sub: nn.Module) -> list[nn.Module]:
    """Modules under `sub` that hold buffers: in training mode, a forward pass may write them."""
    return [m for m in sub.modules() if any(True for _ in m.buffers(False))]


class DeviceIndexError(IndexError):
    """An index a CUDA kernel would assert on (aborting the whole process's CUDA context),
    caught on the host first."""


def _first_arg(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str) -> Any:
    """The argument a module's forward receives as `name` (at `position`), however passed."""
    return args[position] if len(args) > position else kwargs.get(name)


def _int_range(x: Any) -> tuple[int, int] | None:
    """(min, max) of an integer tensor with elements; None for anything else."""
    if (isinstance(x, torch.Tensor) and x.numel() and not x.is_floating_point()
            and not x.is_complex() and x.dtype is not torch.bool):
        return int(x.min()), int(x.max())
    return None


def _check_embedding_input(module: nn.Module, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> None:
    span = _int_range(_first_arg(args, kwargs, 0, "input"))
    if span is not None:
        low, high = span
        if low < 0 or high >= module.num_embeddings:
            raise DeviceIndexError(f"{type(module).__name__} input holds index "
                                   f"{low if low < 0 else high}, outside "
                                   f"[0, {module.num_embeddings})")


def _check_unpool_indices(module: nn.Module, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> None:
    x = _first_arg(args, kwargs, 0, "input")
    indices = _first_arg(args, kwargs, 1, "indices")
    span = _int_range(indices)
    if span is None or not isinstance(x, torch.Tensor):
        return
    dims = {nn.MaxUnpool1d: 1, nn.MaxUnpool2d: 2, nn.MaxUnpool3d: 3}[type(module)]
    try:
        size = nn.functional._unpool_output_size(
            x, module.kernel_size, module.stride, module.padding,
            _first_arg(args, kwargs, 2, "output_size"))
    except (ValueError, TypeError, RuntimeError):
        return  # torch reports a bad output_size itself, before any kernel runs
    limit = math.prod(list(size)[-dims:])
    low, high = span
    if low < 0 or high >= limit:
        raise DeviceIndexError(f"{type(module).__name__} indices hold {low if low < 0 else high},"
                               f" outside [0, {limit})")


def guard_device_indexing(module: nn.Module) -> None:
    """Checks index inputs of Embedding / EmbeddingBag and MaxUnpool before they reach a CUDA
    kernel, whether passed by position or by keyword.

    On CUDA an out-of-range index there is a device-side assert, which aborts every later CUDA
    call of the server process (all models); on the CPU torch raises. The check (one min/max)
    turns it into INVALID_ARGUMENT for the caller alone.
    """
    for m in module.modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            m.register_forward_pre_hook(_check_embedding_input, with_kwargs=True)
        elif type(m) in (nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d):
            m.register_forward_pre_hook(_check_unpool_indices, with_kwargs=True)


def is_uninitialized(t: torch.Tensor) -> bool:
    """Whether `t` is a lazy module's not yet materialized parameter or buffer."""
    return isinstance(t, nn.parameter.UninitializedTensorMixin)


def uninitialized_text(module: nn.Module, name: str) -> str:
    """torch's own error text for using the uninitialized tensor `name` of `module`."""
    owner_path, _, local = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    t = owner._parameters.get(local)
    if t is None:
        t = owner._buffers.get(local)
    try:
        t.detach()  # raises torch's ValueError for an uninitialized tensor
    except ValueError as e:
        return str(e)
    return f"{name!r} is not materialized"
