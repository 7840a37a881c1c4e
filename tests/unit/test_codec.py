"""The one codec (paramhub._codec): tensors, chunk streams, indices and values. No sockets."""

from __future__ import annotations

import pytest
import torch

from paramhub import _codec
from paramhub.errors import InvalidArgumentError, OutOfRangeError, ResourceExhaustedError
from paramhub.v1 import tensor_pb2 as pb
from paramhub_server.core.indexing import apply_index

from _tensors import random_tensor

ALL_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
    torch.complex128, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes as a flat uint8 tensor: compares NaNs and float8 exactly."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


# ------------------------------------------------------------------------------- dtypes


def test_dtype_table_covers_every_proto_value_once():
    values = [v.number for v in pb.Dtype.DESCRIPTOR.values if v.number != 0]
    assert sorted(_codec.dtype_to_proto(d) for d in ALL_DTYPES) == sorted(values)
    for d in ALL_DTYPES:
        assert _codec.dtype_from_proto(_codec.dtype_to_proto(d)) is d


@pytest.mark.parametrize("value", [pb.DTYPE_UNSPECIFIED, 999])
def test_dtype_from_proto_rejects_unknown(value):
    with pytest.raises(InvalidArgumentError) as e:
        _codec.dtype_from_proto(value)
    assert e.value.reason == "UNSUPPORTED_DTYPE"


def test_dtype_to_proto_rejects_unsupported():
    with pytest.raises(InvalidArgumentError) as e:
        _codec.dtype_to_proto(torch.quint8)
    assert e.value.reason == "UNSUPPORTED_DTYPE"


# ------------------------------------------------------------------------------- whole tensors


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (5, 7)], ids=str)
def test_tensor_round_trip_every_dtype(dtype, shape):
    t = random_tensor(shape, dtype)
    msg = _codec.tensor_to_proto(t)
    assert list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    back = _codec.tensor_from_proto(pb.Tensor.FromString(msg.SerializeToString()))
    assert same(back, t)


def test_bfloat16_and_float8_values_survive_exactly():
    t = torch.tensor([1.5, -2.25, 0.0, 448.0], dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        v = t.to(dtype)
        assert torch.equal(_codec.tensor_from_proto(_codec.tensor_to_proto(v)).float(), v.float())


def test_bytes_are_little_endian_row_major():
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int16)
    assert _codec.tensor_to_proto(t).data == bytes([1, 0, 2, 0, 3, 0, 4, 0])
    assert _codec.tensor_to_proto(t.t()).data == bytes([1, 0, 3, 0, 2, 0, 4, 0])


def _views():
    base = random_tensor((6, 8), torch.float32, seed=3)
    c = random_tensor((4, 5), torch.complex64, seed=4)
    return {
        "transpose": base.t(),
        "step_slice": base[::2, 1::3],
        "expand": torch.arange(3.0).expand(4, 3),
        "column": base[:, 5],
        "permute3d": random_tensor((2, 3, 4), torch.int64).permute(2, 0, 1),
        "conj": c.conj(),
        "neg_view": torch._neg_view(base),
        "bf16_transpose": base.to(torch.bfloat16).t(),
        "bool_step": (base > 0)[::3],
    }


@pytest.mark.parametrize("name", list(_views()))
def test_tensor_round_trip_non_contiguous_views(name):
    view = _views()[name]
    expected = view.resolve_conj().resolve_neg().contiguous()
    back = _codec.tensor_from_proto(_codec.tensor_to_proto(view))
    assert same(back, expected)
    # Chunked too, with a chunk size that splits elements.
    (asm,) = _codec.assemble_tensors(_codec.iter_tensor_chunks(view, chunk_bytes=7))
    assert same(asm.finish(), expected)


def test_tensor_from_proto_returns_independent_memory():
    msg = _codec.tensor_to_proto(torch.arange(4, dtype=torch.int32))
    a = _codec.tensor_from_proto(msg)
    b = _codec.tensor_from_proto(msg)
    a[0] = 100
    assert b[0] == 0


