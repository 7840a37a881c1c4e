"""Metrics endpoint, liveness/readiness, request ids in logs, raw bytes answered
INVALID_ARGUMENT."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

import paramhub
from paramhub import _spec
from paramhub.errors import UnavailableError
from paramhub_server import logs
from paramhub_server.app import build_server

from _raw import call_raw


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_count_rpcs_codes_bytes_and_holdings(settings):
    srv = build_server(dataclasses.replace(settings, metrics_port=0))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}") as c:
            c.create_model_from_spec("m", _spec.spec_from_module(nn.Linear(8, 4)),
                                     values=nn.Linear(8, 4).state_dict())
            c.get_tensor("m", "weight")
            with pytest.raises(paramhub.NotFoundError):
                c.get_tensor("m", "nope")
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            call_raw(ch, "GetTensor", [b"\xff\xff\xff"])
        m = _scrape(srv.metrics_port)
    finally:
        srv.stop(None)
    assert m['paramhub_rpcs_total{code="OK",method="GetTensor"}'] == 1
    assert m['paramhub_rpcs_total{code="NOT_FOUND",method="GetTensor"}'] == 1
    assert m['paramhub_rpcs_total{code="INVALID_ARGUMENT",method="GetTensor"}'] == 1
    assert m['paramhub_rpc_duration_seconds_count{code="OK",method="CreateModel"}'] == 1
    assert m['paramhub_sent_bytes_total{method="GetTensor"}'] >= 36 * 4
    assert m['paramhub_received_bytes_total{method="CreateModel"}'] >= 36 * 4
    assert m["paramhub_models"] == 1
    assert m["paramhub_parameters"] == 36
    assert m["paramhub_held_bytes"] == 144


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_readiness_false_while_loading(settings):
    release = threading.Event()
    loaded = []

    def loader(registry):
        release.wait(30)
        loaded.append(registry)

    srv = build_server(settings, loader=loader)
    target = f"127.0.0.1:{srv.port}"
    try:
        serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                                health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _health(target, "liveness") == serving
        assert _health(target, "readiness") == not_serving
        assert _health(target, "") == not_serving
        with paramhub.connect(target, timeout=5) as c:
            with pytest.raises(UnavailableError) as e:
                c.list_models()
            assert e.value.reason == "NOT_READY"
            release.set()
            for _ in range(200):
                if srv.ready():
                    break
                threading.Event().wait(0.05)
            assert _health(target, "readiness") == serving
            assert c.list_models() == []
    finally:
        release.set()
        srv.stop(None)
    assert loaded


def test_request_id_from_metadata_reaches_logs_and_response(server, target, caplog):
    caplog.set_level(logging.INFO)
    handler = logging.StreamHandler(stream := __import__("io").StringIO())
    handler.addFilter(logs.RequestContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        with grpc.insecure_channel(target) as ch:
            stub = __import__("paramhub.v1.parameter_service_pb2_grpc",
                              fromlist=["x"]).ParameterServiceStub(ch)
            from paramhub.common import pb
            with pytest.raises(grpc.RpcError) as e:
                stub.DescribeModel(pb.DescribeModelRequest(name="models/none"),
                                   metadata=[("x-request-id", "req-abc-123")], timeout=10)
            assert ("x-request-id", "req-abc-123") in e.value.trailing_metadata()
            # A success echoes the client's id; without one it sends none (errors always do).
            _, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=10,
                                                metadata=[("x-request-id", "req-ok-1")])
            assert ("x-request-id", "req-ok-1") in call.trailing_metadata()
            _, call = stub.ListModels.with_call(pb.ListModelsRequest(), timeout=10)
            assert "x-request-id" not in dict(call.trailing_metadata() or ())
            with pytest.raises(grpc.RpcError) as e2:
                stub.DescribeModel(pb.DescribeModelRequest(name="models/none"), timeout=10)
            generated = dict(e2.value.trailing_metadata())["x-request-id"]
            assert len(generated) == 16
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    access = [x for x in lines if x["logger"] == "paramhub_server.access"]
    assert {"request_id": "req-abc-123", "method": "DescribeModel", "rpc_code": "NOT_FOUND"
            }.items() <= access[0].items()
    assert access[1]["request_id"] == "req-ok-1" and access[1]["rpc_code"] == "OK"
    assert access[2]["rpc_code"] == "OK" and len(access[2]["request_id"]) == 16
    assert access[3]["request_id"] == generated and access[3]["rpc_code"] == "NOT_FOUND"


@pytest.mark.parametrize("method", ["ListModels", "SetSlice", "GetTensor", "CreateModel",
                                    "StreamSetSlice", "Probe"])
def test_undecodable_bytes_are_invalid_argument(server, target, method):
    with grpc.insecure_channel(target) as ch:
        code, _ = call_raw(ch, method, [b"\x0a\xff\xff\xff\xff\x0f"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_metrics_write_log_lag(settings):
    """paramhub_wal_bytes grows with each logged write and drops when the log is compacted;
    paramhub_wal_unsynced_models counts logs with appends awaiting a batch fsync."""
    srv = build_server(dataclasses.replace(settings, metrics_port=0, fsync="batch",
                                           fsync_interval_s=3600.0))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}") as c:
            c.create_model_from_spec("m", _spec.spec_from_module(nn.Linear(8, 4)),
                                     values=nn.Linear(8, 4).state_dict())
            before = _scrape(srv.metrics_port)["paramhub_wal_bytes"]
            c.set_slice("m", "weight", (0, 0), 1.0)
            m = _scrape(srv.metrics_port)
            assert m["paramhub_wal_bytes"] > before
            assert m["paramhub_wal_unsynced_models"] == 1  # the hour-long batch has not flushed
            c.compact("m")
            assert _scrape(srv.metrics_port)["paramhub_wal_bytes"] < m["paramhub_wal_bytes"]
    finally:
        srv.stop(None)
