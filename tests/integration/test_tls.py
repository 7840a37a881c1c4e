"""TLS and mTLS: connects with the right certificates, rejections without them; the data
channel in TLS (bulk transfers under TLS)."""

from __future__ import annotations

import dataclasses
import socket
import ssl
import time

import pytest
import torch

import paramhub
from paramhub import _data
from paramhub.errors import InvalidArgumentError, NotFoundError, UnavailableError
from paramhub_server.app import ConfigError, build_server

from _certs import issue, make_ca


@pytest.fixture(scope="module")
def pki():
    ca, ca_key, ca_cert = make_ca()
    server = issue(ca_key, ca_cert, "localhost", server=True)
    client = issue(ca_key, ca_cert, "client-1", server=False)
    other_ca, other_key, other_cert = make_ca("another CA")
    rogue = issue(other_key, other_cert, "rogue", server=False)
    return {"ca": ca, "server": server, "client": client, "other_ca": other_ca, "rogue": rogue}


def _files(tmp_path, pki, mtls):
    paths = {}
    for name, data in (("cert", pki["server"].cert), ("key", pki["server"].key),
                       ("ca", pki["ca"].cert)):
        p = tmp_path / f"{name}.pem"
        p.write_bytes(data)
        paths[name] = p
    return dict(tls_cert=paths["cert"], tls_key=paths["key"],
                tls_client_ca=paths["ca"] if mtls else None)


@pytest.fixture(params=[False, True], ids=["tls", "mtls"])
def tls_server(request, settings, tmp_path, pki):
    srv = build_server(dataclasses.replace(settings, **_files(tmp_path, pki, request.param)))
    try:
        yield srv, request.param
    finally:
        srv.stop(None)


def test_tls_connect_with_ca(tls_server, pki):
    srv, mtls = tls_server
    kw = dict(client_cert=pki["client"].cert, client_key=pki["client"].key) if mtls else {}
    with paramhub.connect(f"localhost:{srv.port}", tls=True, root_certificates=pki["ca"].cert,
                          timeout=10, **kw) as c:
        assert c.list_models() == []


def test_tls_rejects_plaintext_and_unknown_ca(tls_server, pki):
    srv, mtls = tls_server
    kw = dict(client_cert=pki["client"].cert, client_key=pki["client"].key) if mtls else {}
    with paramhub.connect(f"localhost:{srv.port}", timeout=5) as c:
        with pytest.raises(UnavailableError):
            c.list_models()
    with paramhub.connect(f"localhost:{srv.port}", tls=True,
                          root_certificates=pki["other_ca"].cert, timeout=5, **kw) as c:
        with pytest.raises(UnavailableError):
            c.list_models()


def test_mtls_requires_a_client_cert_from_the_ca(settings, tmp_path, pki):
    srv = build_server(dataclasses.replace(settings, **_files(tmp_path, pki, True)))
    try:
        target = f"localhost:{srv.port}"
        with paramhub.connect(target, tls=True, root_certificates=pki["ca"].cert,
                              timeout=5) as c:
            with pytest.raises(UnavailableError):
                c.list_models()
        with paramhub.connect(target, tls=True, root_certificates=pki["ca"].cert,
                              client_cert=pki["rogue"].cert, client_key=pki["rogue"].key,
                              timeout=5) as c:
            with pytest.raises(UnavailableError):
                c.list_models()
    finally:
        srv.stop(None)


def test_mtls_counts_as_authentication_for_exposed_hosts(settings, tmp_path, pki):
    files = _files(tmp_path, pki, False)
    with pytest.raises(ConfigError):
        build_server(dataclasses.replace(settings, host="0.0.0.0", **files))
    with pytest.raises(ConfigError):
        build_server(dataclasses.replace(settings, tls_cert=files["tls_cert"]))
    with pytest.raises(ConfigError):
        build_server(dataclasses.replace(settings, tls_client_ca=files["tls_cert"]))


# ------------------------------------------------------------------ bulk under TLS

MIN = _data.DATA_MIN_BYTES


class _Holder(torch.nn.Module):
    def __init__(self, **tensors: torch.Tensor) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t.clone())