@pytest.mark.parametrize("msg,reason", [
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 7), "BAD_TENSOR_BYTES"),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2], data=b"\0" * 9), "BAD_TENSOR_BYTES"),
    (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[], data=b""), "BAD_TENSOR_BYTES"),
    (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0"), "UNSUPPORTED_DTYPE"),
    (pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[-1], data=b""), "BAD_SHAPE"),
    (pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1] * 65, data=b"\0"), "BAD_SHAPE"),
], ids=["short", "long", "0d_without_bytes", "unspecified_dtype", "negative_dim", "rank_65"])
def test_tensor_from_proto_rejects_malformed(msg, reason):
    with pytest.raises(InvalidArgumentError) as e:
        _codec.tensor_from_proto(msg)
    assert e.value.reason == reason


def test_tensor_from_proto_enforces_max_elements():
    msg = _codec.tensor_to_proto(torch.zeros(10, dtype=torch.uint8))
    assert _codec.tensor_from_proto(msg, max_elements=10).numel() == 10
    # A limit, not a malformed shape: RESOURCE_EXHAUSTED naming the limit and the asked amount.
    with pytest.raises(ResourceExhaustedError) as e:
        _codec.tensor_from_proto(msg, max_elements=9)
    assert e.value.reason == "TENSOR_TOO_LARGE"
    assert (e.value.metadata["limit"], e.value.metadata["asked"]) == ("max_tensor_elements", "10")


# ------------------------------------------------------------------------------- chunk streams

CHUNK = 64


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.complex128, torch.bool,
                                   torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_chunks_at_chunk_boundaries(dtype, n, delta):
    itemsize = torch.empty((), dtype=dtype).element_size()
    # Bytes n*CHUNK-1, n*CHUNK, n*CHUNK+1 exactly for 1-byte types; for wider types the
    # nearest element counts, with a chunk size that is not a multiple of the item size.
    chunk = CHUNK if itemsize == 1 else CHUNK * itemsize + 1
    numel = (n * chunk + delta) // itemsize if itemsize > 1 else n * chunk + delta
    t = random_tensor((numel,), dtype, seed=n)
    chunks = list(_codec.iter_tensor_chunks(t, name="w", version=7, chunk_bytes=chunk))
    nbytes = numel * itemsize
    assert len(chunks) == -(-nbytes // chunk)
    assert chunks[0].HasField("header")
    assert all(not c.HasField("header") for c in chunks[1:])
    assert all(len(c.data) == chunk for c in chunks[:-1])
    assert sum(len(c.data) for c in chunks) == nbytes
    (asm,) = list(_codec.assemble_tensors(chunks))
    assert (asm.name, asm.version) == ("w", 7)
    assert same(asm.finish(), t)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_chunks_at_default_chunk_boundary(delta):
    numel = 2 * _codec.DEFAULT_CHUNK_BYTES + delta
    t = random_tensor((numel,), torch.uint8, seed=delta + 5)
    chunks = list(_codec.iter_tensor_chunks(t))
    assert len(chunks) == (3 if delta == 1 else 2)
    (asm,) = list(_codec.assemble_tensors(chunks))
    assert same(asm.finish(), t)


@pytest.mark.parametrize("shape", [(), (0,), (4, 0)], ids=str)
def test_chunks_of_0d_and_empty(shape):
    t = torch.full(shape, 3.5, dtype=torch.float64)
    chunks = list(_codec.iter_tensor_chunks(t))
    assert len(chunks) == 1 and chunks[0].HasField("header")
    assert list(chunks[0].header.shape) == list(shape)
    (asm,) = list(_codec.assemble_tensors(chunks))
    assert same(asm.finish(), t)


def test_assemble_several_tensors_in_one_stream():
    tensors = {"a": torch.arange(100, dtype=torch.int64), "b": torch.zeros(0),
               "c": torch.tensor(True), "d": random_tensor((33, 3), torch.float16)}
    stream = [c for name, t in tensors.items()
              for c in _codec.iter_tensor_chunks(t, name=name, chunk_bytes=50)]
    got = {a.name: a.finish() for a in _codec.assemble_tensors(stream)}
    assert list(got) == list(tensors)
    for name, t in tensors.items():
        assert same(got[name], t)


def test_assembler_rejects_missing_header():
    with pytest.raises(InvalidArgumentError) as e:
        list(_codec.assemble_tensors([pb.TensorChunk(data=b"xx")]))
    assert e.value.reason == "BAD_TENSOR_BYTES"


def test_assembler_rejects_too_many_bytes():
    header = pb.TensorHeader(dtype=pb.DTYPE_UINT8, shape=[3])
    with pytest.raises(InvalidArgumentError) as e:
        list(_codec.assemble_tensors([pb.TensorChunk(header=header, data=b"ab"),
                                      pb.TensorChunk(data=b"cd")]))
    assert e.value.reason == "BAD_TENSOR_BYTES"


@pytest.mark.parametrize("followed", [False, True])
def test_assembler_rejects_missing_bytes(followed):
    header = pb.TensorHeader(name="x", dtype=pb.DTYPE_FLOAT32, shape=[3])
    stream = [pb.TensorChunk(header=header, data=b"\0" * 8)]
    if followed:  # a new header before the previous tensor is complete
        stream.append(pb.TensorChunk(header=pb.TensorHeader(dtype=pb.DTYPE_UINT8, shape=[0])))
    with pytest.raises(InvalidArgumentError) as e:
        list(_codec.assemble_tensors(stream))
    assert e.value.reason == "BAD_TENSOR_BYTES"


def test_assembler_enforces_max_bytes():
    header = pb.TensorHeader(dtype=pb.DTYPE_FLOAT64, shape=[4])
    assert _codec.TensorAssembler(header, max_bytes=32).nbytes == 32
    with pytest.raises(ResourceExhaustedError) as e:
        _codec.TensorAssembler(header, max_bytes=31)
    assert e.value.reason == "TENSOR_TOO_LARGE" and e.value.metadata["asked"] == "32"


# ------------------------------------------------------------------------------- indices

BASE = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)

