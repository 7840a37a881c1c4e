"""Weight sync between two torch.distributed jobs through paramhub (the RL post-training
pattern): a 2-rank "trainer" job holds its weights as DTensors sharded Shard(0) (FSDP-style)
and publishes them every step with `push_dtensors` (one model version per step); a 2-rank
"inference" job holds them Shard(1) (columns; biases replicated) and pulls each new version
with `pull_dtensors`, each rank reading only its own columns, and checks them.

    make serve                                   # in another terminal
    .venv/bin/python examples/weight_sync.py --steps 5
    .venv/bin/python examples/weight_sync.py --target 127.0.0.1:50051 --hidden 512

Each job is its own gloo process group on 127.0.0.1 (four processes in all); the jobs share
no process group, only the server. The server is --target, else $PARAMHUB_TARGET, else
127.0.0.1:50051. Exits non-zero if any pulled weight differs from what the trainer pushed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import sys
import zlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import paramhub

MODEL_ID = "weight-sync"
#: Seconds a job waits at a step barrier before it gives up.
STEP_TIMEOUT_S = 120.0


def make_model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def delta(name: str, shape: torch.Size, step: int) -> torch.Tensor:
    """The trainer's update of tensor `name` at `step` (the same on every process)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    return 0.01 * torch.randn(shape, generator=g)


def expected(initial: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The full weights after `step` trainer steps."""
    out = {n: t.clone() for n, t in initial.items()}
    for s in range(1, step + 1):
        for n in out:
            out[n] += delta(n, out[n].shape, s)
    return out


def job(role: str, rank: int, port: int, target: str, steps: int, hidden: int,
        barrier: Any, failures: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (2,))
    initial = make_model(hidden).state_dict()
    try:
        with paramhub.connect(target, timeout=120) as c:
            if role == "trainer":
                # The trainer's own state, sharded by rows over its 2 ranks.
                state = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in initial.items()}
            plan = {n: [Shard(1)] if t.dim() == 2 else [Replicate()] for n, t in initial.items()}
            for step in range(1, steps + 1):
                if role == "trainer":
                    for n, d in state.items():  # a "training step": DTensor ops on the shards
                        state[n] = d + distribute_tensor(delta(n, d.shape, step), mesh,
                                                         [Shard(0)])
                    c.push_dtensors(MODEL_ID, state)
                barrier.wait(STEP_TIMEOUT_S)  # the step is published
                if role == "inference":
                    pulled, version = c.pull_dtensors(MODEL_ID, mesh, plan)
                    want = expected(initial, step)
                    bad = [n for n, d in pulled.items()
                           if not torch.allclose(d.full_tensor(), want[n], atol=1e-5)]
                    if rank == 0:
                        print(f"step {step}: model version {version}, "
                              f"{len(pulled)} tensors {'MISMATCH ' + str(bad) if bad else 'ok'}",
                              flush=True)
                    if bad:
                        failures.value += 1
                barrier.wait(STEP_TIMEOUT_S)  # the step is checked
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("PARAMHUB_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    with paramhub.connect(args.target, timeout=120) as c:
        if MODEL_ID in [m.name.split("/")[-1] for m in c.list_models()]:
            c.delete_model(MODEL_ID)
        c.create_model(MODEL_ID, make_model(args.hidden))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    failures = ctx.Value("i", 0)
    ports = {"trainer": free_port(), "inference": free_port()}
    procs = [ctx.Process(target=job, args=(role, rank, ports[role], args.target, args.steps,
                                          args.hidden, barrier, failures))
             for role in ("trainer", "inference") for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(STEP_TIMEOUT_S * (args.steps + 1))
        if p.is_alive():
            p.kill()
            p.join()
    ok = all(p.exitcode == 0 for p in procs) and failures.value == 0
    print("weight sync", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
