"""The cost of a cluster on one host (README "Past one machine"): a plain `paramhub serve` next
to a 2-rank torchrun cluster serving the same model sharded, both on 127.0.0.1, in one run.

Rows: a whole-tensor read and write of a big parameter (plain server: shared memory, and gRPC
only; cluster: routed to/from both ranks, and through the front door), `pull_state` /
`push_state` of the whole model (plain server over gRPC; the cluster's sharded model), the
median latency of a one-element read and write, and compute: a Forward and one training step
(Forward + Backward + an SGD step) of a 16 MiB MLP, plain vs sharded. Numbers are medians;
this machine's cores are shared with other
work, so they are noisy.

    python -m benchmarks.cluster [--mib 64] [--repeats 5] [--small 50]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

import paramhub

PY = sys.executable


def _free_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of ports")


def _ready(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _start(cmd: list[str], targets: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(_ready(t) for t in targets):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"{cmd[:4]} did not start; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _median_s(fn, repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _compute_rows(client: paramhub.Client, label: str, repeats: int
                  ) -> list[tuple[str, str, str]]:
    """Forward (no grad) of a batch of 32 through a 4-layer 1024-wide MLP (16 MiB), and one
    training step (zero_grad, Forward + Backward, an SGD step), on `client`'s server; the
    cluster's model is sharded (shard="fsdp")."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    shard = {"shard": "fsdp"} if "cluster" in label else {}
    net = client.create_model("mlp", nn.Sequential(*layers), **shard)
    opt = paramhub.optim.SGD(net.parameters(), lr=1e-4)
    X, y = torch.randn(32, 1024), torch.randn(32, 1024)

    def forward() -> None:
        with torch.no_grad():
            net(X)

    def step() -> None:
        opt.zero_grad()
        F.mse_loss(net(X), y).backward()
        opt.step()

    out = []
    for name, fn in (("Forward, 16 MiB MLP, batch 32", forward),
                     ("training step (zero_grad, Forward+Backward, SGD step)", step)):
        s = _median_s(fn, repeats)
        out.append((f"{name}, {label}", f"{s * 1e3:.1f} ms", ""))
    client.delete_model("mlp")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", type=int, default=50)
    ap.add_argument("--compute", type=int, default=10, help="repeats of the compute rows")
    ap.add_argument("--state-only", action="store_true",
                    help="only the pull_state / push_state rows")
    args = ap.parse_args()
    rows = args.mib * (1 << 20) // (4 * 1024)
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(1024, rows, bias=False))
    mib = module[0].weight.numel() * 4 / (1 << 20)
    results: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plain_port, cluster_port = _free_pair(), _free_pair()
        plain = _start([PY, "-m", "paramhub_server", "--port", str(plain_port), "--data-dir",
                        f"{tmp}/plain", "--log-level", "WARNING"],
                       [f"127.0.0.1:{plain_port}"], Path(tmp) / "plain.log")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            master = s.getsockname()[1]
        cluster = _start([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(master),
                          "-m", "paramhub_server", "serve", "--port", str(cluster_port),
                          "--data-dir", f"{tmp}/cluster", "--log-level", "WARNING"],
                         [f"127.0.0.1:{cluster_port}", f"127.0.0.1:{cluster_port + 1}"],
                         Path(tmp) / "cluster.log")
        try:
            with paramhub.connect(f"127.0.0.1:{plain_port}", timeout=300) as p, \
                    paramhub.connect(f"127.0.0.1:{plain_port}", timeout=300, shm=False,
                                     data_channel=False) as pg, \
                    paramhub.connect(f"127.0.0.1:{cluster_port}", timeout=300) as c, \
                    paramhub.connect(f"127.0.0.1:{cluster_port}", timeout=300) as cf:
                cf._cluster()._routing_off = True  # the same cluster through the front door
                p.create_model("m", module)
                c.create_model("m", module, shard="fsdp")
                c.create_model("tp", module, shard={"0": "rowwise"})  # the weight Shard(1)
                pg.model("m")
                c.model("m")
                big = [
                    ("plain server, shared memory", lambda: p.get_tensor("m", "0.weight")),
                    ("plain server, gRPC stream", lambda: pg.get_tensor("m", "0.weight")),
                    ("2-rank cluster, routed from both ranks",
                     lambda: c.get_tensor("m", "0.weight")),
                    ("2-rank cluster, routed, Shard(1) (a rowwise plan)",
                     lambda: c.get_tensor("tp", "0.weight")),
                    ("2-rank cluster, through the front door (index [:])",
                     lambda: c.get_tensor("m", "0.weight", (slice(None),))),
                ]
                for name, fn in ([] if args.state_only else big):
                    s = _median_s(fn, args.repeats)
                    results.append((f"read {mib:.0f} MiB: {name}", f"{s * 1e3:.0f} ms",
                                    f"{mib / 1024 / s:.2f} GB/s"))
                new = {"0.weight": torch.randn(module[0].weight.shape)}
                for label, client in (
                        ("plain server, gRPC stream", pg),
                        ("2-rank cluster, routed to / from both ranks", c),
                        ("2-rank cluster, through the front door", cf)):
                    for what, fn in (("pull_state", lambda: client.pull_state("m")),
                                     ("push_state", lambda: client.push_state("m", new))):
                        s = _median_s(fn, args.repeats)
                        results.append((f"{what} {mib:.0f} MiB: {label}", f"{s * 1e3:.0f} ms",
                                        f"{mib / 1024 / s:.2f} GB/s"))
                if args.state_only:
                    return _table(args, results)  # (the servers stop below)
                value = torch.randn_like(module[0].weight)
                writes = [
                    ("plain server, shared memory", lambda: p.set_slice("m", "0.weight", None,
                                                                        value)),
                    ("plain server, gRPC stream", lambda: pg.set_slice("m", "0.weight", None,
                                                                       value)),
                    ("2-rank cluster, routed to both ranks",
                     lambda: c.set_slice("m", "0.weight", None, value)),
                    ("2-rank cluster, through the front door (index [0:rows])",
                     lambda: c.set_slice("m", "0.weight", (slice(0, rows),), value)),
                ]
                for name, fn in writes:
                    s = _median_s(fn, args.repeats)
                    results.append((f"write {mib:.0f} MiB: {name}", f"{s * 1e3:.0f} ms",
                                    f"{mib / 1024 / s:.2f} GB/s"))
                for label, client in (("plain server", p), ("2-rank cluster", c)):
                    s = _median_s(lambda: client.get_tensor("m", "0.weight", (0, 0)),
                                  args.small)
                    results.append((f"one-element read, {label}", f"{s * 1e3:.2f} ms", ""))
                    s = _median_s(lambda: client.set_slice("m", "0.weight", (0, 0),
                                                           torch.tensor(1.0)), args.small)
                    results.append((f"one-element write (fsync), {label}",
                                    f"{s * 1e3:.2f} ms", ""))
                for label, client in (("plain server", p), ("2-rank cluster", c)):
                    results.extend(_compute_rows(client, label, args.compute))
        finally:
            _stop(plain)
            _stop(cluster)
    _table(args, results)


def _table(args: argparse.Namespace, results: list[tuple[str, str, str]]) -> None:
    print(f"| what ({args.repeats} big / {args.small} small repeats, medians) | time | rate |")
    print("|---|---|---|")
    for row in results:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")


if __name__ == "__main__":
    main()
