"""Walks the error table of STYLE.md §5 through the real SDK: for each reachable row, the status
code, the SDK exception (and the builtin it also is), and the ErrorInfo reason."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from torch import nn

import paramhub
from _core_helpers import create, model_ids, unchanged
from paramhub import errors
from paramhub.common import pb
from paramhub.v1 import parameter_service_pb2_grpc as pb_grpc
from paramhub_server.app import build_server


def _not_found(client, **_):
    client.get_tensor("ghost", "weight")


def _already_exists(client, **_):
    create(client, "m", nn.Linear(2, 2), seed=0)


def _invalid_argument(client, **_):
    client.set_slice("m", "weight", None, torch.ones(3, 3))


def _out_of_range(client, **_):
    client.get_tensor("m", "weight", (0, 2))


def _aborted(client, **_):
    client.set_slice("m", "weight", 0, 1.0, expected_version=7)


def _resource_exhausted(client, **_):
    create(client, "huge", nn.Linear(1024, 1024), seed=0)


def _unavailable(settings, **_):
    # A server that has stopped: the channel cannot connect (after its retries).
    srv = build_server(settings)
    port = srv.port
    srv.stop(grace=None)
    with paramhub.connect(f"127.0.0.1:{port}", timeout=5) as c:
        c.list_models()


def _deadline_exceeded(client, server, **_):
    # A writer holds the model's lock, so the read waits past its deadline.
    with server.registry.get("m").lock.write():
        client.get_tensor("m", "weight", timeout=0.5)


# (situation, code, SDK exception, builtin it also is, reason, trigger)
TABLE = [
    ("unknown model", "NOT_FOUND", errors.NotFoundError, LookupError, "MODEL_NOT_FOUND",
     _not_found),
    ("create with an existing id", "ALREADY_EXISTS", errors.AlreadyExistsError, None,
     "MODEL_EXISTS", _already_exists),
    ("shape that does not broadcast", "INVALID_ARGUMENT", errors.InvalidArgumentError,
     ValueError, "BAD_SHAPE", _invalid_argument),
    ("index out of bounds", "OUT_OF_RANGE", errors.OutOfRangeError, IndexError,
     "INDEX_OUT_OF_RANGE", _out_of_range),
    ("expected_version mismatch", "ABORTED", errors.ConflictError, None, "VERSION_MISMATCH",
     _aborted),
    ("model over --max-model-bytes", "RESOURCE_EXHAUSTED", errors.ResourceExhaustedError, None,
     "MODEL_TOO_LARGE", _resource_exhausted),
    ("server gone", "UNAVAILABLE", errors.UnavailableError, None, "UNAVAILABLE", _unavailable),
    ("deadline passed", "DEADLINE_EXCEEDED", errors.DeadlineExceededError, TimeoutError,
     "DEADLINE_EXCEEDED", _deadline_exceeded),
]


@pytest.fixture
def settings(settings):
    return dataclasses.replace(settings, max_model_bytes=1 << 20)


@pytest.mark.parametrize("situation,code,cls,builtin,reason,trigger", TABLE,
                         ids=[row[1] for row in TABLE])
def test_error_table(client, server, settings, situation, code, cls, builtin, reason, trigger):
    create(client, "m", nn.Linear(2, 2), seed=0)
    with unchanged(client, "m"):
        with pytest.raises(errors.ParamhubError) as info:
            trigger(client=client, server=server, settings=settings)
    err = info.value
    assert type(err) is cls, situation
    assert err.code == code == cls.code
    assert err.reason == reason
    assert isinstance(err, errors.ParamhubError)
    if builtin is not None:
        assert isinstance(err, builtin)
    assert model_ids(client) == ["m"]


@pytest.mark.parametrize("token, cls, builtin, code, reason", [
    (None, errors.AuthError, None, "UNAUTHENTICATED", "TOKEN_MISSING"),
    ("not-a-token-0123456789", errors.AuthError, None, "UNAUTHENTICATED", "TOKEN_INVALID"),
    ("read-token-0123456789abcdef", errors.PermissionDeniedError, PermissionError,
     "PERMISSION_DENIED", "ROLE_TOO_LOW"),
])
def test_error_table_auth_rows(settings, tmp_path, token, cls, builtin, code, reason):
    """The table's auth rows, on a server with an auth file: a write without a token, with an
    unknown one, and with a read-role one; nothing is written."""
    tokens = tmp_path / "tokens"
    tokens.write_text("read read-token-0123456789abcdef\nadmin admin-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    srv = build_server(dataclasses.replace(settings, auth_file=tokens))
    target = f"127.0.0.1:{srv.port}"
    try:
        with paramhub.connect(target, token="admin-token-0123456789abcdef") as admin:
            create(admin, "m", nn.Linear(2, 2), seed=0)
            with unchanged(admin, "m"):
                with paramhub.connect(target, token=token) as c:
                    with pytest.raises(cls) as info:
                        c.set_slice("m", "weight", None, torch.ones(2, 2))
        err = info.value
        assert (err.code, err.reason) == (code, reason)
        if builtin is not None:
            assert isinstance(err, builtin)
    finally:
        srv.stop(grace=None)


def test_error_table_internal_is_generic_and_logged(client, server, monkeypatch, caplog):
    # A fault injected into our own core (not grpc, not torch) stands for a server bug.
    def broken() -> list:
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(server.registry, "list", broken)
    with pytest.raises(errors.InternalError) as info:
        client.list_models()
    err = info.value
    assert (err.code, err.reason) == ("INTERNAL", "INTERNAL")
    assert "secret" not in str(err)
    request_id = err.metadata["request_id"]
    assert request_id in str(err)
    assert any(request_id in r.getMessage() for r in caplog.records)
    monkeypatch.undo()
    assert client.list_models() == []  # the server is still up


def test_error_info_travels_as_rich_status(target):
    # Read with plain grpc: the detail is a google.rpc.ErrorInfo in the paramhub domain.
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ParameterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.DescribeModel(pb.DescribeModelRequest(name="models/ghost"), timeout=30)
    call = info.value
    assert call.code() == grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(call)
    (detail,) = status.details
    error_info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(error_info)
    assert error_info.domain == errors.ERROR_DOMAIN == "paramhub.dev"
    assert error_info.reason == "MODEL_NOT_FOUND"
    assert dict(error_info.metadata) == {"model": "ghost"}


def test_every_sdk_exception_maps_back_from_its_code():
    for cls in (errors.NotFoundError, errors.AlreadyExistsError, errors.InvalidArgumentError,
                errors.OutOfRangeError, errors.ConflictError, errors.ResourceExhaustedError,
                errors.AuthError, errors.PermissionDeniedError, errors.UnavailableError,
                errors.DeadlineExceededError, errors.UnimplementedError, errors.InternalError):
        assert errors.error_class_for_code(cls.code) is cls
        assert grpc.StatusCode[cls.code]  # a real status code name
    assert errors.error_class_for_code("CANCELLED") is errors.ParamhubError
