"""The local mirror of a served model: a real torch.nn.Module tree on the meta device whose
parameters and buffers are remote handles (STYLE.md §6).

`attach(client, model_id)` makes one DescribeModel call and builds the skeleton from the spec
the server returns, with the same classes, names and shared module objects; tied weights get one
handle per server-side storage. From then on, printing, indexing and listing make no RPC; only
values move, on demand. Calling any module of the tree runs Forward on the server.

Remote autograd: when torch would record a graph (grad mode on, and an input or one of the
module's parameters requires grad), the call goes through `RemoteForward`, a
torch.autograd.Function, so the output has a grad_fn and `loss.backward()` reaches the server:
the Backward RPC replays the Forward with autograd from the inputs it is sent again (and the same
dropout seed) and accumulates `.grad` on the served parameters. The server keeps nothing per
Forward, so a forward whose output is never backpropagated (evaluation without no_grad, a
crashed client) costs no server memory; the price is a second forward pass on the server and
sending the inputs twice, paid only by calls that are backpropagated. With grad mode off (or
nothing requiring grad) a call is the plain Forward of before.

Why ~550 lines: building the mirror (skeleton, handles, root methods) and what calling it does
(Forward, remote autograd, train/zero_grad) are one concept: every module of the tree is bound
to both.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.module import _IncompatibleKeys

from paramhub import _code, _codec, _spec
from paramhub.errors import InvalidArgumentError
from paramhub.tensor import RemoteBuffer, RemoteParameter, _materialize, _Ref, is_remote_tensor
from paramhub.common import pb

if TYPE_CHECKING:
    from paramhub.client import Client, PushResult

__all__ = ["attach", "is_remote", "model_id_of"]

# Module methods that would move or convert tensors locally: on a served model they would
# silently detach the mirror from the server, so they raise and name the alternative.
_LOCAL_ONLY = ("to", "cuda", "cpu", "float", "double", "half", "bfloat16", "type", "to_empty",
               "share_memory", "requires_grad_", "ipu", "xpu", "mtia")


#: A leaf that requires grad, given to every RemoteForward so that its outputs require grad
#: (and reach Backward) even when no input does: the graph's link to the served parameters.
_ANCHOR = torch.zeros((), requires_grad=True)


def _requires_grad(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not is_remote_tensor(x) and x.requires_grad


class _RemoteForward:
    """`module(*args)` -> Forward RPC on the module's path; inputs are sent, outputs fetched.

    When torch would record a graph, the call is a RemoteForward autograd node instead."""

    def __init__(self, client: Client, model_id: str, path: str, module: nn.Module) -> None:
        self.client, self.model_id, self.path = client, model_id, path
        self.module = module
        # Whether the module has parameters that require grad: fixed for a mirror, since
        # requires_grad of a served parameter cannot be changed through its handle.
        self.params_require_grad = any(p.requires_grad for p in module.parameters())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        mirror: _Mirror = self.module._paramhub_mirror
        if mirror.lazy and _has_lazy(self.module):
            # Lazy modules not yet materialized: the pass initializes them on the server from
            # this process's generator (as local torch would); the mirror then re-describes the
            # model (new shapes, LazyLinear -> Linear). This pass records no autograd graph.
            try:
                out, changed = self.client.forward_materializing(
                    self.model_id, _materialize(args), _materialize(kwargs),
                    module_path=self.path)
            except BaseException:
                mirror.refresh()  # a failed pass may have materialized some, as in torch
                raise
            if changed:
                mirror.refresh()
            return out
        if not kwargs and all(type(a) is torch.Tensor for a in args):
            # The common call, net(x) on plain tensors: decided without walking pytrees.
            if torch.is_grad_enabled() and (
                    self.params_require_grad or any(a.requires_grad for a in args)):
                return _autograd_call(self, args, kwargs, plain=True)
            return self.client.forward(self.model_id, *args, module_path=self.path)
        if torch.is_grad_enabled():
            flat_kwargs = tree_flatten(kwargs)[0]
            if any(_requires_grad(x) for x in flat_kwargs):
                raise NotImplementedError(
                    "gradients of keyword inputs of a served module are not supported; pass "
                    "tensors that require grad positionally")
            if self.params_require_grad or any(_requires_grad(x) for x in tree_flatten(args)[0]):
                return _autograd_call(self, args, kwargs)
        return self.client.forward(self.model_id, *_materialize(args), module_path=self.path,
                                   **_materialize(kwargs))


class _Call:
    """What Backward needs to replay one Forward: its inputs, seed and version."""

    def __init__(self, fwd: _RemoteForward, args: tuple[Any, ...], kwargs: dict[str, Any],
                 grad_inputs: list[int]) -> None:
        self.fwd, self.args, self.kwargs, self.grad_inputs = fwd, args, kwargs, grad_inputs
        # Dropout masks are replayed from this seed; Python's generator, so that calling a
        # served module does not advance the caller's torch generator.
        self.seed = random.getrandbits(62)
        self.version = -1
        self.leaves: list[Any] = []
        self.positions: list[int] = []
        self.treespec: Any = None


class RemoteForward(torch.autograd.Function):
    """The autograd node of a served module's call: forward = Forward RPC, backward =
    Backward RPC (which also accumulates the served parameters' .grad)."""

    @staticmethod
    def forward(ctx: Any, call: _Call, anchor: torch.Tensor, *inputs: torch.Tensor) -> Any:
        fwd = call.fwd
        out, call.version = fwd.client.forward_versioned(
            fwd.model_id, call.args, call.kwargs, module_path=fwd.path, seed=call.seed)
        if isinstance(out, torch.Tensor):  # one output: no pytree to keep
            call.leaves, call.treespec, call.positions = [out], None, [0]
        else:
            call.leaves, call.treespec = tree_flatten(out)
            call.positions = [i for i, x in enumerate(call.leaves)
                              if isinstance(x, torch.Tensor)]
        outs = tuple(call.leaves[i] for i in call.positions)
        ctx.mark_non_differentiable(*[o for o in outs
                                      if not (o.is_floating_point() or o.is_complex())])
        ctx.set_materialize_grads(False)
        ctx.call = call
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> Any:
        call: _Call = ctx.call
        fwd = call.fwd
        grads = fwd.client.backward(
            fwd.model_id, call.args, call.kwargs, grad_outputs=list(grad_outputs),
            grad_inputs=call.grad_inputs, forward_model_version=call.version,
            module_path=fwd.path, seed=call.seed)
        return (None, None, *grads)


def _autograd_call(fwd: _RemoteForward, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                   plain: bool = False) -> Any:
    if plain:  # positional plain tensors only (checked by the caller)
        tensors = list(args)
        grad_inputs = [j for j, t in enumerate(tensors) if t.requires_grad]
        call = _Call(fwd, tuple(t.detach() for t in tensors), {}, grad_inputs)
    else:
        args, kwargs = _materialize(args), _materialize(kwargs)
        tensors = [x for x in tree_flatten(args)[0] if isinstance(x, torch.Tensor)]
        grad_inputs = [j for j, t in enumerate(tensors) if t.requires_grad]
        detach = (lambda x: x.detach() if isinstance(x, torch.Tensor) else x)  # noqa: E731
        call = _Call(fwd, tree_map(detach, args), tree_map(detach, kwargs), grad_inputs)
    outs = RemoteForward.apply(call, _ANCHOR, *[tensors[j] for j in grad_inputs])
    if call.treespec is None:
        return outs[0]
    leaves = list(call.leaves)
    for i, o in zip(call.positions, outs):
        leaves[i] = o
    return tree_unflatten(leaves, call.treespec)


class _RemoteZeroGrad:
    """`module.zero_grad(set_to_none=True)` -> one ZeroGrad RPC for the whole subtree."""

    def __init__(self, client: Client, model_id: str, path: str) -> None:
        self.client, self.model_id, self.path = client, model_id, path

    def __call__(self, set_to_none: bool = True) -> None:
        self.client.zero_grad(self.model_id, module_path=self.path, set_to_none=set_to_none)


class _RemoteTrain:
    """`module.train(mode)` -> one SetTrainingMode RPC, then the local flags of the subtree."""

    def __init__(self, client: Client, model_id: str, path: str, module: nn.Module) -> None:
        self.client, self.model_id, self.path = client, model_id, path
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.client.set_training(self.model_id, mode, self.path)
        for m in self.module.modules():
            m.training = mode
        return self.module


def _local_only(name: str) -> Any:
    def method(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{name}() would move a served model's tensors into this process; use net.pull() "
            "for a local copy, or create the model with device=... on the server")
    return method


class RemoteModule(Protocol):
    """What `Client.create_model` and `Client.model` return, for type checkers: the mirror is a
    real torch.nn.Module of the served classes (`type(m) == nn.Linear` holds, `print(net)`,
    `net[0]`, `named_parameters()` and every other nn.Module attribute work, hence
    `__getattr__`), plus these methods on the root. At run time nothing subclasses this."""

    #: The served model's id.
    model_id: str
    #: The Client the mirror calls through.
    paramhub_client: Client

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward on the server (see Client.forward)."""

    def __getattr__(self, name: str) -> Any:
        """Submodules, remote parameters and buffers, and the rest of torch.nn.Module."""

    def pull(self, into: nn.Module | None = None, *, return_version: bool = False) -> Any:
        """A local copy of the model's values (see Client.pull_model)."""

    def push_grads(self, grads: nn.Module | Mapping[str, torch.Tensor], version: int, *,
                   timeout: float | None = None) -> PushResult:
        """Gradients for the server's optimizer (see Client.push_grads)."""

    def configure_training(self, mode: str = "async", *, sync_workers: int = 1,
                           max_staleness: int = 0, stale_policy: str = "reject") -> Any:
        """Parameter-server mode (see Client.configure_training)."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """torch's load_state_dict, as one all-or-nothing write on the server."""

    def named_remote_tensors(self) -> Iterator[tuple[str, Any]]:
        """Every remote parameter and buffer handle, by state_dict name."""

    def watch(self, callback: Any = None, **kwargs: Any) -> Any:
        """The model's write events (see Client.watch)."""

    def batch(self, **kwargs: Any) -> Any:
        """Several writes as one atomic write (see Client.batch)."""


def is_remote(module: nn.Module) -> bool:
    """Whether `module` is (part of) a served model's mirror."""
    return getattr(module, "_paramhub_model_id", None) is not None


def model_id_of(module: nn.Module) -> str:
    """The served model id of a mirror (root or submodule)."""
    model_id = getattr(module, "_paramhub_model_id", None)
    if model_id is None:
        raise InvalidArgumentError(f"{type(module).__name__} is not a served model",
                                   reason="BAD_ARGUMENT")
    return model_id


_LAZY = nn.parameter.UninitializedTensorMixin


class _Mirror:
    """What every module of one mirror shares: the latest description of the served model,
    and whether it still has lazy modules to materialize."""

    def __init__(self, client: Client, model_id: str, root: nn.Module,
                 desc: pb.DescribeModelResponse) -> None:
        self.client, self.model_id, self.root, self.desc = client, model_id, root, desc
        #: Whether some module of the mirror is still lazy (uninitialized tensors, or a lazy
        #: class that its first Forward changes).
        self.lazy = _has_lazy(root)

    def refresh(self) -> None:
        """Re-describes the model after a pass that may have materialized lazy modules: each
        such module of the mirror becomes, in place, what the server's now is (its class, e.g.
        LazyLinear -> Linear, its attributes and new handles), as torch changes it locally."""
        desc = self.client.describe_model(self.model_id)
        fresh = _skeleton(desc)
        still = {n.rpartition(".")[0] for n in list(desc.uninitialized_parameters)
                 + list(desc.uninitialized_buffers)}
        for path, m in self.root.named_modules(remove_duplicate=False):
            own = [t for t in list(m._parameters.values()) + list(m._buffers.values())
                   if isinstance(t, _LAZY)]
            try:
                now = fresh.get_submodule(path)
            except AttributeError:
                continue
            if not (own and path not in still) and not (
                    isinstance(m, LazyModuleMixin) and type(now) is not type(m)):
                continue  # nothing lazy here, or not materialized yet
            installed = {k: v for k, v in m.__dict__.items()
                         if k in _INSTALLED or k.startswith("_paramhub")}
            _strip_lazy_hooks(now)
            m.__class__ = type(now)
            m.__dict__.update({k: v for k, v in now.__dict__.items()
                               if k not in ("_modules", "training")})
            m.__dict__.update(installed)
        _install_handles(self.root, self.client, self.model_id, desc)
        self.desc = desc
        self.lazy = _has_lazy(self.root)


def _skeleton(desc: pb.DescribeModelResponse) -> nn.Module:
    """The described tree on the meta device, lazy modules' tensors uninitialized: built from
    the spec, or (a user-defined module served as code) from the module list."""
    if desc.spec.nodes:
        with torch.device("meta"):
            return _spec.build_module(desc.spec)
    root = _code.build_from_description(desc.modules)
    for names, make in ((desc.uninitialized_parameters, nn.UninitializedParameter),
                        (desc.uninitialized_buffers, nn.UninitializedBuffer)):
        for name in names:
            owner_path, _, local = name.rpartition(".")
            owner = root.get_submodule(owner_path)
            (owner._parameters if make is nn.UninitializedParameter
             else owner._buffers)[local] = make(device="meta")
    return root


#: Attributes `attach` sets on each module of a mirror (kept when a lazy module materializes).
_INSTALLED = {"forward", "train", "zero_grad", *_LOCAL_ONLY}


def _has_lazy(root: nn.Module) -> bool:
    return any(isinstance(t, _LAZY) for t in _all_tensors(root)) or any(
        isinstance(m, LazyModuleMixin) for m in root.modules())


def _strip_lazy_hooks(m: nn.Module) -> None:
    """A lazy module of a mirror must not materialize itself when called (torch's pre-forward
    hook would): the server does, and the mirror re-describes it."""
    for hook in ("_initialize_hook", "_load_hook"):
        if hasattr(m, hook):
            getattr(m, hook).remove()
            delattr(m, hook)


def _all_tensors(root: nn.Module) -> list[torch.Tensor]:
    return [t for m in root.modules() for t in list(m._parameters.values())
            + list(m._buffers.values()) if t is not None]


def _install_handles(root: nn.Module, client: Client, model_id: str,
                     desc: pb.DescribeModelResponse) -> None:
    """Puts a remote handle where each described parameter and buffer is, one per storage;
    handles already in place (a refresh) are kept."""
    handles: dict[int, Any] = {}  # storage group -> handle
    for info in desc.tensors:
        owner_path, _, local = info.name.rpartition(".")
        owner = root.get_submodule(owner_path)
        table = owner._parameters if info.kind == pb.TENSOR_KIND_PARAMETER else owner._buffers
        if local not in table and desc.spec.nodes:  # (a code model's tree starts empty)
            raise InvalidArgumentError(
                f"the served model's {info.name!r} does not exist in the local rebuild; the "
                "client's torch may differ from the server's", reason="BAD_SPEC")
        current = table.get(local)
        if is_remote_tensor(current) and handles.get(info.storage_group) is None:
            handles[info.storage_group] = current
        handle = handles.get(info.storage_group)
        if handle is None:
            dtype = _codec.dtype_from_proto(info.dtype)
            meta = torch.empty(tuple(info.shape), dtype=dtype, device="meta")
            kind = "parameters" if info.kind == pb.TENSOR_KIND_PARAMETER else "buffers"
            ref = _Ref(client, model_id, info.name, kind, torch.device(info.device),
                       info.version, meta.shape)
            handle = (RemoteParameter._make(meta, ref, info.requires_grad)
                      if kind == "parameters" else RemoteBuffer._make(meta, ref))
            handles[info.storage_group] = handle
        table[local] = handle


def attach(client: Client, model_id: str) -> RemoteModule:
    """Builds the mirror of a served model (one DescribeModel call)."""
    desc = client.describe_model(model_id)
    root = _skeleton(desc)
    for m in root.modules():
        _strip_lazy_hooks(m)
    _install_handles(root, client, model_id, desc)
    # Leftover meta tensors would mean the local rebuild has names the server lacks
    # (uninitialized tensors of lazy modules are not described: they have no storage yet).
    described = {t.name for t in desc.tensors}
    extra = [n for n, p in root.named_parameters(remove_duplicate=False)
             if n not in described and not isinstance(p, _LAZY)]
    if extra:
        raise InvalidArgumentError(f"the local rebuild has parameters the server lacks: {extra}",
                                   reason="BAD_SPEC")
    training = {m.path: m.training for m in desc.modules}
    for path, m in root.named_modules(remove_duplicate=False):
        m.training = training.get(path, m.training)
    mirror = _Mirror(client, model_id, root, desc)
    seen: set[int] = set()
    for path, m in root.named_modules(remove_duplicate=False):
        if id(m) in seen:
            continue
        seen.add(id(m))
        m.forward = _RemoteForward(client, model_id, path, m)
        m.train = _RemoteTrain(client, model_id, path, m)
        m.zero_grad = _RemoteZeroGrad(client, model_id, path)
        for name in _LOCAL_ONLY:
            setattr(m, name, _local_only(name))
        m._paramhub_model_id = model_id
        m._paramhub_path = path
        m._paramhub_client = client
        m._paramhub_mirror = mirror
    _install_root_methods(root, client, model_id, mirror)
    return cast(RemoteModule, root)  # an nn.Module with the root methods installed above


def _install_root_methods(root: nn.Module, client: Client, model_id: str,
                          mirror: _Mirror) -> None:
    def storage_names() -> dict[str, str]:
        # state_dict key -> the name its storage is sent under (the storage's first name).
        first: dict[int, str] = {}
        return {t.name: first.setdefault(t.storage_group, t.name) for t in mirror.desc.tensors}

    def pull(into: nn.Module | None = None, *, return_version: bool = False) -> Any:
        """A local nn.Module copy of the served model with its current values.

        All values are read on one consistent version (one PullModel call).

        Args:
            into: a local module of the same structure (e.g. from an earlier pull) to load
                the values into instead of building a new one; reusing it avoids rebuilding.
            return_version: return `(module, version)`, the model version the values were
                read at; pass it to `push_grads` (parameter-server training).

        Raises:
            NotFoundError: the model was deleted.
        """
        tensors, version = client.pull_model(model_id, include_buffers=True)
        storage_name = storage_names()
        if into is None and not mirror.desc.spec.nodes:
            local = _code.build_from_description(mirror.desc.modules)
            made: dict[int, torch.Tensor] = {}
            for info in mirror.desc.tensors:
                owner_path, _, name = info.name.rpartition(".")
                owner = local.get_submodule(owner_path)
                t = made.get(info.storage_group)
                if t is None:
                    t = tensors[storage_name[info.name]]
                    if info.kind == pb.TENSOR_KIND_PARAMETER:
                        t = nn.Parameter(t, requires_grad=info.requires_grad)
                    made[info.storage_group] = t
                (owner._parameters if info.kind == pb.TENSOR_KIND_PARAMETER
                 else owner._buffers)[name] = t
            local.train(root.training)
            return (local, version) if return_version else local
        local = into if into is not None else _spec.build_module(mirror.desc.spec)
        state = {name: tensors[storage_name[name]] for name in local.state_dict().keys()}
        local.load_state_dict(state)
        local.train(root.training)
        return (local, version) if return_version else local

    def push_grads(grads: nn.Module | Mapping[str, torch.Tensor], version: int, *,
                   timeout: float | None = None) -> PushResult:
        """Hands gradients computed locally at model `version` to the server's optimizer.

        `grads` is a local module (its parameters' `.grad`, e.g. the one `pull` returned, after
        `loss.backward()`) or a {parameter name: gradient} dict. What happens depends on the
        model's training mode (`configure_training`): see `PushResult`.

        Raises:
            NotFoundError: the model has no optimizer (create one with paramhub.optim).
            InvalidArgumentError: gradients that do not match the parameters.
        """
        if isinstance(grads, nn.Module):
            grads = {n: p.grad for n, p in grads.named_parameters() if p.grad is not None}
        return client.push_grads(model_id, grads, version, timeout=timeout)

    def configure_training(mode: str = "async", *, sync_workers: int = 1,
                           max_staleness: int = 0, stale_policy: str = "reject") -> Any:
        """Sets how push_grads applies gradients: "async", "sync" (one step per
        `sync_workers` pushes, averaged) or "bounded_staleness" ("reject" or "scale" pushes
        more than `max_staleness` steps old). Returns the stored configuration."""
        return client.configure_training(model_id, mode, sync_workers=sync_workers,
                                         max_staleness=max_staleness, stale_policy=stale_policy)

    def load_state_dict(state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """torch's load_state_dict, as one atomic PushState (all values or none)."""
        if assign:
            raise NotImplementedError("assign=True would replace the served tensors with local "
                                      "ones; load values instead (assign=False)")
        # Lazy modules' uninitialized tensors (None) take the loaded shape, as in torch.
        shapes = {n: None if isinstance(t, _LAZY) else tuple(t.shape)
                  for n, t in root.named_parameters(remove_duplicate=False)}
        shapes.update((n, None if isinstance(t, _LAZY) else tuple(t.shape))
                      for n, t in root.named_buffers(remove_duplicate=False))
        own = list(shapes)
        known = set(own)
        missing = [n for n in own if n not in state_dict]
        unexpected = [k for k in state_dict if k not in known]
        parts = [f"size mismatch for {k}: copying a param with shape "
                 f"{torch.Size(tuple(v.shape))} from checkpoint, the shape in current model is "
                 f"{torch.Size(shapes[k])}." for k, v in state_dict.items()
                 if k in known and shapes[k] is not None
                 and tuple(getattr(v, "shape", ())) != shapes[k]]
        if parts:  # torch's own check, before anything is sent
            raise RuntimeError("Error(s) in loading state_dict for "
                               f"{type(root).__name__}:\n\t" + "\n\t".join(parts))
        if strict and (missing or unexpected):
            if unexpected:
                parts.append("Unexpected key(s) in state_dict: "
                             + ", ".join(f'"{k}"' for k in unexpected) + ". ")
            if missing:
                parts.append("Missing key(s) in state_dict: "
                             + ", ".join(f'"{k}"' for k in missing) + ". ")
            raise RuntimeError("Error(s) in loading state_dict for "
                               f"{type(root).__name__}:\n\t" + "\n\t".join(parts))
        values = {k: v for k, v in state_dict.items() if k in known}
        batch = client._active_batch(model_id)
        if batch is not None:  # inside `with net.batch():` the values join that batch
            params = {n for n, _ in root.named_parameters(remove_duplicate=False)}
            for k, v in values.items():
                batch.set_slice(k, None, v, "assign",
                                kind="parameters" if k in params else "buffers")
        elif values:
            client.push_state(model_id, values)
            if mirror.lazy:  # loading materialized lazy modules' tensors on the server
                mirror.refresh()
        return _IncompatibleKeys(missing, unexpected)

    def named_remote_tensors() -> Iterator[tuple[str, Any]]:
        """(name, handle) for every parameter and buffer, tied names included."""
        yield from root.named_parameters(remove_duplicate=False)
        yield from root.named_buffers(remove_duplicate=False)

    def watch(callback: Any = None, **kwargs: Any) -> Any:
        """`for event in net.watch(): ...`, or `net.watch(callback)`: see Client.watch."""
        return client.watch(model_id, callback, **kwargs)

    def batch(**kwargs: Any) -> Any:
        """`with net.batch(): ...` collects this model's writes into one atomic ApplyBatch
        (the same as `with client.batch(net):`); see Client.batch."""
        return client.batch(model_id, **kwargs)

    root.watch = watch
    root.batch = batch
    root.pull = pull
    root.push_grads = push_grads
    root.configure_training = configure_training
    root.load_state_dict = load_state_dict
    root.named_remote_tensors = named_remote_tensors
    root.paramhub_client = client
    root.model_id = model_id
