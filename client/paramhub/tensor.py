"""Remote tensor handles: RemoteParameter, RemoteBuffer and RemoteTensor (a view of either).

(~600 lines, one concept: the torch function table of one handle class; its halves, reads that
fetch and in-place operations that write, dispatch through the same `__torch_function__`.)

A handle is a torch.Tensor subclass backed by a meta tensor (shape and dtype, no memory), so
torch's own code accepts it, and `__torch_function__` decides where each operation runs:

* metadata (shape, dtype, size(), dim(), device, requires_grad, ...) is answered locally;
* basic indexing and view ops (`p.data`, `p.data[0, 1:3]`, `view_as`, `t()`, ...) return a
  lazy RemoteTensor view, as torch returns a view sharing memory;
* in-place operations (`[...] = v`, `+=`, `*=`, `copy_`, `fill_`, `zero_`, `uniform_`,
  `normal_`, `torch.nn.init.*` that torch dispatches) become one atomic server operation; any
  other in-place op (`clamp_`, `exp_`, ...) is a read-modify-write guarded by expected_version
  and retried on conflict, so it is atomic too;
* everything else (repr, comparisons, arithmetic, `abs()`, ...) fetches the values and computes
  locally.

Python turns `w.data[:] += 1` into get-item, in-place add, set-item; the final set-item receives
the view that the in-place add already wrote and is skipped (no second write).
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import _ParameterMeta
from torch.overrides import resolve_name
from torch.utils._pytree import tree_map

from paramhub.errors import ConflictError, NotFoundError, OutOfRangeError

if TYPE_CHECKING:
    from paramhub.client import Client

__all__ = ["RemoteParameter", "RemoteBuffer", "RemoteTensor", "is_remote_tensor"]

_NoTF = torch._C.DisableTorchFunctionSubclass

#: Most elements a write through a composed view may address (its positions are computed
#: locally with an int64 arange of the base's size).
MAX_COMPOSED_WRITE = 1 << 27


@dataclass
class _Ref:
    """What a handle points at on the server."""

    client: Client
    model_id: str
    name: str  # state_dict key of the storage's first name
    kind: str  # "parameters" or "buffers"
    device: torch.device
    version: int
    shape: torch.Size  # of the whole storage

    def seen(self, version: int | None) -> None:
        """Records a version read or written (None: the write joined a batch, not yet sent)."""
        if version is not None:
            self.version = max(self.version, version)


# --------------------------------------------------------------------------------------------
# Operation tables (by torch.overrides.resolve_name)

_T = "torch.Tensor."

# Answered from the meta tensor.
_META = {_T + n for n in (
    "size", "dim", "ndimension", "numel", "nelement", "element_size", "is_floating_point",
    "is_complex", "is_signed", "stride", "is_contiguous", "__len__", "storage_offset",
    "shape.__get__", "dtype.__get__", "ndim.__get__", "layout.__get__", "requires_grad.__get__",
    "is_leaf.__get__", "names.__get__", "is_sparse.__get__", "is_quantized.__get__",
    "is_nested.__get__", "grad_fn.__get__", "itemsize.__get__", "nbytes.__get__",
    "is_mkldnn.__get__", "is_mps.__get__", "is_xpu.__get__", "is_sparse_csr.__get__",
    "_version.__get__", "output_nr.__get__", "_base.__get__", "_is_view",
)}

# Ops that produce a view sharing the handle's memory (recorded lazily, writable).
_VIEW_OPS = {_T + n for n in (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "t", "T.__get__",
    "mT.__get__", "transpose", "permute", "squeeze", "unsqueeze", "narrow", "select",
    "contiguous", "unbind",
)}
# Views that keep every element in row-major order: a write through them is a whole write.
_ORDER_PRESERVING = {_T + n for n in (
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "contiguous")}

_IDENTITY = {_T + "data.__get__", _T + "detach"}

# Factories that only need shape/dtype/device of the handle, never its values.
_LIKE = {_T + n for n in ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")} | {
    "torch.empty_like", "torch.zeros_like", "torch.ones_like", "torch.full_like",
    "torch.rand_like", "torch.randn_like", "torch.randint_like"}

_BINARY_INPLACE = {
    _T + "add_": "add", _T + "__iadd__": "add", _T + "sub_": "sub", _T + "__isub__": "sub",
    _T + "mul_": "mul", _T + "__imul__": "mul", _T + "div_": "div", _T + "__itruediv__": "div",
}

# torch.nn.init functions that torch dispatches to __torch_function__ as one call.
_INIT_FUNCS = {f"torch.nn.init.{n}" for n in (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_")}


def is_remote_tensor(x: Any) -> bool:
    """Whether x is a paramhub handle (RemoteParameter, RemoteBuffer or RemoteTensor)."""
    return isinstance(x, _RemoteMixin)


def _materialize(x: Any) -> Any:
    return tree_map(lambda v: v.fetch() if isinstance(v, _RemoteMixin) else v, x)


def _meta_of(x: Any) -> Any:
    """The meta-device stand-in of a handle (for shape-only computations)."""
    if isinstance(x, _RemoteMixin):
        with _NoTF():
            return torch.Tensor._make_subclass(torch.Tensor, x, False)
    return x


def _is_basic_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice))
               and not isinstance(i, bool) for i in items)


class _RemoteMixin:
    """Behaviour shared by every handle. `_ph_ref` is the storage; `_ph_chain` the view ops
    (func, args, kwargs) that lead from the whole storage to this handle."""

    _ph_ref: _Ref
    _ph_chain: tuple[tuple[Any, tuple[Any, ...], dict[str, Any]], ...]
    _ph_written: bool

    # ---------------------------------------------------------------- public helpers

    @property
    def version(self) -> int:
        """The storage's version as last seen by this client (reads and writes update it)."""
        return self._ph_ref.version

    @property
    def remote_name(self) -> str:
        """state_dict key of the storage this handle points at."""
        return self._ph_ref.name

    def fetch(self) -> torch.Tensor:
        """The current values as a local CPU tensor (one GetTensor call)."""
        return self._fetch()[0]

    # ---------------------------------------------------------------- reads

    def _first_index(self) -> tuple[Any, int]:
        """(index sent to the server, number of chain ops it covers)."""
        if self._ph_chain and resolve_name(self._ph_chain[0][0]) == _T + "__getitem__":
            return self._ph_chain[0][1][0], 1
        return None, 0

    def _fetch(self) -> tuple[torch.Tensor, int]:
        ref = self._ph_ref
        index, covered = self._first_index()
        t, version = ref.client.get_tensor(ref.model_id, ref.name, index, kind=ref.kind)
        ref.seen(version)
        for func, args, kwargs in self._ph_chain[covered:]:
            t = func(t, *args, **kwargs)
        return t, version

    # ---------------------------------------------------------------- writes

    def _write(self, op: str, value: Any, expected_version: int | None = None) -> None:
        """`self (op)= value` as one server operation."""
        ref = self._ph_ref
        value = _materialize(value)
        chain = self._ph_chain
        if not chain or (len(chain) == 1 and (chain[0][0] is torch.Tensor.__getitem__ or
                                              resolve_name(chain[0][0]) == _T + "__getitem__")):
            # The whole tensor or one index (`w.data[0, 0] = 42`): a Python number goes to
            # set_slice as it is, which encodes it without a torch round trip.
            ref.seen(ref.client.set_slice(ref.model_id, ref.name,
                                          chain[0][1][0] if chain else None, value, op,
                                          kind=ref.kind, expected_version=expected_version))
            return
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(value)
        shape = _meta_of(self).shape
        names = [resolve_name(f) for f, _, _ in self._ph_chain]
        if len(self._ph_chain) == 1 and names[0] == _T + "__getitem__":
            index: Any = self._ph_chain[0][1][0]
        elif all(n in _ORDER_PRESERVING for n in names):
            index = None
            value = value.expand(shape).reshape(ref.shape)
        else:
            index, value = self._composed_index(value, shape)
        ref.seen(ref.client.set_slice(ref.model_id, ref.name, index, value, op,
                                           kind=ref.kind, expected_version=expected_version))

    def _composed_index(self, value: torch.Tensor, shape: torch.Size) -> tuple[Any, torch.Tensor]:
        base_shape = self._ph_ref.shape
        n = math.prod(base_shape)
        if n > MAX_COMPOSED_WRITE:
            raise NotImplementedError(
                f"writing through this chain of views of {self._ph_ref.name!r} ({n} elements) "
                "is not supported; index the tensor in one step, e.g. p.data[i, j] = v")
        positions = torch.arange(n).reshape(base_shape)
        for func, args, kwargs in self._ph_chain:
            positions = func(positions, *args, **kwargs)
        index = torch.unravel_index(positions.reshape(-1), base_shape)
        return index, value.expand(shape).reshape(-1)

    def _view(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> RemoteTensor:
        try:
            with _NoTF():
                meta = func(_meta_of(self), *args, **kwargs)
        except IndexError as e:  # checked locally, raised as the server would
            raise OutOfRangeError(str(e), reason="INDEX_OUT_OF_RANGE") from None
        return RemoteTensor._make(meta, self._ph_ref, self._ph_chain + ((func, args, kwargs),))

    def _read_modify_write(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                           ) -> Any:
        """Runs an in-place op locally on fetched values and writes the result back only if
        nobody wrote in between (expected_version); retries on conflict."""
        args, kwargs = _materialize(args), _materialize(kwargs)
        timeout = self._ph_ref.client.timeout
        deadline = time.monotonic() + (timeout if timeout is not None else 60.0)
        attempt = 0
        while True:
            current, version = self._fetch()
            local = current.clone()
            func(local, *args, **kwargs)
            try:
                self._write("assign", local, expected_version=version)
                return self
            except ConflictError:
                attempt += 1
                if time.monotonic() > deadline:
                    raise ConflictError(f"{self._ph_ref.name!r} kept changing during "
                                        f"{getattr(func, '__name__', func)} ({attempt} tries)",
                                        reason="VERSION_MISMATCH") from None
                # Jittered exponential backoff so that contending writers stop colliding.
                time.sleep(random.uniform(0, min(0.05, 0.0005 * 2 ** min(attempt, 10))))

    # ---------------------------------------------------------------- dispatch

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = resolve_name(func) or getattr(func, "__name__", "")
        self = args[0] if args and isinstance(args[0], _RemoteMixin) else None
        if self is not None:
            handler = _HANDLERS.get(name)
            if handler is not None:
                return handler(self, func, args[1:], kwargs)
            if name in _META:
                with _NoTF():  # the handle itself is the meta tensor
                    return func(self, *args[1:], **kwargs)
            if name in _VIEW_OPS:
                if name == _T + "unbind":
                    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                    return tuple(self._view(torch.Tensor.select, (dim, i), {})
                                 for i in range(_meta_of(self).shape[dim]))
                return self._view(func, args[1:], kwargs)
            if name in _IDENTITY:
                # `.data` / `.detach()`: the same storage region, as a plain (non-Parameter) view.
                return RemoteTensor._make(_meta_of(self), self._ph_ref, self._ph_chain)
            if name in _LIKE:
                proxy = torch.empty(_meta_of(self).shape, dtype=_meta_of(self).dtype)
                with _NoTF():
                    return func(proxy, *args[1:], **kwargs)
            if name in _BINARY_INPLACE:
                other = args[1] if len(args) > 1 else kwargs.get("other")
                alpha = kwargs.get("alpha", 1)
                op = _BINARY_INPLACE[name]
                if kwargs.get("rounding_mode") is not None:
                    return self._read_modify_write(func, args[1:], kwargs)
                other = _materialize(other)
                if alpha != 1:
                    other = other * alpha
                self._write(op, other)
                self._ph_written = True
                return self
            if name.endswith("_") and not name.endswith("__") and name.startswith(_T):
                return self._read_modify_write(func, args[1:], kwargs)
        out = kwargs.get("out")
        if isinstance(out, _RemoteMixin):
            local_kwargs = dict(kwargs)
            local_kwargs["out"] = torch.empty(_meta_of(out).shape, dtype=_meta_of(out).dtype)
            with _NoTF():
                func(*_materialize(args), **_materialize(local_kwargs))
            out._write("assign", local_kwargs["out"])
            return out
        if name in _INIT_FUNCS:
            target = kwargs.get("tensor", args[0] if args else None)
            if isinstance(target, _RemoteMixin):
                return _init(target, func, name, args, kwargs)
        if name.endswith("_") and not name.endswith("__") and args and isinstance(
                args[0], (list, tuple)) and any(isinstance(a, _RemoteMixin) for a in args[0]):
            # e.g. torch._foreach_add_(params, ...): running it on fetched copies would drop
            # the writes silently.
            raise NotImplementedError(
                f"{name} on a list of served tensors is not supported; use paramhub.optim for "
                "server-side optimizer steps, or update each tensor (p.data.add_(...))")
        with _NoTF():
            return func(*_materialize(args), **_materialize(kwargs))

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # noqa: D105
        return repr(self.fetch())

    def __reduce_ex__(self, protocol: Any) -> Any:
        # torch.save(net.state_dict(), f) saves the current values as plain local tensors.
        return self.fetch().__reduce_ex__(protocol)

    def __deepcopy__(self, memo: Any) -> Any:
        raise TypeError("paramhub handles cannot be deep-copied; use .fetch() or net.pull()")


def _getitem(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> Any:
    idx = args[0]
    if _is_basic_index(idx):
        # torch returns a view for basic indexing: so do we (lazy, writable).
        return self._view(func, (idx,), {})
    # Advanced indexing copies in torch: fetch now.
    if not self._ph_chain:
        ref = self._ph_ref
        t, version = ref.client.get_tensor(ref.model_id, ref.name, _materialize(idx),
                                           kind=ref.kind)
        ref.seen(version)
        return t
    return self.fetch()[_materialize(idx)]


def _setitem(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> None:
    idx, value = args
    if (isinstance(value, _RemoteMixin) and value._ph_written
            and value._ph_ref is self._ph_ref
            and value._ph_chain[:-1] == self._ph_chain and len(value._ph_chain) > 0
            and resolve_name(value._ph_chain[-1][0]) == _T + "__getitem__"
            and _same_index(value._ph_chain[-1][1][0], idx)):
        # `w[idx] += v` already wrote through the view; Python's final set-item is a no-op.
        value._ph_written = False
        return
    target = self._view(torch.Tensor.__getitem__, (idx,), {}) if _is_basic_index(idx) else None
    if target is not None:
        target._write("assign", value)
        return
    if not self._ph_chain:
        self._write_index(idx, value)
        return
    # An advanced index into a view: compose the positions it addresses in the storage.
    ref = self._ph_ref
    if math.prod(ref.shape) > MAX_COMPOSED_WRITE:
        raise NotImplementedError(
            f"writing through this chain of views of {ref.name!r} is not supported; index the "
            "tensor in one step, e.g. p.data[mask] = v")
    positions = torch.arange(math.prod(ref.shape)).reshape(ref.shape)
    for f, a, k in self._ph_chain:
        positions = f(positions, *a, **k)
    positions = positions[_materialize(idx)]
    value_t = _materialize(value)
    value_t = value_t if isinstance(value_t, torch.Tensor) else torch.tensor(value_t)
    ref.seen(ref.client.set_slice(
        ref.model_id, ref.name, torch.unravel_index(positions.reshape(-1), ref.shape),
        value_t.expand(positions.shape).reshape(-1), "assign", kind=ref.kind))


def _write_index(self: _RemoteMixin, idx: Any, value: Any) -> None:
    ref = self._ph_ref
    # A Python number goes as it is (set_slice encodes it without a torch round trip).
    ref.seen(ref.client.set_slice(ref.model_id, ref.name, _materialize(idx), _materialize(value),
                                  "assign", kind=ref.kind))


_RemoteMixin._write_index = _write_index  # type: ignore[attr-defined]


def _same_index(a: Any, b: Any) -> bool:
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return len(a) == len(b) and all(
        (x is y) or (not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor)
                     and x == y) for x, y in zip(a, b))


def _data_set(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> None:
    value = args[0]
    if (isinstance(value, _RemoteMixin) and value._ph_ref is self._ph_ref
            and value._ph_chain == self._ph_chain and value._ph_written):
        # `p.data *= mask` wrote already; Python's final `p.data = <that view>` is a no-op.
        value._ph_written = False
        return
    if isinstance(value, _RemoteMixin) and value._ph_ref is self._ph_ref:
        return
    meta = _meta_of(self)
    value = _materialize(value)
    if tuple(value.shape) != tuple(meta.shape):
        raise NotImplementedError(
            f"assigning .data of another shape ({tuple(value.shape)} into {tuple(meta.shape)}) "
            "would change the served model's structure; create a new model instead")
    self._write("assign", value)


def _grad_get(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> torch.Tensor | None:
    ref = self._ph_ref
    if ref.kind != "parameters":
        return None
    try:
        t, _ = ref.client.get_tensor(ref.model_id, ref.name, grad=True, kind=ref.kind)
    except NotFoundError as e:
        if e.reason == "GRAD_NOT_SET":
            return None
        raise
    index, covered = self._first_index()
    if index is not None:
        t = t[index]
    for f, a, k in self._ph_chain[covered:]:
        t = f(t, *a, **k)
    return t


def _device_get(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> torch.device:
    return self._ph_ref.device


def _is_cuda(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> bool:
    return self._ph_ref.device.type == "cuda"


def _is_cpu(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> bool:
    return self._ph_ref.device.type == "cpu"


def _false(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return False


def _get_device(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> int:
    d = self._ph_ref.device
    return d.index if d.type == "cuda" and d.index is not None else -1


def _hash(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    return id(self)


def _copy(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self._write("assign", args[0])
    self._ph_written = True
    return self


def _fill(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self._write("assign", args[0] if args else kwargs["value"])
    self._ph_written = True
    return self


def _zero(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    self._write("assign", 0)
    self._ph_written = True
    return self


#: Init schemes that draw random numbers (the others write constants).
_RANDOM_SCHEMES = {"uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
                   "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_"}


def _random_(scheme: str, names: tuple[str, ...]) -> Callable[..., Any]:
    """Tensor.uniform_ / normal_ (`p.data.normal_(0, 0.01)`): the scheme of the same name,
    drawing from the caller's generator (see `_run_init`)."""
    def handler(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Any:
        kwargs = dict(kwargs)
        generator = kwargs.pop("generator", None)
        init_args = dict(zip(names, args))
        # Tensor.uniform_ calls its bounds from/to; the init scheme calls them a/b.
        init_args.update({{"from": "a", "to": "b"}.get(k, k): v for k, v in kwargs.items()})
        return _run_init(self, scheme, getattr(nn.init, scheme), init_args, generator)
    return handler


def _init(self: _RemoteMixin, func: Any, name: str, args: tuple[Any, ...],
          kwargs: dict[str, Any]) -> Any:
    """torch.nn.init.X_(handle, ...): see `_run_init`."""
    # torch dispatches with the tensor both positionally and as a keyword (tensor=...), and the
    # caller's other arguments positionally or by keyword: merge them by the signature.
    params = list(inspect.signature(func).parameters)
    merged = dict(zip(params, args))
    merged.update(kwargs)
    merged.pop("tensor", None)
    generator = merged.pop("generator", None)
    return _run_init(self, name.rsplit(".", 1)[1], func, merged, generator)


def _run_init(self: _RemoteMixin, scheme: str, func: Any, init_args: dict[str, Any],
              generator: torch.Generator | None) -> Any:
    """Runs an init scheme on a served tensor so that it draws exactly what local torch draws
    from the caller's generator (the default one, or `generator=`), and advances it as torch
    would.

    The whole tensor, outside a batch: one ApplyInit carrying the generator's state; the server
    draws from it on the CPU and returns the advanced state, which is set back. A region
    (`p.data[0]`), a write inside `with net.batch():`, a generator that is not a CPU generator,
    or sparse_ with an explicit generator (torch draws its permutation from the default
    generator even then): the scheme runs here on a CPU tensor of the region's shape, and the
    values are written in one write.
    """
    ref = self._ph_ref
    gen = generator if generator is not None else torch.default_generator
    random = scheme in _RANDOM_SCHEMES
    local = (bool(self._ph_chain) or ref.client._active_batch(ref.model_id) is not None
             or gen.device.type != "cpu" or (scheme == "sparse_" and generator is not None))
    if local:
        meta = _meta_of(self)
        work = torch.empty(meta.shape, dtype=meta.dtype)
        with torch.no_grad():
            if random:
                func(work, **init_args, generator=generator)
            else:
                func(work, **init_args)
        self._write("assign", work)
        return self
    from paramhub.v1 import parameter_service_pb2 as pb

    resp = ref.client.apply_init(ref.model_id, scheme, [pb.InitTarget(parameter=ref.name)],
                                 {k: v for k, v in init_args.items() if v is not None},
                                 generator=gen if random else None)
    for u in resp.updated if resp is not None else ():
        if u.name == ref.name:
            ref.seen(u.version)
    return self


def _unsupported(what: str) -> Callable[..., Any]:
    def handler(self: _RemoteMixin, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Any:
        raise NotImplementedError(what)
    return handler


_HANDLERS: dict[str, Callable[..., Any]] = {
    _T + "__getitem__": _getitem,
    _T + "__setitem__": _setitem,
    _T + "data.__set__": _data_set,
    _T + "grad.__get__": _grad_get,
    _T + "device.__get__": _device_get,
    _T + "is_cuda.__get__": _is_cuda,
    _T + "is_cpu.__get__": _is_cpu,
    _T + "is_meta.__get__": _false,
    _T + "get_device": _get_device,
    _T + "__hash__": _hash,
    _T + "copy_": _copy,
    _T + "fill_": _fill,
    _T + "zero_": _zero,
    _T + "uniform_": _random_("uniform_", ("a", "b")),
    _T + "normal_": _random_("normal_", ("mean", "std")),
    _T + "requires_grad_": _unsupported(
        "requires_grad of a served parameter is set on the server, not through a handle"),
    _T + "grad.__set__": _unsupported("gradients of served parameters live on the server"),
    _T + "share_memory_": _unsupported("served tensors live on the server"),
    _T + "resize_": _unsupported("resizing would change the served model's structure"),
    _T + "set_": _unsupported("set_ would change the served model's structure"),
}


class _RemoteParameterMeta(_ParameterMeta):
    # `print(type(p))` shows torch's Parameter, as in local torch (the seed walkthrough prints
    # it); isinstance(p, nn.Parameter) holds because RemoteParameter subclasses it.
    def __repr__(cls) -> str:
        return "<class 'torch.nn.parameter.Parameter'>"


class RemoteParameter(_RemoteMixin, nn.Parameter, metaclass=_RemoteParameterMeta):
    """A served nn.Parameter. One object per server-side storage, so tied weights are `is`."""

    @classmethod
    def _make(cls, meta: torch.Tensor, ref: _Ref, requires_grad: bool) -> RemoteParameter:
        obj = torch.Tensor._make_subclass(cls, meta, requires_grad)
        obj._ph_ref, obj._ph_chain, obj._ph_written = ref, (), False
        return obj

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # noqa: D105
        with _NoTF():
            requires_grad = torch.Tensor.requires_grad.__get__(self)
        return repr(nn.Parameter(self.fetch(), requires_grad=requires_grad))


class RemoteBuffer(_RemoteMixin, torch.Tensor):
    """A served buffer (e.g. BatchNorm's running_mean)."""

    @classmethod
    def _make(cls, meta: torch.Tensor, ref: _Ref) -> RemoteBuffer:
        obj = torch.Tensor._make_subclass(cls, meta, False)
        obj._ph_ref, obj._ph_chain, obj._ph_written = ref, (), False
        return obj


class RemoteTensor(_RemoteMixin, torch.Tensor):
    """A view of a served tensor (`p.data`, `p.data[0]`, `p.detach()`, ...): reads fetch the
    region, in-place ops write it on the server."""

    @classmethod
    def _make(cls, meta: torch.Tensor, ref: _Ref, chain: tuple[Any, ...]) -> RemoteTensor:
        obj = torch.Tensor._make_subclass(cls, meta, False)
        obj._ph_ref, obj._ph_chain, obj._ph_written = ref, chain, False
        return obj

