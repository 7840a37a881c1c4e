"""Compute on sharded models, SPMD (torch only, no grpc): Forward, Backward, gradient reads and
ZeroGrad as cluster commands that every rank runs together, and each rank's training state.

How a pass runs. Rank 0 broadcasts the call (inputs, module path, a seed) as one command;
every rank then runs the same module tree on the same inputs. A module's tensors are gathered
to full tensors just before it runs (a forward pre-hook) and dropped when it returns (a forward
hook), FSDP-style: at any moment a rank holds the full tensors of the modules being run, not
the whole model. A gather is DTensor's own `full_tensor()`, so any placement works (Shard(d) on
any dim, Replicate); modules that read their children's tensors without calling them
(MultiheadAttention, the Transformer layers) are gathered as one unit. Every rank computes the
same output, and rank 0's is the answer (nothing else moves).

Backward replays the pass with autograd on every rank (as the plain server does), takes the
gradient of each full parameter and keeps only this rank's part of it: gradients are sharded
like their parameter. While the graph lives, the tensors it saved (the gathered weights) stay
alive, so a pass with grad peaks higher than one without.

The optimizers (torch's, over each rank's parts) are in optim.py; the gRPC handlers are in
compute_service.py.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from paramhub.common.errors import ConflictError, InvalidArgumentError, NotFoundError
from paramhub_server.cluster.commands import command
from paramhub_server.cluster.sharding import PARAMETER, Entry, ShardedModel, contiguous_strides
from paramhub_server.core import rng, training
from paramhub_server.core.compute import _draws_random, mark_grad_inputs

if TYPE_CHECKING:
    from paramhub_server.cluster.engine import Cluster

#: Modules whose forward reads their descendants' tensors without calling them: gathered
#: (with their whole subtree) as one unit.
UNITS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer,
                                      nn.TransformerDecoderLayer)


# ----------------------------------------------------------------------- per-rank state

@dataclass
class RankTraining:
    """A sharded model's training state on one rank: its parts of the gradients and the
    optimizer over its parts of the parameters."""

    #: storage group -> this rank's part of the gradient.
    grads: dict[int, torch.Tensor] = field(default_factory=dict)
    optimizer: training.ServedOptimizer | None = None


def state_of(m: ShardedModel) -> RankTraining:
    """The model's training state on this rank (created on first use; it lives and dies with
    the model object, so a deleted and re-created id starts fresh)."""
    st = m.__dict__.get("_training")
    if st is None:
        st = m.__dict__["_training"] = RankTraining()
    return st


def _model(cluster: Cluster, model_id: str) -> ShardedModel:
    return cluster._model(model_id)


# ----------------------------------------------------------------------- the gathered pass

@dataclass
class Pass:
    """What one gathered pass holds: the parameters' full leaves (for gradients), and the
    bytes of gathered tensors alive now and at most (what a rank paid for the pass)."""

    grad: bool
    leaves: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    live_bytes: int = 0
    peak_bytes: int = 0


def _owned(m: ShardedModel, sub: nn.Module, path: str
           ) -> dict[int, list[tuple[nn.Module, str, str, Entry]]]:
    """id(module) -> [(module, attribute, kind, entry)] of the tensors each module of `sub`
    gathers before it runs: its own, or its whole subtree's for a UNITS module."""
    direct: dict[int, list[tuple[nn.Module, str, str, Entry]]] = {}
    for mpath, mod in sub.named_modules(prefix=path, remove_duplicate=False):
        if id(mod) in direct:
            continue
        prefix = f"{mpath}." if mpath else ""
        mine = []
        for attr, t in mod._parameters.items():
            if t is not None:
                mine.append((mod, attr, PARAMETER, m.by_name[prefix + attr]))
        for attr, t in mod._buffers.items():
            if t is not None and prefix + attr in m.by_name:  # persistent buffers only
                e = m.by_name[prefix + attr]
                mine.append((mod, attr, e.kind, e))
        direct[id(mod)] = mine
    out = dict(direct)
    for mod in sub.modules():
        if isinstance(mod, UNITS):
            out[id(mod)] = [t for d in mod.modules() for t in direct[id(d)]]
    return out


