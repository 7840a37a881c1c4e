"""Weight sync between two 2-rank jobs on one host (README "DTensor in and out"): time to
publish a state with `push_dtensors` (trainer job, Shard(0)) and to pull it with
`pull_dtensors` (inference job, Shard(1)), beside the same bytes moved with a
torch.distributed broadcast (gloo) from the trainer's first process to all four processes,
and beside the unsharded `push_state` / `pull_state` of one process each. One in-process
server on 127.0.0.1; four spawned processes, one gloo world of 4 split into two 1-D meshes
(one per job). Medians of --repeats; this machine's cores are shared, so numbers are noisy.

    python -m benchmarks.weight_sync [--mib 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import paramhub

MODEL_ID = "weight-sync-bench"
WIDTH = 1024  # each layer is WIDTH x WIDTH float32 = 4 MiB


def make_model(mib: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(max(1, mib // 4))])


def proc(rank: int, port: int, target: str, mib: int, repeats: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4, timeout=timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("job", "shard"))["shard"]
    trainer = rank < 2
    full = make_model(mib).state_dict()
    times: dict[str, list[float]] = {k: [] for k in
                                      ("publish", "pull", "broadcast", "push_state", "pull_state")}

    def timed(key: str, fn: Any) -> None:
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        times[key].append(time.perf_counter() - t)

    with paramhub.connect(target, timeout=600) as c:
        state = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
        plan = {n: [Shard(1)] for n in full}
        flat = torch.cat([t.reshape(-1) for t in full.values()]).view(torch.uint8)
        for _ in range(repeats + 1):  # the first round warms up and is dropped below
            timed("publish", lambda: c.push_dtensors(MODEL_ID, state) if trainer else None)
            timed("pull", lambda: c.pull_dtensors(MODEL_ID, mesh, plan) if not trainer else None)
            buf = flat.clone() if rank == 0 else torch.empty_like(flat)
            timed("broadcast", lambda: dist.broadcast(buf, src=0))
            timed("push_state", lambda: c.push_state(MODEL_ID, full) if rank == 0 else None)
            timed("pull_state", lambda: c.pull_state(MODEL_ID) if rank == 2 else None)
    if rank == 0:
        out.update({k: statistics.median(v[1:]) for k, v in times.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from paramhub_server.app import build_server
    from paramhub_server.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        server = build_server(Settings(host="127.0.0.1", port=0, data_dir=Path(tmp) / "data",
                                       max_workers=16))
        target = f"127.0.0.1:{server.port}"
        try:
            with paramhub.connect(target, timeout=600) as c:
                c.create_model(MODEL_ID, make_model(args.mib))
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            ctx = mp.get_context("spawn")
            with ctx.Manager() as manager:
                out = manager.dict()
                procs = [ctx.Process(target=proc, args=(r, port, target, args.mib,
                                                        args.repeats, out)) for r in range(4)]
                for p in procs:
                    p.start()
                for p in procs:
                    p.join(1200)
                    if p.is_alive():
                        p.kill()
                        p.join()
                result = dict(out)
        finally:
            server.stop(grace=None)
    mib = max(1, args.mib // 4) * 4
    print(f"weight sync of a {mib} MiB state (float32), 2-rank trainer -> 2-rank inference, "
          f"medians of {args.repeats}:")
    rows = [("publish: push_dtensors (Shard(0), 2 ranks)", "publish"),
            ("pull: pull_dtensors (Shard(1), 2 ranks)", "pull"),
            ("reference: dist.broadcast of the same bytes to 4 processes (gloo)", "broadcast"),
            ("unsharded push_state (1 process)", "push_state"),
            ("unsharded pull_state (1 process)", "pull_state")]
    for label, key in rows:
        s = result.get(key)
        print(f"| {label} | {s * 1e3:.0f} ms | {mib / s:.0f} MiB/s |" if s else
              f"| {label} | failed | |")


if __name__ == "__main__":
    main()
