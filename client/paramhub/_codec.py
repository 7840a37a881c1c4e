"""The one codec: torch.Tensor, torch indices and Python values <-> paramhub.v1 messages.

Both the SDK and the server use this module, so the two sides cannot drift apart.

Wire format of a tensor: dtype enum + int64 shape + raw little-endian row-major bytes. Bytes are
obtained by viewing the (contiguous, CPU) tensor as uint8, which works for every fixed-width
dtype including bfloat16 and bool; nothing is pickled and numpy is not involved. Large tensors
travel as TensorChunk streams with the header in the first chunk only; the receiver
preallocates the tensor and copies each chunk into place (no b"".join of the whole payload).
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from paramhub.errors import InvalidArgumentError, OutOfRangeError, ResourceExhaustedError
from paramhub.v1 import tensor_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "dtype_to_proto",
    "dtype_from_proto",
    "tensor_to_proto",
    "tensor_from_proto",
    "iter_tensor_chunks",
    "TensorAssembler",
    "assemble_tensors",
    "index_to_proto",
    "index_from_proto",
    "value_to_proto",
    "value_from_proto",
]

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for
    raise ImportError("paramhub's wire format is little-endian; big-endian hosts are unsupported")

#: Default size of one streamed chunk. ~1 MiB measured fastest on loopback (STYLE.md §3).
DEFAULT_CHUNK_BYTES = 1 << 20

_DTYPES: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.complex64: pb.DTYPE_COMPLEX64,
    torch.complex128: pb.DTYPE_COMPLEX128,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.int16: pb.DTYPE_INT16,
    torch.int32: pb.DTYPE_INT32,
    torch.int64: pb.DTYPE_INT64,
    torch.bool: pb.DTYPE_BOOL,
    torch.uint16: pb.DTYPE_UINT16,
    torch.uint32: pb.DTYPE_UINT32,
    torch.uint64: pb.DTYPE_UINT64,
    torch.float8_e4m3fn: pb.DTYPE_FLOAT8_E4M3FN,
    torch.float8_e5m2: pb.DTYPE_FLOAT8_E5M2,
}
_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in _DTYPES.items()}

#: Hard cap on tensor rank accepted from the wire (torch itself allows at most 64 dims).
MAX_RANK = 64


def dtype_to_proto(dtype: torch.dtype) -> int:
    """The DType enum value of a torch dtype; InvalidArgumentError for unsupported ones."""
    try:
        return _DTYPES[dtype]
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
    shape = tuple(int(s) for s in shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgumentError(f"tensor rank {len(shape)} exceeds the maximum {MAX_RANK}",
                                   reason="BAD_SHAPE")
    if any(s < 0 for s in shape):
        raise InvalidArgumentError(f"negative size in shape {list(shape)}", reason="BAD_SHAPE")
    numel = 1
    for s in shape:
        numel *= s
    if max_elements is not None and numel > max_elements:
        # A limit, not a malformed shape: the same shape is fine on a server with a higher cap.
        raise ResourceExhaustedError(
            f"shape {list(shape)} has {numel} elements, more than the limit "
            f"max_tensor_elements={max_elements}", reason="TENSOR_TOO_LARGE",
            metadata={"limit": "max_tensor_elements", "limit_value": str(max_elements),
                      "asked": str(numel)})
    return shape


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (copying to a contiguous CPU tensor only if needed)."""
    if t.device.type != "cpu":
        t = t.detach().to("cpu")
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous().reshape(-1)
    if t.numel() <= 1 and t.stride(0) != 1:
        # A one-element or empty tensor counts as contiguous whatever its stride (e.g.
        # w[0, 5::2**40], found by the fuzz suite); view() needs stride 1.
        t = torch.empty(t.numel(), dtype=t.dtype).copy_(t)
    return t.view(torch.uint8)


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Encodes a whole tensor into one Tensor message (use chunks for large ones)."""
    flat = _byte_view(t)
    data = ctypes.string_at(flat.data_ptr(), flat.numel()) if flat.numel() else b""
    return pb.Tensor(dtype=dtype_to_proto(t.dtype), shape=list(t.shape), data=data)


def _expected_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def tensor_from_proto(msg: pb.Tensor, *, max_elements: int | None = None) -> torch.Tensor:
    """Decodes a Tensor message into a new CPU tensor; validates dtype, shape and byte length."""
    dtype = dtype_from_proto(msg.dtype)
    shape = check_shape(msg.shape, max_elements=max_elements)
    expected = _expected_nbytes(dtype, shape)
    if len(msg.data) != expected:
        raise InvalidArgumentError(
            f"tensor data has {len(msg.data)} bytes but dtype {dtype} and shape {list(shape)} "
            f"need {expected}", reason="BAD_TENSOR_BYTES")
    out = torch.empty(shape, dtype=dtype)
    if expected:
        ctypes.memmove(out.data_ptr(), msg.data, expected)
    return out


def iter_tensor_chunks(t: torch.Tensor, *, name: str = "", version: int = 0,
                       chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.TensorChunk]:
    """Streams a tensor as TensorChunk messages, header in the first.

    Reads straight from the tensor's memory: only one chunk's bytes exist as a Python bytes
    object at a time. An empty tensor is one chunk with a header and no data.
    """
    flat = _byte_view(t)
    header = pb.TensorHeader(name=name, dtype=dtype_to_proto(t.dtype), shape=list(t.shape),
                             version=version)
    total = flat.numel()
    if total == 0:
        yield pb.TensorChunk(header=header)
        return
    # A memoryview over the tensor's own memory (no numpy, works for every dtype); `flat`
    # stays referenced for as long as the generator runs.
    mv = memoryview((ctypes.c_char * total).from_address(flat.data_ptr())).cast("B")
    first = True
    for start in range(0, total, chunk_bytes):
        data = mv[start:start + chunk_bytes].tobytes()
        if first:
            yield pb.TensorChunk(header=header, data=data)
            first = False
        else:
            yield pb.TensorChunk(data=data)


class TensorAssembler:
    """Receives one tensor's chunks into a preallocated tensor.

    Usage: `asm = TensorAssembler(header)`, then `asm.add(data)` for each chunk's bytes (the
    first chunk's too), then `asm.finish()` returns the tensor once every byte has arrived.
    """

    def __init__(self, header: pb.TensorHeader, *, max_elements: int | None = None,
                 max_bytes: int | None = None) -> None:
        self.name = header.name
        self.version = header.version
        self.dtype = dtype_from_proto(header.dtype)
        self.shape = check_shape(header.shape, max_elements=max_elements)
        self.nbytes = _expected_nbytes(self.dtype, self.shape)
        if max_bytes is not None and self.nbytes > max_bytes:
            raise ResourceExhaustedError(
                f"tensor {self.name or ''} of {self.nbytes} bytes exceeds the limit "
                f"max_bytes={max_bytes}", reason="TENSOR_TOO_LARGE",
                metadata={"limit": "max_bytes", "limit_value": str(max_bytes),
                          "asked": str(self.nbytes)})
        self.tensor = torch.empty(self.shape, dtype=self.dtype)
        self._ptr = self.tensor.data_ptr()
        self.received = 0

    @property
    def complete(self) -> bool:
        """Whether every byte has arrived."""
        return self.received == self.nbytes

    def add(self, data: bytes) -> None:
        """Copies the next chunk's bytes into place."""
        n = len(data)
        if n == 0:
            return
        if self.received + n > self.nbytes:
            raise InvalidArgumentError(
                f"tensor {self.name or ''} received more than the {self.nbytes} bytes its header "
                f"announced", reason="BAD_TENSOR_BYTES")
        ctypes.memmove(self._ptr + self.received, data, n)
        self.received += n

    def finish(self) -> torch.Tensor:
        """The received tensor; InvalidArgumentError if bytes are missing."""
        if not self.complete:
            raise InvalidArgumentError(
                f"tensor {self.name or ''} ended after {self.received} of {self.nbytes} bytes",
                reason="BAD_TENSOR_BYTES")
        return self.tensor


