"""Server-side optimizers and parameter-server training of a served model.

(~700 lines, one concept: the optimizer and the parameter-server rounds share the trainer's
state and lock; splitting them would put one lock discipline in two files.)

A model has at most one optimizer: an allow-listed torch.optim class built over the model's own
Parameters, so a step is torch's own `optimizer.step()`. Only allow-listed constructor arguments
with plain values (numbers, bools, a pair of floats for `betas`) are accepted; nothing a client
sends is executed. Steps run under the model's write lock, so they are atomic with respect to
every other writer, and bump the versions of the parameters they change.

Parameter-server mode (PushGrads) hands gradients computed elsewhere to that optimizer:

* async: every push is one step;
* sync: pushes are averaged until `sync_workers` have arrived, then one step is taken; each
  push waits for its round's step (a barrier), so k workers move in lockstep;
* bounded staleness: as async, but a push computed more than `max_staleness` steps ago is
  rejected or scaled by (max_staleness + 1) / (staleness + 1).

Staleness counts optimizer steps (not other writes) since the version a push was computed at.

Durability (store.py): everything here is kept in a form a snapshot can store: a JSON-able
configuration (`training_state`) and a flat {"{parameter}/{key}": tensor} dict of torch's
per-parameter optimizer state; `build_optimizer` rebuilds an optimizer from them. Every change is
logged under the model's write lock before it is acknowledged: CreateOptimizer and
ConfigureTraining as small records, a step as ONE record holding the parameters it changed and
their new optimizer state (so replay never sees half a step). Gradients and an incomplete sync
round are not persisted (torch does not save .grad either).
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from paramhub.common.errors import (AlreadyExistsError, InvalidArgumentError, NotFoundError,
                             ResourceExhaustedError, UnavailableError)
from paramhub_server.core.model import PARAMETER, Extra, ServedModel

ASYNC, SYNC, BOUNDED = "async", "sync", "bounded_staleness"
REJECT, SCALE = "reject", "scale"
APPLIED, SCALED, REJECTED, QUEUED = "applied", "scaled", "rejected", "queued"

MAX_SYNC_WORKERS = 1024
#: Step versions remembered for computing staleness (older pushes count as this stale).
MAX_STEP_HISTORY = 100_000
#: A sync push waits in slices of this many seconds, checking that its caller is still there.
_WAIT_SLICE = 1.0
#: Timeouts longer than this (seconds, ~11 days) mean "no deadline".
_NO_DEADLINE = 1e6


def _float(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidArgumentError(f"optimizer argument {name!r} must be a number, not "
                                   f"{type(v).__name__}", reason="BAD_OPTIMIZER_ARGUMENT",
                                   metadata={"argument": name})
    return float(v)


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidArgumentError(f"optimizer argument {name!r} must be a bool, not "
                                   f"{type(v).__name__}", reason="BAD_OPTIMIZER_ARGUMENT",
                                   metadata={"argument": name})
    return v


def _pair(name: str, v: Any) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise InvalidArgumentError(f"optimizer argument {name!r} must be a pair of numbers",
                                   reason="BAD_OPTIMIZER_ARGUMENT", metadata={"argument": name})
    return (_float(name, v[0]), _float(name, v[1]))


_COMMON = {"lr": _float, "weight_decay": _float, "maximize": _bool}
#: torch.optim class -> its accepted constructor arguments and their checkers. Implementation
#: switches (foreach, fused, capturable, differentiable) are the server's choice.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "SGD": (torch.optim.SGD, {**_COMMON, "momentum": _float, "dampening": _float,
                              "nesterov": _bool}),
    "Adam": (torch.optim.Adam, {**_COMMON, "betas": _pair, "eps": _float, "amsgrad": _bool}),
    "AdamW": (torch.optim.AdamW, {**_COMMON, "betas": _pair, "eps": _float, "amsgrad": _bool}),
    "RMSprop": (torch.optim.RMSprop, {**_COMMON, "alpha": _float, "eps": _float,
                                      "momentum": _float, "centered": _bool}),
    "Adagrad": (torch.optim.Adagrad, {**_COMMON, "lr_decay": _float, "eps": _float,
                                      "initial_accumulator_value": _float}),
}


def check_options(type_name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validates optimizer arguments against the allow-list; returns them normalized."""
    if type_name not in OPTIMIZERS:
        raise InvalidArgumentError(
            f"unknown optimizer {type_name[:100]!r}; one of {sorted(OPTIMIZERS)}",
            reason="BAD_OPTIMIZER", metadata={"type": type_name[:100]})
    allowed = OPTIMIZERS[type_name][1]
    out: dict[str, Any] = {}
    for k, v in options.items():
        check = allowed.get(k)
        if check is None:
            raise InvalidArgumentError(
                f"{type_name} takes no argument {k[:100]!r}; allowed: {sorted(allowed)}",
                reason="BAD_OPTIMIZER_ARGUMENT", metadata={"argument": k[:100]})
        out[k] = check(k, v)
    return out