def _tls_client(srv, pki, mtls, **kw) -> paramhub.Client:
    if mtls:
        kw.update(client_cert=pki["client"].cert, client_key=pki["client"].key)
    return paramhub.connect(f"localhost:{srv.port}", tls=True, root_certificates=pki["ca"].cert,
                            timeout=60, shm=False, progress=False, **kw)


def test_tls_data_channel_moves_big_tensors_in_tls(tls_server, pki):
    srv, mtls = tls_server
    n = MIN // 4 + 3
    srv.registry.adopt("m", _Holder(big=torch.randn(n), small=torch.randn(4)))
    channel = srv.transport.data
    assert channel is not None and channel.tls is not None
    with _tls_client(srv, pki, mtls) as c:
        assert c.transport_info().data_port == channel.port and c.uses_data_channel
        got, _ = c.get_tensor("m", "big", kind="buffers")
        assert torch.equal(got, srv.registry.get("m").module.big)
        value = torch.randn(n)
        c.set_slice("m", "big", None, value, kind="buffers")
        assert torch.equal(srv.registry.get("m").module.big, value)
        # A small tensor of unknown size: the server answers on the stream (the greeted data
        # connection stays unused); once its size is known, one unary call.
        c.get_tensor("m", "small", kind="buffers")
        c.get_tensor("m", "small", kind="buffers")
        # Which transport moved the bytes: the client's record and the server's counters.
        assert c.transfers["get:data"] == 1 and c.transfers["set:data"] == 1
        assert c.transfers["get:stream"] == 1 and c.transfers["get:inline"] == 1
        assert channel.sent == 1 and channel.received == 1


def test_tls_data_channel_never_greets_plaintext_or_unknown_clients(tls_server, pki):
    srv, mtls = tls_server
    port = srv.transport.data.port
    # A plaintext connection: the handshake fails, no token is ever sent or registered.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"\x00" * 64)
        raw.settimeout(10)
        try:
            got = raw.recv(64)
        except (ConnectionResetError, TimeoutError):
            got = b""
        assert len(got) < 32  # never a whole greeting token
    # A TLS client that does not trust the server's CA: refused by the client itself.
    untrusting = _data.DataLink("localhost", port, timeout=5,
                                tls=_data.TlsConfig(root_certificates=pki["other_ca"].cert))
    with pytest.raises(ssl.SSLError):
        untrusting.connect()
    if mtls:  # under mTLS a client without a certificate from the CA is never greeted
        anonymous = _data.DataLink("localhost", port, timeout=5,
                                   tls=_data.TlsConfig(root_certificates=pki["ca"].cert))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            anonymous.connect()
    time.sleep(0.3)
    assert srv.transport.data.pending == 0


def test_tls_data_channel_bad_write_is_refused_and_changes_nothing(tls_server, pki):
    srv, mtls = tls_server
    n = MIN // 4 + 1
    srv.registry.adopt("m", _Holder(big=torch.zeros(n)))
    with _tls_client(srv, pki, mtls) as c:
        assert c.uses_data_channel
        with pytest.raises(InvalidArgumentError) as e:  # more elements than the region
            c.set_slice("m", "big", slice(0, 10), torch.ones(n), kind="buffers")
        assert e.value.reason == "BAD_SHAPE"
        with pytest.raises(NotFoundError):
            c.set_slice("m", "nope", None, torch.ones(n), kind="buffers")
    m = srv.registry.get("m")
    assert not m.module.big.any() and m.version == 0
    assert srv.transport.data.received == 0


def test_tls_data_channel_off_with_no_data_port(settings, tmp_path, pki):
    srv = build_server(dataclasses.replace(settings, data_channel=False,
                                           **_files(tmp_path, pki, False)))
    try:
        srv.registry.adopt("m", _Holder(big=torch.randn(MIN // 4 + 1)))
        with _tls_client(srv, pki, False) as c:
            assert c.transport_info().data_port == 0 and not c.uses_data_channel
            got, _ = c.get_tensor("m", "big", kind="buffers")
            assert torch.equal(got, srv.registry.get("m").module.big)
            assert c.transfers["get:stream"] == 1
    finally:
        srv.stop(None)
