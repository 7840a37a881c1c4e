"""The `paramhub` CLI as a user runs it (subprocesses), and the container files: the compose
file parses, the image's ENTRYPOINT runs outside Docker, its HEALTHCHECK command works."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import paramhub
from paramhub import _spec
from _compose import check_serve_argv, engine_module, load, run_args, seconds, serve_argv
from _compose import dockerfile as _dockerfile

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PARAMHUB = str(BIN / "paramhub")
TOKENS = {"read": "cli-read-token-0123456789", "admin": "cli-admin-token-0123456789"}


def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise AssertionError(f"server did not start: {proc.stderr.read()}")
    return proc, line


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PARAMHUB, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "120", **(env or {})})


def test_dockerfile_is_multistage_nonroot_with_cuda_arg_and_grpc_healthcheck():
    d = _dockerfile()
    assert any(f.endswith(" AS build") for f in d["FROM"]) and " AS " not in d["FROM"][-1]
    assert {"TORCH_INDEX_URL", "BASE_IMAGE", "OFFLINE"} <= set(d["ARG"])
    # make image's offline build looks for a local wheel of the version the Dockerfile pins.
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", (ROOT / "docker" / "Dockerfile").read_text(),
                       re.M).group(1)
    assert engine_module().TORCH_VERSION == pinned
    assert d["USER"] and d["USER"][0] not in ("root", "0")
    assert "TORCH_INDEX_URL" in d["ARG"]
    assert d["ENTRYPOINT"][:4] == ["paramhub", "serve", "--host", "0.0.0.0"]
    assert d["HEALTHCHECK"][:2] == ["paramhub", "health"]


def test_compose_file_parses():
    doc = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = doc["services"]
    assert {"paramhub", "paramhub-gpu"} <= set(svc)
    for s in svc.values():
        assert "paramhub-data:/data" in s["volumes"]
        assert s["secrets"] == [{"source": "paramhub_tokens", "uid": "10001", "gid": "10001",
                                 "mode": 0o400}]
        assert s["healthcheck"]["test"][:3] == ["CMD", "paramhub", "health"]
        assert "--auth-file" in s["command"]
    assert svc["paramhub-gpu"]["profiles"] == ["gpu"]
    assert svc["paramhub-gpu"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"] == ["gpu"]
    assert "paramhub-data" in doc["volumes"]
    compose = shutil.which("docker-compose")
    if compose:  # pragma: no cover - no compose CLI on the test machines
        env = {**os.environ}
        tokens = ROOT / "docker" / "tokens"
        created = not tokens.exists()
        if created:
            tokens.write_text("admin x\n")
        try:
            subprocess.run([compose, "-f", str(ROOT / "docker" / "compose.yaml"), "config"],
                           check=True, capture_output=True, env=env, timeout=60)
        finally:
            if created:
                tokens.unlink()


def test_compose_services_run_real_serve_flags_and_the_image_healthcheck():
    """Each service, translated into the `run` call compose would make, passes only flags and
    values `paramhub serve` accepts, checks health with the image's own HEALTHCHECK command, and
    gives the server longer to stop than its drain takes."""
    from paramhub_server.settings import Settings

    doc, d = load(), _dockerfile()
    for name, s in doc["services"].items():
        check_serve_argv(serve_argv(doc, name))
        args = run_args(doc, name, container=name)
        assert args[args.index("--health-cmd") + 1] == json.dumps(d["HEALTHCHECK"])
        assert f"paramhub_paramhub-data:/data" in args
        assert "paramhub_tokens,target=paramhub_tokens,uid=10001,gid=10001,mode=0400" in args
        assert int(args[args.index("--stop-timeout") + 1]) > Settings.grace_seconds
        image = args.index(s["image"])
        assert args[image + 1:] == s["command"]
    assert "nvidia.com/gpu=all" in run_args(doc, "paramhub-gpu", container="g")
    docker = run_args(doc, "paramhub-gpu", container="g", engine="docker",
                      secrets={"paramhub_tokens": "/etc/t"})
    assert "/etc/t:/run/secrets/paramhub_tokens:ro" in docker and "--secret" not in docker
    assert docker[docker.index("--gpus") + 1] == "all"
    assert seconds("1m30s") == 90 and seconds(15) == 15


@pytest.mark.parametrize("bad", [["--no-such-flag"], ["--port", "http"], ["--fsync", "never"],
                                 ["--auth-file"]])
def test_compose_serve_flag_check_refuses_what_serve_refuses(bad):
    doc = load()
    with pytest.raises(ValueError, match="paramhub serve"):
        check_serve_argv([*serve_argv(doc, "paramhub"), *bad])


def test_entrypoint_refuses_exposed_address_without_auth(tmp_path):
    d = _dockerfile()
    args = [PARAMHUB, *d["ENTRYPOINT"][1:], "--data-dir", str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to serve 0.0.0.0" in proc.stderr
    assert proc.stdout == ""  # nothing was bound, so no address was printed


@pytest.fixture
def live(tmp_path):
    """The image's ENTRYPOINT + CMD shape run outside Docker, on loopback and port 0."""
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{r} {t}\n" for r, t in TOKENS.items()))
    tokens.chmod(0o600)
    d = _dockerfile()
    args = [PARAMHUB, *d["ENTRYPOINT"][1:], "--auth-file", str(tokens),
            "--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "data")]
    proc, address = _start(args)
    try:
        yield address, d
    finally:
        assert _stop(proc) == 0


def test_healthcheck_command_against_live_server(live):
    address, d = live
    hc = list(d["HEALTHCHECK"])
    hc[hc.index("--target") + 1] = address
    out = subprocess.run([PARAMHUB, *hc[1:]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "SERVING"
    down = _run("health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert down.returncode == 1 and down.stdout.strip() == "UNAVAILABLE"


def test_cli_inspects_a_live_model(live):
    address, _ = live
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    net = nn.Sequential(emb, block, block, head)
    with paramhub.connect(address, token=TOKENS["admin"]) as c:
        c.create_model_from_spec("lm", _spec.spec_from_module(net), values=net.state_dict())
    env = {"PARAMHUB_TARGET": address, "PARAMHUB_TOKEN": TOKENS["read"]}
    models = _run("models", env=env)
    assert models.returncode == 0 and re.search(r"lm\s+Sequential\s+cpu\s+60", models.stdout)
    tree = _run("tree", "lm", env=env)
    assert tree.returncode == 0, tree.stderr
    assert "tied -> 0.weight" in tree.stdout and "shared -> 1" in tree.stdout
    assert "float32 [10, 4]" in tree.stdout and "60 parameters" in tree.stdout
    stats = _run("stats", "lm", "1.0.weight", "--bins", "4", env=env)
    assert stats.returncode == 0, stats.stderr
    w = net[1][0].weight.detach().double()
    assert f"{float(w.max()):.6g}" in stats.stdout and "█" in stats.stdout
    get = _run("get", "lm", "1.0.weight", "0, 1:3", env=env)
    assert get.returncode == 0, get.stderr
    assert "float32 [2]" in get.stdout
    assert f"{net[1][0].weight[0, 1].item():.4f}" in get.stdout
    denied = _run("get", "lm", "1.0.weight", env={**env, "PARAMHUB_TOKEN": "bad-token-xxxxxxxxxxx"})
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    missing = _run("stats", "lm", "nope", env=env)
    assert missing.returncode == 1 and "TENSOR_NOT_FOUND" in missing.stderr
    bad_index = _run("get", "lm", "1.0.weight", "__import__('os')", env=env)
    assert bad_index.returncode == 2


def test_python_m_paramhub_server_still_serves(tmp_path):
    proc, address = _start([sys.executable, "-m", "paramhub_server", "--port", "0",
                            "--data-dir", str(tmp_path)])
    assert _stop(proc) == 0
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address)


def test_cli_checkpoints(live, tmp_path):
    from safetensors.torch import load_file

    address, _ = live
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    with paramhub.connect(address, token=TOKENS["admin"]) as c:
        c.create_model_from_spec("m", _spec.spec_from_module(net), values=net.state_dict())
    env = {"PARAMHUB_TARGET": address, "PARAMHUB_TOKEN": TOKENS["admin"]}
    made = _run("checkpoint", "create", "m", "before", env=env)
    assert made.returncode == 0 and "checkpoint before of m" in made.stdout, made.stderr
    with paramhub.connect(address, token=TOKENS["admin"]) as c:
        c.set_slice("m", "weight", None, torch.zeros(2, 3))
    listed = _run("checkpoint", "list", "m", env=env)
    assert listed.returncode == 0 and re.search(r"before\s+\d+", listed.stdout)
    out = tmp_path / "before.safetensors"
    exported = _run("checkpoint", "export", "m", str(out), "--name", "before", env=env)
    assert exported.returncode == 0, exported.stderr
    assert torch.equal(load_file(str(out))["weight"], net.weight.detach())
    restored = _run("checkpoint", "restore", "m", "before", env=env)
    assert restored.returncode == 0 and "restored m from before" in restored.stdout
    with paramhub.connect(address, token=TOKENS["read"]) as c:
        assert torch.equal(c.get_tensor("m", "weight")[0], net.weight.detach())
    denied = _run("checkpoint", "delete", "m", "before",
                  env={**env, "PARAMHUB_TOKEN": TOKENS["read"]})
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    deleted = _run("checkpoint", "delete", "m", "before", env=env)
    assert deleted.returncode == 0
    missing = _run("checkpoint", "restore", "m", "before", env=env)
    assert missing.returncode == 1 and "CHECKPOINT_NOT_FOUND" in missing.stderr
