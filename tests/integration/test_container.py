"""The image built and run for real, as compose.yaml runs it (`make container-test`).

One container from the image: non-root, a named data volume, the tokens file as a secret,
`--host 0.0.0.0` with auth. From the host: health through the image's HEALTHCHECK command, a
model created and written through the SDK with a token, `stop` (SIGTERM, exit status 0 within the
stop timeout), a second container on the same volume that reads every acknowledged write back, and
a request without a token refused. Host networking, so the only traffic is to 127.0.0.1 (the server
binds a free port; its HEALTHCHECK command is run with that port).

Skipped unless PARAMHUB_CONTAINER_TEST=1 (make container-test sets it after building the image).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import paramhub
from paramhub import _spec
from paramhub.errors import AuthError, PermissionDeniedError
from _compose import dockerfile, engine_module, load, run_args

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("PARAMHUB_IMAGE", "paramhub:cpu")
#: Bounds every wait on the container (the first start imports torch on a busy machine).
START_TIMEOUT_S = 240.0

pytestmark = pytest.mark.skipif(os.environ.get("PARAMHUB_CONTAINER_TEST") != "1",
                                reason="builds and runs the image: make container-test")


class Engine:
    """docker or podman with this machine's flags (docker/engine.py)."""

    def __init__(self) -> None:
        self.engine = engine = engine_module()
        name = engine.which()
        if name is None:
            pytest.fail("PARAMHUB_CONTAINER_TEST=1 but neither docker nor podman runs here")
        self.name = name

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 stdin: str | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run(self.engine.command(self.name, *args), env=self.engine.environ(),
                             capture_output=True, text=True, timeout=timeout, input=stdin)
        if check and out.returncode != 0:
            raise AssertionError(f"{self.name} {' '.join(args)}: {out.returncode}\n{out.stderr}")
        return out