@contextmanager
def gathered(m: ShardedModel, sub: nn.Module, path: str, p: Pass) -> Iterator[None]:
    """Hooks `sub` (a private copy of the skeleton) so that each module's tensors are gathered
    before it runs and dropped after. Every rank must run the same modules in the same order
    (the same code on the same inputs does)."""
    owned = _owned(m, sub, path)
    live: set[tuple[int, str]] = set()
    handles = []

    def pre(mod: nn.Module, _args: Any) -> None:
        mine = []
        for owner, attr, kind, e in owned.get(id(mod), ()):
            key = (id(owner), attr)
            if key in live:
                continue
            assert e.dt is not None
            full = e.dt.full_tensor()
            if kind == PARAMETER:
                full = full.detach().requires_grad_(p.grad)
                if p.grad:
                    p.leaves.append((e.group, full))
                owner._parameters[attr] = full  # type: ignore[assignment]
            else:  # a copy: a training-mode pass does not write the model's buffers
                owner._buffers[attr] = full.clone()
            live.add(key)
            mine.append((owner, attr, kind))
            p.live_bytes += full.numel() * full.element_size()
        p.peak_bytes = max(p.peak_bytes, p.live_bytes)
        mod.__dict__.setdefault("_ph_gathered", []).append(mine)

    def post(mod: nn.Module, _args: Any, _out: Any) -> None:
        for owner, attr, kind in mod.__dict__["_ph_gathered"].pop():
            table = owner._parameters if kind == PARAMETER else owner._buffers
            t = table[attr]
            assert t is not None
            p.live_bytes -= t.numel() * t.element_size()
            table[attr] = _placeholder(t)
            live.discard((id(owner), attr))

    for mod in sub.modules():
        if owned.get(id(mod)):
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _module(m: ShardedModel, path: str) -> nn.Module:
    """Module `path` of the skeleton (MODULE_NOT_FOUND if there is none)."""
    assert m.skeleton is not None
    try:
        return m.skeleton.get_submodule(path) if path else m.skeleton
    except AttributeError:
        raise NotFoundError(f"model {m.id!r} has no module {path[:200]!r}",
                            reason="MODULE_NOT_FOUND",
                            metadata={"model": m.id, "module": path[:200]}) from None


def _submodule(m: ShardedModel, path: str) -> nn.Module:
    """A private copy of module `path` of the skeleton (hooks and gathered tensors go on it,
    never on the skeleton others read)."""
    return copy.deepcopy(_module(m, path))


