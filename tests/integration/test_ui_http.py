"""The web inspector through an HTTP client (no browser): pages, values, the guarded edits, roles,
the CLI (the event streams are in test_ui_live.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

import paramhub
from paramhub_server.app import build_server
from paramhub_server.ui import detect_role

from _ui import make_model, served_ui, write_headers

SNAPSHOT = re.compile(r'<script type="application/json" id="page-data">(.*?)</script>', re.S)


def page_data(html: str) -> dict:
    m = SNAPSHOT.search(html)
    assert m, "the page has no page-data"
    return json.loads(m.group(1))


def csrf_of(html: str) -> str:
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert m
    return m.group(1)


@pytest.fixture
def model(client):
    make_model(client)
    return "mlp"


@pytest.fixture
def ui(client, model):
    with served_ui(client, allow_edits=True, role="admin") as (server, base):
        with httpx.Client(base_url=base, timeout=30) as http:
            yield server, base, http


# ------------------------------------------------------------------------------------ pages


def test_ui_index_lists_models_with_device_size_version(ui, client):
    client.set_slice("mlp", "0.bias", None, 1.0)
    _, _, http = ui
    r = http.get("/")
    assert r.status_code == 200
    row = re.search(r'<tr data-model="mlp">(.*?)</tr>', r.text, re.S).group(1)
    assert '<a href="/models/mlp">mlp</a>' in row and "cpu" in row
    assert re.search(r'class="model-version" data-model="mlp">1<', row)
    assert "KiB" in row or " B<" in row


def test_ui_model_page_tree_marks_shared_tied_eval_and_counts(ui):
    _, _, http = ui
    html = http.get("/models/mlp").text
    text = re.sub(r"<[^>]+>", "", html)
    assert "Sequential(" in text
    assert "(0): Linear(in_features=8, out_features=8, bias=True) 72 params" in text
    assert "(4): Linear(…) shared → 2" in text
    assert "tied → 0.weight" in text           # 6.weight shares 0.weight's storage
    assert re.search(r"\(5\): BatchNorm1d\(8,.*?eval", text)
    assert "running_mean float32 [8]" in text  # a buffer row
    assert 'href="/models/mlp/buffers/5.running_mean"' in html
    assert "(6): Linear(in_features=8, out_features=8, bias=True) 72 params" in text
    # The root counts tied and shared storage once: 72 + 72 + 16 + 8 (6.bias).
    assert "Sequential( 168 params" in text


def test_ui_tensor_page_shows_the_probe_statistics(ui, client):
    _, _, http = ui
    r = http.get("/models/mlp/parameters/2.weight")
    assert r.status_code == 200
    data = page_data(r.text)
    probe = client.probe("mlp", "2.weight", bins=40).stats
    assert data["stats"]["version"] == probe.version == data["version"]
    assert data["stats"]["min"] == pytest.approx(probe.min)
    assert data["stats"]["std"] == pytest.approx(probe.std)
    assert sum(data["stats"]["hist"]["counts"]) == 64
    assert data["index"] == ""  # small tensors open whole


def test_ui_tensor_page_of_a_gradient_and_of_a_buffer(ui, client):
    _, _, http = ui
    r = http.get("/models/mlp/parameters/0.weight?grad=1")
    assert r.status_code == 404 and "GRAD_NOT_SET" in r.text
    net = client.model("mlp")
    net.train()
    net[5].eval()
    net(torch.rand(3, 8)).sum().backward()
    data = page_data(http.get("/models/mlp/parameters/0.weight?grad=1").text)
    grad, _ = client.get_tensor("mlp", "0.weight", grad=True)
    assert data["grad"] is True
    assert data["stats"]["max"] == pytest.approx(grad.max().item())
    assert "data-first=\"0.weight\"" in http.get("/models/mlp").text
    buf = page_data(http.get("/models/mlp/buffers/5.running_var").text)
    assert buf["kind"] == "buffers" and buf["stats"]["mean"] == pytest.approx(1.0)


def test_ui_values_region_matches_the_sdk(ui, client):
    _, _, http = ui
    r = http.get("/api/models/mlp/parameters/0.weight/values", params={"index": "0:2, :3"})
    assert r.status_code == 200
    d = r.json()
    t, version = client.get_tensor("mlp", "0.weight", (slice(0, 2), slice(None, 3)))
    assert d["shape"] == [2, 3] and d["version"] == version
    assert torch.tensor(d["rows"]) == pytest.approx(t.double())


@pytest.mark.parametrize("index,status,reason", [
    ("0:2 ; x", 400, "BAD_INDEX"),
    ("0, abc", 400, "BAD_INDEX"),
    ("99", 400, "INDEX_OUT_OF_RANGE"),
])
def test_ui_values_bad_index_refused(ui, index, status, reason):
    _, _, http = ui
    r = http.get("/api/models/mlp/parameters/0.weight/values", params={"index": index})
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason


def test_ui_values_region_too_large_refused(client):
    client.create_model("big", torch.nn.Linear(256, 128))
    with served_ui(client) as (_, base):
        r = httpx.get(f"{base}/api/models/big/parameters/weight/values", timeout=30)
        assert r.status_code == 413 and r.json()["reason"] == "REGION_TOO_LARGE"
        ok = httpx.get(f"{base}/api/models/big/parameters/weight/values",
                       params={"index": ":64, :64"}, timeout=30)
        assert ok.status_code == 200 and ok.json()["shape"] == [64, 64]
        # The tensor page opens on a region it can draw.
        assert page_data(httpx.get(f"{base}/models/big/parameters/weight",
                                   timeout=30).text)["index"] == ":64, :64"


@pytest.mark.parametrize("path,status", [
    ("/models/nope", 404), ("/models/mlp/parameters/nope", 404),
    ("/models/mlp/weights/0.weight", 404), ("/api/models/nope/parameters/w/values", 404),
])
def test_ui_unknown_pages_answer_404(ui, path, status):
    _, _, http = ui
    assert http.get(path).status_code == status


def test_ui_foreign_host_header_refused(ui):
    _, _, http = ui
    assert http.get("/", headers={"host": "evil.example"}).status_code == 400


def test_ui_pages_carry_csp_and_never_the_servers_token(settings, tmp_path):
    token = "write-token-for-the-ui-0123456789"
    auth = tmp_path / "tokens"
    auth.write_text(f"admin {token}\n")
    auth.chmod(0o600)
    srv = build_server(dataclasses.replace(settings, auth_file=auth))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", token=token, timeout=60) as c:
            make_model(c)
            with served_ui(c, allow_edits=True) as (_, base):
                for path in ("/", "/models/mlp", "/models/mlp/parameters/0.weight",
                             "/api/models/mlp/parameters/0.weight/values", "/static/ui.js",
                             "/api/status"):
                    r = httpx.get(base + path, timeout=30)
                    assert r.status_code == 200, path
                    assert token not in r.text, path
                    assert "default-src 'self'" in r.headers["content-security-policy"]
    finally:
        srv.stop(grace=None)


# ------------------------------------------------------------------------------------ edits


def test_ui_set_slice_writes_through_the_sdk(ui, client):
    _, base, http = ui
    csrf = csrf_of(http.get("/models/mlp/parameters/0.weight").text)
    v = client.tensor_version("mlp", "0.weight")
    r = http.post("/api/models/mlp/set_slice", headers=write_headers(base, csrf),
                  content=json.dumps({"name": "0.weight", "index": "0:2, :2", "value": "7.5",
                                      "expected_version": v}))
    assert r.status_code == 200 and r.json()["ok"], r.text
    t, version = client.get_tensor("mlp", "0.weight")
    assert version == r.json()["version"] == v + 1
    assert (t[:2, :2] == 7.5).all() and (t[2:] != 7.5).all()
    assert (client.get_tensor("mlp", "6.weight")[0][:2, :2] == 7.5).all()  # tied
    # A JSON list is cast to the tensor's dtype and broadcast by the server.
    r = http.post("/api/models/mlp/set_slice", headers=write_headers(base, csrf),
                  content=json.dumps({"name": "0.bias", "index": "", "value": "[1, 2, 3, 4, 5, "
                                      "6, 7, 8]", "expected_version":
                                      client.tensor_version("mlp", "0.bias")}))
    assert r.status_code == 200, r.text
    assert client.get_tensor("mlp", "0.bias")[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


def test_ui_stale_set_slice_refused_and_nothing_written(ui, client):
    _, base, http = ui
    csrf = csrf_of(http.get("/").text)
    stale = client.tensor_version("mlp", "0.weight")
    client.set_slice("mlp", "0.weight", (0, 0), 1.0)  # someone else writes meanwhile
    before, v = client.get_tensor("mlp", "0.weight")
    r = http.post("/api/models/mlp/set_slice", headers=write_headers(base, csrf),
                  content=json.dumps({"name": "0.weight", "index": "", "value": "0",
                                      "expected_version": stale}))
    assert r.status_code == 409
    assert (r.json()["code"], r.json()["reason"]) == ("ABORTED", "VERSION_MISMATCH")
    after, v2 = client.get_tensor("mlp", "0.weight")
    assert v2 == v and torch.equal(after, before)


@pytest.mark.parametrize("case,status,reason", [
    ("no csrf token", 403, "CSRF_TOKEN"),
    ("wrong csrf token", 403, "CSRF_TOKEN"),
    ("no origin", 403, "CSRF_ORIGIN"),
    ("foreign origin", 403, "CSRF_ORIGIN"),
    ("form post", 415, "BAD_CONTENT_TYPE"),
    ("no expected version", 400, "BAD_VERSION"),
    ("bad value", 400, "BAD_VALUE"),
    ("not json", 400, "BAD_JSON"),
])
def test_ui_write_without_csrf_or_bad_refused(ui, client, case, status, reason):
    _, base, http = ui
    csrf = csrf_of(http.get("/").text)
    headers = write_headers(base, csrf)
    body = {"name": "0.weight", "index": "", "value": "0",
            "expected_version": client.tensor_version("mlp", "0.weight")}
    content = None
    if case == "no csrf token":
        del headers["x-csrf-token"]
    elif case == "wrong csrf token":
        headers["x-csrf-token"] = csrf[:-2] + "xx"
    elif case == "no origin":
        del headers["origin"]
    elif case == "foreign origin":
        headers["origin"] = "http://evil.example"
    elif case == "form post":
        headers["content-type"] = "application/x-www-form-urlencoded"
        content = "name=0.weight&value=0&expected_version=0"
    elif case == "no expected version":
        del body["expected_version"]
    elif case == "bad value":
        body["value"] = "__import__('os')"
    elif case == "not json":
        content = "{not json"
    before, v = client.get_tensor("mlp", "0.weight")
    r = http.post("/api/models/mlp/set_slice", headers=headers,
                  content=content if content is not None else json.dumps(body))
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason
    after, v2 = client.get_tensor("mlp", "0.weight")
    assert v2 == v and torch.equal(after, before)


def test_ui_edits_off_without_allow_edits(client, model):
    with served_ui(client, allow_edits=False) as (_, base):
        html = httpx.get(f"{base}/models/mlp/parameters/0.weight", timeout=30).text
        assert 'id="set-form"' not in html
        r = httpx.post(f"{base}/api/models/mlp/set_slice",
                       headers=write_headers(base, csrf_of(html)),
                       content=json.dumps({"name": "0.weight", "value": "0",
                                           "expected_version": 0}), timeout=30)
        assert r.status_code == 403 and r.json()["reason"] == "EDITS_DISABLED"
    assert client.tensor_version("mlp", "0.weight") == 0


def test_ui_apply_init_and_checkpoints_with_expected_model_version(ui, client):
    _, base, http = ui
    csrf = csrf_of(http.get("/").text)
    h = write_headers(base, csrf)
    mv = client.model_version("mlp")
    r = http.post("/api/models/mlp/apply_init", headers=h, content=json.dumps(
        {"name": "0.bias", "scheme": "constant_", "args": "val=0.25",
         "expected_model_version": mv}))
    assert r.status_code == 200, r.text
    assert (client.get_tensor("mlp", "0.bias")[0] == 0.25).all()
    r = http.post("/api/models/mlp/apply_init", headers=h, content=json.dumps(
        {"glob": "*.bias", "scheme": "zeros_", "expected_model_version": mv}))
    assert r.status_code == 409 and r.json()["reason"] == "VERSION_MISMATCH"
    assert (client.get_tensor("mlp", "0.bias")[0] == 0.25).all()
    r = http.post("/api/models/mlp/apply_init", headers=h, content=json.dumps(
        {"name": "0.bias", "scheme": "exec", "expected_model_version": mv + 1}))
    assert r.status_code == 400 and r.json()["reason"] == "BAD_INIT_SCHEME"

    r = http.post("/api/models/mlp/checkpoints", headers=h, content=json.dumps({"name": "c1"}))
    assert r.status_code == 200, r.text
    assert [c.name for c in client.list_checkpoints("mlp")] == ["c1"]
    assert "c1" in http.get("/models/mlp").text
    client.set_slice("mlp", "0.bias", None, 9.0)
    mv = client.model_version("mlp")
    r = http.post("/api/models/mlp/checkpoints/restore", headers=h,
                  content=json.dumps({"name": "c1", "expected_model_version": mv - 1}))
    assert r.status_code == 409 and r.json()["reason"] == "VERSION_MISMATCH"
    assert (client.get_tensor("mlp", "0.bias")[0] == 9.0).all()
    r = http.post("/api/models/mlp/checkpoints/restore", headers=h,
                  content=json.dumps({"name": "c1", "expected_model_version": mv}))
    assert r.status_code == 200, r.text
    assert (client.get_tensor("mlp", "0.bias")[0] == 0.25).all()


def test_ui_role_detection_and_role_limits(settings, tmp_path):
    tokens = {"read": "read-token-0123456789abcdef", "write": "write-token-0123456789abcdef",
              "admin": "admin-token-0123456789abcdef"}
    auth = tmp_path / "tokens"
    auth.write_text("".join(f"{r} {t}\n" for r, t in tokens.items()))
    auth.chmod(0o600)
    srv = build_server(dataclasses.replace(settings, auth_file=auth))
    target = f"127.0.0.1:{srv.port}"
    try:
        clients = {r: paramhub.connect(target, token=t, timeout=60) for r, t in tokens.items()}
        make_model(clients["admin"])
        assert {r: detect_role(c) for r, c in clients.items()} == {
            "read": "read", "write": "write", "admin": "admin"}
        with pytest.raises(paramhub.AuthError):
            detect_role(paramhub.connect(target, token="not-a-token-0123456789", timeout=60))
        with served_ui(clients["write"], allow_edits=True, role="write") as (_, base):
            html = httpx.get(f"{base}/models/mlp", timeout=30).text
            assert 'id="init-form"' in html and 'id="checkpoint-form"' not in html
            r = httpx.post(f"{base}/api/models/mlp/checkpoints",
                           headers=write_headers(base, csrf_of(html)),
                           content=json.dumps({"name": "c1"}), timeout=30)
            assert r.status_code == 403 and r.json()["reason"] == "ROLE"
        assert clients["admin"].list_checkpoints("mlp") == []
        for c in clients.values():
            c.close()
    finally:
        srv.stop(grace=None)


@pytest.mark.parametrize("path,body,status,reason", [
    ("apply_init", {"name": "0.bias", "scheme": "exec"}, 400, "BAD_INIT_SCHEME"),
    ("apply_init", {"name": "0.bias", "scheme": "normal_", "args": "std"}, 400,
     "BAD_INIT_ARGS"),
    ("apply_init", {"name": "0.bias", "scheme": "normal_", "args": "evil=1"}, 400, None),
    ("apply_init", {"scheme": "zeros_"}, 400, "BAD_TARGET"),
    ("apply_init", {"name": "0.bias", "scheme": "zeros_", "seed": "1"}, 400, "BAD_SEED"),
    ("apply_init", {"name": "nope", "scheme": "zeros_"}, 404, None),
    ("apply_init", {"name": "0.bias", "scheme": "zeros_", "expected_model_version": "0"},
     400, "BAD_VERSION"),
    ("checkpoints", {"name": "../etc"}, 400, None),
    ("checkpoints/restore", {"name": "absent"}, 404, "CHECKPOINT_NOT_FOUND"),
    ("set_slice", {"name": "0.weight", "index": "99", "value": "1"}, 400,
     "INDEX_OUT_OF_RANGE"),
    ("set_slice", {"name": "0.weight", "kind": "weights", "value": "1"}, 404, "BAD_KIND"),
])
def test_ui_bad_edit_refused_and_nothing_changed(ui, client, path, body, status, reason):
    _, base, http = ui
    csrf = csrf_of(http.get("/").text)
    mv = client.model_version("mlp")
    body = {"expected_model_version": mv, "expected_version": 0, **body}
    before = {k: v.clone() for k, v in client.pull_state("mlp")[0].items()}
    r = http.post(f"/api/models/mlp/{path}", headers=write_headers(base, csrf),
                  content=json.dumps(body))
    assert r.status_code == status, r.text
    assert r.json()["ok"] is False
    if reason is not None:
        assert r.json()["reason"] == reason
    assert client.model_version("mlp") == mv
    assert client.list_checkpoints("mlp") == []
    after = client.pull_state("mlp")[0]
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------ CLI


def test_ui_cli_serves_and_exits_on_sigterm(target, client, model):
    exe = Path(sys.executable).parent / "paramhub"
    proc = subprocess.Popen([str(exe), "ui", "--target", target, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PARAMHUB_TOKEN": ""})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()  # bounded by the pytest timeout
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", line), line
        r = httpx.get(line + "models/mlp", timeout=30)
        assert r.status_code == 200 and '<span class="cls">Sequential</span>(' in r.text
        assert 'id="set-form"' not in httpx.get(line + "models/mlp/parameters/0.weight",
                                                timeout=30).text
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