def _free_ports(n: int) -> list[int]:
    """`n` distinct ports free on every interface now (the server binds 0.0.0.0): held open
    together, so two calls cannot hand out the same port."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("0.0.0.0", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_serving(run: Engine, container: str, health_cmd: list[str]) -> None:
    """Returns once the container's health command passes (bounded): `podman healthcheck run`
    (docker has no such command: there it runs through `exec`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_TIMEOUT_S:
        check = (["healthcheck", "run", container] if run.name == "podman"
                 else ["exec", container, *health_cmd])
        if run(*check, check=False, timeout=60).returncode == 0:
            return
        state = run("inspect", "--format", "{{.State.Running}}", container).stdout.strip()
        if state != "true":
            logs = run("logs", container, check=False)
            raise AssertionError(f"container exited before SERVING:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.2)
    raise AssertionError(f"not SERVING after {START_TIMEOUT_S:.0f} s")


@pytest.fixture
def deployment(tmp_path):
    """Starts containers of the image as compose's `paramhub` service on one volume and one
    secret; yields (start, run, health command, target, tokens); removes everything
    afterwards."""
    run = Engine()
    if run("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: make container-test builds it (make image)")
    tag = secrets.token_hex(4)
    volume, secret = f"paramhub-test-{tag}", f"paramhub-test-tokens-{tag}"
    tokens = {"admin": secrets.token_hex(16), "read": secrets.token_hex(16)}
    token_file = tmp_path / "tokens"
    token_file.write_text("".join(f"{r} {t}\n" for r, t in tokens.items()))
    token_file.chmod(0o600)
    port, metrics_port = _free_ports(2)
    containers: list[str] = []
    run("volume", "create", volume)
    if run.name == "docker":  # a bind-mounted file keeps its owner and mode
        os.chown(token_file, 10001, 10001)
        token_file.chmod(0o400)
        secret = str(token_file)
    else:
        run("secret", "create", secret, str(token_file))
    doc = load()
    hc = doc["services"]["paramhub"]["healthcheck"]["test"][1:]
    hc[hc.index("--target") + 1] = f"127.0.0.1:{port}"

    def start() -> tuple[str, float, float]:
        """A new container: (name, when `run` was called, seconds until it returned)."""
        name = f"paramhub-test-{tag}-{len(containers)}"
        args = run_args(doc, "paramhub", container=name, engine=run.name,
                        volumes={"paramhub-data": volume}, secrets={"paramhub_tokens": secret},
                        publish=False)
        args[args.index(doc["services"]["paramhub"]["image"])] = IMAGE
        # Host networking: the server's 0.0.0.0 is reached on 127.0.0.1; free ports replace
        # the fixed ones (the later flag wins), and the health command follows the port.
        args[args.index("--health-cmd") + 1] = json.dumps(hc)
        args = [args[0], "--network", "host", *args[1:],
                "--port", str(port), "--metrics-port", str(metrics_port)]
        t0 = time.monotonic()
        containers.append(name)
        run(*args)
        return name, t0, time.monotonic() - t0

    try:
        yield start, run, hc, f"127.0.0.1:{port}", tokens
    finally:
        for name in containers:
            run("rm", "--force", *(["--time", "0"] if run.name == "podman" else []), name,
                check=False)
        run("volume", "rm", "--force", volume, check=False)
        if run.name == "podman":
            run("secret", "rm", secret, check=False)


def test_container_serves_restarts_on_its_volume_and_stops_cleanly(deployment, capsys):
    start, run, health_cmd, target, tokens = deployment

    first, t0, created = start()
    _wait_serving(run, first, health_cmd)
    cold = time.monotonic() - t0  # from `run` to the first passing health command
    user = run("exec", first, "id", "-u").stdout.strip()
    assert user == "10001", "the server must not run as root"
    image_hc = json.loads(run("image", "inspect", "--format", "{{json .Config.Healthcheck.Test}}",
                              IMAGE).stdout)
    assert image_hc[1:] == dockerfile()["HEALTHCHECK"], "the image lost its HEALTHCHECK"

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    expected = {k: v.detach().clone() for k, v in net.state_dict().items()}
    with paramhub.connect(target, token=tokens["admin"], timeout=60) as c:
        c.create_model_from_spec("m", _spec.spec_from_module(net), values=net.state_dict())
        for i in range(20):  # every write below is acknowledged before the stop
            value = torch.full((4,), float(i))
            c.set_slice("m", "0.weight", (slice(None), i % 8), value)
            expected["0.weight"][:, i % 8] = value
        c.set_slice("m", "2.bias", None, torch.tensor([7.0, -7.0]))
        expected["2.bias"] = torch.tensor([7.0, -7.0])
    with paramhub.connect(target, token=tokens["read"], timeout=60) as c:
        with pytest.raises(PermissionDeniedError) as e:
            c.set_slice("m", "2.bias", None, torch.zeros(2))
        assert e.value.code == "PERMISSION_DENIED"

    stop = time.monotonic()
    run("stop", first, timeout=60)
    stop = time.monotonic() - stop
    state = json.loads(run("inspect", "--format", "{{json .State}}", first).stdout)
    assert state["ExitCode"] == 0, state
    assert "draining" in run("logs", first).stderr

    second, t1, _ = start()
    _wait_serving(run, second, health_cmd)
    warm = time.monotonic() - t1
    with paramhub.connect(target, token=tokens["read"], timeout=60) as c:
        for name, value in expected.items():
            got, _ = c.get_tensor("m", name)
            assert torch.equal(got, value), name
    with paramhub.connect(target, timeout=60) as c:
        with pytest.raises(AuthError) as e:
            c.get_tensor("m", "2.bias")
        assert e.value.code == "UNAUTHENTICATED" and e.value.reason == "TOKEN_MISSING"
        with pytest.raises(AuthError) as e:
            c.set_slice("m", "2.bias", None, torch.zeros(2))
        assert e.value.code == "UNAUTHENTICATED"
    with paramhub.connect(target, token=tokens["read"], timeout=60) as c:
        assert torch.equal(c.get_tensor("m", "2.bias")[0], expected["2.bias"])

    size = int(run("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    with capsys.disabled():
        print(f"\n{run.name} image {IMAGE}: {size / 1e6:.0f} MB; `run` to SERVING: {cold:.1f} s "
              f"cold ({created:.1f} s until `run` returned), {warm:.1f} s with the model on the "
              f"volume; `stop`: {stop:.1f} s")
