"""Fuzzing every RPC with random and malformed messages and with raw random bytes.

For each request: the answer is never INTERNAL or UNKNOWN and the server never crashes; after a
rejected request every model's checksum (Probe) is unchanged; health stays SERVING.

`make test` runs a bounded, derandomized number of examples per test; `make fuzz` sets
PARAMHUB_FUZZ_EXAMPLES (and random seeds) for a longer run. A summary of requests tried and
status codes seen is printed at the end of the module.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle

import grpc
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from torch import nn

import paramhub
from paramhub import _spec
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server.app import build_server

from _raw import METHODS, call_raw

from conftest import SUMMARY_KEY  # noqa: E402
EXAMPLES = int(os.environ.get("PARAMHUB_FUZZ_EXAMPLES", "25"))
LONG = "PARAMHUB_FUZZ_EXAMPLES" in os.environ
FUZZ = hsettings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG,
                 suppress_health_check=list(HealthCheck), database=None)

BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
STATS: collections.Counter[str] = collections.Counter()
PER_METHOD: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

NAMES = ["models/fz", "models/fz/parameters/0.weight", "models/fz/parameters/0.bias",
         "models/fz/buffers/1.running_mean", "models/fz/parameters/2.weight", "models/",
         "models/fz/parameters/", "models/../etc/passwd", "fz", "0.weight", "", "1",
         "os.system", "builtins.eval", "subprocess.Popen", "__import__", "torch.nn.Linear",
         "Linear", "Sequential", "BatchNorm1d", "normal_", "uniform_", "*.weight", "*"]
PICKLE = pickle.dumps(("os", "system", "echo pwned"))
EVIL_CLASSES = ["os.system", "builtins.eval", "builtins.exec", "subprocess.Popen",
                "torch.load", "__builtins__", "Linear", "Sequential", "ReLU", "Embedding"]


def _make_net() -> nn.Module:
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4)
    head = nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), head)


class Harness:
    """A server with one model, the baseline checksums, and bookkeeping."""

    def __init__(self, srv, client: paramhub.Client) -> None:
        self.srv = srv
        self.client = client
        self.target = f"127.0.0.1:{srv.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.reset()

    def reset(self) -> None:
        for m in self.client.list_models():
            self.client.delete_model(m.name.removeprefix("models/"))
        net = _make_net()
        self.client.create_model_from_spec("fz", _spec.spec_from_module(net),
                                           values=net.state_dict())
        self.baseline = self.checksums()

    def checksums(self) -> dict[str, str]:
        return {m.name: self.client.probe(m.name.removeprefix("models/"),
                                          include_buffers=True).stats.checksum_sha256
                for m in self.client.list_models()}

    def send(self, method: str, bodies: list[bytes]) -> grpc.StatusCode:
        code, _ = call_raw(self.channel, method, bodies, timeout=30)
        STATS["requests"] += 1
        STATS[code.name] += 1
        PER_METHOD[method][code.name] += 1
        assert code not in BAD, f"{method} answered {code.name}"
        status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        if code == grpc.StatusCode.OK:
            # An accepted request may change things: restore a known state.
            self.reset()
        else:
            assert self.checksums() == self.baseline, f"rejected {method} changed a model"
        return code


@pytest.fixture(scope="module")
def harness(tmp_path_factory, request):
    from paramhub_server.settings import Settings

    settings = Settings(host="127.0.0.1", port=0, device="cpu",
                        data_dir=tmp_path_factory.mktemp("fuzz"), max_workers=8,
                        max_model_bytes=16 << 20, max_total_bytes=64 << 20,
                        max_tensor_elements=1 << 20, max_spec_nodes=1000)
    srv = build_server(settings)
    client = paramhub.connect(f"127.0.0.1:{srv.port}", timeout=30)
    h = Harness(srv, client)
    yield h
    h.channel.close()
    client.close()
    srv.stop(None)
    # Printed by tests/conftest.py's pytest_terminal_summary.
    lines = [f"fuzz summary ({EXAMPLES} examples per test): "
             + ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()))]
    lines += [f"  {method}: " + ", ".join(f"{k}={v}" for k, v in sorted(codes.items()))
              for method, codes in sorted(PER_METHOD.items())]
    request.config.stash.setdefault(SUMMARY_KEY, []).extend(lines)


# ------------------------------------------------------------------------------ strategies

_INTS = st.one_of(st.integers(-3, 70), st.sampled_from([-(2**63), 2**63 - 1, 2**31, -1,
                                                         2**40, 2**62]))


def _scalar(data: st.DataObject, f: FieldDescriptor) -> object:
    t = f.type
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64,
             FieldDescriptor.TYPE_SFIXED64):
        return data.draw(_INTS)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
             FieldDescriptor.TYPE_SFIXED32):
        return data.draw(st.one_of(st.integers(-3, 70), st.sampled_from([-(2**31),
                                                                         2**31 - 1])))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return data.draw(st.integers(0, 2**32 - 1))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return data.draw(st.integers(0, 2**64 - 1))
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return data.draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
    if t == FieldDescriptor.TYPE_BOOL:
        return data.draw(st.booleans())
    if t == FieldDescriptor.TYPE_STRING:
        return data.draw(st.one_of(st.sampled_from(NAMES + EVIL_CLASSES),
                                   st.text(max_size=24)))
    if t == FieldDescriptor.TYPE_BYTES:
        return data.draw(st.one_of(st.binary(max_size=96), st.just(PICKLE),
                                   st.binary(min_size=4, max_size=4)))
    if t == FieldDescriptor.TYPE_ENUM:
        # Known values and unknown ones (proto3 enums are open).
        return data.draw(st.one_of(st.sampled_from([v.number for v in f.enum_type.values]),
                                   st.integers(-5, 50)))
    raise AssertionError(t)


def draw_message(data: st.DataObject, desc, depth: int = 0):
    """A random message of type `desc`: each field set or not, scalars from edge-heavy
    strategies, nested messages up to a depth, repeated and map fields up to a few entries."""
    msg = GetMessageClass(desc)()
    for f in desc.fields:
        if not data.draw(st.booleans()):
            continue
        is_msg = f.type == FieldDescriptor.TYPE_MESSAGE
        if is_msg and depth >= 5:
            continue
        if f.is_repeated and is_msg and f.message_type.GetOptions().map_entry:
            for _ in range(data.draw(st.integers(0, 2))):
                key = data.draw(st.sampled_from(["mean", "std", "a", "gain", "", "__class__"]))
                vdesc = f.message_type.fields_by_name["value"]
                if vdesc.type == FieldDescriptor.TYPE_MESSAGE:
                    getattr(msg, f.name)[key].CopyFrom(
                        draw_message(data, vdesc.message_type, depth + 1))
                else:
                    getattr(msg, f.name)[key] = _scalar(data, vdesc)
        elif f.is_repeated:
            for _ in range(data.draw(st.integers(0, 3))):
                if is_msg:
                    getattr(msg, f.name).add().CopyFrom(
                        draw_message(data, f.message_type, depth + 1))
                else:
                    getattr(msg, f.name).append(_scalar(data, f))
        elif is_msg:
            getattr(msg, f.name).CopyFrom(draw_message(data, f.message_type, depth + 1))
        else:
            setattr(msg, f.name, _scalar(data, f))
    return msg


def _bodies(data: st.DataObject, method: str) -> list[bytes]:
    m = METHODS[method]
    n = data.draw(st.integers(1, 4)) if m.client_streaming else 1
    return [draw_message(data, m.input_type).SerializeToString() for _ in range(n)]


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("method", sorted(METHODS))
@FUZZ
@given(data=st.data())
def test_fuzz_random_messages(harness, method, data):
    harness.send(method, _bodies(data, method))


@pytest.mark.parametrize("method", sorted(METHODS))
@FUZZ
@given(raw=st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_fuzz_raw_bytes(harness, method, raw):
    harness.send(method, raw)


def _tensor(data: st.DataObject) -> tpb.Tensor:
    """Tensors whose shape, dtype and byte length disagree, or are huge or negative."""
    dtype = data.draw(st.one_of(st.sampled_from([1, 2, 4, 11, 12]), st.integers(-3, 40)))
    shape = data.draw(st.lists(st.one_of(st.integers(-4, 6), st.sampled_from(
        [2**31, 2**40, 2**62, -(2**63)])), max_size=data.draw(st.sampled_from([3, 70]))))
    n = data.draw(st.integers(0, 64))
    return tpb.Tensor(dtype=dtype, shape=shape, data=data.draw(st.one_of(
        st.binary(min_size=n, max_size=n), st.just(PICKLE))))


@FUZZ
@given(data=st.data())
def test_fuzz_malformed_tensors_and_indices(harness, data):
    from paramhub.common import pb

    name = data.draw(st.sampled_from(NAMES[:5]))
    index = []
    for _ in range(data.draw(st.integers(0, 3))):
        kind = data.draw(st.sampled_from(["int", "slice", "tensor", "nan", "empty"]))
        if kind == "int":
            index.append(tpb.IndexItem(integer=data.draw(_INTS)))
        elif kind == "slice":
            index.append(tpb.IndexItem(slice=tpb.Slice(start=data.draw(_INTS),
                                                       step=data.draw(_INTS))))
        elif kind == "tensor":
            index.append(tpb.IndexItem(tensor=_tensor(data)))
        elif kind == "nan":  # float index tensors holding NaN / Inf
            vals = torch.tensor([float("nan"), float("inf"), 1.0])
            index.append(tpb.IndexItem(tensor=tpb.Tensor(
                dtype=1, shape=[3], data=bytes(vals.view(torch.uint8).tolist()))))
        else:
            index.append(tpb.IndexItem())
    req = pb.SetSliceRequest(name=name, index=index, op=data.draw(st.integers(-1, 9)),
                             value=_tensor(data))
    method = data.draw(st.sampled_from(["SetSlice", "GetTensor", "Probe", "StreamSetSlice",
                                        "Forward"]))
    if method == "SetSlice":
        bodies = [req.SerializeToString()]
    elif method == "GetTensor":
        bodies = [pb.GetTensorRequest(name=name, index=index,
                                      chunk_bytes=data.draw(_INTS)).SerializeToString()]
    elif method == "Probe":
        bodies = [pb.ProbeRequest(name=name, index=index,
                                  histogram_bins=data.draw(st.integers(-2, 5000))
                                  ).SerializeToString()]
    elif method == "Forward":
        fwd = pb.ForwardRequest(model="models/fz", module_path=data.draw(
            st.sampled_from(["", "0", "2", "1", "nope", "0.weight"])))
        fwd.args.add().tensor_value.CopyFrom(_tensor(data))
        bodies = [fwd.SerializeToString()]
    else:
        head = pb.SetSliceRequest()
        head.CopyFrom(req)
        head.value.data = b""
        bodies = [pb.StreamSetSliceRequest(request=head).SerializeToString()] + [
            pb.StreamSetSliceRequest(data=data.draw(st.binary(max_size=64))).SerializeToString()
            for _ in range(data.draw(st.integers(0, 3)))]
    harness.send(method, bodies)


@FUZZ
@given(data=st.data())
def test_fuzz_specs(harness, data):
    """Deep, cyclic, huge or non-allow-listed specs, pickles in arguments."""
    from paramhub.common import pb

    n = data.draw(st.sampled_from([0, 1, 3, 70, 1001]))
    spec = pb.ModelSpec(root=data.draw(st.integers(-1, 3)))
    for i in range(n):
        node = spec.nodes.add(type=data.draw(st.sampled_from(EVIL_CLASSES)))
        if data.draw(st.booleans()):
            node.args.add().int_value = data.draw(_INTS)
        if data.draw(st.booleans()):
            node.args.add().string_value = data.draw(st.sampled_from(["os", "eval", "rm -rf"]))
        if data.draw(st.booleans()):
            node.kwargs["device"].string_value = "cuda"
        if data.draw(st.booleans()):
            node.args.add().tensor_value.CopyFrom(tpb.Tensor(dtype=8, shape=[len(PICKLE)],
                                                             data=PICKLE))
        target = data.draw(st.sampled_from([i + 1, i, 0, -1, n + 5]))
        node.children.add(name=data.draw(st.sampled_from(["0", "a.b", "", "x"])), node=target)
    for _ in range(data.draw(st.integers(0, 2))):
        spec.ties.add(parameter=data.draw(st.sampled_from(NAMES)),
                      source=data.draw(st.sampled_from(NAMES)))
    header = pb.CreateModelHeader(model_id=data.draw(st.sampled_from(["fz", "new", "", "a/b"])),
                                  spec=spec, device=data.draw(st.sampled_from(["", "cpu", "x"])))
    bodies = [pb.CreateModelRequest(header=header).SerializeToString()]
    if data.draw(st.booleans()):
        bodies.append(pb.CreateModelRequest(chunk=tpb.TensorChunk(
            header=tpb.TensorHeader(name="0.weight", dtype=1, shape=[4, 4]),
            data=PICKLE)).SerializeToString())
    harness.send("CreateModel", bodies)


# ------------------------------------------------------------------------------ memory

#: The most a `paramhub serve` process's peak RSS may rise over a whole run of amplifying
#: requests (each of which, unchecked, would commit hundreds of MiB to GiB).
RSS_BOUND = 200 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory, request):
    """`paramhub serve` as a subprocess (its peak RSS is read from /proc), with small limits."""
    from _served import Served

    s = Served(tmp_path_factory.mktemp("fuzz-rss"), "--max-message-bytes", str(4 << 20),
               "--max-tensor-elements", str(1 << 26))
    net = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, 4))
    s.client.create_model_from_spec("fz", _spec.spec_from_module(net), values=net.state_dict())
    base = s.reset_peak()
    yield s, base
    s.close()
    request.config.stash.setdefault(SUMMARY_KEY, []).append(
        f"fuzz memory: {STATS['memory requests']} amplifying requests, server peak RSS grew "
        f"{STATS['memory peak growth MiB']} MiB at most (bound {RSS_BOUND >> 20} MiB); "
        + ", ".join(f"{m}: {dict(c)}" for m, c in sorted(PER_METHOD.items())
                    if m.startswith("memory")))


def _amplifying(data: st.DataObject) -> tuple[str, list, bool]:
    """(method, messages, client streaming) of a small request that announces or selects far
    more than its target holds."""
    from paramhub.common import pb

    weight = "models/fz/parameters/0.weight"  # 64 x 16
    # Announced elements: within --max-tensor-elements (2**26, 256 MiB of float32: only the
    # check against the target refuses them) and beyond it.
    big = data.draw(st.sampled_from([1 << 26, 1 << 28, 1 << 24, 1 << 20]))
    kind = data.draw(st.sampled_from(["index", "upload", "grads", "batch", "forward", "shm"]))
    if kind == "index":
        n = data.draw(st.sampled_from([1 << 10, 1 << 11, 1 << 14, 1 << 15]))
        rows = torch.zeros(n, 1, dtype=torch.int64)
        cols = torch.zeros(1, data.draw(st.sampled_from([1, n])), dtype=torch.int64)
        index = _codec_index(rows, cols)
        method = data.draw(st.sampled_from(["GetTensorInline", "GetTensor", "Probe",
                                            "SetSlice"]))
        msg = {"GetTensorInline": lambda: pb.GetTensorInlineRequest(name=weight, index=index),
               "GetTensor": lambda: pb.GetTensorRequest(name=weight, index=index),
               "Probe": lambda: pb.ProbeRequest(name=weight, index=index),
               "SetSlice": lambda: pb.SetSliceRequest(
                   name=weight, index=index, op=pb.SLICE_OP_ADD,
                   value=tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, data=b"\0\0\0\0"))}[method]()
        return method, [msg], False
    value = tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=[big])
    req = pb.SetSliceRequest(name=weight, op=pb.SLICE_OP_ASSIGN, value=value)
    tail = [b"\0" * data.draw(st.sampled_from([0, 64, 1 << 20]))]
    if kind == "upload":
        return "StreamSetSlice", [pb.StreamSetSliceRequest(request=req)] + [
            pb.StreamSetSliceRequest(data=t) for t in tail], True
    if kind == "grads":
        chunk = tpb.TensorChunk(header=tpb.TensorHeader(name="0.weight", dtype=1, shape=[big]),
                                data=tail[0])
        return "PushGrads", [pb.PushGradsRequest(header=pb.PushGradsHeader(model="models/fz")),
                             pb.PushGradsRequest(chunk=chunk)], True
    if kind == "batch":
        count = data.draw(st.integers(1, 200))
        one = pb.ApplyBatchRequest(write=pb.BatchWrite(set_slice=pb.SetSliceRequest(
            name=weight, op=pb.SLICE_OP_ASSIGN, value=tpb.Tensor(
                dtype=tpb.DTYPE_FLOAT32, shape=[1 << 18], data=b"\0" * (1 << 20)))))
        return "ApplyBatch", [pb.ApplyBatchRequest(header=pb.ApplyBatchHeader(
            model="models/fz"))] + [one] * count, True
    if kind == "forward":
        rows = data.draw(st.sampled_from([1 << 10, 1 << 14, 1 << 16]))
        fwd = pb.ForwardRequest(model="models/fz", module_path="0")
        fwd.args.add().tensor_value.CopyFrom(tpb.Tensor(
            dtype=tpb.DTYPE_FLOAT32, shape=[rows, 16], data=b"\0" * (rows * 64)))
        return "Forward", [fwd], False
    return "shm", [big * 4], False


def _codec_index(*items):
    from paramhub import _codec

    return _codec.index_to_proto(tuple(items))


def _shm_read(s, size: int) -> object:
    """GetTensor into a client buffer that is a sparse memfd of `size` bytes."""
    import socket

    from paramhub import _shm
    from paramhub.common import pb
    from _served import raw

    link = _shm.ShmLink(s.client.transport_info().shm_address)
    fd = os.memfd_create("fuzz", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        greeted = link.connect()
        try:
            socket.send_fds(greeted.conn, [b"F"], [fd])
            return raw(s.channel, "GetTensor", [pb.GetTensorRequest(
                name="models/fz/parameters/0.bias", shm_token=greeted.token,
                shm_client_buffer=True)])
        finally:
            greeted.close()
    finally:
        os.close(fd)


@FUZZ
@given(data=st.data())
def test_fuzz_server_memory_stays_bounded(served, data):
    """Random amplifying requests (broadcast index tensors, announced uploads, gradient and
    batch streams, Forward outputs over the limit, sparse shm client buffers) against a
    `paramhub serve` process: none answers INTERNAL, and the server's peak RSS over the whole
    run stays within RSS_BOUND of where it started."""
    from _served import raw
    from paramhub.errors import ParamhubError

    s, base = served
    method, msgs, stream = _amplifying(data)
    if method == "shm":
        answer = _shm_read(s, msgs[0])
    else:
        answer = raw(s.channel, method, msgs, stream=stream)
    STATS["memory requests"] += 1
    if isinstance(answer, ParamhubError):
        PER_METHOD[f"memory {method}"][answer.reason] += 1
        assert answer.code not in ("INTERNAL", "UNKNOWN"), answer
    growth = s.peak() - base
    STATS["memory peak growth MiB"] = max(STATS["memory peak growth MiB"], growth >> 20)
    assert growth < RSS_BOUND, f"server peak RSS grew {growth >> 20} MiB ({method})"