def assemble_tensors(chunks: Iterable[pb.TensorChunk], **limits: Any
                     ) -> Iterator[TensorAssembler]:
    """Splits a stream holding one or more chunked tensors; yields each finished assembler."""
    current: TensorAssembler | None = None
    for chunk in chunks:
        if chunk.HasField("header"):
            if current is not None:
                current.finish()
                yield current
            current = TensorAssembler(chunk.header, **limits)
        elif current is None:
            raise InvalidArgumentError("the first tensor chunk carries no header",
                                       reason="BAD_TENSOR_BYTES")
        current.add(chunk.data)
    if current is not None:
        current.finish()
        yield current


# ---------------------------------------------------------------------------------------------
# Indices


def index_to_proto(index: Any) -> list[pb.IndexItem]:
    """Encodes a torch index (int, slice, Ellipsis, None, tensors, lists, or a tuple of these)."""
    if not isinstance(index, tuple):
        index = (index,)
    items = []
    for it in index:
        if it is Ellipsis:
            items.append(pb.IndexItem(ellipsis=pb.Ellipsis()))
        elif it is None:
            items.append(pb.IndexItem(new_axis=pb.NewAxis()))
        elif isinstance(it, bool):
            items.append(pb.IndexItem(tensor=tensor_to_proto(torch.tensor(it))))
        elif isinstance(it, int) or (hasattr(it, "__index__") and not isinstance(it, torch.Tensor)):
            items.append(pb.IndexItem(integer=int(it.__index__())))
        elif isinstance(it, slice):
            s = pb.Slice()
            if it.start is not None:
                s.start = int(it.start)
            if it.stop is not None:
                s.stop = int(it.stop)
            if it.step is not None:
                s.step = int(it.step)
            items.append(pb.IndexItem(slice=s))
        elif isinstance(it, torch.Tensor):
            if it.dtype not in (torch.bool, torch.int64, torch.int32, torch.uint8):
                raise InvalidArgumentError(f"index tensors must be bool or integer, not {it.dtype}",
                                           reason="BAD_INDEX")
            if it.dtype is torch.uint8:
                it = it.bool()
            items.append(pb.IndexItem(tensor=tensor_to_proto(it)))
        elif isinstance(it, (list, tuple)):
            items.append(pb.IndexItem(tensor=tensor_to_proto(torch.as_tensor(it))))
        else:
            raise InvalidArgumentError(f"unsupported index element {it!r}", reason="BAD_INDEX")
    return items


