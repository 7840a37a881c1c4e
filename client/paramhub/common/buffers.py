"""Tensor memory as bytes: flat uint8 views, raw copies, receive buffers. Imports no protobuf.

Every place that needs a tensor's bytes (frames, shared memory, the data channel, the log) goes
through `byte_view` / `memory` / `copy_into` here instead of its own ctypes idiom.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence

import torch

__all__ = ["BIG_BUFFER_BYTES", "empty", "byte_view", "tensor_bytes", "buffer_address",
           "copy_into", "memory", "typed_view"]

#: Buffers at least this big are allocated by `empty` as prefaulted huge-page mappings.
BIG_BUFFER_BYTES = 4 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty for receive buffers: big ones are anonymous mappings advised to use
    transparent huge pages and populated in one call.

    A fresh torch.empty of hundreds of MiB takes one page fault per 4 KiB page on first touch,
    which on a VM costs more than copying the bytes (measured: 3 GB/s filling a fresh tensor vs
    7-9 GB/s filling a huge-page, prepopulated one). The tensor owns the mapping (it is unmapped
    when the tensor is freed); unlike torch.empty's storage it cannot be resized in place.
    """
    shape = tuple(shape)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if nbytes < BIG_BUFFER_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in (mmap.MADV_HUGEPAGE, _MADV_POPULATE_WRITE):
        try:
            m.madvise(advice)
        except OSError:
            pass  # an older kernel: faults happen on first touch instead
    return torch.frombuffer(m, dtype=torch.uint8).view(dtype).view(shape)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (copying to a contiguous CPU tensor only if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
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


_byte_view = byte_view



def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes as one bytes object (one copy; meant for small tensors). A contiguous
    CPU tensor is read in place, without the views `byte_view` builds."""
    if (t.device.type == "cpu" and t.layout is torch.strided and t.is_contiguous()
            and not t.is_conj() and not t.is_neg()):
        # data_ptr() includes the storage offset; a one-element tensor is contiguous whatever
        # its stride, and its bytes are the element_size() at data_ptr().
        n = t.numel() * t.element_size()
        return ctypes.string_at(t.data_ptr(), n) if n else b""
    flat = byte_view(t)
    return ctypes.string_at(flat.data_ptr(), flat.numel()) if flat.numel() else b""


def buffer_address(data: bytes | memoryview) -> int:
    """The address of a bytes object's or a (C-contiguous) memoryview's first byte."""
    if isinstance(data, bytes):
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    obj = data.obj
    if isinstance(obj, bytes) and data.contiguous:
        base = ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0
        # A memoryview slice of a bytes object: recover its start from the buffer pointer.
        return base + _mv_offset(data)
    return ctypes.addressof(ctypes.c_char.from_buffer(data))


def _mv_offset(mv: memoryview) -> int:
    # CPython exposes a memoryview's buffer pointer only through the buffer protocol; for a
    # read-only view of bytes we ask ctypes for the Py_buffer via PyObject_GetBuffer.
    buf = _Py_buffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(mv), ctypes.byref(buf), 0)
    try:
        base = ctypes.cast(ctypes.c_char_p(mv.obj), ctypes.c_void_p).value or 0
        return (buf.buf or 0) - base
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(buf))


class _Py_buffer(ctypes.Structure):  # noqa: N801 - the C name
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def copy_into(address: int, data: bytes | memoryview) -> None:
    """memcpy of `data` to `address` (one copy, no intermediate bytes object)."""
    n = len(data)
    if n:
        ctypes.memmove(address, buffer_address(data), n)


def memory(flat: torch.Tensor) -> memoryview:
    """A memoryview over a contiguous uint8 CPU tensor's own memory."""
    n = flat.numel()
    if n == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * n).from_address(flat.data_ptr())).cast("B")


_memory = memory


def _typed_view(flat: torch.Tensor, off: int, nbytes: int, dtype: torch.dtype,
                shape: Sequence[int]) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return flat[off:off + nbytes].view(dtype).view(tuple(shape))


def typed_view(flat: torch.Tensor, nbytes: int, dtype: torch.dtype, shape: Sequence[int]
               ) -> torch.Tensor:
    """The first `nbytes` of a flat uint8 buffer viewed as a tensor of dtype and shape."""
    return _typed_view(flat, 0, nbytes, dtype, shape)
