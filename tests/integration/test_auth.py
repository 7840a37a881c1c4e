"""Auth roles: every RPC against every role, tokens never logged, health/reflection open,
non-loopback binding refused without auth."""

from __future__ import annotations

import dataclasses
import logging

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

import paramhub
from paramhub.errors import AuthError, PermissionDeniedError
from paramhub_server.app import ConfigError, build_server
from paramhub_server.auth import (ADMIN, METHOD_ROLES, READ, ROLES, WRITE, AuthFileError,
                                  Authenticator, required_role)

from _raw import METHODS, SERVICE, call_raw

TOKENS = {READ: "read-token-0123456789abcdef", WRITE: "write-token-0123456789abcdef",
          ADMIN: "admin-token-0123456789abcdef"}
_LEVEL = {r: i for i, r in enumerate(ROLES)}


@pytest.fixture
def auth_file(tmp_path):
    p = tmp_path / "tokens"
    p.write_text("# role token\n" + "".join(f"{r} {t}\n" for r, t in TOKENS.items()) + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def auth_server(settings, auth_file):
    srv = build_server(dataclasses.replace(settings, auth_file=auth_file))
    try:
        yield srv
    finally:
        srv.stop(grace=None)


@pytest.fixture
def target_a(auth_server):
    return f"127.0.0.1:{auth_server.port}"


def _model(client: paramhub.Client) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    from paramhub import _spec
    client.create_model_from_spec("m", _spec.spec_from_module(net), values=net.state_dict())


def test_method_roles_cover_every_rpc():
    # A new RPC without an entry would fall back to admin; this makes the omission loud.
    assert set(METHOD_ROLES) == set(METHODS), set(METHODS) ^ set(METHOD_ROLES)
    assert set(METHOD_ROLES.values()) <= set(ROLES)


def test_required_role_unknown_method_needs_admin_and_other_services_are_open():
    assert required_role(f"/{SERVICE.full_name}/SomeFutureRpc") == ADMIN
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role(f"/{SERVICE.full_name}/GetTensor") == READ


@pytest.mark.parametrize("method", sorted(METHOD_ROLES))
@pytest.mark.parametrize("who", ["none", "wrong", "garbled", READ, WRITE, ADMIN])
def test_rpc_role_matrix(target_a, method, who):
    """Each RPC x each credential: UNAUTHENTICATED without/with a bad token, PERMISSION_DENIED
    below the RPC's role, otherwise past auth (an empty request then fails validation or
    succeeds, but never with an auth code)."""
    md: list[tuple[str, str]] = []
    if who == "wrong":
        md = [("authorization", "Bearer not-a-valid-token-at-all-xx")]
    elif who == "garbled":
        md = [("authorization", f"Basic {TOKENS[ADMIN]}")]
    elif who in TOKENS:
        md = [("authorization", f"Bearer {TOKENS[who]}")]
    with grpc.insecure_channel(target_a) as ch:
        code, _ = call_raw(ch, method, [b""], metadata=md, timeout=10)
    if who in ("none", "wrong", "garbled"):
        assert code == grpc.StatusCode.UNAUTHENTICATED
    elif _LEVEL[who] < _LEVEL[METHOD_ROLES[method]]:
        assert code == grpc.StatusCode.PERMISSION_DENIED
    else:
        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def test_sdk_roles_end_to_end_and_denied_writes_change_nothing(target_a, monkeypatch):
    with paramhub.connect(target_a, token=TOKENS[ADMIN]) as admin:
        _model(admin)
        before = admin.probe("m").stats.checksum_sha256
    # Token from the environment, as users set it.
    monkeypatch.setenv("PARAMHUB_TOKEN", TOKENS[READ])
    with paramhub.connect(target_a) as reader:
        t, _ = reader.get_tensor("m", "0.weight")
        assert t.shape == (3, 4)
        assert reader.forward("m", torch.ones(1, 4)).shape == (1, 2)
        with pytest.raises(PermissionDeniedError) as e:
            reader.set_slice("m", "0.weight", (0, 0), 5.0)
        assert e.value.code == "PERMISSION_DENIED" and e.value.reason == "ROLE_TOO_LOW"
        assert e.value.metadata["needed"] == WRITE
        with pytest.raises(PermissionDeniedError):
            reader.delete_model("m")
        assert reader.probe("m").stats.checksum_sha256 == before
    monkeypatch.delenv("PARAMHUB_TOKEN")
    with paramhub.connect(target_a) as anon:
        with pytest.raises(AuthError) as e:
            anon.list_models()
        assert e.value.code == "UNAUTHENTICATED" and e.value.reason == "TOKEN_MISSING"
    with paramhub.connect(target_a, token="x" * 30) as bad:
        with pytest.raises(AuthError) as e:
            bad.set_slice("m", "0.weight", (0, 0), 5.0)
        assert e.value.reason == "TOKEN_INVALID"
    with paramhub.connect(target_a, token=TOKENS[WRITE]) as writer:
        assert writer.probe("m").stats.checksum_sha256 == before
        writer.set_slice("m", "0.weight", (0, 0), 5.0)
        assert writer.get_tensor("m", "0.weight", (0, 0))[0].item() == 5.0
        with pytest.raises(PermissionDeniedError):
            writer.create_model_from_spec("m2", writer.describe_model("m").spec)
        assert [m.name for m in writer.list_models()] == ["models/m"]
    with paramhub.connect(target_a, token=TOKENS[ADMIN]) as admin:
        admin.delete_model("m")
        assert admin.list_models() == []


def test_health_and_reflection_stay_open(target_a):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(target_a) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                     timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        out = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=10))
        names = {s.name for s in out[0].list_services_response.service}
        assert SERVICE.full_name in names


