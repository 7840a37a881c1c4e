"""The allow-list of torch.nn.init schemes and validation of their arguments.

Each scheme runs on a new CPU tensor of its target's shape and dtype, drawing from torch's global
CPU generator inside `rng.seeded(seed)`, then the model copies the results back. So a seeded
ApplyInit is bit-identical to `torch.manual_seed(seed)` followed by the same calls on local CPU
tensors, whatever device the model lives on (schemes such as sparse_ draw from the global
generator even when given a generator, so passing one would not be), and a failing scheme
changes nothing.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import init as _init

from paramhub.common.errors import InvalidArgumentError

SCHEMES = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_",
           "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
           "orthogonal_", "sparse_")

_STRING_ARGS = {"mode": ("fan_in", "fan_out"),
                "nonlinearity": ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                                 "conv_transpose2d", "conv_transpose3d", "sigmoid", "tanh",
                                 "relu", "leaky_relu", "selu")}
_INT_ARGS = {"groups"}


class InitScheme:
    """One allow-listed init function with its accepted keyword arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fn: Callable[..., torch.Tensor] = getattr(_init, name)
        params = inspect.signature(self.fn).parameters
        self.args = {n: p for n, p in params.items() if n not in ("tensor", "generator")}
        self.required = {n for n, p in self.args.items() if p.default is inspect.Parameter.empty}

    def check_args(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validates keyword arguments: known names, right types, finite numbers."""
        unknown = sorted(set(args) - set(self.args))
        if unknown:
            raise InvalidArgumentError(
                f"{self.name} takes no argument {unknown[0]!r} (it takes {sorted(self.args)})",
                reason="BAD_INIT_ARGS")
        missing = sorted(self.required - set(args))
        if missing:
            raise InvalidArgumentError(f"{self.name} needs argument {missing[0]!r}",
                                       reason="BAD_INIT_ARGS")
        out: dict[str, Any] = {}
        for k, v in args.items():
            if k in _STRING_ARGS:
                if v not in _STRING_ARGS[k]:
                    raise InvalidArgumentError(f"{self.name}: {k} must be one of "
                                               f"{list(_STRING_ARGS[k])}, not {v!r}",
                                               reason="BAD_INIT_ARGS")
            elif k in _INT_ARGS:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise InvalidArgumentError(f"{self.name}: {k} must be a positive int",
                                               reason="BAD_INIT_ARGS")
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise InvalidArgumentError(f"{self.name}: {k} must be a number, not {v!r}",
                                               reason="BAD_INIT_ARGS")
                if not math.isfinite(v):
                    raise InvalidArgumentError(f"{self.name}: {k} must be finite, not {v}",
                                               reason="BAD_INIT_ARGS")
            out[k] = v
        return out

    def run(self, target: torch.Tensor, args: dict[str, Any]) -> torch.Tensor:
        """Returns a new CPU tensor of target's shape and dtype with the scheme applied.

        Every scheme overwrites every element, so the target's values are not read. Call it
        inside `rng.seeded(...)`: it draws from the global CPU generator.
        """
        work = torch.empty(target.shape, dtype=target.dtype, device="cpu")
        try:
            with torch.no_grad():
                self.fn(work, **args)
        except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as e:
            raise InvalidArgumentError(f"{self.name} on shape {list(target.shape)}: "
                                       f"{str(e).splitlines()[0]}",
                                       reason="BAD_INIT_ARGS") from None
        return work


_REGISTRY = {name: InitScheme(name) for name in SCHEMES}


def get_scheme(name: str) -> InitScheme:
    """The scheme called `name`; InvalidArgumentError (UNKNOWN_INIT_SCHEME) otherwise."""
    scheme = _REGISTRY.get(name)
    if scheme is None:
        raise InvalidArgumentError(f"unknown init scheme {name[:100]!r}; known: {list(SCHEMES)}",
                                   reason="UNKNOWN_INIT_SCHEME")
    return scheme
