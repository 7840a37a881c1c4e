"""Durability benchmarks: what --fsync costs, how long recovery takes, reads under a writer.

    .venv/bin/python benchmarks/durability.py [--seconds 3] [--model-mib 512] [--log-writes 3000]

Runs real `paramhub serve` subprocesses on 127.0.0.1 port 0 with data directories under a
temporary folder (or --tmp), drives them through the SDK, prints a table and writes JSON
(--json, default benchmarks/results/durability.json). Numbers are side by side from one run on
one machine; compare ratios, not absolute values across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

import paramhub
from paramhub import _spec

PARAMHUB = str(Path(sys.executable).with_name("paramhub"))


def spawn(data_dir: Path | None, *extra: str) -> tuple[subprocess.Popen, str]:
    """Starts `paramhub serve` and returns (process, target)."""
    args = [PARAMHUB, "serve", "--port", "0", "--log-level", "WARNING", *extra]
    args += ["--in-memory"] if data_dir is None else ["--data-dir", str(data_dir)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, proc.stdout.readline().strip()


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def create(c: paramhub.Client, model_id: str, module: nn.Module, seed: int = 0) -> None:
    c.create_model_from_spec(model_id, _spec.spec_from_module(module), seed=seed, timeout=600)


def bench_writes(tmp: Path, seconds: float) -> list[dict]:
    """Small SetSlice add ops/s, one client, per fsync policy (and memory-only)."""
    rows = []
    for policy in ("always", "batch", "off", "memory"):
        data = None if policy == "memory" else tmp / f"w-{policy}"
        extra = () if policy == "memory" else ("--fsync", policy)
        proc, target = spawn(data, *extra)
        try:
            with paramhub.connect(target, timeout=60) as c:
                c.wait_ready(60)
                create(c, "m", nn.Linear(64, 64))
                for _ in range(50):  # warm up
                    c.set_slice("m", "weight", (0, 0), 1.0, "add")
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    c.set_slice("m", "weight", (n % 64, slice(None)), 1.0, "add")
                    n += 1
                dt = time.perf_counter() - t0
                rows.append({"fsync": policy, "writes": n, "seconds": round(dt, 3),
                             "ops_per_s": round(n / dt, 1)})
        finally:
            stop(proc)
    base = next(r["ops_per_s"] for r in rows if r["fsync"] == "off")
    for r in rows:
        r["vs_off"] = round(r["ops_per_s"] / base, 3)
    return rows


def bench_recovery(tmp: Path, model_mib: int, log_writes: int) -> dict:
    """Time from restart to SERVING after kill -9, for a big model with a long log."""
    data = tmp / "recovery"
    width = 4096  # one Linear(4096, 4096) is 64 MiB of float32
    layers = max(1, model_mib // 64)
    module = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    proc, target = spawn(data, "--fsync", "batch", "--compact-bytes", str(1 << 40))
    try:
        with paramhub.connect(target, timeout=600) as c:
            c.wait_ready(60)
            t0 = time.perf_counter()
            create(c, "big", module)
            create_s = time.perf_counter() - t0
            row = torch.ones(width)
            t0 = time.perf_counter()
            for i in range(log_writes):
                # A mix: row writes (16 KiB each) and, every 100th, a whole 64 MiB layer.
                if i % 100 == 99:
                    c.set_slice("big", f"{i % layers}.weight", None, float(i))
                else:
                    c.set_slice("big", f"{i % layers}.weight", (i % width, slice(None)), row,
                                "add")
            write_s = time.perf_counter() - t0
            expected = c.get_tensor("big", "0.weight", (slice(0, 4),))
            version = c.model_version("big")
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    wal = sum(p.stat().st_size for p in (data / "models" / "big").glob("wal-*.log"))
    snap = sum(p.stat().st_size for p in (data / "models" / "big").glob("snapshot-*"))
    t0 = time.perf_counter()
    proc, target = spawn(data)
    try:
        port_s = time.perf_counter() - t0
        with paramhub.connect(target, timeout=600) as c:
            c.wait_ready(600)
            ready_s = time.perf_counter() - t0
            got = c.get_tensor("big", "0.weight", (slice(0, 4),))
            ok = torch.equal(got[0], expected[0]) and c.model_version("big") == version
    finally:
        stop(proc)
    return {"model_mib": layers * 64, "log_records": log_writes, "log_mib": round(wal / 2**20, 1),
            "snapshot_mib": round(snap / 2**20, 1), "create_s": round(create_s, 2),
            "log_write_s": round(write_s, 2), "port_printed_s": round(port_s, 2),
            "ready_s": round(ready_s, 2), "recovered_equal": ok}


def bench_reads(tmp: Path, seconds: float) -> list[dict]:
    """GetTensor of a 64 MiB parameter: alone, beside a small-write stream, beside 64 MiB
    writes to the same parameter."""
    rows = []
    proc, target = spawn(tmp / "reads", "--fsync", "always")
    try:
        with paramhub.connect(target, timeout=120) as c:
            c.wait_ready(60)
            create(c, "m", nn.Sequential(nn.Linear(4096, 4096), nn.Linear(64, 64)))
            for mode in ("no writer", "small writes to another parameter",
                         "64 MiB writes to the same parameter"):
                stop_ev = threading.Event()
                writes = [0]

                def writer() -> None:
                    with paramhub.connect(target, timeout=120) as w:
                        big = torch.zeros(4096, 4096)
                        while not stop_ev.is_set():
                            if mode.startswith("small"):
                                w.set_slice("m", "1.weight", (0, 0), 1.0, "add")
                            else:
                                w.set_slice("m", "0.weight", None, big)
                            writes[0] += 1

                t = threading.Thread(target=writer) if mode != "no writer" else None
                if t:
                    t.start()
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    c.get_tensor("m", "0.weight")
                    n += 1
                dt = time.perf_counter() - t0
                stop_ev.set()
                if t:
                    t.join()
                rows.append({"reads_of_64MiB_while": mode, "reads": n,
                             "read_GB_per_s": round(n * 64 * 2**20 / dt / 1e9, 3),
                             "writer_ops_per_s": round(writes[0] / dt, 1)})
    finally:
        stop(proc)
    return rows


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    line = " | ".join(k.ljust(w) for k, w in zip(keys, widths))
    out = [line, "-|-".join("-" * w for w in widths)]
    out += [" | ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per write / read measurement")
    p.add_argument("--model-mib", type=int, default=512, help="recovery model size")
    p.add_argument("--log-writes", type=int, default=3000, help="log records before kill -9")
    p.add_argument("--tmp", type=Path, default=None, help="where data dirs go (default /tmp)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/durability.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        tmp = Path(d)
        writes = bench_writes(tmp, args.seconds)
        print("Write ops/s (SetSlice add of one 64-float row, one client):")
        print(table(writes), "\n", flush=True)
        recovery = bench_recovery(tmp, args.model_mib, args.log_writes)
        print("Recovery after kill -9 (fsync batch while writing; time from restart):")
        print(table([recovery]), "\n", flush=True)
        reads = bench_reads(tmp, args.seconds)
        print("Reads while a writer runs (fsync always):")
        print(table(reads), flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "platform": platform.platform()},
              "args": {k: str(v) for k, v in vars(args).items()},
              "writes": writes, "recovery": recovery, "reads": reads}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
