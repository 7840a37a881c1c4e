"""What durable optimizer state costs per OptimizerStep: --fsync always vs off vs --in-memory.

    .venv/bin/python benchmarks/optimizer_durability.py [--steps 100] [--big-steps 30]
        [--baseline /work/main/.venv/bin/paramhub]

For the seed MLP (4-8-1) and a 1M-parameter MLP (4-1000-1000-1), with SGD (momentum) and Adam:
starts a real `paramhub serve` per configuration on 127.0.0.1 port 0, sets the gradients once by
remote autograd, then times `opt.step()` (one OptimizerStep RPC each; the gradients stay, so
every step changes every parameter and its optimizer state, as in training). Also reports the
log bytes per step. `--baseline PATH` adds the same runs with another `paramhub` executable (e.g.
a checkout without durable optimizer state) for a side-by-side comparison. Prints a table and
writes JSON (--json, default benchmarks/results/optimizer_durability.json). Compare ratios from
one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import paramhub

PARAMHUB = str(Path(sys.executable).with_name("paramhub"))


def spawn(exe: str, data_dir: Path | None, fsync: str) -> tuple[subprocess.Popen, str]:
    args = [exe, "serve", "--port", "0", "--log-level", "WARNING"]
    args += ["--in-memory"] if data_dir is None else ["--data-dir", str(data_dir), "--fsync",
                                                      fsync]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, proc.stdout.readline().strip()


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"seed MLP 4-8-1": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)),
            "MLP 4-1000-1000-1": nn.Sequential(nn.Linear(4, 1000), nn.ReLU(),
                                               nn.Linear(1000, 1000), nn.ReLU(),
                                               nn.Linear(1000, 1))}


OPTIMIZERS = {"SGD": {"lr": 1e-4, "momentum": 0.9}, "Adam": {"lr": 1e-4}}


def run_one(exe: str, data_dir: Path | None, fsync: str, module: nn.Module, opt_name: str,
            steps: int) -> dict:
    proc, target = spawn(exe, data_dir, fsync)
    try:
        with paramhub.connect(target, timeout=600) as c:
            c.wait_ready(60)
            net = c.create_model("m", module)
            opt = getattr(paramhub.optim, opt_name)(net.parameters(), **OPTIMIZERS[opt_name])
            X = torch.randn(32, 4)
            F.mse_loss(net(X), torch.zeros(32, 1)).backward()
            for _ in range(3):  # warm-up (state allocated, files created)
                opt.step()
            wal = (lambda: sum(p.stat().st_size for p in (data_dir / "models" / "m").glob(
                "wal-*"))) if data_dir is not None else (lambda: 0)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            log_bytes = wal()
    finally:
        stop(proc)
    return {"ms_per_step_median": statistics.median(times) * 1e3,
            "ms_per_step_mean": statistics.fmean(times) * 1e3,
            "log_bytes_at_end": log_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="timed steps, seed MLP")
    ap.add_argument("--big-steps", type=int, default=30, help="timed steps, 1M MLP")
    ap.add_argument("--baseline", default="", help="another paramhub executable to compare")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" /
                                          "optimizer_durability.json"))
    args = ap.parse_args()
    servers = [("this", PARAMHUB)] + ([("baseline", args.baseline)] if args.baseline else [])
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for mname, module in models().items():
            params = sum(p.numel() for p in module.parameters())
            steps = args.steps if params < 10_000 else args.big_steps
            for opt_name in OPTIMIZERS:
                for label, exe in servers:
                    for policy in ("always", "off", "memory"):
                        if label == "baseline" and policy == "memory":
                            continue
                        data = None if policy == "memory" else \
                            Path(tmp) / f"{label}-{policy}-{opt_name}-{params}"
                        r = run_one(exe, data, policy, module, opt_name, steps)
                        rows.append({"model": mname, "params": params, "optimizer": opt_name,
                                     "server": label, "fsync": policy, "steps": steps, **r})
                        print(f"{mname:18} {opt_name:4} {label:8} {policy:6} "
                              f"{r['ms_per_step_median']:8.2f} ms/step (median)", flush=True)
    print()
    print("| model | optimizer | server | --fsync | ms/step (median) | vs in-memory |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["optimizer"] ==
                    r["optimizer"] and x["server"] == "this" and x["fsync"] == "memory")
        print(f"| {r['model']} | {r['optimizer']} | {r['server']} | {r['fsync']} | "
              f"{r['ms_per_step_median']:.2f} | "
              f"{r['ms_per_step_median'] / base['ms_per_step_median']:.2f}x |")
    out = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "torch": torch.__version__, "cpus": __import__("os").cpu_count()},
           "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
