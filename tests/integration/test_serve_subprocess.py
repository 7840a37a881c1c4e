"""`paramhub serve` as a user runs it: a subprocess on port 0, health, server reflection, a call
built only from reflection-discovered descriptors, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

SERVICE = "paramhub.v1.ParameterService"
STARTUP_SECONDS = 120  # importing torch on a busy 2-core machine can take a while


def _paramhub_executable() -> str:
    exe = Path(sys.executable).parent / "paramhub"  # the console script of this environment
    assert exe.exists(), "the project is not installed: run `make setup`"
    return str(exe)


def _read_first_line(proc: subprocess.Popen) -> str:
    """The first line of stdout, waiting at most STARTUP_SECONDS (polled, never blocked on)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + STARTUP_SECONDS
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            raise AssertionError(f"no address line from paramhub serve (got {data!r}, "
                                 f"exit {proc.poll()})")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                continue
            data += chunk
    return data.split(b"\n", 1)[0].decode()


@pytest.fixture
def served(tmp_path):
    """`paramhub serve --port 0` in a subprocess; yields (process, "host:port")."""
    proc = subprocess.Popen(
        [_paramhub_executable(), "serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu",
         "--data-dir", str(tmp_path / "data"), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        address = _read_first_line(proc)
        yield proc, address
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _reflection_request(stub, request):
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    assert len(responses) == 1
    return responses[0]


def _file_protos(stub, symbol: str) -> list[descriptor_pb2.FileDescriptorProto]:
    """The FileDescriptorProtos that define `symbol`, with their dependencies, via reflection."""
    response = _reflection_request(stub, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=symbol))
    assert response.WhichOneof("message_response") == "file_descriptor_response"
    return [descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in response.file_descriptor_response.file_descriptor_proto]


def test_serve_subprocess_health_reflection_generic_call_and_sigterm(served):
    proc, address = served
    host, _, port = address.rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0

    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)

        # Health: the server overall and the service by name.
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # Reflection lists the service.
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = _reflection_request(reflection, reflection_pb2.ServerReflectionRequest(
            list_services=""))
        names = [s.name for s in listed.list_services_response.service]
        assert SERVICE in names
        assert "grpc.health.v1.Health" in names

        # Build a pool from reflection only: no import of paramhub's generated code here.
        pool = descriptor_pool.DescriptorPool()
        pending = _file_protos(reflection, SERVICE)
        added: set[str] = set()
        while pending:  # add files after their dependencies
            progress = False
            for fd in list(pending):
                if all(dep in added for dep in fd.dependency):
                    pool.Add(fd)
                    added.add(fd.name)
                    pending.remove(fd)
                    progress = True
            assert progress, f"unresolvable dependencies in {[f.name for f in pending]}"
        service = pool.FindServiceByName(SERVICE)
        methods = {m.name: m for m in service.methods}
        assert {"CreateModel", "ListModels", "GetTensor", "SetSlice", "ApplyInit", "Forward",
                "CheckShared"} <= set(methods)

        # A generic unary call to ListModels with classes made from those descriptors.
        def call(method_name: str, **fields):
            method = methods[method_name]
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            rpc = channel.unary_unary(f"/{SERVICE}/{method_name}",
                                      request_serializer=request_cls.SerializeToString,
                                      response_deserializer=response_cls.FromString)
            return rpc(request_cls(**fields), timeout=30)

        reply = call("ListModels")
        assert reply.DESCRIPTOR.full_name == "paramhub.v1.ListModelsResponse"
        assert list(reply.models) == []
        # An error through the same generic path: NOT_FOUND for an unknown model.
        with pytest.raises(grpc.RpcError) as info:
            call("DescribeModel", name="models/ghost")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

    # SIGTERM: the server drains and exits 0.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_serve_subprocess_python_m_entry_point(tmp_path):
    """`python -m paramhub_server` runs the same server (first line is the address)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "paramhub_server", "--port", "0", "--device", "cpu",
         "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        address = _read_first_line(proc)
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=60,
                                 wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_serve_subprocess_port_in_use_fails(served, tmp_path):
    _, address = served
    port = address.rpartition(":")[2]
    proc = subprocess.run([_paramhub_executable(), "serve", "--port", port, "--device", "cpu",
                           "--data-dir", str(tmp_path / "data2")],
                          capture_output=True, timeout=STARTUP_SECONDS, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == b""  # no address line: nothing is listening for it
    # One line naming the address, not a traceback.
    assert b"cannot serve on" in proc.stderr and b"Traceback" not in proc.stderr
