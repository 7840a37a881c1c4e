"""Applying a decoded torch index to a served tensor: bounds checks before a device sees the
index, the size of the region an index selects, and torch's errors mapped to the error table.
Server-only (the SDK sends indices, it never applies them to served tensors)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from paramhub.common.errors import InvalidArgumentError, OutOfRangeError

__all__ = ["check_index_tensor_bounds", "index_result_shape", "apply_index"]


def check_index_tensor_bounds(shape: Sequence[int], index: tuple[Any, ...]) -> None:
    """Raises IndexError for an integer index tensor with an element outside its dimension.

    torch checks this on the host for CPU tensors, but on CUDA the check is a device-side
    assert, which aborts every later CUDA call of the whole server process. So integer index
    tensors (which arrive on the CPU) are checked here before they go near a device.
    """
    consumed = [0 if i is None or i is Ellipsis else
                (i.dim() if isinstance(i, torch.Tensor) and i.dtype is torch.bool else 1)
                for i in index]
    if Ellipsis in [i for i in index if not isinstance(i, torch.Tensor)]:
        at = next(k for k, i in enumerate(index)
                  if not isinstance(i, torch.Tensor) and i is Ellipsis)
        consumed[at] = max(0, len(shape) - sum(consumed))
    dim = 0
    for item, n in zip(index, consumed):
        if (isinstance(item, torch.Tensor) and item.dtype is not torch.bool and item.numel()
                and dim < len(shape)):
            size = shape[dim]
            low, high = int(item.min()), int(item.max())
            if low < -size or high >= size:
                bad = low if low < -size else high
                raise IndexError(f"index {bad} is out of bounds for dimension {dim} with size "
                                 f"{size}")
        dim += n


def index_result_shape(shape: Sequence[int], index: tuple[Any, ...]
                       ) -> tuple[int, ...] | None:
    """The shape `tensor[index]` would have, computed on the meta device (no memory), for a
    tensor of `shape`: an index tensor can make a region far larger than the tensor (index
    tensors of shapes (N, 1) and (1, N) select N x N elements). A boolean mask counts as all
    True (an upper bound). None if torch rejects the index (the real indexing reports it)."""
    items: list[Any] = []
    for i in index:
        if isinstance(i, torch.Tensor):
            if i.dtype is torch.bool:
                if i.dim() == 0:
                    items.append(None)  # a size-1 (or 0) new dimension
                else:
                    items.extend(torch.empty(i.numel(), dtype=torch.int64, device="meta")
                                 for _ in range(i.dim()))
            else:
                items.append(torch.empty(i.shape, dtype=torch.int64, device="meta"))
        else:
            items.append(i)
    try:
        return tuple(torch.empty(tuple(shape), dtype=torch.uint8, device="meta")
                     [tuple(items)].shape)
    except (IndexError, RuntimeError, TypeError, ValueError):
        return None


def apply_index(t: torch.Tensor, index: tuple[Any, ...]) -> torch.Tensor:
    """`t[index]` with torch's errors mapped: bounds -> OutOfRangeError, others -> InvalidArgument."""
    if not index:
        return t
    try:
        if any(isinstance(i, torch.Tensor) for i in index):
            check_index_tensor_bounds(t.shape, index)
            index = tuple(i.to(t.device) if isinstance(i, torch.Tensor) else i for i in index)
        return t[index]
    except IndexError as e:
        text = str(e)
        if "out of bounds" in text or "out of range" in text:
            raise OutOfRangeError(text, reason="INDEX_OUT_OF_RANGE") from None
        raise InvalidArgumentError(text, reason="BAD_INDEX") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidArgumentError(str(e).splitlines()[0], reason="BAD_INDEX") from None