INDICES = {
    "int": 2,
    "negative_int": -1,
    "tuple_ints": (1, -2),
    "slice": slice(1, 3),
    "slice_step": slice(None, None, 2),
    "slice_start_step": slice(1, None, 3),
    "slice_negative_bounds": slice(-3, -1),
    "slice_open": slice(None),
    "ellipsis": Ellipsis,
    "ellipsis_last": (Ellipsis, 0),
    "ellipsis_middle": (0, Ellipsis, slice(0, 6, 4)),
    "none": None,
    "none_middle": (slice(None), None, 1),
    "bool_mask_full": BASE > 60,
    "bool_mask_dim0": torch.tensor([True, False, True, False]),
    "int_tensor": torch.tensor([3, 0, -1]),
    "int32_tensor": torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
    "list": [0, 2],
    "mixed": (torch.tensor([0, 2]), slice(None, None, 2), -1),
    "bool_scalar": True,
}


@pytest.mark.parametrize("name", list(INDICES))
def test_index_round_trip_matches_torch(name):
    index = INDICES[name]
    items = _codec.index_to_proto(index)
    wire = [pb.IndexItem.FromString(i.SerializeToString()) for i in items]
    decoded = _codec.index_from_proto(wire)
    expected = BASE[index]
    assert torch.equal(apply_index(BASE, decoded), expected)


def test_empty_index_is_whole_tensor():
    assert apply_index(BASE, ()) is BASE
    assert _codec.index_from_proto([]) == ()


def test_index_item_kinds_on_the_wire():
    items = _codec.index_to_proto((3, slice(1, None, 2), Ellipsis, None, torch.tensor([1])))
    assert [i.WhichOneof("item") for i in items] == ["integer", "slice", "ellipsis", "new_axis",
                                                     "tensor"]
    assert items[1].slice.HasField("start") and not items[1].slice.HasField("stop")
    assert items[1].slice.step == 2


def _slice_item(**kw):
    return pb.IndexItem(slice=pb.Slice(**kw))


