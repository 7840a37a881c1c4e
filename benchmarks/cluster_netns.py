"""Aggregate read bandwidth of a sharded model on 1, 2 and 4 ranks, each rank a separate "host":
its own network namespace, joined to this one by a veth pair on a bridge, its outgoing link
rate-limited with tc (README "Past one machine"). Needs root and iproute2; everything it creates
(namespaces, links, bridge) is removed after, also on failure.

A client in this namespace reads one whole parameter: with K ranks the SDK fetches the K parts
from the K ranks in parallel (routed reads), so each rank's link carries 1/K of the bytes; with
one rank the read comes through its one link.

    sudo python -m benchmarks.cluster_netns [--mbit 100] [--mib 32] [--ranks 1 2 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

import paramhub

PY = sys.executable
SUBNET = "10.77.0"
BRIDGE_IP = f"{SUBNET}.254"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def hosts(n: int, mbit: int) -> Iterator[list[tuple[str, str, str]]]:
    """n namespaces [(namespace, its interface, its address)] on one bridge with this
    namespace (address BRIDGE_IP); each namespace's egress limited to `mbit` Mbit/s."""
    tag = uuid.uuid4().hex[:4]
    bridge = f"phb{tag}"
    made: list[tuple[str, str, str]] = []
    try:
        _ip("ip", "link", "add", bridge, "type", "bridge")
        _ip("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", bridge)
        _ip("ip", "link", "set", bridge, "up")
        for r in range(n):
            ns, outer, inner = f"ph{tag}{r}", f"ph{tag}h{r}", f"ph{tag}n{r}"
            _ip("ip", "netns", "add", ns)
            made.append((ns, inner, f"{SUBNET}.{r + 1}"))
            _ip("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("ip", "link", "set", inner, "netns", ns)
            _ip("ip", "link", "set", outer, "master", bridge)
            _ip("ip", "link", "set", outer, "up")
            _ip("ip", "addr", "add", f"{SUBNET}.{r + 1}/24", "dev", inner, ns=ns)
            _ip("ip", "link", "set", inner, "up", ns=ns)
            _ip("ip", "link", "set", "lo", "up", ns=ns)
            _ip("tc", "qdisc", "add", "dev", inner, "root", "tbf", "rate", f"{mbit}mbit",
                "burst", "256kb", "latency", "100ms", ns=ns)
        yield made
    finally:
        for ns, _, _ in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


def _ready(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@contextlib.contextmanager
def cluster(where: list[tuple[str, str, str]], log: Path) -> Iterator[str]:
    """One rank per namespace (torchrun's environment variables, as each host's torchrun
    would set them); yields the front door's address."""
    procs: list[subprocess.Popen[bytes]] = []
    out = open(log, "ab")  # noqa: SIM115 - closed below
    try:
        for r, (ns, iface, addr) in enumerate(where):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": "0",
                   "WORLD_SIZE": str(len(where)), "MASTER_ADDR": where[0][2],
                   "MASTER_PORT": "29500", "GLOO_SOCKET_IFNAME": iface,
                   "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, PY, "-m", "paramhub_server", "serve", "--host",
                 addr, "--port", "50051", "--insecure", "--in-memory", "--log-level",
                 "WARNING"], env=env, stdout=out, stderr=out, start_new_session=True))
        deadline = time.monotonic() + 180
        targets = [f"{addr}:50051" for _, _, addr in where]
        while not all(_ready(t) for t in targets):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the cluster did not start; see {log}")
            time.sleep(0.5)
        yield targets[0]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(30)
        out.close()


def measure(k: int, mbit: int, mib: int, repeats: int, log: Path) -> float:
    """Median seconds of one whole read of a `mib` MiB parameter on a k-rank cluster."""
    torch.manual_seed(0)
    rows = mib * (1 << 20) // (4 * 1024)
    module = nn.Sequential(nn.Linear(1024, rows, bias=False))
    with hosts(k, mbit) as where, cluster(where, log) as target:
        with paramhub.connect(target, timeout=600) as c:
            c.create_model("m", module, shard="fsdp")
            c.model("m")  # learn sizes: the read below is a whole-tensor read
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                got, _ = c.get_tensor("m", "0.weight")
                times.append(time.perf_counter() - t)
            if not torch.equal(got, module[0].weight.detach()):
                raise AssertionError("the read differs from the model")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbit", type=int, default=100, help="each rank's link rate")
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (ip netns, tc)")
    log = Path("/tmp") / f"paramhub-netns-{os.getpid()}.log"
    rows = []
    for k in args.ranks:
        s = measure(k, args.mbit, args.mib, args.repeats, log)
        rows.append((k, s))
    base = rows[0][1]
    print(f"| ranks ({args.mbit} Mbit/s per rank's link, {args.mib} MiB read, median of "
          f"{args.repeats}) | time | aggregate | vs {rows[0][0]} rank |")
    print("|---|---|---|---|")
    for k, s in rows:
        print(f"| {k} | {s:.2f} s | {args.mib * 8 * 1.048576 / s:.0f} Mbit/s | "
              f"{base / s:.2f}x |")


if __name__ == "__main__":
    main()
