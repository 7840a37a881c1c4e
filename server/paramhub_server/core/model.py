"""A served model: one torch module, its tensors' versions, and the operations clients run.

Locking: every model has a reader/writer lock. Reads (GetTensor, Forward in eval mode,
describe) share it and copy what they return before releasing it; writes (SetSlice, ApplyInit,
training-mode Forward that updates buffers) hold it alone and compute their result completely
before changing any tensor, so a failed write changes nothing and readers never see half of one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from paramhub import _codec, _spec
from paramhub.errors import (ConflictError, InvalidArgumentError, NotFoundError,
                             PermissionDeniedError)
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub_server.core import inits, rng
from paramhub_server.core.rwlock import RWLock

PARAMETER = "parameter"
BUFFER = "buffer"

SLICE_OPS = ("assign", "add", "sub", "mul", "div")


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

    def __init__(self, model_id: str, module: nn.Module, spec: pb.ModelSpec, device: torch.device
                 ) -> None:
        self.id = model_id
        self.module = module
        self.spec = spec
        self.device = device
        self.lock = RWLock()
        self.version = 0
        self._refs: dict[str, TensorRef] = {}
        groups: dict[int, int] = {}  # id(tensor) -> group number
        for kind, items in ((PARAMETER, module.named_parameters(remove_duplicate=False)),
                            (BUFFER, module.named_buffers(remove_duplicate=False))):
            for name, t in items:
                owner_path, _, local = name.rpartition(".")
                group = groups.setdefault(id(t), len(groups))
                self._refs[name] = TensorRef(name, kind, module.get_submodule(owner_path), local,
                                             group)
        # state_dict order: torch lists each module's parameters then buffers, module by module.
        order = list(module.state_dict(keep_vars=True).keys())
        self._order = [n for n in order if n in self._refs] + [
            n for n in self._refs if n not in set(order)]
        self.versions = [0] * len(groups)

    # ----------------------------------------------------------------------------- metadata

    @property
    def name(self) -> str:
        """Resource name "models/{id}"."""
        return f"models/{self.id}"

    def names(self, *, include_buffers: bool = True) -> list[str]:
        """Every state_dict name (tied duplicates included) in state_dict order."""
        return [n for n in self._order if include_buffers or self._refs[n].kind == PARAMETER]

    def ref(self, name: str, kind: str | None = None) -> TensorRef:
        """The TensorRef of a name; NotFoundError (TENSOR_NOT_FOUND) if there is none."""
        r = self._refs.get(name)
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
             kind: str | None = None) -> ReadResult:
        """A CPU copy of `tensor[index]` (or of its gradient) and the version it was read at."""
        ref = self.ref(name, kind)
        with self.lock.read():
            t = ref.get()
            if grad:
                if ref.kind != PARAMETER or t.grad is None:
                    raise NotFoundError(f"{name!r} has no gradient", reason="GRAD_NOT_SET",
                                        metadata={"model": self.id, "tensor": name[:200]})
                t = t.grad
            region = _codec.apply_index(t.detach(), index)
            # Copy while holding the lock: the bytes are sent after it is released.
            if region.device.type == "cpu":
                out = region.clone() if _shares_memory(region, t) else region
            else:
                out = region.to("cpu")
            return ReadResult(out, self.versions[ref.group])

    # ----------------------------------------------------------------------------- writes

    def _check_expected(self, ref: TensorRef, expected: int | None) -> None:
        if expected is not None and self.versions[ref.group] != expected:
            raise ConflictError(
                f"{ref.name!r} is at version {self.versions[ref.group]}, not {expected}",
                reason="VERSION_MISMATCH",
                metadata={"tensor": ref.name, "version": str(self.versions[ref.group])})

    def _bump(self, groups: Sequence[int]) -> None:
        self.version += 1
        for g in groups:
            self.versions[g] += 1

    def set_slice(self, name: str, index: tuple[Any, ...], op: str, value: torch.Tensor,
                  expected_version: int | None = None, *, kind: str | None = None
                  ) -> tuple[int, int]:
        """`tensor[index] (op)= value`, atomically. Returns (tensor version, model version)."""
        if op not in SLICE_OPS:
            raise InvalidArgumentError(f"unknown slice op {op!r}", reason="BAD_OP")
        ref = self.ref(name, kind)
        with self.lock.write():
            self._check_expected(ref, expected_version)
            t = ref.get().detach()
            region = _codec.apply_index(t, index)
            new = _combine(region, op, value.to(t.device), ref.name)
            with torch.no_grad():
                if not index:
                    t.copy_(new)
                else:
                    t[tuple(i.to(t.device) if isinstance(i, torch.Tensor) else i
                            for i in index)] = new
            self._bump([ref.group])
            return self.versions[ref.group], self.version

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
                        add(self._refs[mprefix + local])
            else:
                raise InvalidArgumentError("an init target has no selector set",
                                           reason="BAD_ARGUMENT")
        if not out:
            raise NotFoundError("the init targets select no parameter", reason="TENSOR_NOT_FOUND")
        return out

    def apply_init(self, targets: Sequence[tuple[str, Any]], scheme_name: str,
                   args: dict[str, Any], seed: int | None,
                   expected_model_version: int | None = None) -> tuple[list[tuple[str, int]], int]:
        """Runs an init scheme over the targets, all or nothing. Returns ([(name, version)],
        model version)."""
        scheme = inits.get_scheme(scheme_name)
        args = scheme.check_args(args)
        refs = self.select(targets)
        with self.lock.write():
            if expected_model_version is not None and self.version != expected_model_version:
                raise ConflictError(f"model {self.id!r} is at version {self.version}, not "
                                    f"{expected_model_version}", reason="VERSION_MISMATCH",
                                    metadata={"version": str(self.version)})
            with rng.seeded(seed):
                new = [scheme.run(r.get(), args) for r in refs]
            with torch.no_grad():
                for r, v in zip(refs, new):
                    r.get().copy_(v)
            self._bump([r.group for r in refs])
            return [(r.name, self.versions[r.group]) for r in refs], self.version

    def set_training(self, path: str, training: bool) -> None:
        """Module.train(training) on the module at `path`."""
        sub = _spec.get_submodule(self.module, path)
        with self.lock.write():
            sub.train(training)

    # ----------------------------------------------------------------------------- forward

    def forward(self, path: str, args: list[Any], kwargs: dict[str, Any], *,
                may_write: bool = True) -> tuple[Any, int]:
        """Runs the (sub)module on inputs; returns (output moved to CPU, model version).

        A pass that would update buffers (training mode) is a write: with `may_write` False
        (a caller holding only the read role) it is refused with PermissionDeniedError.
        """
        sub = _spec.get_submodule(self.module, path)
        args = _to_device(args, self.device)
        kwargs = _to_device(kwargs, self.device)
        # In training mode, modules such as BatchNorm update their buffers: that is a write.
        # The mode is read again under the lock, since SetTrainingMode may have run between.
        while True:
            mutating = _mutating(sub)
            if mutating and not may_write:
                raise PermissionDeniedError(
                    f"Forward of {path or 'the model'} in training mode updates buffers (e.g. "
                    "BatchNorm running stats), which needs the write role; call eval() first",
                    reason="ROLE_TOO_LOW", metadata={"needed": "write"})
            lock = self.lock.write() if mutating else self.lock.read()
            with lock, torch.no_grad():
                if not mutating and _mutating(sub):
                    continue  # switched to training mode meanwhile: retry under the write lock
                # A failed pass must change nothing: keep copies of the buffers it may update.
                saved = [(b, b.clone()) for m in mutating for b in m.buffers(recurse=False)]
                try:
                    out = sub(*args, **kwargs)
                except Exception as e:
                    for b, copy in saved:
                        b.copy_(copy)
                    if not isinstance(e, (RuntimeError, TypeError, ValueError, IndexError,
                                          AssertionError)):
                        raise
                    text = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise InvalidArgumentError(f"forward of {path or 'the model'} failed: {text}",
                                               reason="BAD_INPUT") from None
                if mutating:
                    groups = {self._refs[n].group for n, _ in sub.named_buffers(
                        prefix=path, remove_duplicate=False)}
                    self._bump(sorted(groups))
                return _to_device(out, torch.device("cpu")), self.version


def _mutating(sub: nn.Module) -> list[nn.Module]:
    """Modules under `sub` that a forward pass may write to: in training mode, with buffers."""
    return [m for m in sub.modules() if m.training and any(True for _ in m.buffers(False))]


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
            return value.to(region.dtype).expand(region.shape).clone()
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