def _run(m: ShardedModel, path: str, args: Sequence[Any], kwargs: dict[str, Any], seed: int,
         p: Pass) -> Any:
    sub = _submodule(m, path)
    replay = rng.seeded(seed) if _draws_random(sub) else nullcontext()
    try:
        with gathered(m, sub, path, p), replay, torch.set_grad_enabled(p.grad):
            return sub(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as e:
        if _comm_error(e):
            raise
        text = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise InvalidArgumentError(f"forward of {path or 'the model'!r} failed: {text}",
                                   reason="BAD_INPUT") from None


def _comm_error(e: BaseException) -> bool:
    from paramhub_server.cluster.engine import _is_comm_error
    return _is_comm_error(e)


@command("forward")
def _do_forward(cluster: Cluster, model_id: str, path: str, args: list[Any],
                kwargs: dict[str, Any], seed: int) -> tuple[Any, int, int]:
    """(output, model version, peak gathered bytes on this rank): every rank runs the pass."""
    m = _model(cluster, model_id)
    p = Pass(grad=False)
    with torch.inference_mode(False), torch.no_grad():
        out = _run(m, path, args, kwargs, seed, p)
    return (out if cluster.rank == 0 else None), m.version, p.peak_bytes


def forward(cluster: Cluster, model_id: str, path: str, args: list[Any], kwargs: dict[str, Any],
            seed: int | None) -> tuple[Any, int]:
    """Rank 0: Forward of module `path` on every rank; (output, the model version it saw).
    Without a seed, rank 0 draws one, so every rank's dropout masks agree."""
    _module(_model(cluster, model_id), path)  # MODULE_NOT_FOUND before any rank works
    out, version, _ = cluster.run("forward", model_id=model_id, path=path, args=args,
                                  kwargs=kwargs, seed=_seed(seed))
    return out, version


def _seed(seed: int | None) -> int:
    return seed if seed is not None else random.getrandbits(62)


# ----------------------------------------------------------------------- gradients

def _local_part(full: torch.Tensor, e: Entry, cluster: Cluster) -> torch.Tensor:
    """This rank's part of a full tensor laid out like `e` (no communication: every rank
    holds the same full tensor)."""
    return distribute_tensor(full, cluster.mesh, [e.placement], src_data_rank=None).to_local()


@command("backward")
def _do_backward(cluster: Cluster, model_id: str, path: str, args: list[Any],
                 kwargs: dict[str, Any], seed: int, forward_version: int,
                 grad_outputs: list[torch.Tensor | None], grad_inputs: list[int]
                 ) -> tuple[list[torch.Tensor | None], int]:
    """Replays the pass with autograd on every rank; each rank accumulates its part of the
    parameters' gradients. Returns (gradients of the selected inputs, model version)."""
    m = _model(cluster, model_id)
    if m.version != forward_version:
        # Every rank holds the same versions, so every rank refuses alike.
        raise ConflictError(
            f"model {model_id!r} was written after this Forward (version {forward_version}, "
            f"now {m.version}); run the forward pass again", reason="PARAMETERS_CHANGED",
            metadata={"model": model_id, "version": str(m.version)})
    flat, spec = tree_flatten(args)
    wanted = mark_grad_inputs(flat, grad_inputs)
    p = Pass(grad=True)
    with torch.inference_mode(False):
        out = _run(m, path, tree_unflatten(flat, spec), kwargs, seed, p)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if len(grad_outputs) != len(outs):
            raise InvalidArgumentError(
                f"{len(grad_outputs)} output gradients for {len(outs)} output tensors",
                reason="BAD_ARGUMENT")
        pairs = []
        for i, (o, go) in enumerate(zip(outs, grad_outputs)):
            if go is None:
                continue
            if tuple(go.shape) != tuple(o.shape):
                raise InvalidArgumentError(f"gradient of output {i} is {list(go.shape)}, the "
                                           f"output is {list(o.shape)}", reason="BAD_SHAPE")
            if o.requires_grad:
                pairs.append((o, go.to(o.dtype)))
        targets = [t for _, t in p.leaves] + wanted
        grads: list[torch.Tensor | None] = [None] * len(targets)
        if pairs and targets:
            try:
                grads = list(torch.autograd.grad([o for o, _ in pairs], targets,
                                                 [g for _, g in pairs], allow_unused=True))
            except RuntimeError as e:
                if _comm_error(e):
                    raise
                raise InvalidArgumentError(f"backward of {path or 'the model'!r} failed: "
                                           f"{str(e).splitlines()[0][:300]}",
                                           reason="BAD_INPUT") from None
    # A storage gathered twice (a module called twice, tied names) sums its leaves' gradients.
    full: dict[int, torch.Tensor] = {}
    for (g, _), grad in zip(p.leaves, grads[:len(p.leaves)]):
        if grad is not None:
            full[g] = full[g] + grad if g in full else grad
    st = state_of(m)
    with cluster._lock:
        for g, grad in full.items():
            part = _local_part(grad.detach(), m.entries[g], cluster).clone()
            if g in st.grads:
                st.grads[g].add_(part)
            else:
                st.grads[g] = part
    input_grads = grads[len(p.leaves):]
    if cluster.rank != 0:
        return [], m.version
    return [None if x is None else x.detach() for x in input_grads], m.version


def backward(cluster: Cluster, model_id: str, path: str, args: list[Any],
             kwargs: dict[str, Any], *, seed: int | None, forward_version: int,
             grad_outputs: list[torch.Tensor | None], grad_inputs: list[int]
             ) -> tuple[list[torch.Tensor | None], int]:
    _module(_model(cluster, model_id), path)
    return cluster.run("backward", model_id=model_id, path=path, args=args, kwargs=kwargs,
                       seed=_seed(seed), forward_version=forward_version,
                       grad_outputs=grad_outputs, grad_inputs=grad_inputs)


def _full(cluster: Cluster, e: Entry, part: torch.Tensor) -> torch.Tensor:
    """The full tensor of a part laid out like `e` (every rank takes part)."""
    return DTensor.from_local(part, cluster.mesh, [e.placement], run_check=False,
                              shape=torch.Size(e.shape),
                              stride=contiguous_strides(e.shape)).full_tensor()


@command("read_grad")
def _do_read_grad(cluster: Cluster, model_id: str, name: str) -> torch.Tensor | None:
    """The full gradient of a parameter, assembled on rank 0 like a value read."""
    m = _model(cluster, model_id)
    e = m.entry(name, PARAMETER)
    part = state_of(m).grads.get(e.group)
    if part is None:  # the same on every rank: gradients are accumulated by one command
        raise NotFoundError(f"{name[:200]!r} has no gradient", reason="GRAD_NOT_SET",
                            metadata={"model": model_id, "tensor": name[:200]})
    full = _full(cluster, e, part)
    return full if cluster.rank == 0 else None


def read_grad(cluster: Cluster, model_id: str, name: str, kind: str | None,
              index: tuple[Any, ...]) -> torch.Tensor:
    """Rank 0: `parameter.grad[index]` of a sharded model (NOT_FOUND GRAD_NOT_SET without)."""
    from paramhub_server.core import indexing

    m = _model(cluster, model_id)
    e = m.entry(name, kind)
    if e.kind != PARAMETER:
        raise NotFoundError(f"{name[:200]!r} has no gradient", reason="GRAD_NOT_SET",
                            metadata={"model": model_id, "tensor": name[:200]})
    indexing.apply_index(torch.empty(e.shape, dtype=e.dtype, device="meta"), index)
    full = cluster.run("read_grad", model_id=model_id, name=name)
    return indexing.apply_index(full, index).clone()


@command("zero_grad")
def _do_zero_grad(cluster: Cluster, model_id: str, path: str, names: list[str],
                  fill_zeros: bool) -> None:
    m = _model(cluster, model_id)
    if names:
        groups = {m.entry(n, PARAMETER).group for n in names}
    else:
        sub = _module(m, path)
        prefix = f"{path}." if path else ""
        groups = {m.by_name[prefix + n].group
                  for n, _ in sub.named_parameters(remove_duplicate=False)}
    st = state_of(m)
    with cluster._lock:
        for g in groups:
            if g not in st.grads:
                continue
            if fill_zeros:
                st.grads[g].zero_()
            else:
                del st.grads[g]


def zero_grad(cluster: Cluster, model_id: str, path: str, names: Sequence[str],
              fill_zeros: bool) -> None:
    cluster.run("zero_grad", model_id=model_id, path=path, names=list(names),
                fill_zeros=fill_zeros)
