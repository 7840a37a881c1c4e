"""Server-side optimizers that mirror torch.optim.

    opt = paramhub.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for X, y in batches:
        opt.zero_grad()                     # one ZeroGrad RPC
        F.mse_loss(net(X), y).backward()    # Backward RPC: .grad accumulates on the server
        opt.step()                          # one OptimizerStep RPC: torch.optim.SGD.step there

The optimizer object lives on the server, next to the model (a model has at most one): its
state never crosses the network, each step is atomic with respect to other writers, and the
parameter-server mode (`net.push_grads`) steps with it too. Constructing an optimizer with the
same arguments as the existing one attaches to it (state kept), so every worker can run the
same line; another configuration raises AlreadyExistsError unless `replace=True`.
Arguments are torch's (allow-listed, validated on the server); `foreach`, `fused`, `capturable`
and `differentiable` are the server's choice and not accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from paramhub import _codec
from paramhub.errors import InvalidArgumentError
from paramhub.tensor import RemoteParameter
from paramhub.common import pb

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "get"]


def _options(values: Any) -> dict[str, Any]:
    return {k: _codec.value_from_proto(v) for k, v in values.items()}


class Optimizer:
    """A torch.optim optimizer that runs on the server over a served model's parameters.

    Use a subclass (`SGD`, `Adam`, `AdamW`, `RMSprop`, `Adagrad`) as you would torch's.
    """

    #: torch.optim class name on the server.
    type_name = ""

    def __init__(self, params: Iterable[Any], *, replace: bool = False, **defaults: Any) -> None:
        """Creates (or attaches to an identical) optimizer on the server.

        Args:
            params: served parameters (`net.parameters()`), or parameter-group dicts
                `{"params": [...], "lr": ...}` as torch.optim takes.
            replace: discard an existing optimizer of another configuration (and its state).
            **defaults: the torch.optim constructor's keyword arguments.

        Raises:
            InvalidArgumentError: not served parameters, unknown or bad arguments (reasons
                BAD_OPTIMIZER, BAD_OPTIMIZER_ARGUMENT, DUPLICATE_PARAMETER).
            AlreadyExistsError: the model has another optimizer and `replace` is False.
        """
        items = list(params)
        if not items:
            raise InvalidArgumentError("optimizer got an empty parameter list",
                                       reason="BAD_OPTIMIZER_ARGUMENT")
        raw_groups = items if isinstance(items[0], dict) else [{"params": items}]
        groups: list[tuple[list[str], dict[str, Any]]] = []
        handles: dict[str, RemoteParameter] = {}
        ref = None
        for g in raw_groups:
            if not isinstance(g, dict) or "params" not in g:
                raise InvalidArgumentError("parameter groups must be dicts with 'params'",
                                           reason="BAD_OPTIMIZER_ARGUMENT")
            ps = g["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
            names = []
            for p in ps:
                if not isinstance(p, RemoteParameter):
                    raise InvalidArgumentError(
                        "paramhub.optim optimizers take parameters of a served model; use "
                        "torch.optim for local ones", reason="BAD_OPTIMIZER_ARGUMENT")
                if ref is not None and (p._ph_ref.model_id != ref.model_id
                                        or p._ph_ref.client is not ref.client):
                    raise InvalidArgumentError("all parameters must belong to one served model",
                                               reason="BAD_OPTIMIZER_ARGUMENT")
                ref = p._ph_ref
                names.append(p._ph_ref.name)
                handles[p._ph_ref.name] = p
            groups.append((names, {k: v for k, v in g.items() if k != "params"}))
        assert ref is not None
        self._client, self.model_id = ref.client, ref.model_id
        self._handles = handles
        response = self._client.create_optimizer(self.model_id, self.type_name, groups, defaults,
                                                 replace=replace)
        #: False when an identical optimizer already existed and this one attached to it.
        self.created = response.created
        self._info = response.optimizer

    @classmethod
    def _attached(cls, client: Any, model_id: str, info: pb.OptimizerInfo,
                  handles: dict[str, RemoteParameter]) -> Optimizer:
        obj = cls.__new__(cls)
        obj._client, obj.model_id, obj._handles = client, model_id, handles
        obj.created, obj._info = False, info
        return obj

    # ------------------------------------------------------------------------- torch API

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups as torch shows them: {"params": [handles], **resolved options}
        (as of the last call that returned them)."""
        return [{"params": [self._handles[n] for n in g.parameters if n in self._handles],
                 **_options(g.options)} for g in self._info.param_groups]

    @property
    def defaults(self) -> dict[str, Any]:
        """The constructor arguments given."""
        return _options(self._info.defaults)

    @property
    def steps(self) -> int:
        """Steps the server has taken with this optimizer (as of the last call)."""
        return self._info.steps

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step on the server (atomic with respect to other writers).

        `closure`, as in torch, re-evaluates the model and returns the loss; it runs here
        (its forward/backward go to the server) before the single step.

        Raises:
            NotFoundError: the optimizer was removed with the model.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        response = self._client.optimizer_step(self.model_id)
        self._info.steps = response.steps
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of this optimizer's parameters (one RPC)."""
        self._client.zero_grad(self.model_id, parameters=[
            n for g in self._info.param_groups for n in g.parameters],
            set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The server's optimizer state in torch's layout ({"state": {i: {...}},
        "param_groups": [{..., "params": [i, ...]}]}), so `torch_opt.load_state_dict()` of a
        local optimizer over a pulled copy (same parameter order) accepts it."""
        info, tensors = self._client.get_optimizer_state(self.model_id)
        self._info = info
        index: dict[str, int] = {}
        groups = []
        for g in info.param_groups:
            ids = []
            for n in g.parameters:
                index[n] = len(index)
                ids.append(index[n])
            groups.append({**_options(g.options), "params": ids})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, entry = key.rpartition("/")
            state.setdefault(index[name], {})[entry] = t
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Not supported: the server's optimizer state is set by the server itself (it survives
        restarts, and `restore_checkpoint` brings back the checkpoint's)."""
        raise NotImplementedError("loading optimizer state from a client is not supported")

    def __repr__(self) -> str:
        lines = [f"{self.type_name} (server-side, model {self.model_id!r})", "("]
        for i, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for k in sorted(k for k in g if k != "params"):
                lines.append(f"    {k}: {g[k]}")
        lines.append(")")
        return "\n".join(lines)


class SGD(Optimizer):
    """torch.optim.SGD on the server: lr, momentum, dampening, weight_decay, nesterov,
    maximize."""

    type_name = "SGD"


class Adam(Optimizer):
    """torch.optim.Adam on the server: lr, betas, eps, weight_decay, amsgrad, maximize."""

    type_name = "Adam"


class AdamW(Optimizer):
    """torch.optim.AdamW on the server: lr, betas, eps, weight_decay, amsgrad, maximize."""

    type_name = "AdamW"


class RMSprop(Optimizer):
    """torch.optim.RMSprop on the server: lr, alpha, eps, weight_decay, momentum, centered,
    maximize."""

    type_name = "RMSprop"


class Adagrad(Optimizer):
    """torch.optim.Adagrad on the server: lr, lr_decay, weight_decay,
    initial_accumulator_value, eps, maximize."""

    type_name = "Adagrad"


_CLASSES = {c.type_name: c for c in (SGD, Adam, AdamW, RMSprop, Adagrad)}


def get(net: nn.Module) -> Optimizer:
    """The served model's existing optimizer (e.g. created by another worker).

    Raises:
        NotFoundError: the model has no optimizer (reason OPTIMIZER_NOT_FOUND).
    """
    client, model_id = net._paramhub_client, net._paramhub_model_id
    info, _ = client.get_optimizer_state(model_id, config_only=True)
    handles = {p._ph_ref.name: p for p in net.parameters() if isinstance(p, RemoteParameter)}
    cls = _CLASSES.get(info.type, Optimizer)
    return cls._attached(client, model_id, info, handles)
