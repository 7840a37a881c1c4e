"""dtypes and shapes on the wire: the DType enum values (tensor.proto) of torch dtypes, and
the validation of shapes received from a peer. Imports no protobuf: the enum numbers are the wire
format, written here once and checked against the generated enum by tests/unit/test_codec.py."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch

from paramhub.common.errors import InvalidArgumentError, ResourceExhaustedError

if TYPE_CHECKING:  # the generated enum type, for type checkers only (no protobuf at run time)
    from paramhub.v1.tensor_pb2 import Dtype
else:
    Dtype = int

__all__ = ["DTYPES", "dtype_to_proto", "dtype_from_proto", "check_shape", "numel", "nbytes",
           "MAX_RANK"]

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for
    raise ImportError("paramhub's wire format is little-endian; big-endian hosts are unsupported")

#: torch dtype -> paramhub.v1.DType value (tensor.proto; the numbers never change).
DTYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.complex64: 5,
    torch.complex128: 6,
    torch.int8: 7,
    torch.uint8: 8,
    torch.int16: 9,
    torch.int32: 10,
    torch.int64: 11,
    torch.bool: 12,
    torch.uint16: 13,
    torch.uint32: 14,
    torch.uint64: 15,
    torch.float8_e4m3fn: 16,
    torch.float8_e5m2: 17,
}
_DTYPES = DTYPES
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _DTYPES.items()}

#: Hard cap on tensor rank accepted from the wire (torch itself allows at most 64 dims).
MAX_RANK = 64
#: Sizes (and their product, zeros counted as ones) must stay below this: torch's strides are
#: signed 64-bit byte offsets, so the product times the widest element must fit.
_MAX_NUMEL = 1 << 59


def dtype_to_proto(dtype: torch.dtype) -> Dtype:
    """The DType enum value of a torch dtype; InvalidArgumentError for unsupported ones."""
    try:
        return cast(Dtype, _DTYPES[dtype])
    except KeyError:
        raise InvalidArgumentError(f"dtype {dtype} is not supported on the wire",
                                   reason="UNSUPPORTED_DTYPE") from None


def dtype_from_proto(value: int) -> torch.dtype:
    """The torch dtype of a DType enum value; InvalidArgumentError for unknown values."""
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise InvalidArgumentError(f"unknown or unspecified dtype enum value {value}",
                                   reason="UNSUPPORTED_DTYPE") from None


def check_shape(shape: Sequence[int], *, max_elements: int | None = None) -> tuple[int, ...]:
    """Validates a shape from the wire and returns it as a tuple."""
    shape = tuple(map(int, shape))
    if len(shape) > MAX_RANK:
        raise InvalidArgumentError(f"tensor rank {len(shape)} exceeds the maximum {MAX_RANK}",
                                   reason="BAD_SHAPE")
    numel = 1
    nonzero = 1
    for s in shape:
        if s < 0:
            raise InvalidArgumentError(f"negative size in shape {list(shape)}",
                                       reason="BAD_SHAPE")
        numel *= s
        nonzero *= max(s, 1)
    if nonzero >= _MAX_NUMEL:
        # torch computes strides over the non-zero sizes: even an empty tensor of
        # [0, 2**62, 2**62] overflows them.
        raise InvalidArgumentError(f"shape {list(shape)} is too large to index",
                                   reason="BAD_SHAPE")
    if max_elements is not None and numel > max_elements:
        # A limit, not a malformed shape: the same shape is fine on a server with a higher cap.
        raise ResourceExhaustedError(
            f"shape {list(shape)} has {numel} elements, more than the limit "
            f"max_tensor_elements={max_elements}", reason="TENSOR_TOO_LARGE",
            metadata={"limit": "max_tensor_elements", "limit_value": str(max_elements),
                      "asked": str(numel)})
    return shape




def numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of `shape`."""
    return math.prod(shape)


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """The bytes of a contiguous tensor of `dtype` and `shape`."""
    return math.prod(shape) * dtype.itemsize