@dataclass
class ServedOptimizer:
    """A torch optimizer over a model's parameters, with what describes it."""

    type: str
    defaults: dict[str, Any]
    groups: list[tuple[list[str], dict[str, Any]]]  # (parameter names, option overrides)
    torch_opt: torch.optim.Optimizer
    params: list[tuple[int, str, nn.Parameter]]  # (storage group, name, Parameter), torch order
    steps: int = 0

    def same_config(self, type_name: str, groups: Sequence[tuple[list[str], dict[str, Any]]],
                    defaults: Mapping[str, Any]) -> bool:
        """Whether a CreateOptimizer with these arguments would build this same optimizer."""
        return (self.type == type_name and self.defaults == dict(defaults)
                and [(list(n), dict(o)) for n, o in groups] == self.groups)

    def resolved_groups(self) -> list[tuple[list[str], dict[str, Any]]]:
        """Every group's parameter names and full options, as torch's param_groups."""
        out = []
        for (names, _), group in zip(self.groups, self.torch_opt.param_groups):
            out.append((names, {k: v for k, v in group.items() if k != "params"}))
        return out


@dataclass
class _Round:
    """One sync round: the sum of its pushes' gradients by storage group."""

    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    result: tuple[int, int] | None = None  # (model version, steps) once stepped
    discarded: bool = False


@dataclass(frozen=True)
class PushResult:
    """What PushGrads did."""

    outcome: str
    staleness: int
    scale: float
    model_version: int
    steps: int


@dataclass
class TrainingConfig:
    """How pushes become steps."""

    mode: str = ASYNC
    sync_workers: int = 1
    max_staleness: int = 0
    stale_policy: str = REJECT


class Trainer:
    """A model's optimizer and parameter-server state (ServedModel.training)."""

    def __init__(self) -> None:
        self.optimizer: ServedOptimizer | None = None
        self.config = TrainingConfig()
        # Orders pushes, steps and configuration changes; taken before the model's lock.
        self.cond = threading.Condition()
        self.round = _Round()
        self.step_versions: list[int] = []  # model version after each step that changed values
        self.closing = False  # the server is shutting down: waiting pushes return

    def close(self) -> None:
        """Releases every push waiting for a round (server shutdown)."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    def staleness(self, version: int) -> int:
        """Optimizer steps taken after `version`."""
        return len(self.step_versions) - bisect.bisect_right(self.step_versions, version)

    def record_step(self, version: int) -> None:
        self.step_versions.append(version)
        if len(self.step_versions) > MAX_STEP_HISTORY:
            del self.step_versions[: len(self.step_versions) - MAX_STEP_HISTORY]


_TRAINER_LOCK = threading.Lock()


def trainer(model: ServedModel) -> Trainer:
    """The model's Trainer, created on first use."""
    if model.train_state is None:
        with _TRAINER_LOCK:
            if model.train_state is None:
                model.train_state = Trainer()
    return model.train_state


def optimizer_of(model: ServedModel) -> ServedOptimizer:
    opt = trainer(model).optimizer
    if opt is None:
        raise NotFoundError(f"model {model.id!r} has no optimizer; create one first",
                            reason="OPTIMIZER_NOT_FOUND", metadata={"model": model.id})
    return opt


# ------------------------------------------------------------------------------- optimizers

