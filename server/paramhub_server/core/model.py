"""A served model: one torch module, its tensors' versions, and the operations clients run.

Locking: every model has a reader/writer lock. Reads (GetTensor, Forward in eval mode,
describe) share it and copy what they return before releasing it; writes (SetSlice, ApplyInit,
training-mode Forward that updates buffers) hold it alone and compute their result completely
before changing any tensor, so a failed write changes nothing and readers never see half of one.

Gradients: Backward re-runs the pass with autograd under the read lock (several backward passes
compute at once) and accumulates into `.grad` under the write lock; reading or clearing `.grad`
takes the lock like any other read or write.
"""

from __future__ import annotations

import fnmatch
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

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
        self._param_groups = {r.group for r in self._refs.values() if r.kind == PARAMETER}
        #: The model version of the latest committed write to any parameter (Backward refuses
        #: to backpropagate through a Forward that ran before it).
        self.params_written_at = 0
        #: Server-side optimizer and parameter-server state (core/training.py); created lazily.
        self.train_state: Any = None

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
        if any(g in self._param_groups for g in groups):
            self.params_written_at = self.version

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
                may_write: bool = True, seed: int | None = None) -> tuple[Any, int]:
        """Runs the (sub)module on inputs; returns (output moved to CPU, model version).

        A pass that would update buffers (training mode) is a write: with `may_write` False
        (a caller holding only the read role) it is refused with PermissionDeniedError.
        With `seed`, random modules (dropout) draw from a generator seeded with it, so that
        `backward` with the same seed replays the same pass.
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
            replay = rng.seeded_on(seed, self.device) \
                if seed is not None and _draws_random(sub) else nullcontext()
            with lock, torch.no_grad(), replay:
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

    # ----------------------------------------------------------------------------- gradients

    def _grad_params(self, sub: nn.Module, path: str) -> list[tuple[int, nn.Parameter]]:
        """(storage group, Parameter) of every parameter of `sub` that requires grad, once per
        storage, in state_dict order."""
        out: list[tuple[int, nn.Parameter]] = []
        seen: set[int] = set()
        prefix = f"{path}." if path else ""
        for local, p in sub.named_parameters(remove_duplicate=False):
            g = self._refs[prefix + local].group
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


def _mutating(sub: nn.Module) -> list[nn.Module]:
    """Modules under `sub` that a forward pass may write to: in training mode, with buffers."""
    return [m for m in sub.modules() if m.training and any(True for _ in m.buffers(False))]
