"""Torch objects <-> what the wire carries for them, beyond tensors (those are the codec's):
slice operations, CPU generator states, and the checksum Probe reports."""

from __future__ import annotations

import torch

from paramhub import _codec
from paramhub.errors import InvalidArgumentError
from paramhub.common import pb

__all__ = ["OPS", "generator_state", "set_generator_state", "tensor_checksum"]

#: set_slice's `op` names -> SliceOp.
OPS = {"assign": pb.SLICE_OP_ASSIGN, "add": pb.SLICE_OP_ADD, "sub": pb.SLICE_OP_SUB,
       "mul": pb.SLICE_OP_MUL, "div": pb.SLICE_OP_DIV}


def generator_state(generator: torch.Generator) -> bytes:
    """A CPU generator's state as bytes (what ApplyInit and Forward carry)."""
    if generator.device.type != "cpu":
        raise InvalidArgumentError("only a CPU generator's state can be sent",
                                   reason="BAD_ARGUMENT")
    return _codec.tensor_bytes(generator.get_state())


def set_generator_state(generator: torch.Generator, state: bytes) -> None:
    """Sets a CPU generator to a state received from the server."""
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))


def tensor_checksum(t: torch.Tensor) -> str:
    """Lowercase hex SHA-256 of a tensor's raw little-endian row-major bytes: what Probe's
    `checksum_sha256` reports for the same values on the server."""
    import ctypes
    import hashlib

    flat = _codec._byte_view(t)
    h = hashlib.sha256()
    if flat.numel():
        h.update((ctypes.c_char * flat.numel()).from_address(flat.data_ptr()))
    return h.hexdigest()
