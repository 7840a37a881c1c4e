"""The registry of cluster commands defined outside engine.py.

A command is a function `fn(cluster, **args)` that every rank runs, in rank 0's order, from the
command loop (engine.Cluster._execute). engine.py defines the basic ones as `Cluster._do_<op>`
methods; a module for one area (compute, state transfers, recovery, ...) registers its own with
`@command("op")` and is named in MODULES, which every rank imports before its loop starts (so
rank 0 never broadcasts an op another rank does not know).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: op -> fn(cluster, **args)
COMMANDS: dict[str, Callable[..., Any]] = {}

#: Modules that register commands (imported by Cluster.start on every rank).
MODULES: tuple[str, ...] = ("paramhub_server.cluster.routed", "paramhub_server.cluster.state",
                             "paramhub_server.cluster.compute", "paramhub_server.cluster.optim")

#: fn(cluster) run by Cluster.start on every rank after it recovered its models from disk
#: and resolved writes left in doubt (before the command loop starts): an area's own state
#: kept beside the models.
RECOVER_HOOKS: list[Callable[[Any], None]] = []


def command(op: str) -> Callable[[F], F]:
    """Registers `fn(cluster, **args)` as the command `op`."""
    def register(fn: F) -> F:
        if op in COMMANDS:
            raise ValueError(f"cluster command {op!r} is defined twice")
        COMMANDS[op] = fn
        return fn
    return register


def on_recover(fn: F) -> F:
    """Registers `fn(cluster)` to run after this rank's recovery (see RECOVER_HOOKS)."""
    RECOVER_HOOKS.append(fn)
    return fn


def load() -> None:
    """Imports every module in MODULES (each registers its commands once)."""
    import importlib
    for name in MODULES:
        importlib.import_module(name)
