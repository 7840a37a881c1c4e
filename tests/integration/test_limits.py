"""Limits: each answers RESOURCE_EXHAUSTED naming the limit and the asked amount, and leaves
nothing half-created or changed."""

from __future__ import annotations

import dataclasses
import threading

import grpc
import pytest
import torch
from torch import nn

import paramhub
from paramhub import _spec
from paramhub.errors import ResourceExhaustedError
from paramhub.common import pb
from paramhub_server.app import build_server


@pytest.fixture
def limited(settings):
    def make(**kw):
        srv = build_server(dataclasses.replace(settings, **kw))
        made.append(srv)
        return srv, paramhub.connect(f"127.0.0.1:{srv.port}", timeout=30)
    made = []
    yield make
    for s in made:
        s.stop(None)


def _linear_spec(n_in, n_out):
    return _spec.spec_from_module(nn.Linear(n_in, n_out, device="meta"))


def test_max_model_bytes(limited):
    _, c = limited(max_model_bytes=1000)
    with pytest.raises(ResourceExhaustedError) as e:
        c.create_model_from_spec("big", _linear_spec(100, 100))
    assert e.value.reason == "MODEL_TOO_LARGE"
    assert e.value.metadata["limit"] == "max_model_bytes"
    assert e.value.metadata["asked"] == str((100 * 100 + 100) * 4)
    assert c.list_models() == []
    c.create_model_from_spec("big", _linear_spec(10, 10))  # the id is free; small fits


def test_max_total_bytes_counts_every_model_and_frees_on_delete(limited):
    _, c = limited(max_total_bytes=3000)
    c.create_model_from_spec("a", _linear_spec(20, 20))  # 1680 bytes
    with pytest.raises(ResourceExhaustedError) as e:
        c.create_model_from_spec("b", _linear_spec(20, 20))
    assert e.value.reason == "TOTAL_BYTES_EXCEEDED"
    assert e.value.metadata == {"limit": "max_total_bytes", "asked": "1680", "in_use": "1680",
                                "limit_value": "3000"}
    assert [m.name for m in c.list_models()] == ["models/a"]
    c.delete_model("a")
    c.create_model_from_spec("b", _linear_spec(20, 20))


def test_max_total_bytes_concurrent_creates_cannot_overcommit(limited):
    _, c = limited(max_total_bytes=4000)
    results = []

    def create(i):
        try:
            c.create_model_from_spec(f"m{i}", _linear_spec(20, 20))
            results.append("ok")
        except ResourceExhaustedError:
            results.append("full")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["full"] * 4 + ["ok"] * 2
    assert sum(m.num_bytes for m in c.list_models()) <= 4000


def test_max_message_bytes(limited):
    srv, c = limited(max_message_bytes=64 << 10)
    c.create_model_from_spec("m", _linear_spec(4, 4))
    before = c.probe("m").stats.checksum_sha256
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = __import__("paramhub.v1.parameter_service_pb2_grpc",
                          fromlist=["x"]).ParameterServiceStub(ch)
        req = pb.SetSliceRequest(name="models/m/parameters/weight", op=pb.SLICE_OP_ASSIGN)
        req.value.dtype = 1
        req.value.data = b"\0" * (128 << 10)
        with pytest.raises(grpc.RpcError) as e:
            stub.SetSlice(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert c.probe("m").stats.checksum_sha256 == before


def test_max_tensor_elements_on_values_indices_streams_and_forward(limited):
    _, c = limited(max_tensor_elements=100)
    c.create_model_from_spec("m", _linear_spec(20, 20))
    before = c.probe("m").stats.checksum_sha256
    cases = [
        lambda: c.set_slice("m", "weight", None, torch.zeros(20, 20)),            # 400 elements
        lambda: c.get_tensor("m", "weight", torch.zeros(200, dtype=torch.int64)),  # index tensor
        lambda: c.forward("m", torch.zeros(10, 20)),                               # input
    ]
    for case in cases:
        with pytest.raises(ResourceExhaustedError) as e:
            case()
        assert e.value.reason == "TENSOR_TOO_LARGE"
        assert e.value.metadata["limit"] == "max_tensor_elements"
        assert int(e.value.metadata["asked"]) > 100
    # A streamed upload is refused from its header, before any bytes are allocated.
    stub = c.stub
    req = pb.SetSliceRequest(name="models/m/parameters/weight", op=pb.SLICE_OP_ASSIGN)
    req.value.dtype = 1
    req.value.shape.extend([1 << 20, 1 << 20])
    with pytest.raises(grpc.RpcError) as e:
        stub.StreamSetSlice(iter([pb.StreamSetSliceRequest(request=req)]), timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert c.probe("m").stats.checksum_sha256 == before
    c.set_slice("m", "weight", (0,), torch.ones(20))  # within the cap: fine


def _chain(depth):
    spec = pb.ModelSpec(root=0)
    for i in range(depth):
        node = spec.nodes.add(type="Sequential")
        if i + 1 < depth:
            node.children.add(name="0", node=i + 1)
    return spec


def test_max_spec_nodes_and_depth(limited):
    _, c = limited(max_spec_nodes=10, max_spec_depth=5)
    with pytest.raises(ResourceExhaustedError) as e:
        c.create_model_from_spec("deep", _chain(6))
    assert e.value.reason == "SPEC_TOO_DEEP"
    assert e.value.metadata["asked"] == "6" and e.value.metadata["limit"] == "max_spec_depth"
    c.create_model_from_spec("ok", _chain(5))
    wide = pb.ModelSpec(root=0)
    root = wide.nodes.add(type="Sequential")
    for i in range(11):
        root.children.add(name=str(i), node=i + 1)
        wide.nodes.add(type="ReLU")
    with pytest.raises(ResourceExhaustedError) as e:
        c.create_model_from_spec("wide", wide)
    assert e.value.reason == "SPEC_TOO_LARGE" and e.value.metadata["asked"] == "12"
    assert [m.name for m in c.list_models()] == ["models/ok"]


def test_max_concurrent_rpcs(limited):
    srv, c = limited(max_concurrent_rpcs=1)
    release = threading.Event()
    started = threading.Event()

    def slow_requests():
        yield pb.CreateModelRequest(header=pb.CreateModelHeader(
            model_id="slow", spec=_linear_spec(2, 2)))
        started.set()
        release.wait(30)

    result = {}

    def run():
        try:
            result["resp"] = c.stub.CreateModel(slow_requests(), timeout=60)
        except grpc.RpcError as e:  # pragma: no cover - reported below
            result["err"] = e.code()

    t = threading.Thread(target=run)
    t.start()
    try:
        assert started.wait(30)
        # The CreateModel stream holds the only slot until released.
        with pytest.raises(ResourceExhaustedError):
            for _ in range(50):
                c.list_models()
                threading.Event().wait(0.05)
    finally:
        release.set()
        t.join(60)
    assert "err" not in result
    assert [m.name for m in c.list_models()] == ["models/slow"]