def create_optimizer(model: ServedModel, type_name: str,
                     groups: Sequence[tuple[Sequence[str], Mapping[str, Any]]],
                     defaults: Mapping[str, Any], *, replace: bool = False
                     ) -> tuple[ServedOptimizer, bool]:
    """Builds the model's optimizer (validated completely before it is installed).

    Returns (optimizer, created); an existing identical optimizer is reused (created=False).
    """
    norm_defaults, norm_groups, torch_groups, params = _resolve(model, type_name, groups,
                                                                defaults)
    tr = trainer(model)
    with tr.cond:
        existing = tr.optimizer
        if existing is not None and existing.same_config(type_name, norm_groups, norm_defaults):
            return existing, False
        if existing is not None and not replace:
            raise AlreadyExistsError(
                f"model {model.id!r} already has a {existing.type} optimizer with another "
                "configuration; pass replace=True to discard it and its state",
                reason="OPTIMIZER_EXISTS", metadata={"model": model.id, "type": existing.type})
        opt = construct(type_name, norm_defaults, norm_groups, torch_groups, params)
        with model.lock.write():
            # Logged before it is installed and acknowledged (replay rebuilds it, state empty).
            if model.journal is not None:
                model.journal.log_record(model, {"t": "optimizer",
                                                 "optimizer": optimizer_config(opt)})
            tr.optimizer = opt
        return opt, True


def _resolve(model: ServedModel, type_name: str,
             groups: Sequence[tuple[Sequence[str], Mapping[str, Any]]],
             defaults: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                   list[tuple[list[str], dict[str, Any]]],
                                                   list[dict[str, Any]],
                                                   list[tuple[int, str, nn.Parameter]]]:
    """Validates an optimizer's arguments against the model: (defaults, groups, torch's
    param_groups, params)."""
    def parameter(name: str) -> tuple[int, Callable[[], Any]]:
        ref = model.ref(name, PARAMETER)
        return ref.group, ref.get

    return resolve(type_name, groups, defaults, parameter)


def resolve(type_name: str, groups: Sequence[tuple[Sequence[str], Mapping[str, Any]]],
            defaults: Mapping[str, Any],
            parameter: Callable[[str], tuple[int, Callable[[], Any]]]
            ) -> tuple[dict[str, Any], list[tuple[list[str], dict[str, Any]]],
                       list[dict[str, Any]], list[tuple[int, str, nn.Parameter]]]:
    """Validates an optimizer's arguments (allow-listed options, at least one group, no empty
    group, every storage once): (defaults, groups, torch's param_groups, params).
    `parameter(name)` -> (storage group, a function giving the nn.Parameter the optimizer
    steps), raising NOT_FOUND for a name that is not a parameter; shared by a plain model and
    a cluster's sharded one (cluster/optim.py)."""
    norm_defaults = check_options(type_name, defaults)
    if not groups:
        raise InvalidArgumentError("an optimizer needs at least one parameter group",
                                   reason="BAD_OPTIMIZER_ARGUMENT")
    norm_groups: list[tuple[list[str], dict[str, Any]]] = []
    torch_groups = []
    params: list[tuple[int, str, nn.Parameter]] = []
    seen: set[int] = set()
    for names, options in groups:
        if not names:
            raise InvalidArgumentError("a parameter group has no parameters",
                                       reason="BAD_OPTIMIZER_ARGUMENT")
        group_params = []
        for n in names:
            group, get = parameter(n)
            if group in seen:
                raise InvalidArgumentError(f"parameter {n!r} appears in more than one group "
                                           "(or twice, as a tied name)",
                                           reason="DUPLICATE_PARAMETER",
                                           metadata={"parameter": n})
            seen.add(group)
            p = get()
            params.append((group, n, p))
            group_params.append(p)
        opts = check_options(type_name, options)
        norm_groups.append((list(names), opts))
        torch_groups.append({"params": group_params, **opts})
    return norm_defaults, norm_groups, torch_groups, params


def construct(type_name: str, defaults: dict[str, Any],
               groups: list[tuple[list[str], dict[str, Any]]], torch_groups: list[dict[str, Any]],
               params: list[tuple[int, str, nn.Parameter]]) -> ServedOptimizer:
    """The torch optimizer over the parameters (not installed)."""
    cls = OPTIMIZERS[type_name][0]
    try:
        torch_opt = cls(torch_groups, **defaults)
    except (ValueError, TypeError) as e:
        # torch's own checks (lr < 0, nesterov without momentum, ...): nothing installed.
        raise InvalidArgumentError(f"{type_name}: {str(e).splitlines()[0]}",
                                   reason="BAD_OPTIMIZER_ARGUMENT") from None
    return ServedOptimizer(type_name, defaults, groups, torch_opt, params)


