"""The write engine of a served model: every write (SetSlice, ApplyInit, ApplyBatch, restores,
replays) is planned first (`_plan`: the one op check, every region computed, torch's errors
mapped) and committed after (`_commit`: logged, applied, versions bumped, watchers told), so a
failed write changes nothing and readers never see half of one. A mixin of ServedModel."""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from paramhub.common import spec as _spec
from paramhub.common.errors import ConflictError, InvalidArgumentError, NotFoundError
from paramhub_server.core import indexing, inits, rng, watch
from paramhub_server.core.types import (MAX_RECENT_REQUESTS, NO_CONTEXT, PARAMETER, SLICE_OPS,
                                        Change, Extra, InitWrite, SliceWrite, SnapshotState,
                                        TensorRef, WriteContext, WriteResult)

log = logging.getLogger(__name__)



def check_op(op: str) -> None:
    """The one check of a slice op's name (INVALID_ARGUMENT, reason BAD_OP)."""
    if op not in SLICE_OPS:
        raise InvalidArgumentError(f"unknown slice op {op!r}", reason="BAD_OP")


class WriteEngine:
    """ServedModel's writes (see the module docstring)."""

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
            check_op(w.op)
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
                check_op(w.op)
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
                  ctx: WriteContext = NO_CONTEXT, volatile: bool = False) -> tuple[int, int]:
        """`tensor[index] (op)= value`, atomically. Returns (tensor version, model version).

        `volatile`: `value` is memory another process can still change (a client's shared
        memory). A logged write then never applies it directly: it applies the bytes its value
        file holds, or else a private copy, so the tensor and the log cannot disagree."""
        check_op(op)
        ref = self.ref(name, kind)
        journal = self.journal
        if journal is not None:  # a big whole-tensor value goes to disk before the lock
            stable = journal.prewrite(ref, index, op, value, volatile=volatile)
            if stable is not None:
                value = stable
            elif volatile:
                value = value.clone()
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
