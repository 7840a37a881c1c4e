"""Training throughput: parameter-server workers, and remote autograd against local training.

    .venv/bin/python -m benchmarks.training [--quick] [--out benchmarks/results/training.json]

1. Worker steps per second (pull + local forward/backward + push, summed over workers) for 1, 2
   and 4 worker processes, sync and async, on the seed's MLP (4-8-1) and a 4-256-256-1 MLP.
2. One training step (zero_grad, forward, backward, optimizer step) through remote autograd and
   a server-side SGD, against the same step on a local copy, for the seed's MLP and a 4096-wide
   MLP (256-4096-4096-1); plus Forward under no_grad against grad mode (the autograd path's
   overhead when nothing is backpropagated).

The server is a separate `paramhub serve --port 0` process, as a user runs it; workers are
separate processes started before the clock starts. Prints a table with ratios and writes JSON. Numbers from a shared machine are
noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import paramhub


def seed_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def mid_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 1))


def wide_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 1))


def _worker(target: str, model_id: str, rank: int, steps: int, in_features: int,
            ready: Any, go: Any, results: Any) -> None:
    torch.set_num_threads(1)  # one core per worker, as a parameter-server worker is deployed
    with paramhub.connect(target, timeout=300) as client:
        net = client.model(model_id)
        local, _ = net.pull(return_version=True)  # warm the channel and the module
        g = torch.Generator().manual_seed(rank)
        ready.release()
        go.wait()
        start = time.time()
        for _ in range(steps):
            local, version = net.pull(local, return_version=True)
            local.zero_grad()
            x = torch.randn(32, in_features, generator=g)
            F.mse_loss(local(x), x.sum(dim=1, keepdim=True).sin()).backward()
            net.push_grads(local, version)
        results.put((start, time.time(), steps))


def bench_workers(target: str, client: paramhub.Client, build: Any, in_features: int,
                  workers: int, mode: str, steps: int) -> float:
    """Pushes per second summed over `workers` processes."""
    model_id = f"bench-{mode}-{workers}"
    torch.manual_seed(0)
    net = client.create_model(model_id, build())
    paramhub.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.configure_training(mode, sync_workers=workers)
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(target, model_id, r, steps, in_features, ready,
                                               go, results)) for r in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    go.set()
    spans = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    client.delete_model(model_id)
    total = sum(s for _, _, s in spans)
    return total / (max(e for _, e, _ in spans) - min(b for b, _, _ in spans))


def _median_time(fn: Any, repeat: int) -> float:
    for _ in range(3):  # warm-up (first-touch page faults of the allocator's buffers)
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_autograd(client: paramhub.Client, name: str, build: Any, in_features: int,
                   batch: int, repeat: int) -> dict[str, float]:
    """Seconds per training step, remote autograd vs local, and forward no_grad vs grad."""
    torch.manual_seed(0)
    local = build()
    net = client.create_model(f"bench-autograd-{name}", copy.deepcopy(local))
    opt = paramhub.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    lopt = torch.optim.SGD(local.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(batch, in_features)
    y = torch.randn(batch, 1)

    # Gradients are zero-filled, not freed (set_to_none=False) on both sides: freeing and
    # re-allocating them every step measures this machine's page faults, not training.
    def remote_step() -> None:
        opt.zero_grad(set_to_none=False)
        F.mse_loss(net(x), y).backward()
        opt.step()

    def local_step() -> None:
        lopt.zero_grad(set_to_none=False)
        F.mse_loss(local(x), y).backward()
        lopt.step()

    def forward_no_grad() -> None:
        with torch.no_grad():
            net(x)

    def forward_grad_mode() -> None:
        net(x)

    out = {"remote_step_s": _median_time(remote_step, repeat),
           "local_step_s": _median_time(local_step, repeat),
           "forward_no_grad_s": _median_time(forward_no_grad, repeat),
           "forward_grad_mode_s": _median_time(forward_grad_mode, repeat)}
    client.delete_model(f"bench-autograd-{name}")
    return out


def workers_table(target: str, client: paramhub.Client, steps: int) -> list[dict[str, Any]]:
    """Part 1: pushes per second for 1, 2, 4 workers, sync and async."""
    rows = []
    print("Parameter-server workers: pushes/s summed over workers "
          f"({steps} pushes each, batch 32, SGD momentum)")
    print(f"{'model':<10} {'mode':<6} {'workers':>7} {'steps/s':>9} {'x 1 worker':>10}")
    for model_name, build, in_features in (("seed-mlp", seed_mlp, 4), ("mlp-256", mid_mlp, 4)):
        for mode in ("sync", "async"):
            base = None
            for workers in (1, 2, 4):
                rate = bench_workers(target, client, build, in_features, workers, mode, steps)
                base = base or rate
                rows.append({"model": model_name, "mode": mode, "workers": workers,
                             "steps_per_s": rate})
                print(f"{model_name:<10} {mode:<6} {workers:>7} {rate:>9.1f} "
                      f"{rate / base:>10.2f}")
    print()
    return rows


def autograd_table(client: paramhub.Client, repeat: int) -> list[dict[str, Any]]:
    """Part 2: remote autograd + server-side SGD against local training, per step."""
    rows = []
    print(f"Remote autograd + server-side SGD vs local training, one step (median of {repeat})")
    print(f"{'model':<12} {'batch':>5} {'local ms':>9} {'remote ms':>10} {'ratio':>7} "
          f"{'fwd no_grad ms':>15} {'fwd grad ms':>12} {'ratio':>6}")
    for model_name, build, in_features, batch in (("seed-mlp", seed_mlp, 4, 64),
                                                  ("wide-4096", wide_mlp, 256, 32)):
        r: dict[str, Any] = bench_autograd(client, model_name, build, in_features, batch, repeat)
        r.update(model=model_name, batch=batch)
        rows.append(r)
        print(f"{model_name:<12} {batch:>5} {r['local_step_s'] * 1e3:>9.2f} "
              f"{r['remote_step_s'] * 1e3:>10.2f} {r['remote_step_s'] / r['local_step_s']:>7.2f} "
              f"{r['forward_no_grad_s'] * 1e3:>15.2f} {r['forward_grad_mode_s'] * 1e3:>12.2f} "
              f"{r['forward_grad_mode_s'] / r['forward_no_grad_s']:>6.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    parser.add_argument("--part", choices=["all", "workers", "autograd"], default="all")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training.json"))
    args = parser.parse_args()
    steps = 10 if args.quick else 40
    repeat = 3 if args.quick else 10

    server = subprocess.Popen([sys.executable, "-m", "paramhub_server", "--port", "0",
                               "--device", "cpu", "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    target = server.stdout.readline().strip()
    if not target:
        raise SystemExit("the server did not start")
    report: dict[str, Any] = {"machine": {"cpus": mp.cpu_count(), "torch": torch.__version__,
                                          "python": platform.python_version(),
                                          "torch_threads": torch.get_num_threads()},
                              "workers": [], "autograd": []}
    try:
        with paramhub.connect(target, timeout=300) as client:
            if args.part in ("all", "workers"):
                report["workers"] = workers_table(target, client, steps)
            if args.part in ("all", "autograd"):
                report["autograd"] = autograd_table(client, repeat)
    finally:
        server.terminate()
        server.wait(timeout=60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
