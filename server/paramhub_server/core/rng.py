"""One lock around torch's global random generator.

Seeded work (CreateModel with a seed, ApplyInit with a seed) must draw exactly the numbers that
`torch.manual_seed(seed)` followed by the same local calls draws; torch's modules and init
functions draw from the global CPU generator, so every use of it by the server runs under this
lock, and a seeded scope restores the generator afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_LOCK = threading.Lock()


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Runs the block holding the global generator; seeded with `seed` when it is not None."""
    with _LOCK:
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator: torch.manual_seed would also reseed every CUDA device.
            torch.default_generator.manual_seed(seed)
            yield


@contextmanager
def seeded_on(seed: int, device: torch.device) -> Iterator[None]:
    """Like `seeded`, but also forks and seeds the generator of a CUDA `device`, for passes
    that run there (dropout on a GPU draws from the device's generator)."""
    if device.type != "cuda":
        with seeded(seed):
            yield
        return
    with _LOCK:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index]):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
            yield
