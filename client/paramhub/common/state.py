"""Many tensors in one buffer (PullState / PushState): the layout, packing and unpacking.
Imports no protobuf: headers are anything with `dtype` (DType enum value) and `shape`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from paramhub.common.buffers import empty
from paramhub.common.dtypes import _FROM_PROTO, MAX_RANK, check_shape, dtype_from_proto, \
    dtype_to_proto
from paramhub.common.errors import InvalidArgumentError

__all__ = ["STATE_ALIGN", "Header", "state_layout", "full_state_layout", "pack_state",
           "unpack_state"]


class Header(NamedTuple):
    """A tensor's wire dtype (DType enum value) and shape, as the layout functions read them
    (a paramhub.v1.TensorHeader has the same two fields)."""

    dtype: int
    shape: Sequence[int]


#: Each tensor of a state transfer starts at a multiple of this many bytes.
STATE_ALIGN = 64


def _shape_numel(shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
    shape = tuple(shape)
    if len(shape) > MAX_RANK or (shape and min(shape) < 0):
        check_shape(shape)  # raises with the precise reason
    return shape, math.prod(shape)


def state_layout(headers: Sequence[Any], *, max_bytes: int | None = None
                 ) -> tuple[list[int], list[int], int]:
    """(offsets, byte sizes, total bytes) of tensors laid out back to back.

    Each tensor starts at a multiple of STATE_ALIGN, and the total is rounded up to one too, so
    every tensor's span is a whole number of elements of any dtype.
    """
    offsets, sizes, _, _, total = full_state_layout(headers)
    if max_bytes is not None and total > max_bytes:
        raise InvalidArgumentError(f"the tensors need {total} bytes, more than the limit "
                                   f"{max_bytes}", reason="TENSOR_TOO_LARGE")
    return offsets, sizes, total


def full_state_layout(headers: Sequence[Any]
                      ) -> tuple[list[int], list[int], list[torch.dtype],
                                 list[tuple[int, ...]], int]:
    """(offsets, byte sizes, dtypes, shapes, total bytes): `state_layout` plus what
    `unpack_state` needs, so a receiver reads its manifest's 1,000 headers once, not twice."""
    offsets, sizes, dtypes, shapes = [], [], [], []
    off = 0
    align = STATE_ALIGN
    from_proto = _FROM_PROTO
    for h in headers:
        shape, numel = _shape_numel(h.shape)
        dtype = from_proto.get(h.dtype) or dtype_from_proto(h.dtype)
        nbytes = numel * dtype.itemsize
        offsets.append(off)
        sizes.append(nbytes)
        dtypes.append(dtype)
        shapes.append(shape)
        off += -(-nbytes // align) * align
    return offsets, sizes, dtypes, shapes, off


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(shape[i + 1], 1)
    return tuple(strides)


def pack_state(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None,
               headers: Sequence[Any] | None = None,
               layout: tuple[list[int], list[int], int] | None = None) -> torch.Tensor:
    """Copies tensors into one uint8 buffer laid out by state_layout (`out`, or a new one).

    Handles any device, stride, conj/neg bit: each tensor is copied exactly once. Padding is
    zeroed, so no stale memory is ever sent.
    """
    if layout is None:
        if headers is None:
            headers = [Header(dtype_to_proto(t.dtype), list(t.shape)) for t in tensors]
        layout = state_layout(headers)
    offsets, sizes, total = layout
    if out is None:
        out = empty((total,), torch.uint8)
    elif out.numel() < total:
        raise InvalidArgumentError("state buffer is too small", reason="BAD_TENSOR_BYTES")
    if tensors and sum(sizes) == total:
        # No padding anywhere (every size a multiple of STATE_ALIGN): with one dtype on one
        # device, the tensors are flattened into one buffer by a single torch call (its loop
        # is C++; conj/neg bits are resolved by it) and copied once into place, instead of a
        # strided view per tensor (measured ~0.8 ms less for 1,000 small tensors).
        first = tensors[0]
        dtype, device = first.dtype, first.device
        if all(t.dtype is dtype and t.device == device for t in tensors):
            with torch.no_grad():
                flat = torch._utils._flatten_dense_tensors(list(tensors))
                out[:total].view(dtype).copy_(flat)
            return out
    typed: dict[torch.dtype, torch.Tensor] = {}
    dsts, srcs = [], []
    prev_end = 0
    body = out[:total]
    for t, off, nbytes in zip(tensors, offsets, sizes):
        if off > prev_end:
            out[prev_end:off].zero_()
        if nbytes:
            dtype = t.dtype
            view = typed.get(dtype)
            if view is None:
                view = typed[dtype] = body.view(dtype)
            shape = t.shape
            if len(shape) == 2:
                strides: tuple[int, ...] = (shape[1], 1)
            elif len(shape) == 1:
                strides = (1,)
            else:
                strides = _contiguous_strides(tuple(shape))
            dsts.append(view.as_strided(shape, strides, off // dtype.itemsize))
            srcs.append(t)  # not detached: no_grad below (a detach per tensor cost ~4 us)
        prev_end = off + nbytes
    if total > prev_end:
        out[prev_end:total].zero_()
    same_device = all(s.device.type == "cpu" and not s.is_conj() and not s.is_neg()
                      for s in srcs)
    with torch.no_grad():
        if same_device and srcs:
            torch._foreach_copy_(dsts, srcs)
        else:
            for d, s_ in zip(dsts, srcs):
                d.copy_(s_)
    return out


def unpack_state(flat: torch.Tensor, headers: Sequence[Any],
                 layout: Any = None) -> list[torch.Tensor]:
    """Views of a state buffer as the tensors its headers describe (no copy); `layout` is
    `full_state_layout(headers)` when the caller has it already."""
    offsets, sizes, dtypes, shapes, total = layout or full_state_layout(headers)
    if flat.numel() != total:
        raise InvalidArgumentError(f"state data has {flat.numel()} bytes, the headers describe "
                                   f"{total}", reason="BAD_TENSOR_BYTES")
    typed: dict[torch.dtype, torch.Tensor] = {}
    out = []
    for off, nbytes, dtype, shape in zip(offsets, sizes, dtypes, shapes):
        if not nbytes:
            out.append(torch.empty(shape, dtype=dtype))
            continue
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = flat.view(dtype)
        if len(shape) == 2:
            strides: tuple[int, ...] = (shape[1], 1)
        elif len(shape) == 1:
            strides = (1,)
        else:
            strides = _contiguous_strides(shape)
        out.append(view.as_strided(shape, strides, off // dtype.itemsize))
    return out


# ---------------------------------------------------------------------------------------------
# Indices
