"""Server-side optimizers on sharded models (torch only, no grpc): torch's optimizer built on
every rank over that rank's parts of the parameters, its state sharded like its parameter and
durable per rank.

Every optimizer paramhub offers (core/training.py OPTIMIZERS) is elementwise, so stepping each
part is stepping the whole. A step is one command: every rank computes the step beside its
live parts (on copies of its parameters and of the optimizer state), writes the optimizer state
file named by the model version the step makes (`{data}/sharded/{model}/optim/{version}.
safetensors`), and then commits the new parameter values like a write (commit.two_phase:
logged prepare, vote, logged commit, apply, confirm): one model version on every rank, or,
refused anywhere, nothing anywhere (the state is put back and the file dropped). The older
state file is dropped after the commit. Recovery (on_recover, after in-doubt writes are
resolved) keeps the newest state file whose version the recovered model reached and deletes
newer ones (a step that was never committed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from paramhub.common.errors import (AlreadyExistsError, InternalError, InvalidArgumentError,
                                    NotFoundError, ParamhubError)
from paramhub_server.cluster import commit, storage
from paramhub_server.cluster.commands import command, on_recover
from paramhub_server.cluster.compute import _full, _model, state_of
from paramhub_server.cluster.sharding import PARAMETER, ShardedModel
from paramhub_server.core import training

if TYPE_CHECKING:
    from paramhub_server.cluster.engine import Cluster

#: The directory of a model's optimizer state files (beside storage.py's files).
OPTIM_DIR = "optim"


def _build(m: ShardedModel, type_name: str,
           groups: Sequence[tuple[Sequence[str], dict[str, Any]]], defaults: dict[str, Any]
           ) -> training.ServedOptimizer:
    """torch's optimizer over this rank's parts of the named parameters (validated as on a
    plain server: allow-listed arguments, every storage once)."""
    def parameter(name: str) -> tuple[int, Callable[[], Any]]:
        e = m.entry(name, PARAMETER)
        # Its own tensor object; bound to the live part (p.data) for each step.
        return e.group, lambda: nn.Parameter(torch.empty(0, dtype=e.dtype))

    return training.construct(type_name, *training.resolve(type_name, groups, defaults,
                                                            parameter))


@command("create_optimizer")
def _do_create_optimizer(cluster: Cluster, model_id: str, type_name: str,
                         groups: list[tuple[list[str], dict[str, Any]]],
                         defaults: dict[str, Any], replace: bool
                         ) -> tuple[training.ServedOptimizer, bool]:
    m = _model(cluster, model_id)
    st = state_of(m)
    opt = _build(m, type_name, groups, defaults)
    existing = st.optimizer
    if existing is not None and existing.same_config(type_name, opt.groups, opt.defaults):
        return existing, False
    if existing is not None and not replace:
        raise AlreadyExistsError(
            f"model {model_id!r} already has a {existing.type} optimizer with another "
            "configuration; pass replace=True to discard it and its state",
            reason="OPTIMIZER_EXISTS", metadata={"model": model_id, "type": existing.type})
    _vote(cluster, None)
    _save_optimizer(cluster, m, opt)
    _prune(cluster, m)
    cluster._confirm()
    st.optimizer = opt
    return opt, True


def _vote(cluster: Cluster, error: ParamhubError | None) -> None:
    """Every rank says whether it can go on; all go on or all raise."""
    import torch.distributed as dist

    votes: list[Any] = [None] * cluster.world
    dist.all_gather_object(votes, error is None)
    if error is not None:
        raise error
    if not all(votes):
        raise InvalidArgumentError("another rank refused the call", reason="BAD_INPUT")


def _optimizer(m: ShardedModel) -> training.ServedOptimizer:
    opt = state_of(m).optimizer
    if opt is None:
        raise NotFoundError(f"model {m.id!r} has no optimizer; create one first",
                            reason="OPTIMIZER_NOT_FOUND", metadata={"model": m.id})
    return opt


@command("optimizer_step")
def _do_optimizer_step(cluster: Cluster, model_id: str) -> tuple[int, int]:
    """One optimizer.step() on every rank's parts, committed like a write (commit.two_phase):
    the step is computed beside the live parts (on copies of the parameters and of the
    optimizer state), its state file written, then prepared, voted, committed and applied on
    every rank or on none; one model version on every rank. Returns (model version, steps)."""
    m = _model(cluster, model_id)
    opt = _optimizer(m)  # the same answer on every rank
    st = state_of(m)
    changed = [g for g, _, _ in opt.params if g in st.grads]
    torch_opt = opt.torch_opt
    before = {p: dict(s) for p, s in torch_opt.state.items()}
    error: ParamhubError | None = None
    stepped = False
    try:
        with cluster._lock:
            for g, _, p in opt.params:
                p.data = m.entries[g].local.clone()
                p.grad = st.grads.get(g)
                if p in torch_opt.state:  # stepped on copies: `before` stays as it was
                    torch_opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                          for k, v in torch_opt.state[p].items()}
        torch_opt.step()
        opt.steps += 1
        stepped = True
        staged = {g: [(slice(0, p.numel()), p.detach().reshape(-1))]
                  for g, _, p in opt.params if g in changed}
        if not changed:  # nothing to commit: the step count is all that changed
            _save_optimizer(cluster, m, opt)
            _prune(cluster, m)
            return m.version, opt.steps
        m.version += 1  # the state file is named by the version the step makes
        try:
            _save_optimizer(cluster, m, opt)
        except OSError as e:
            error = InternalError(f"rank {cluster.rank} could not write the optimizer state: "
                                  f"{e}", reason="DISK_FULL" if e.errno == 28 else "IO_ERROR")
        finally:
            m.version -= 1
        commit.two_phase(cluster, m, staged, error)
    except BaseException:
        # Refused (by a rank's vote or torch): nothing was committed anywhere.
        torch_opt.state.clear()
        torch_opt.state.update(before)
        if stepped:
            opt.steps -= 1
        if changed:
            _drop_state_file(cluster, m, m.version + 1)
        raise
    finally:
        for _, _, p in opt.params:
            p.grad = None
            p.data = torch.empty(0, dtype=p.dtype)
    _prune(cluster, m)
    if changed and cluster.rank == 0:  # the watch event, as a plain model's step publishes
        from paramhub_server.cluster import state
        state.publish(m, "optimizer.step", [(g, "[...]") for g in changed])
    return m.version, opt.steps


def _drop_state_file(cluster: Cluster, m: ShardedModel, version: int) -> None:
    d = _optim_dir(cluster, m)
    if d is not None:
        (d / f"{version}.safetensors").unlink(missing_ok=True)


def create_optimizer(cluster: Cluster, model_id: str, type_name: str,
                     groups: Sequence[tuple[Sequence[str], dict[str, Any]]],
                     defaults: dict[str, Any], replace: bool
                     ) -> tuple[training.ServedOptimizer, bool]:
    m = _model(cluster, model_id)
    _build(m, type_name, groups, defaults)  # refused before any rank works
    return cluster.run("create_optimizer", model_id=model_id, type_name=type_name,
                       groups=[(list(n), dict(o)) for n, o in groups],
                       defaults=dict(defaults), replace=replace)


def optimizer_step(cluster: Cluster, model_id: str) -> tuple[int, int]:
    return cluster.run("optimizer_step", model_id=model_id)


def optimizer_of(cluster: Cluster, model_id: str) -> training.ServedOptimizer:
    """Rank 0's optimizer of the model (its configuration and steps are every rank's)."""
    return _optimizer(_model(cluster, model_id))


@command("optimizer_state")
def _do_optimizer_state(cluster: Cluster, model_id: str) -> dict[str, torch.Tensor]:
    """{"{parameter}/{key}": full tensor} of the optimizer state, assembled on rank 0 like
    value reads (a parameter-shaped state from every rank's part; scalars such as Adam's
    step are the same on every rank)."""
    m = _model(cluster, model_id)
    opt = _optimizer(m)
    out: dict[str, torch.Tensor] = {}
    with cluster._lock:
        for g, name, p in opt.params:
            e = m.entries[g]
            local_shape = e.local.shape
            for key, v in opt.torch_opt.state.get(p, {}).items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
                full = _full(cluster, e, t) if key != "step" and t.shape == local_shape \
                    else t.clone()
                out[f"{name}/{key}"] = full
    return out if cluster.rank == 0 else {}


def optimizer_state(cluster: Cluster, model_id: str
                    ) -> tuple[training.ServedOptimizer, dict[str, torch.Tensor]]:
    opt = optimizer_of(cluster, model_id)
    return opt, cluster.run("optimizer_state", model_id=model_id)


# ----------------------------------------------------------------------- durability

def _optim_dir(cluster: Cluster, m: ShardedModel) -> Path | None:
    return cluster.root / m.id / OPTIM_DIR if cluster.root is not None else None


def _save_optimizer(cluster: Cluster, m: ShardedModel, opt: training.ServedOptimizer) -> None:
    """Writes this rank's optimizer (configuration, steps, its parts of the state) as the
    state file of the model's current version, fsynced and renamed into place (older files
    stay until `_prune`: the step's parameters are not logged yet)."""
    from safetensors.torch import save_file

    d = _optim_dir(cluster, m)
    if d is None:
        return
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.contiguous().clone() for k, t in training.optimizer_state(opt)}
    meta = {"config": json.dumps(training.optimizer_config(opt)), "version": str(m.version)}
    tmp = d / ".state.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    storage.fsync(tmp)
    os.replace(tmp, d / f"{m.version}.safetensors")
    storage.fsync(d)