def _run_step(model: ServedModel, opt: ServedOptimizer) -> list[int]:
    """optimizer.step() under the caller's write lock; returns the groups it changed.

    The step changes parameters and state in place before its record is logged, so the log's
    disk space is reserved first: a full disk refuses the step (DISK_FULL) before it runs."""
    changed = [g for g, _, p in opt.params if p.grad is not None]
    if model.journal is not None:
        model.journal.reserve(_step_record_bytes(opt))
    opt.torch_opt.step()
    opt.steps += 1
    return changed


def _step_record_bytes(opt: ServedOptimizer) -> int:
    """An upper bound of a step's log record: the parameters with gradients and their state
    (three parameter-sized tensors where torch has not created it yet), plus the header."""
    total = 1 << 20
    for _, _, p in opt.params:
        if p.grad is None:
            continue
        n = p.numel() * p.element_size()
        state = opt.torch_opt.state.get(p) or {}
        held = sum(t.numel() * t.element_size() for t in state.values()
                   if isinstance(t, torch.Tensor))
        total += n + (held if state else 3 * n)
    return total


def _commit_step(model: ServedModel, tr: Trainer, opt: ServedOptimizer,
                 changed: Sequence[int]) -> None:
    """Commits a step just taken (caller holds the write lock): ONE log record with the new
    values of the parameters it changed and their new optimizer state, then versions and the
    watch event. A step that changed nothing (no gradients) logs only the step count."""
    if changed:
        extra: Extra = ({"kind": "optimizer.step", "steps": opt.steps},
                        optimizer_state(opt, set(changed)))
        model._bump(changed, extra=extra)
        tr.record_step(model.version)
    elif model.journal is not None:
        model.journal.log_record(model, {"t": "optimizer_steps", "steps": opt.steps})


def step(model: ServedModel) -> tuple[int, int]:
    """One optimizer.step() on the accumulated gradients. Returns (model version, steps)."""
    opt = optimizer_of(model)
    tr = trainer(model)
    with tr.cond, model.lock.write():
        changed = _run_step(model, opt)
        _commit_step(model, tr, opt, changed)
        return model.version, opt.steps


def zero_grad(model: ServedModel, fill_zeros: bool) -> None:
    """optimizer.zero_grad() over the optimizer's parameters."""
    opt = optimizer_of(model)
    model.zero_grad("", [n for _, n, _ in opt.params], fill_zeros)


def export_optimizer(model: ServedModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON-able configuration, {"{parameter}/{key}": CPU tensor}) of the optimizer.

    The configuration holds type, defaults, groups (names and their overrides), resolved
    groups and steps; the tensors are torch's per-parameter state (momentum_buffer, exp_avg,
    exp_avg_sq, step, ...), copied under the read lock. `build_optimizer` takes both back.
    """
    opt = optimizer_of(model)
    with model.lock.read():
        tensors = {k: t.to("cpu", copy=True) for k, t in optimizer_state(opt)}
        config = optimizer_config(opt)
        config["resolved_groups"] = [{"parameters": n, "options": _jsonable(o)}
                                     for n, o in opt.resolved_groups()]
        return config, tensors


# ------------------------------------------------------------------------------- durability
# What store.py persists and recovers. The callers hold the model's lock (read to export, write
# or exclusive ownership during recovery to install); nothing here takes it.

def optimizer_config(opt: ServedOptimizer) -> dict[str, Any]:
    """The JSON-able configuration that rebuilds `opt` (type, defaults, groups, steps)."""
    return {"type": opt.type, "defaults": _jsonable(opt.defaults),
            "groups": [{"parameters": list(n), "options": _jsonable(o)} for n, o in opt.groups],
            "steps": opt.steps}


def optimizer_state(opt: ServedOptimizer, groups: Collection[int] | None = None
                    ) -> list[tuple[str, torch.Tensor]]:
    """[("{parameter}/{key}", live tensor)] of torch's per-parameter state, in parameter
    order; only of the storages in `groups` if given. Hold the model's lock while using them."""
    out: list[tuple[str, torch.Tensor]] = []
    for g, name, p in opt.params:
        if groups is not None and g not in groups:
            continue
        for key, v in opt.torch_opt.state.get(p, {}).items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            out.append((f"{name}/{key}", t.detach()))
    return out


