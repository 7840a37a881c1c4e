"""Raw wire frames and the state layout: same bytes as protobuf, every dtype, malformed input."""

from __future__ import annotations

import pytest
import torch

from paramhub import _codec
from paramhub._progress import PROGRESS_MIN_BYTES, progress_for
from paramhub.errors import InvalidArgumentError
from paramhub.common import pb as spb
from paramhub.v1 import tensor_pb2 as pb

from _tensors import random_tensor

DTYPES = list(_codec._DTYPES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 0, 2), (33, 17)])
def test_chunk_frames_match_protobuf_and_round_trip(dtype, shape):
    t = random_tensor(shape, dtype)
    frames = list(_codec.iter_chunk_frames(t, name="w", version=9, chunk_bytes=64))
    messages = list(_codec.iter_tensor_chunks(t, name="w", version=9, chunk_bytes=64))
    assert frames == [m.SerializeToString() for m in messages]
    (asm,) = _codec.assemble_tensors(_codec.parse_chunk(f) for f in frames)
    got = asm.finish()
    assert got.dtype == dtype and got.shape == t.shape and asm.version == 9
    assert torch.equal(_codec.byte_view(got), _codec.byte_view(t))


@pytest.mark.parametrize("n", [1, 127, 128, 16383, 16384, 1 << 20, (1 << 20) + 1])
def test_data_frames_match_protobuf(n):
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    frame = _codec.data_frame(0x12, data)
    assert frame == spb.StreamSetSliceRequest(data=data).SerializeToString()
    assert frame == spb.PushStateRequest(data=data).SerializeToString()
    assert bytes(_codec.parse_data_frame(frame, 0x12)) == data
    pull = spb.PullStateResponse(data=data).SerializeToString()
    assert bytes(_codec.parse_data_frame(pull, 0x1A)) == data


def test_parse_falls_back_to_protobuf_for_other_messages():
    header_only = spb.StreamSetSliceRequest(request=spb.SetSliceRequest(name="x"))
    assert _codec.parse_data_frame(header_only.SerializeToString(), 0x12) is None
    manifest = spb.PullStateResponse(headers=[pb.TensorHeader(name="a")], data=b"xy")
    assert _codec.parse_data_frame(manifest.SerializeToString(), 0x1A) is None
    # A TensorChunk with an unknown extra field is still read correctly.
    raw = pb.TensorChunk(header=pb.TensorHeader(name="h", dtype=pb.DTYPE_UINT8, shape=[2]),
                         data=b"ab").SerializeToString() + b"\x18\x01"
    chunk = _codec.parse_chunk(raw)
    assert chunk.header.name == "h" and bytes(chunk.data) == b"ab"


def test_parse_chunk_rejects_truncated_frames():
    frame = _codec.encode_chunk(None, b"x" * 100)
    with pytest.raises(InvalidArgumentError) as e:
        _codec.parse_chunk(frame[:-1])
    assert e.value.reason == "BAD_TENSOR_BYTES"
    with pytest.raises(InvalidArgumentError):
        _codec.parse_chunk(b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")


def test_assembler_rejects_extra_and_missing_bytes():
    header = pb.TensorHeader(dtype=pb.DTYPE_FLOAT32, shape=[2])
    asm = _codec.TensorAssembler(header)
    asm.add(memoryview(b"\0" * 12)[4:])
    with pytest.raises(InvalidArgumentError) as e:
        asm.add(b"\0")
    assert e.value.reason == "BAD_TENSOR_BYTES"
    with pytest.raises(InvalidArgumentError):
        _codec.TensorAssembler(header).finish()


def test_state_layout_aligns_and_round_trips_every_dtype():
    tensors = [random_tensor((3,) if i % 3 else (), dt, seed=i) for i, dt in enumerate(DTYPES)]
    tensors.append(torch.empty(0, 5))
    tensors.append(torch.randn(6, 4).t())  # non-contiguous
    headers = [pb.TensorHeader(name=f"t{i}", dtype=_codec.dtype_to_proto(t.dtype),
                               shape=list(t.shape)) for i, t in enumerate(tensors)]
    offsets, sizes, total = _codec.state_layout(headers)
    assert all(o % _codec.STATE_ALIGN == 0 for o in offsets)
    flat = _codec.pack_state(tensors, headers=headers)
    assert flat.numel() == total
    for i, (off, size) in enumerate(zip(offsets, sizes)):
        end = offsets[i + 1] if i + 1 < len(offsets) else total
        assert not flat[off + size:end].any()  # padding is zeros, never stale memory
    for t, got in zip(tensors, _codec.unpack_state(flat, headers)):
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(_codec.byte_view(got), _codec.byte_view(t))
    with pytest.raises(InvalidArgumentError) as e:
        _codec.unpack_state(flat[:-1], headers)
    assert e.value.reason == "BAD_TENSOR_BYTES"


def test_progress_only_for_big_transfers_and_when_asked():
    assert not progress_for(None, "x", PROGRESS_MIN_BYTES * 4).active  # stderr is not a TTY
    assert not progress_for(True, "x", PROGRESS_MIN_BYTES - 1).active
    assert not progress_for(False, "x", PROGRESS_MIN_BYTES * 4).active
    bar = progress_for(True, "x", PROGRESS_MIN_BYTES)
    assert bar.active
    bar.advance(PROGRESS_MIN_BYTES)
    bar.close()
    assert not bar.active
