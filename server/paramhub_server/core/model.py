"""A served model: one torch module, its tensors' versions, and the operations clients run.

The tensor table and reads are here; the write engine (plan, then commit) is writes.py, Forward
and Backward are compute.py, and the plain types (writes, results, the journal protocol) types.py.

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
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from paramhub.common import spec as _spec
from paramhub.common import buffers, dtypes
from paramhub.common import state as packing
from paramhub.common.errors import InvalidArgumentError, NotFoundError
from paramhub_server.core import indexing, watch
from paramhub_server.core.rwlock import RWLock
from paramhub_server.core.compute import (Compute, DeviceIndexError, guard_device_indexing,
                                          is_uninitialized, uninitialized_text)
from paramhub_server.core.types import (BUFFER, MAX_RECENT_REQUESTS, MAX_REQUEST_ID, NO_CONTEXT,
                                        PARAMETER, SLICE_OPS, Change, Extra, InitWrite, Journal,
                                        Program, ReadResult, SliceWrite, SnapshotState,
                                        StateHeader, StateManifest, TensorRef, WriteContext,
                                        WriteResult)
from paramhub_server.core.writes import WriteEngine, _shares_memory, region_text

log = logging.getLogger(__name__)

# What other modules import from here (the types live in types.py, writes in writes.py,
# compute in compute.py).
__all__ = ["ServedModel", "BUFFER", "MAX_RECENT_REQUESTS", "MAX_REQUEST_ID", "NO_CONTEXT",
           "PARAMETER", "SLICE_OPS", "Change", "Extra", "InitWrite", "Journal", "Program",
           "ReadResult", "SliceWrite", "SnapshotState", "StateHeader", "StateManifest",
           "TensorRef", "WriteContext", "WriteResult", "DeviceIndexError",
           "guard_device_indexing", "is_uninitialized", "uninitialized_text", "region_text"]


class ServedModel(WriteEngine, Compute):
    """A model held by the server: its tensor table (names, storage groups, versions), reads and
    snapshots; writes come from WriteEngine (writes.py), compute from Compute (compute.py)."""

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
        #: Modules that may draw random numbers in training mode (dropout), per Forward path:
        #: found once per tree like `_buffered`, so a seeded pass reads only their modes.
        self._random: dict[str, list[nn.Module]] = {}
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
        self._random = {}
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