def _prune(cluster: Cluster, m: ShardedModel) -> None:
    """Drops the state files older than the model's version (once the newest is durable and,
    for a step, its parameters are logged)."""
    d = _optim_dir(cluster, m)
    if d is None or not d.is_dir():
        return
    for f in d.glob("*.safetensors"):
        if f.stem.isdigit() and int(f.stem) < m.version:
            f.unlink(missing_ok=True)


@on_recover
def recover(cluster: Cluster) -> None:
    """After this rank recovered its parts: each model's optimizer from the newest state file
    its recovered version reached; files of later versions (a step whose parameters were never
    logged) are deleted, so a later write of that version cannot pick them up."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    for m in list(cluster.models.values()):
        d = _optim_dir(cluster, m)
        if d is None or not d.is_dir():
            continue
        files = sorted((int(f.stem), f) for f in d.glob("*.safetensors") if f.stem.isdigit())
        best = None
        for v, f in files:
            if v > m.version:
                f.unlink(missing_ok=True)
            else:
                best = f
        if best is None:
            continue
        with safe_open(str(best), "pt") as fh:
            meta = fh.metadata()
        config = json.loads(meta["config"])
        groups = [(list(g["parameters"]), dict(g["options"])) for g in config["groups"]]
        opt = _build(m, config["type"], groups, config["defaults"])
        by_name = {n: p for _, n, p in opt.params}
        for key, t in load_file(str(best)).items():
            name, _, entry = key.rpartition("/")
            opt.torch_opt.state[by_name[name]][entry] = t
        opt.steps = int(config["steps"])
        state_of(m).optimizer = opt
