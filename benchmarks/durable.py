"""Durable writes at disk speed: a big write against the data dir's own write+fdatasync, a fetch
right after it against an idle fetch, and group commit (16 scalar writers against 1).

    .venv/bin/python benchmarks/durable.py [--mib 256] [--reps 4] [--seconds 2]
        [--src DIR] [--json PATH]

Starts the default durable `paramhub serve` (`--fsync always`) on 127.0.0.1 port 0 with its data
directory under --tmp (default: a temporary folder), drives it through the SDK, and measures the
reference in the same run on the same file system, interleaved with our runs:

- write: `net.weight.copy_(src)` of a --mib float32 parameter (median of --reps) vs writing the
  same bytes to a new file in the data directory and fdatasyncing it;
- fetch after write: `net.weight.fetch()` right after each acknowledged write vs the same fetch
  after 2 s of quiet;
- group commit: total acknowledged scalar writes/s (`w.data[i, k] = 1.0`, the SetSlice scalar
  path) of 16 writer processes vs 1, each for --seconds.

Also measured: the same 16 writers against a `--fsync off` server (the CPU's ceiling for scalar
writes through RPC on this machine) and 16 vs 1 threads calling the journal in process (no RPC).

--src DIR runs the server from another checkout's sources (e.g. `git archive` of an older
commit), so "before" and "after" are measured with the same client and reference. The CPU is shared
with whatever else runs on the machine: numbers are noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

import paramhub

PARAMHUB = str(Path(sys.executable).with_name("paramhub"))


def spawn(data_dir: Path, src: Path | None, fsync: str = "always"
          ) -> tuple[subprocess.Popen, str]:
    """Starts the default durable server (from `src` if given); returns (process, target)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = f"{src / 'server'}:{src / 'client'}"
    proc = subprocess.Popen([PARAMHUB, "serve", "--host", "127.0.0.1", "--port", "0",
                             "--data-dir", str(data_dir), "--fsync", fsync,
                             "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    return proc, proc.stdout.readline().strip()


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def reference_write(directory: Path, data: torch.Tensor) -> float:
    """Seconds to write `data` to a new file in `directory` and fdatasync it (then removed)."""
    path = directory / "reference.bin"
    view = memoryview(data.view(torch.uint8).numpy())
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for k in range(0, len(view), 8 << 20):
            os.write(fd, view[k:k + (8 << 20)])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    took = time.perf_counter() - start
    path.unlink()
    return took


_WRITER = """
import sys, time
import paramhub
target, i, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with paramhub.connect(target, timeout=60) as c:
    w = c.model("small").weight
    w.data[i % 64, 0] = 1.0  # connected and warm before the clock starts
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    while time.time() < start:
        time.sleep(0.001)
    k = 0
    while time.time() < start + seconds and k < 1_000_000:
        w.data[i % 64, k % 64] = 1.0
        k += 1
print(k)
"""


def scalar_writers(target: str, writers: int, seconds: float) -> float:
    """Acknowledged scalar SetSlice writes per second of `writers` client processes together
    (each its own process, as separate workers would be: one process's threads would share
    its GIL)."""
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, target, str(i), str(seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(writers)]
    for proc in procs:  # every process has imported torch and connected
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("a writer process failed to start")
    start = time.time() + 1.0
    for proc in procs:
        proc.stdin.write(f"{start}\n")
        proc.stdin.flush()
    counts = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        counts.append(int(out.strip().splitlines()[-1]))
    return sum(counts) / seconds


def journal_writers(tmp: Path, threads: int, seconds: float) -> float:
    """The journal alone, no RPC: scalar writes/s of `threads` threads calling the server core
    in this process under --fsync always (what group commit does when CPU is not the limit)."""
    from paramhub.common import spec as _spec
    from paramhub_server.core.registry import Registry
    from paramhub_server.core.store import Store

    reg = Registry(torch.device("cpu"), store=Store(tmp / f"core-{threads}", fsync="always"))
    reg.recover()
    reg.create("m", _spec.spec_from_module(nn.Linear(64, 64).to("meta")), seed=0, device="")
    m = reg.get("m")
    one = torch.tensor(1.0)
    counts = [0] * threads
    stop_at = time.monotonic() + seconds

    def run(i: int) -> None:
        k = 0
        while time.monotonic() < stop_at and k < 1_000_000:
            m.set_slice("weight", (i % 64, k % 64), "assign", one)
            k += 1
        counts[i] = k

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 120)
    reg.close()
    return sum(counts) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--src", type=Path, default=None, help="server sources (checkout root)")
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--fsync", default="always",
                    help="the server's --fsync (\"off\" shows the CPU's ceiling)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="paramhub-durable-", dir=args.tmp))
    data_dir = tmp / "data"
    proc, target = spawn(data_dir, args.src, args.fsync)
    n = args.mib << 18  # float32 elements
    side = int(n ** 0.5)
    rows: dict[str, list[float]] = {"write": [], "reference": [], "fetch_after": [],
                                    "fetch_idle": []}
    try:
        with paramhub.connect(target, timeout=600) as c:
            c.wait_ready(120)
            net = c.create_model("big", nn.Linear(side, n // side, bias=False))
            c.create_model("small", nn.Linear(64, 64))
            src = torch.rand(n // side, side)
            ref_data = torch.rand(n // side, side)
            net.weight.fetch()  # warm: pools and connections exist before anything is timed
            for r in range(args.reps):
                time.sleep(2.0)
                t0 = time.perf_counter()
                net.weight.fetch()
                rows["fetch_idle"].append(time.perf_counter() - t0)
                rows["reference"].append(reference_write(data_dir, ref_data))
                src.add_(1.0)
                t0 = time.perf_counter()
                net.weight.copy_(src)
                t1 = time.perf_counter()
                got = net.weight.fetch()
                t2 = time.perf_counter()
                rows["write"].append(t1 - t0)
                rows["fetch_after"].append(t2 - t1)
                if not torch.equal(got, src):
                    raise SystemExit("the fetch after the write did not see it")
            one = scalar_writers(target, 1, args.seconds)
            sixteen = scalar_writers(target, 16, args.seconds)
    finally:
        stop(proc)
    # The CPU's ceiling for scalar writes through RPC: the same writers, nothing fsynced.
    proc, target = spawn(tmp / "off", args.src, "off")
    try:
        with paramhub.connect(target, timeout=600) as c:
            c.wait_ready(120)
            c.create_model("small", nn.Linear(64, 64))
        off_16 = scalar_writers(target, 16, args.seconds)
    finally:
        stop(proc)
    core_1 = journal_writers(tmp, 1, args.seconds) if args.src is None else 0.0
    core_16 = journal_writers(tmp, 16, args.seconds) if args.src is None else 0.0
    nbytes = n * 4
    med = {k: statistics.median(v) for k, v in rows.items()}
    gbs = {k: nbytes / v / 1e9 for k, v in med.items()}
    table = [
        ("durable copy_ of the parameter", f"{gbs['write']:.2f} GB/s",
         "data dir write+fdatasync", f"{gbs['reference']:.2f} GB/s",
         gbs["write"] / gbs["reference"], ">= 0.5x (goal 0.8x)"),
        ("fetch right after the write", f"{gbs['fetch_after']:.2f} GB/s", "idle fetch",
         f"{gbs['fetch_idle']:.2f} GB/s", gbs["fetch_after"] / gbs["fetch_idle"], ">= 0.8x"),
        ("16 scalar writers, total", f"{sixteen:.0f} ops/s", "1 scalar writer",
         f"{one:.0f} ops/s", sixteen / one, ">= 5x"),
        ("16 scalar writers, total", f"{sixteen:.0f} ops/s", "16 writers, --fsync off (CPU ceiling)",
         f"{off_16:.0f} ops/s", sixteen / off_16, ""),
    ]
    if args.src is None:
        table.append(("journal alone (no RPC): 16 threads", f"{core_16:.0f} ops/s",
                      "1 thread", f"{core_1:.0f} ops/s", core_16 / max(core_1, 1e-9), ""))
    print(f"server sources: {args.src or 'this checkout'}; {args.mib} MiB float32, "
          f"median of {args.reps}; --fsync {args.fsync}; data dir {data_dir}")
    print("| what | paramhub | reference (same run) | reference value | ratio | target |")
    print("|---|---|---|---|---|---|")
    for what, ours, ref, refv, ratio, target_ in table:
        print(f"| {what} | {ours} | {ref} | {refv} | {ratio:.2f}x | {target_} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "src": str(args.src or ""), "mib": args.mib, "reps": args.reps,
            "seconds": rows, "ops_1": one, "ops_16": sixteen, "ops_16_fsync_off": off_16,
            "journal_ops_1": core_1, "journal_ops_16": core_16, "machine": platform.platform(),
            "cpus": os.cpu_count()}, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
