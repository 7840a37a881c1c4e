"""Compute on a served model: Forward (under a snapshot, writing buffers only in training mode),
Backward (re-run with autograd, gradients accumulated under the write lock) and ZeroGrad, plus
the device guards for index-taking modules. A mixin of ServedModel."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from paramhub.common import modcode as _code
from paramhub.common import spec as _spec
from paramhub.common.errors import ConflictError, InvalidArgumentError, PermissionDeniedError
from paramhub_server.core import rng
from paramhub_server.core.types import (NO_CONTEXT, PARAMETER, Change, WriteContext,
                                        WriteResult)

log = logging.getLogger(__name__)


class Compute:
    """ServedModel's Forward, Backward and ZeroGrad."""

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
        on_cpu = self.device.type == "cpu"  # inputs arrive decoded on the CPU: nothing to move
        if not on_cpu:
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
            elif seed is not None and self._draws_random(path, sub):
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
                return (out if on_cpu else _to_device(out, torch.device("cpu")), self.version,
                        stale)

    def _draws_random(self, path: str, sub: nn.Module) -> bool:
        """Whether a pass of `sub` (at `path`) in its current modes draws random numbers. The
        modules that could are found once per tree (a pass asked for with a seed, as every
        grad-mode call is, would otherwise walk the whole tree each time); only their modes
        are read per pass."""
        candidates = self._random.get(path)
        if candidates is None:
            candidates = self._random[path] = _random_modules(sub)
        return any(_draws(m) for m in candidates)

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
        wanted = mark_grad_inputs(flat, grad_inputs)
        args = tree_unflatten(flat, treespec)
        kwargs = _to_device(kwargs, self.device)
        params = self._grad_params(sub, path)
        mutating = {f"{mpath}.{n}" if mpath else n: b
                    for mpath, m in sub.named_modules(remove_duplicate=False) if m.training
                    for n, b in m._buffers.items() if b is not None}
        replay = (rng.seeded_on(seed, self.device)
                  if seed is not None and self._draws_random(path, sub) else nullcontext())
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


#: Module classes that draw random numbers in training mode.
_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout, nn.RReLU)


def _random_modules(sub: nn.Module) -> list[nn.Module]:
    """Modules under `sub` that may draw random numbers in training mode: the dropout classes,
    and modules keeping their dropout as a float attribute (RNN/LSTM/GRU, MultiheadAttention)."""
    return [m for m in sub.modules() if isinstance(m, _RANDOM_MODULES)
            or isinstance(getattr(m, "dropout", None), float)]


def _draws_random(sub: nn.Module) -> bool:
    """Whether a pass of `sub` in its current modes draws random numbers (walks the tree;
    ServedModel caches the walk per path)."""
    return any(_draws(m) for m in _random_modules(sub))


def _draws(m: nn.Module) -> bool:
    """Whether `m` (one of `_random_modules`) draws random numbers in its current mode."""
    if not m.training:
        return False
    if isinstance(m, _RANDOM_MODULES):
        return getattr(m, "p", 1.0) != 0
    return bool(m.dropout > 0)



def _run(sub: nn.Module, path: str, args: Any, kwargs: Any, call: Any = None) -> Any:
    """sub(*args, **kwargs), with torch's input errors turned into INVALID_ARGUMENT."""
    try:
        return call(tuple(args), kwargs) if call is not None else sub(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as e:
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidArgumentError(f"forward of {path or 'the model'} failed: {text}",
                                   reason="BAD_INPUT") from None


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


def mark_grad_inputs(flat: list[Any], grad_inputs: Sequence[int]) -> list[torch.Tensor]:
    """Makes the input tensors at `grad_inputs` (positions among the tensors of the flattened
    inputs `flat`, changed in place) leaves that require grad and returns them, in that order;
    INVALID_ARGUMENT for a repeated or out-of-range position or an input that cannot have a
    gradient. Shared by a plain model's Backward and a sharded one's (cluster/compute.py)."""
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
    return wanted