def test_tokens_never_logged(target_a, caplog):
    caplog.set_level(logging.DEBUG)
    with paramhub.connect(target_a, token=TOKENS[READ]) as c:
        c.list_models()
        with pytest.raises(PermissionDeniedError):
            c.delete_model("x")
    with paramhub.connect(target_a, token="wrong-token-that-should-not-leak") as c:
        with pytest.raises(AuthError):
            c.list_models()
    text = "\n".join(r.getMessage() + " " + str(vars(r)) for r in caplog.records)
    assert "ListModels" in text  # the access log did run
    for secret in (*TOKENS.values(), "wrong-token-that-should-not-leak"):
        assert secret not in text


@pytest.mark.parametrize("content,reason", [
    ("superuser abcdefghijklmnopqrstuvwxyz\n", "unknown role"),
    ("read short\n", "shorter"),
    ("read a b c\n", "expected"),
    ("", "no tokens"),
    ("read same-token-0123456789abcdef\nadmin same-token-0123456789abcdef\n", "two roles"),
])
def test_auth_file_rejected(tmp_path, settings, content, reason):
    p = tmp_path / "tokens"
    p.write_text(content)
    with pytest.raises(AuthFileError) as e:
        build_server(dataclasses.replace(settings, auth_file=p))
    assert reason in str(e.value)
    for word in content.split():
        if len(word) >= 16:
            assert word not in str(e.value)


def test_authenticator_compares_all_entries():
    a = Authenticator([(READ, "r" * 20), (ADMIN, "a" * 20)])
    assert a.authenticate((("authorization", "Bearer " + "a" * 20),)).role == ADMIN
    assert a.authenticate((("authorization", "bearer " + "r" * 20),)).role == READ
    with pytest.raises(AuthError):
        a.authenticate((("authorization", "Bearer " + "a" * 19),))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.com"])
def test_non_loopback_refused_without_auth(settings, host):
    with pytest.raises(ConfigError):
        build_server(dataclasses.replace(settings, host=host))


def test_loopback_allowed_without_auth(settings):
    """A loopback server needs no auth file, and then accepts calls without a token (admin
    ones included); a non-loopback one is refused (test_non_loopback_refused_without_auth)."""
    for host in ("127.0.0.1", "localhost"):
        srv = build_server(dataclasses.replace(settings, host=host))
        try:
            with paramhub.connect(f"{host}:{srv.port}", timeout=30) as c:
                c.create_model("m", nn.Linear(2, 2))
                assert [m.name for m in c.list_models()] == ["models/m"]
                c.delete_model("m")
        finally:
            srv.stop(None)


def test_forward_that_updates_buffers_needs_write_role(target_a):
    """Forward is a read, except in training mode where BatchNorm updates its running stats."""
    with paramhub.connect(target_a, token=TOKENS[ADMIN]) as admin:
        admin.create_model("bn", nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
        stats = admin.get_tensor("bn", "1.running_mean", kind="buffers")
    x = torch.rand(4, 2)
    with paramhub.connect(target_a, token=TOKENS[READ]) as reader:
        with pytest.raises(PermissionDeniedError) as e:
            reader.forward("bn", x)
        assert e.value.reason == "ROLE_TOO_LOW" and e.value.metadata["needed"] == WRITE
        assert torch.equal(reader.get_tensor("bn", "1.running_mean", kind="buffers")[0],
                           stats[0])
    with paramhub.connect(target_a, token=TOKENS[WRITE]) as writer:
        writer.forward("bn", x)  # a writer may update the running stats
        writer.set_training("bn", False)
    with paramhub.connect(target_a, token=TOKENS[READ]) as reader:
        assert reader.forward("bn", x).shape == (4, 3)  # eval mode: a plain read