@pytest.mark.parametrize("items", [
    [_slice_item(step=0)],
    [_slice_item(start=0, stop=3, step=-1)],
    [pb.IndexItem(ellipsis=pb.Ellipsis()), pb.IndexItem(integer=0),
     pb.IndexItem(ellipsis=pb.Ellipsis())],
    [pb.IndexItem(tensor=_codec.tensor_to_proto(torch.tensor([0.0, 1.0])))],
    [pb.IndexItem(tensor=_codec.tensor_to_proto(torch.tensor([1], dtype=torch.int16)))],
    [pb.IndexItem()],
    [pb.IndexItem(integer=0), pb.IndexItem()],
    [pb.IndexItem(tensor=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2], data=b"\0" * 8))],
], ids=["step_zero", "step_negative", "two_ellipses", "float_tensor", "int16_tensor", "unset",
        "unset_second", "truncated_tensor"])
def test_index_from_proto_rejects(items):
    with pytest.raises(InvalidArgumentError) as e:
        _codec.index_from_proto(items)
    assert e.value.reason in ("BAD_INDEX", "BAD_TENSOR_BYTES")


@pytest.mark.parametrize("index", [torch.tensor([0.5]), "a", 1.5, {1: 2}],
                         ids=["float_tensor", "str", "float", "dict"])
def test_index_to_proto_rejects(index):
    with pytest.raises(InvalidArgumentError) as e:
        _codec.index_to_proto(index)
    assert e.value.reason == "BAD_INDEX"


@pytest.mark.parametrize("index", [(4,), (-5,), (0, 5), (0, 0, 6), (torch.tensor([4]),),
                                   (torch.tensor([0, -5]),)], ids=str)
def test_apply_index_out_of_bounds_is_out_of_range(index):
    with pytest.raises(OutOfRangeError) as e:
        apply_index(BASE, index)
    assert e.value.reason == "INDEX_OUT_OF_RANGE"
    assert e.value.code == "OUT_OF_RANGE"


@pytest.mark.parametrize("index", [(0, 0, 0, 0), (torch.tensor([True, False]),)],
                         ids=["too_many", "mask_shape"])
def test_apply_index_bad_index_is_invalid_argument(index):
    with pytest.raises(InvalidArgumentError) as e:
        apply_index(BASE, index)
    assert e.value.reason == "BAD_INDEX"


# ------------------------------------------------------------------------------- values

VALUES = [None, True, False, 0, -(2 ** 63), 2 ** 63 - 1, 1.5, float("inf"), "", "relu",
          [1, 2.0, "x"], (1, (2, 3)), [], (), torch.float16, torch.bfloat16,
          [None, (True, [torch.int64])]]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_value_round_trip(value):
    msg = _codec.value_to_proto(value)
    back = _codec.value_from_proto(pb.Value.FromString(msg.SerializeToString()))
    assert back == value
    assert type(back) is type(value)


def test_value_keeps_bool_int_float_apart():
    assert _codec.value_to_proto(True).WhichOneof("kind") == "bool_value"
    assert _codec.value_to_proto(1).WhichOneof("kind") == "int_value"
    assert _codec.value_to_proto(1.0).WhichOneof("kind") == "float_value"


def test_value_tensors_and_size():
    t = random_tensor((2, 3), torch.bfloat16)
    back = _codec.value_from_proto(_codec.value_to_proto((t, [t[0]])))
    assert isinstance(back, tuple) and same(back[0], t) and same(back[1][0], t[0])
    assert _codec.value_from_proto(_codec.value_to_proto(torch.Size([2, 3]))) == (2, 3)


def test_value_nan_round_trip():
    back = _codec.value_from_proto(_codec.value_to_proto(float("nan")))
    assert back != back


@pytest.mark.parametrize("value", [{"a": 1}, object(), b"bytes", 1j, {1, 2}],
                         ids=["dict", "object", "bytes", "complex", "set"])
def test_value_to_proto_rejects_unencodable(value):
    with pytest.raises(InvalidArgumentError) as e:
        _codec.value_to_proto(value)
    assert e.value.reason == "BAD_VALUE"