def training_state(model: ServedModel) -> tuple[dict[str, Any] | None,
                                                list[tuple[str, torch.Tensor]]]:
    """(JSON-able {"config", "optimizer"}, optimizer state tensors) of the model, or (None, [])
    if it never had training state. Caller holds the model's lock."""
    tr = model.train_state
    if tr is None:
        return None, []
    opt = tr.optimizer
    meta = {"config": dataclasses.asdict(tr.config),
            "optimizer": optimizer_config(opt) if opt is not None else None}
    return meta, optimizer_state(opt) if opt is not None else []


def step_history(model: ServedModel) -> list[int]:
    """Model versions after recent steps (what staleness is counted against)."""
    tr = model.train_state
    return list(tr.step_versions) if tr is not None else []


def _config_from_json(j: Mapping[str, Any]) -> TrainingConfig:
    cfg = TrainingConfig(**{f.name: j[f.name] for f in dataclasses.fields(TrainingConfig)
                            if f.name in j})
    if cfg.mode not in (ASYNC, SYNC, BOUNDED) or cfg.stale_policy not in (REJECT, SCALE):
        raise InvalidArgumentError(f"unknown stored training mode {cfg.mode!r}",
                                   reason="BAD_TRAINING_MODE")
    return cfg


def _set_state(opt: ServedOptimizer, tensors: Mapping[str, torch.Tensor]) -> None:
    """Puts stored per-parameter state into `opt` (copied; "step" stays on the CPU as torch
    keeps it for non-capturable optimizers, the rest goes to the parameter's device)."""
    by_name = {n: p for _, n, p in opt.params}
    staged: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, entry = key.rpartition("/")
        p = by_name.get(name)
        if p is None or not entry:
            raise InvalidArgumentError(f"optimizer state {key[:200]!r} is for no parameter of "
                                       "the optimizer", reason="BAD_OPTIMIZER_STATE")
        device = torch.device("cpu") if entry == "step" else p.device
        staged.setdefault(p, {})[entry] = t.to(device, copy=True)
    for p, entries in staged.items():
        opt.torch_opt.state[p].update(entries)


def build_optimizer(model: ServedModel, config: Mapping[str, Any],
                    tensors: Mapping[str, torch.Tensor]) -> ServedOptimizer:
    """An optimizer rebuilt from `optimizer_config` and `optimizer_state` output, NOT installed
    (nothing of the model changes; invalid input raises InvalidArgumentError)."""
    try:
        groups = [(list(g["parameters"]), dict(g["options"])) for g in config["groups"]]
        type_name, defaults, steps = config["type"], config["defaults"], int(config["steps"])
    except (KeyError, TypeError, ValueError):
        raise InvalidArgumentError("malformed stored optimizer configuration",
                                   reason="BAD_OPTIMIZER_STATE") from None
    opt = construct(type_name, *_resolve(model, type_name, groups, defaults))
    _set_state(opt, tensors)
    opt.steps = steps
    return opt


def load_training_state(model: ServedModel, meta: Mapping[str, Any] | None,
                        tensors: Mapping[str, torch.Tensor], step_versions: Sequence[int] = ()
                        ) -> None:
    """Installs recovered training state (recovery: the model is not served yet)."""
    if meta is None:
        return
    tr = trainer(model)
    tr.config = _config_from_json(meta["config"])
    tr.round = _Round()
    opt = meta.get("optimizer")
    tr.optimizer = build_optimizer(model, opt, tensors) if opt is not None else None
    tr.step_versions = [int(v) for v in step_versions]


def replay_record(model: ServedModel, header: Mapping[str, Any],
                  tensors: Mapping[str, torch.Tensor]) -> None:
    """Re-applies a logged training record during recovery."""
    tr = trainer(model)
    t = header["t"]
    if t == "optimizer":
        tr.optimizer = build_optimizer(model, header["optimizer"], {})
    elif t == "training_config":
        tr.config = _config_from_json(header["config"])
        tr.round = _Round()
    elif t == "optimizer_steps":
        optimizer_of(model).steps = int(header["steps"])
    else:
        raise ValueError(f"unknown training record {t!r}")


def replay_step(model: ServedModel, extra: Mapping[str, Any],
                tensors: Mapping[str, torch.Tensor], model_version: int) -> None:
    """Re-applies the optimizer half of a logged step (the parameter values are the write's)."""
    tr = trainer(model)
    opt = optimizer_of(model)
    _set_state(opt, tensors)
    opt.steps = int(extra["steps"])
    tr.record_step(model_version)