def index_from_proto(items: Sequence[pb.IndexItem], *, max_elements: int | None = None
                     ) -> tuple[Any, ...]:
    """Decodes index items into a tuple usable as `tensor[...]`; validates every item."""
    out: list[Any] = []
    ellipses = 0
    for item in items:
        kind = item.WhichOneof("item")
        if kind == "integer":
            out.append(int(item.integer))
        elif kind == "slice":
            s = item.slice
            step = s.step if s.HasField("step") else None
            if step is not None and step <= 0:
                raise InvalidArgumentError(f"slice step must be positive, got {step}",
                                           reason="BAD_INDEX")
            out.append(slice(s.start if s.HasField("start") else None,
                             s.stop if s.HasField("stop") else None, step))
        elif kind == "ellipsis":
            ellipses += 1
            if ellipses > 1:
                raise InvalidArgumentError("an index can only have a single ellipsis",
                                           reason="BAD_INDEX")
            out.append(Ellipsis)
        elif kind == "new_axis":
            out.append(None)
        elif kind == "tensor":
            t = tensor_from_proto(item.tensor, max_elements=max_elements)
            if t.dtype not in (torch.bool, torch.int64, torch.int32):
                raise InvalidArgumentError(
                    f"index tensors must be bool, int32 or int64, not {t.dtype}",
                    reason="BAD_INDEX")
            out.append(t)
        else:
            raise InvalidArgumentError("index item has no value set", reason="BAD_INDEX")
    return tuple(out)


def apply_index(t: torch.Tensor, index: tuple[Any, ...]) -> torch.Tensor:
    """`t[index]` with torch's errors mapped: bounds -> OutOfRangeError, others -> InvalidArgument."""
    if not index:
        return t
    index = tuple(i.to(t.device) if isinstance(i, torch.Tensor) else i for i in index)
    try:
        return t[index]
    except IndexError as e:
        text = str(e)
        if "out of bounds" in text or "out of range" in text:
            raise OutOfRangeError(text, reason="INDEX_OUT_OF_RANGE") from None
        raise InvalidArgumentError(text, reason="BAD_INDEX") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidArgumentError(str(e).splitlines()[0], reason="BAD_INDEX") from None


# ---------------------------------------------------------------------------------------------
# Values (constructor args, init args, Forward inputs/outputs)


def value_to_proto(v: Any) -> pb.Value:
    """Encodes None/bool/int/float/str/list/tuple/torch.dtype/torch.Tensor into a Value."""
    if v is None:
        return pb.Value(null_value=pb.NULL_VALUE_UNSPECIFIED)
    if isinstance(v, bool):
        return pb.Value(bool_value=v)
    if isinstance(v, int):
        return pb.Value(int_value=v)
    if isinstance(v, float):
        return pb.Value(float_value=v)
    if isinstance(v, str):
        return pb.Value(string_value=v)
    if isinstance(v, torch.dtype):
        return pb.Value(dtype_value=dtype_to_proto(v))
    if isinstance(v, torch.Tensor):
        return pb.Value(tensor_value=tensor_to_proto(v))
    if isinstance(v, torch.Size):
        return pb.Value(tuple_value=pb.ValueList(values=[value_to_proto(x) for x in v]))
    if isinstance(v, tuple):
        return pb.Value(tuple_value=pb.ValueList(values=[value_to_proto(x) for x in v]))
    if isinstance(v, list):
        return pb.Value(list_value=pb.ValueList(values=[value_to_proto(x) for x in v]))
    raise InvalidArgumentError(f"cannot encode a value of type {type(v).__name__}",
                               reason="BAD_VALUE")


def value_from_proto(msg: pb.Value, *, max_depth: int = 16,
                     max_elements: int | None = None) -> Any:
    """Decodes a Value; rejects unset values and nesting deeper than max_depth."""
    if max_depth < 0:
        raise InvalidArgumentError("value nesting is too deep", reason="BAD_VALUE")
    kind = msg.WhichOneof("kind")
    if kind == "null_value":
        return None
    if kind == "bool_value":
        return msg.bool_value
    if kind == "int_value":
        return msg.int_value
    if kind == "float_value":
        return msg.float_value
    if kind == "string_value":
        return msg.string_value
    if kind == "dtype_value":
        return dtype_from_proto(msg.dtype_value)
    if kind == "tensor_value":
        return tensor_from_proto(msg.tensor_value, max_elements=max_elements)
    if kind in ("list_value", "tuple_value"):
        items = [value_from_proto(x, max_depth=max_depth - 1, max_elements=max_elements)
                 for x in getattr(msg, kind).values]
        return items if kind == "list_value" else tuple(items)
    raise InvalidArgumentError("a value has no kind set", reason="BAD_VALUE")
