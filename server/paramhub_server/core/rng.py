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

from paramhub.common.buffers import tensor_bytes
from paramhub.common.errors import InvalidArgumentError

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



#: Bytes of torch's CPU generator state (torch.default_generator.get_state()).
STATE_BYTES = torch.default_generator.get_state().numel()


class GeneratorState:
    """A client's CPU generator state: a block under `drawing_from(state)` draws from it, and
    `state.state` is then the advanced state to send back, so the client's generator moves on
    exactly as it would have locally."""

    def __init__(self, state: bytes) -> None:
        if len(state) != STATE_BYTES:
            raise InvalidArgumentError(
                f"a generator state has {STATE_BYTES} bytes (torch.Generator.get_state() of a "
                f"CPU generator), not {len(state)}", reason="BAD_GENERATOR_STATE")
        self.state = bytes(state)
        self._tensor = torch.frombuffer(bytearray(state), dtype=torch.uint8)
        try:  # torch checks the state's fields: check before anything is drawn or changed
            torch.Generator().set_state(self._tensor)
        except RuntimeError as e:
            raise InvalidArgumentError(f"bad generator state: {str(e).splitlines()[0]}",
                                       reason="BAD_GENERATOR_STATE") from None


@contextmanager
def drawing_from(gen: GeneratorState | None) -> Iterator[None]:
    """Runs the block holding the global CPU generator, set to `gen`'s state when one is given
    (the server's own state is restored afterwards, and `gen.state` advanced)."""
    if gen is None:
        with _LOCK:
            yield
        return
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.set_state(gen._tensor)
        yield
        gen.state = tensor_bytes(torch.default_generator.get_state())