def prepare_restore(model: ServedModel, meta: Mapping[str, Any] | None,
                    tensors: Mapping[str, torch.Tensor]) -> Callable[[], None]:
    """Checks a checkpoint's training state against the model and returns what installs it
    (run under the model's write lock, with the trainer's condition held).

    A checkpoint taken without an optimizer resets the current optimizer's state (same
    configuration, no state, steps 0): the optimizer as it was at that point.
    """
    tr = trainer(model)
    cfg = _config_from_json(meta["config"]) if meta is not None else TrainingConfig()
    stored = meta.get("optimizer") if meta is not None else None
    if stored is not None:
        opt: ServedOptimizer | None = build_optimizer(model, stored, tensors)
    elif tr.optimizer is not None:
        fresh = optimizer_config(tr.optimizer)
        fresh["steps"] = 0
        opt = build_optimizer(model, fresh, {})
    else:
        opt = None

    def install() -> None:
        tr.optimizer = opt
        tr.config = cfg
        tr.round.discarded = True
        tr.round = _Round()
        tr.cond.notify_all()

    return install


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


# ------------------------------------------------------------------------ parameter server

def configure(model: ServedModel, mode: str, *, sync_workers: int = 1, max_staleness: int = 0,
              stale_policy: str = REJECT, max_waiters: int | None = None) -> TrainingConfig:
    """Sets how PushGrads applies gradients; an incomplete sync round is discarded.

    `max_waiters` is how many pushes the server can keep waiting at once: a sync round's first
    `sync_workers - 1` pushes wait for its last, so a larger round could never complete.
    """
    if mode not in (ASYNC, SYNC, BOUNDED):
        raise InvalidArgumentError(f"unknown training mode {mode!r}", reason="BAD_TRAINING_MODE")
    if mode == SYNC and not 1 <= sync_workers <= MAX_SYNC_WORKERS:
        raise InvalidArgumentError(f"sync mode needs 1 to {MAX_SYNC_WORKERS} workers, not "
                                   f"{sync_workers}", reason="BAD_TRAINING_MODE")
    if mode == SYNC and max_waiters is not None and sync_workers - 1 > max_waiters:
        raise ResourceExhaustedError(
            f"a sync round of {sync_workers} workers keeps {sync_workers - 1} pushes waiting; "
            f"this server holds at most {max_waiters} (--max-round-waiters)",
            reason="ROUND_TOO_LARGE", metadata={"limit": str(max_waiters + 1)})
    if mode == BOUNDED and max_staleness < 0:
        raise InvalidArgumentError("max_staleness must be >= 0", reason="BAD_TRAINING_MODE")
    if stale_policy not in (REJECT, SCALE):
        raise InvalidArgumentError(f"unknown stale policy {stale_policy!r}",
                                   reason="BAD_TRAINING_MODE")
    tr = trainer(model)
    config = TrainingConfig(mode, sync_workers if mode == SYNC else 1,
                            max_staleness if mode == BOUNDED else 0, stale_policy)
    with tr.cond, model.lock.write():
        if model.journal is not None:
            model.journal.log_record(model, {"t": "training_config",
                                             "config": dataclasses.asdict(config)})
        tr.round.discarded = True
        tr.round = _Round()
        tr.config = config
        tr.cond.notify_all()
    return config


def check_grads(model: ServedModel, grads: Mapping[str, torch.Tensor]
                ) -> dict[int, torch.Tensor]:
    """Validates pushed gradients against the optimizer's parameters; returns them by storage
    group, on the model's device, in the parameter's dtype."""
    opt = optimizer_of(model)
    covered = {g for g, _, _ in opt.params}
    out: dict[int, torch.Tensor] = {}
    for name, t in grads.items():
        ref = model.ref(name, PARAMETER)
        if ref.group in out:
            raise InvalidArgumentError(f"gradient for {name!r} sent twice (or under a tied name)",
                                       reason="DUPLICATE_PARAMETER", metadata={"parameter": name})
        if ref.group not in covered:
            raise InvalidArgumentError(f"{name!r} is not a parameter of the model's optimizer",
                                       reason="PARAMETER_NOT_OPTIMIZED",
                                       metadata={"parameter": name})
        p = ref.get()
        if tuple(t.shape) != tuple(p.shape):
            raise InvalidArgumentError(f"gradient for {name!r} is {list(t.shape)}, the parameter "
                                       f"is {list(p.shape)}", reason="BAD_SHAPE",
                                       metadata={"parameter": name})
        if not (t.is_floating_point() or t.is_complex()) or (
                t.is_complex() and not p.is_complex()):
            raise InvalidArgumentError(f"gradient for {name!r} is {t.dtype}", reason="BAD_DTYPE",
                                       metadata={"parameter": name})
        out[ref.group] = t.to(device=p.device, dtype=p.dtype)
    return out


