"""TLS and mTLS: connects with the right certificates, rejections without them."""

from __future__ import annotations

import dataclasses

import pytest

import paramhub
from paramhub.errors import UnavailableError
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
