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
