"""Server-side probes: statistics of a tensor, a region of one, or a whole model, computed where
the tensor lives so that only a few numbers travel.

Everything is computed in float64 chunk by chunk (bounded extra memory for any tensor size);
complex values are summarized by their magnitudes. min/max/mean/std/norm and the histogram cover
finite values only; NaN and Inf are counted. The checksum is SHA-256 of the region's raw
little-endian row-major bytes, exactly the bytes GetTensor would send, so a client can check it
against `paramhub.client.tensor_checksum(t)` of the tensor it read.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from paramhub.common.buffers import byte_view
from paramhub.common.errors import InvalidArgumentError, NotFoundError
from paramhub_server.core.indexing import apply_index
from paramhub_server.core.model import PARAMETER, ServedModel

#: Most histogram bins a probe may ask for.
MAX_BINS = 4096
#: Elements processed at a time (bounds the float64 working copy to 32 MiB).
CHUNK_ELEMENTS = 4 << 20


@dataclass
class Stats:
    """What a probe computes. Field meanings follow paramhub.v1.TensorStats."""

    name: str
    dtype: torch.dtype | None
    shape: tuple[int, ...]
    numel: int = 0
    nan_count: int = 0
    inf_count: int = 0
    min: float = math.nan
    max: float = math.nan
    mean: float = math.nan
    std: float = math.nan
    norm: float = 0.0
    histogram_counts: list[int] = field(default_factory=list)
    histogram_min: float = 0.0
    histogram_max: float = 0.0
    checksum_sha256: str = ""
    version: int = 0


class _Accumulator:
    """Streaming min/max/count/sum/sum-of-squares over float64 chunks (Chan et al. merge for the
    variance, so the result matches a one-shot torch.std to float64 rounding)."""

    def __init__(self) -> None:
        self.numel = self.nan = self.inf = self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.mean = 0.0
        self.m2 = 0.0
        self.sumsq = 0.0

    def add(self, x: torch.Tensor) -> torch.Tensor:
        """Adds a float64 chunk; returns its finite values (for the histogram pass)."""
        self.numel += x.numel()
        nan = torch.isnan(x)
        inf = torch.isinf(x)
        self.nan += int(nan.sum())
        self.inf += int(inf.sum())
        finite = x[~(nan | inf)] if (self.nan or self.inf) else x
        n = finite.numel()
        if n == 0:
            return finite
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))
        cmean = float(finite.mean())
        cm2 = float(((finite - cmean) ** 2).sum())
        total = self.count + n
        delta = cmean - self.mean
        self.mean += delta * n / total
        self.m2 += cm2 + delta * delta * self.count * n / total
        self.count = total
        self.sumsq += float((finite * finite).sum())
        return finite


def _as_float64(chunk: torch.Tensor) -> torch.Tensor:
    if chunk.is_complex():
        return chunk.abs().to(torch.float64)
    return chunk.to(torch.float64)


def _chunks(flat: torch.Tensor) -> Any:
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        yield flat[start:start + CHUNK_ELEMENTS]


def _hash_bytes(h: Any, flat: torch.Tensor) -> None:
    """Feeds the raw bytes of a flat tensor to a hash, chunk by chunk, without Python copies."""
    for chunk in _chunks(flat):
        # The codec's byte view: exactly the bytes GetTensor sends.
        c = byte_view(chunk)
        n = c.numel()
        if n:
            h.update((ctypes.c_char * n).from_address(c.data_ptr()))


def check_histogram(bins: int, hmin: float | None, hmax: float | None) -> None:
    """Validates histogram arguments (InvalidArgumentError)."""
    if not 0 <= bins <= MAX_BINS:
        raise InvalidArgumentError(f"histogram_bins must be 0 to {MAX_BINS}, got {bins}",
                                   reason="BAD_ARGUMENT", metadata={"histogram_bins": str(bins)})
    for label, v in (("histogram_min", hmin), ("histogram_max", hmax)):
        if v is not None and not math.isfinite(v):
            raise InvalidArgumentError(f"{label} must be finite", reason="BAD_ARGUMENT")
    if hmin is not None and hmax is not None and hmin > hmax:
        raise InvalidArgumentError(f"histogram_min {hmin} is above histogram_max {hmax}",
                                   reason="BAD_ARGUMENT")


def histogram_range(lo: float, hi: float) -> tuple[float, float]:
    """The histogram's [min, max]: an empty range (a constant tensor) is widened by one on each
    side as torch.histc does; a reversed one (e.g. only histogram_min given, above every value)
    or one too wide for float64 bins is rejected (InvalidArgumentError)."""
    if lo == hi:
        pad = max(1.0, abs(lo) * 1e-6)
        lo, hi = lo - pad, hi + pad
    if not lo < hi:
        raise InvalidArgumentError(f"the histogram range [{lo}, {hi}] is empty",
                                   reason="BAD_ARGUMENT")
    if not math.isfinite(hi - lo):
        raise InvalidArgumentError(f"the histogram range [{lo}, {hi}] is too wide",
                                   reason="BAD_ARGUMENT")
    return lo, hi


def compute(tensors: Sequence[torch.Tensor], *, name: str, bins: int = 0,
            hmin: float | None = None, hmax: float | None = None,
            checksum: bool = True) -> Stats:
    """Statistics over the values of one or more tensors taken together.

    The caller holds whatever lock keeps the tensors still. With several tensors the checksum is
    left empty (the model checksum is built from the per-tensor ones by `probe_model`).
    """
    check_histogram(bins, hmin, hmax)
    single = tensors[0] if len(tensors) == 1 else None
    stats = Stats(name=name, dtype=single.dtype if single is not None else None,
                  shape=tuple(single.shape) if single is not None else ())
    acc = _Accumulator()
    flats = [t.detach().reshape(-1) for t in tensors]
    for flat in flats:
        for chunk in _chunks(flat):
            acc.add(_as_float64(chunk))
    stats.numel, stats.nan_count, stats.inf_count = acc.numel, acc.nan, acc.inf
    if acc.count:
        stats.min, stats.max, stats.mean = acc.min, acc.max, acc.mean
        stats.std = math.sqrt(acc.m2 / (acc.count - 1)) if acc.count > 1 else math.nan
        stats.norm = math.sqrt(acc.sumsq)
    if bins:
        a, b = histogram_range(hmin if hmin is not None else (acc.min if acc.count else 0.0),
                               hmax if hmax is not None else (acc.max if acc.count else 0.0))
        counts = torch.zeros(bins, dtype=torch.float64)
        if acc.count:
            for flat in flats:
                for chunk in _chunks(flat):
                    x = _as_float64(chunk)
                    x = x[torch.isfinite(x)]
                    if x.numel():
                        # histc ignores values outside [a, b].
                        counts += torch.histc(x.cpu(), bins=bins, min=a, max=b)
        stats.histogram_counts = [int(c) for c in counts.tolist()]
        stats.histogram_min, stats.histogram_max = a, b
    if checksum and single is not None:
        h = hashlib.sha256()
        _hash_bytes(h, flats[0])
        stats.checksum_sha256 = h.hexdigest()
    return stats


def probe_tensor(model: ServedModel, name: str, index: tuple[Any, ...], *, kind: str | None,
                 grad: bool = False, bins: int = 0, hmin: float | None = None,
                 hmax: float | None = None) -> tuple[Stats, int]:
    """Statistics of `tensor[index]` (or of its gradient); returns (stats, model version)."""
    check_histogram(bins, hmin, hmax)
    ref = model.ref(name, kind)
    with model.lock.read():
        t = ref.get()
        if grad:
            if ref.kind != PARAMETER or t.grad is None:
                raise NotFoundError(f"{name!r} has no gradient", reason="GRAD_NOT_SET",
                                    metadata={"model": model.id, "tensor": name[:200]})
            t = t.grad
        region = apply_index(t.detach(), index)
        stats = compute([region], name=name, bins=bins, hmin=hmin, hmax=hmax)
        stats.version = model.versions[ref.group]
        return stats, model.version


def probe_model(model: ServedModel, *, include_buffers: bool = False, bins: int = 0,
                hmin: float | None = None, hmax: float | None = None, per_tensor: bool = False
                ) -> tuple[Stats, list[Stats], int]:
    """Statistics over every parameter (and optionally buffer) storage of a model, each tied
    storage once; plus each storage's own statistics when `per_tensor`. Returns
    (model stats, per-tensor stats, model version)."""
    check_histogram(bins, hmin, hmax)
    with model.lock.read():
        seen: set[int] = set()
        refs = []
        for n in model.names(include_buffers=include_buffers):
            ref = model.ref(n)
            if ref.group not in seen:
                seen.add(ref.group)
                refs.append(ref)
        tensors = [r.get().detach() for r in refs]
        # Per-tensor checksums are always needed for the model checksum; the per-tensor numbers
        # are only computed when asked for.
        lines = []
        each: list[Stats] = []
        for ref, t in zip(refs, tensors):
            if per_tensor:
                s = compute([t], name=ref.name, bins=bins, hmin=hmin, hmax=hmax)
                s.version = model.versions[ref.group]
                each.append(s)
                digest = s.checksum_sha256
            else:
                h = hashlib.sha256()
                _hash_bytes(h, t.reshape(-1))
                digest = h.hexdigest()
            lines.append(f"{ref.name} {str(t.dtype).removeprefix('torch.')} "
                         f"{list(t.shape)} {digest}\n")
        if tensors:
            stats = compute(tensors, name=model.name, bins=bins, hmin=hmin, hmax=hmax,
                            checksum=False)
        else:
            stats = Stats(name=model.name, dtype=None, shape=())
            check_histogram(bins, hmin, hmax)
        stats.dtype, stats.shape = None, ()
        stats.checksum_sha256 = hashlib.sha256("".join(lines).encode()).hexdigest()
        stats.version = model.version
        return stats, each, model.version
