"""docker/compose.yaml read the way `docker compose up` reads it: each service becomes the
`run` arguments of a container engine (docker or podman take the same ones), and the server
command line it ends in is checked against `paramhub serve` itself."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml
from typer.main import get_command

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def engine_module():
    """docker/engine.py (a script, not a package): which engine, its flags, the build."""
    spec = importlib.util.spec_from_file_location("paramhub_docker_engine",
                                                  ROOT / "docker" / "engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load() -> dict:
    """compose.yaml with its `<<` merges applied."""
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile() -> dict[str, object]:
    """The Dockerfile's FROM, USER, ARG names and its exec-form ENTRYPOINT, CMD, HEALTHCHECK."""
    text = DOCKERFILE.read_text()
    out: dict[str, object] = {"FROM": re.findall(r"^FROM\s+(.+)$", text, re.M),
                              "USER": re.findall(r"^USER\s+(\S+)", text, re.M),
                              "ARG": re.findall(r"^ARG\s+(\w+)", text, re.M)}
    for key in ("ENTRYPOINT", "CMD"):
        out[key] = json.loads(re.search(rf"^{key}\s+(\[.*\])$", text, re.M).group(1))
    out["HEALTHCHECK"] = json.loads(re.search(r"^HEALTHCHECK .*CMD\s+(\[.*\])$", text,
                                              re.M).group(1))
    return out


def seconds(duration: str | int) -> int:
    """A compose duration ("20s", "1m30s", 15) in whole seconds."""
    if isinstance(duration, int):
        return duration
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    if not parts or not duration:
        raise ValueError(f"unsupported duration {duration!r}")
    return int(parts.group(1) or 0) * 60 + int(parts.group(2) or 0)


def run_args(doc: dict, name: str, *, container: str, engine: str = "podman",
             volumes: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
             publish: bool = True) -> list[str]:
    """`run` arguments for service `name`: restart policy, named volumes, secrets, healthcheck,
    stop timeout, ports, GPUs, image and command. `volumes`/`secrets` map the file's names to
    the engine's (compose prefixes volumes with the project name; for docker, whose `run` has
    no secrets, a secret maps to its file, bind-mounted read-only where compose mounts it);
    `publish=False` leaves the ports out (a host-network run binds them directly)."""
    s = doc["services"][name]
    args = ["run", "--detach", "--name", container]
    if "restart" in s:
        args += ["--restart", s["restart"]]
    for v in s.get("volumes", []):
        src, dst = v.split(":", 1)
        if src not in (doc.get("volumes") or {}):
            raise ValueError(f"{name}: {src} is not a named volume")
        args += ["--volume", f"{(volumes or {}).get(src, doc['name'] + '_' + src)}:{dst}"]
    for sec in s.get("secrets", []):
        sec = {"source": sec} if isinstance(sec, str) else sec
        source = (secrets or {}).get(sec["source"], sec["source"])
        if engine == "docker":
            args += ["--volume", f"{source}:/run/secrets/{sec.get('target', sec['source'])}:ro"]
            continue
        opts = [source, f"target={sec.get('target', sec['source'])}"]
        opts += [f"{k}={sec[k]}" for k in ("uid", "gid") if k in sec]
        if "mode" in sec:  # YAML reads 0400 as the integer 256
            opts.append(f"mode=0{sec['mode']:o}")
        args += ["--secret", ",".join(opts)]
    hc = s.get("healthcheck")
    if hc:
        if hc["test"][0] != "CMD":
            raise ValueError(f"{name}: only exec-form (CMD) healthchecks are translated")
        args += ["--health-cmd", json.dumps(hc["test"][1:]),
                 "--health-interval", f"{seconds(hc['interval'])}s",
                 "--health-timeout", f"{seconds(hc['timeout'])}s",
                 "--health-start-period", f"{seconds(hc['start_period'])}s",
                 "--health-retries", str(hc["retries"])]
    if "stop_grace_period" in s:
        args += ["--stop-timeout", str(seconds(s["stop_grace_period"]))]
    if publish:
        for p in s.get("ports", []):
            args += ["--publish", p]
    for dev in s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", []):
        if "gpu" in dev.get("capabilities", []):
            args += ["--gpus", "all"] if engine == "docker" else ["--device", "nvidia.com/gpu=all"]
    return args + [s["image"], *s.get("command", [])]


def serve_argv(doc: dict, name: str) -> list[str]:
    """The `paramhub serve` arguments a service's container runs: ENTRYPOINT then command."""
    entry = dockerfile()["ENTRYPOINT"]
    if entry[:2] != ["paramhub", "serve"]:
        raise ValueError(f"ENTRYPOINT is not `paramhub serve`: {entry}")
    return [*entry[2:], *doc["services"][name].get("command", dockerfile()["CMD"])]


def check_serve_argv(argv: list[str]) -> None:
    """Parses `argv` with the real `paramhub serve` command (nothing runs). Raises ValueError
    for a flag or value it would refuse with a usage error (exit status 2)."""
    from paramhub_server.cli import app

    serve = get_command(app).commands["serve"]
    try:
        serve.make_context("serve", list(argv))
    except Exception as e:  # click's UsageError (typer may vendor its own click)
        if getattr(e, "exit_code", None) != 2:
            raise
        raise ValueError(f"paramhub serve {' '.join(argv)}: {e}") from None