def _apply(model: ServedModel, tr: Trainer, grads: Mapping[int, torch.Tensor]) -> None:
    """One optimizer step with `grads` in place of the parameters' own .grad (which is kept:
    remote-autograd gradients and pushed ones do not mix). Caller holds tr.cond."""
    opt = optimizer_of(model)
    with model.lock.write():
        saved = [(p, p.grad) for _, _, p in opt.params]
        try:
            for g, _, p in opt.params:
                p.grad = grads.get(g)
            changed = _run_step(model, opt)
        finally:
            for p, grad in saved:
                p.grad = grad
        _commit_step(model, tr, opt, changed)


def push_grads(model: ServedModel, version: int, grads: Mapping[str, torch.Tensor],
               timeout: float | None = None, alive: Callable[[], bool] | None = None
               ) -> PushResult:
    """Applies gradients computed at `version` according to the model's TrainingConfig.

    In sync mode the call waits (up to `timeout` seconds, while `alive()` holds and the server
    is not shutting down) for its round's step; a push that stops waiting is QUEUED: its
    gradient stays counted in the round.
    """
    by_group = check_grads(model, grads)
    if not 0 <= version <= model.version:
        raise InvalidArgumentError(f"version {version} is not a version of model {model.id!r} "
                                   f"(now {model.version})", reason="BAD_VERSION",
                                   metadata={"version": str(model.version)})
    tr = trainer(model)
    opt = optimizer_of(model)
    with tr.cond:
        cfg = tr.config
        stale = tr.staleness(version)
        if cfg.mode == SYNC:
            if stale > 0:
                return PushResult(REJECTED, stale, 1.0, model.version, opt.steps)
            rnd = tr.round
            for g, t in by_group.items():
                if g in rnd.sums:
                    rnd.sums[g].add_(t)
                else:
                    rnd.sums[g] = t.clone()
            rnd.count += 1
            if rnd.count >= cfg.sync_workers:
                mean = {g: s.div_(rnd.count) for g, s in rnd.sums.items()}
                _apply(model, tr, mean)
                rnd.result = (model.version, opt.steps)
                tr.round = _Round()
                tr.cond.notify_all()
                return PushResult(APPLIED, 0, 1.0, model.version, opt.steps)
            # The gradient is counted: from here on nothing may fail while the round lives (a
            # retry would count it twice). No deadline, or a huge one, waits in slices
            # (Condition.wait overflows past ~292 years, and grpc reports "no deadline" as a
            # huge number).
            # A push that times out answers QUEUED a little before the caller's deadline, so
            # that the answer, not DEADLINE_EXCEEDED, reaches it.
            deadline = (None if timeout is None or timeout > _NO_DEADLINE
                        else time.monotonic() + max(0.0, timeout - min(0.05, timeout / 10)))
            while rnd.result is None and not rnd.discarded:
                if tr.closing:  # the round dies with this process: the push must be redone
                    raise UnavailableError("the server is shutting down; the sync round did "
                                           "not complete", reason="SHUTTING_DOWN")
                left = _WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if left <= 0 or (alive is not None and not alive()):
                    return PushResult(QUEUED, 0, 1.0, model.version, opt.steps)
                tr.cond.wait(min(left, _WAIT_SLICE))
            if rnd.discarded:
                return PushResult(REJECTED, tr.staleness(version), 1.0, model.version,
                                  opt.steps)
            v, steps = rnd.result
            return PushResult(APPLIED, 0, 1.0, v, steps)
        scale = 1.0
        outcome = APPLIED
        if cfg.mode == BOUNDED and stale > cfg.max_staleness:
            if cfg.stale_policy == REJECT:
                return PushResult(REJECTED, stale, 1.0, model.version, opt.steps)
            scale = (cfg.max_staleness + 1) / (stale + 1)
            by_group = {g: t.mul(scale) for g, t in by_group.items()}
            outcome = SCALED
        _apply(model, tr, by_group)
        return PushResult(outcome, stale, scale, model.version, opt.steps)