def test_value_from_proto_rejects_unset():
    with pytest.raises(InvalidArgumentError) as e:
        _codec.value_from_proto(pb.Value())
    assert e.value.reason == "BAD_VALUE"
    with pytest.raises(InvalidArgumentError):
        _codec.value_from_proto(pb.Value(list_value=pb.ValueList(values=[pb.Value()])))


def test_value_from_proto_rejects_deep_nesting():
    v = 1
    for _ in range(16):
        v = [v]
    assert _codec.value_from_proto(_codec.value_to_proto(v)) == v
    with pytest.raises(InvalidArgumentError) as e:
        _codec.value_from_proto(_codec.value_to_proto([v]))
    assert e.value.reason == "BAD_VALUE"


def test_value_from_proto_rejects_bad_dtype_and_tensor():
    with pytest.raises(InvalidArgumentError) as e:
        _codec.value_from_proto(pb.Value(dtype_value=pb.DTYPE_UNSPECIFIED))
    assert e.value.reason == "UNSUPPORTED_DTYPE"
    with pytest.raises(InvalidArgumentError) as e:
        _codec.value_from_proto(pb.Value(tensor_value=pb.Tensor(dtype=pb.DTYPE_INT8, shape=[2])))
    assert e.value.reason == "BAD_TENSOR_BYTES"


@pytest.mark.parametrize("index", [
    (torch.tensor([3]),), (0, torch.tensor([4])), (Ellipsis, torch.tensor([5])),
    (None, 0, torch.tensor([-5])), (torch.zeros(3, 4, dtype=torch.bool), torch.tensor([5])),
])
def test_index_tensor_bounds_checked_before_any_device(index):
    """Integer index tensors are bounds-checked on the host (on CUDA torch would assert)."""
    with pytest.raises(OutOfRangeError):
        apply_index(torch.zeros(3, 4, 5), index)


def test_embedding_guard_turns_bad_indices_into_index_error():
    from paramhub_server.core.model import guard_device_indexing

    emb = torch.nn.Embedding(5, 2)
    guard_device_indexing(emb)
    assert emb(torch.tensor([0, 4])).shape == (2, 2)
    with pytest.raises(IndexError):
        emb(torch.tensor([5]))
    with pytest.raises(IndexError):
        emb(torch.tensor([-1]))


@pytest.mark.parametrize("name", ["offset", "one_element_huge_stride", "empty", "transpose",
                                  "conj", "zero_d"])
def test_tensor_bytes_match_the_contiguous_copy(name):
    base = torch.arange(24.0).reshape(4, 6)
    t = {"offset": base[1:3],
         "one_element_huge_stride": torch.arange(12.0).reshape(2, 6)[0, 5::2 ** 40],
         "empty": base[:0],
         "transpose": base.t(),
         "conj": torch.complex(base, -base).conj(),
         "zero_d": base[2, 3]}[name]
    # Rebuilt from Python values: a fresh tensor, whatever the source's strides.
    fresh = torch.tensor(t.resolve_conj().tolist(), dtype=t.dtype).reshape(-1)
    assert _codec.tensor_bytes(t) == bytes(fresh.view(torch.uint8).tolist())


@pytest.mark.parametrize("numel", [1, 3, 40_000])
def test_parse_inline_reads_small_and_large_responses_alike(numel):
    value = torch.arange(numel, dtype=torch.float32)
    header = pb.TensorHeader(name="x", dtype=pb.DTYPE_FLOAT32, shape=[numel], version=7)
    wire = pb.TensorChunk(header=header, data=_codec.tensor_bytes(value)).SerializeToString()
    chunk = _codec.parse_inline(wire)
    assert chunk.header == header
    back = _codec.tensor_from_parts(chunk.header.dtype, chunk.header.shape, chunk.data)
    assert torch.equal(back, value)


def test_kernel_dtype_numbers_match_the_generated_enum():
    # paramhub.common.dtypes writes the DType numbers without importing protobuf; they must be
    # the proto's.
    from paramhub.common.dtypes import DTYPES

    assert set(DTYPES.values()) == {v for v in pb.Dtype.values() if v}
    for dtype, value in DTYPES.items():
        assert pb.Dtype.Name(value) == "DTYPE_" + str(dtype).removeprefix("torch.").upper()
