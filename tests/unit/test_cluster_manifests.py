"""docker/k8s/paramhub-cluster.yaml and docker/compose.cluster.yaml: parsed, and every flag
they pass to `paramhub serve`, `paramhub health` and torchrun checked against the real commands
(nothing runs)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser
from typer.main import get_command

from paramhub_server.cli import app

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s" / "paramhub-cluster.yaml"
COMPOSE = ROOT / "docker" / "compose.cluster.yaml"


def check(command: str, argv: list[str]) -> None:
    """Parses argv with the real `paramhub <command>` (click exits 2 on a bad flag)."""
    cmd = get_command(app).commands[command]
    try:
        cmd.make_context(command, list(argv))
    except Exception as e:  # click's UsageError
        if getattr(e, "exit_code", None) != 2:
            raise
        raise AssertionError(f"paramhub {command} {' '.join(argv)}: {e}") from None


def split_launch(script: str, shell: dict[str, str] | None = None
                 ) -> tuple[dict[str, object], list[str]]:
    """`exec torchrun ... -m paramhub_server serve FLAGS` -> (torchrun options, serve FLAGS),
    the torchrun part parsed by torchrun's own argument parser; `shell` expands what the
    shell would (e.g. "${POD_NAME##*-}" -> the pod's ordinal)."""
    for k, v in (shell or {}).items():
        script = script.replace(k, v)
    words = shlex.split(script)
    assert words[:2] == ["exec", "torchrun"], words[:2]
    m = words.index("-m")
    assert words[m + 1:m + 3] == ["paramhub_server", "serve"]
    ns = get_args_parser().parse_args([*words[2:m], "-m", "paramhub_server", "x"])
    return vars(ns), words[m + 3:]


def test_check_refuses_a_flag_serve_does_not_have() -> None:
    with pytest.raises(AssertionError):
        check("serve", ["--port", "1", "--no-such-flag"])
    with pytest.raises(AssertionError):
        split_launch("exec torchrun --nnodes 2 -m paramhub_server serve") and check(
            "serve", ["--rank", "0"])


def test_k8s_statefulset_headless_service_and_flags() -> None:
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d
            for d in yaml.safe_load_all(K8S.read_text())}
    sts = docs["StatefulSet/paramhub"]
    headless = docs[f"Service/{sts['spec']['serviceName']}"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == sts["spec"]["template"]["metadata"]["labels"]
    front = docs["Service/paramhub"]
    assert front["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "paramhub-0"
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["sh", "-c"]
    # Pod paramhub-1 (its shell turns "${POD_NAME##*-}" into 1) is node rank 1.
    assert '"${POD_NAME##*-}"' in c["args"][0]
    opts, serve = split_launch(c["args"][0], {'"${POD_NAME##*-}"': "1"})
    assert opts["node_rank"] == 1
    check("serve", serve)
    # One node per pod, as many as replicas; the master is pod 0 through the headless DNS.
    assert int(opts["nnodes"]) == sts["spec"]["replicas"] and opts["nproc_per_node"] == "1"
    assert opts["master_addr"] == f"paramhub-0.{headless['metadata']['name']}"
    ports = {p["containerPort"] for p in c["ports"]}
    assert int(opts["master_port"]) in ports
    assert int(serve[serve.index("--port") + 1]) in ports
    # The data dir is the pod's own volume (one per rank).
    data_dir = serve[serve.index("--data-dir") + 1]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data_dir
    auth = serve[serve.index("--auth-file") + 1]
    assert auth.startswith(mounts["tokens"] + "/")
    for probe in ("readinessProbe", "livenessProbe"):
        argv = c[probe]["exec"]["command"]
        assert argv[:2] == ["paramhub", "health"]
        check("health", argv[2:])
    env = {e["name"]: e for e in c["env"]}
    assert "PARAMHUB_ADVERTISE_HOST" in env


def test_compose_cluster_two_ranks_and_flags() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert sorted(services) == ["rank0", "rank1"]
    for rank, name in enumerate(sorted(services)):
        s = services[name]
        assert s["entrypoint"] == ["sh", "-c"]
        opts, serve = split_launch(s["command"][0])
        check("serve", serve)
        assert opts["nnodes"] == "2" and opts["node_rank"] == rank
        assert opts["master_addr"] == "rank0"
        assert s["environment"]["PARAMHUB_ADVERTISE_HOST"] == name
        (volume,) = s["volumes"]
        src, dst = volume.split(":")
        assert src in doc["volumes"] and dst == serve[serve.index("--data-dir") + 1]
        test = s["healthcheck"]["test"]
        assert test[:3] == ["CMD", "paramhub", "health"]
        check("health", test[3:])
    assert len({s["volumes"][0] for s in services.values()}) == 2  # one volume per rank
