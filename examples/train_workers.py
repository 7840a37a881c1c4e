"""N worker processes train one served MLP, parameter-server style.

    make serve                                   # in another terminal
    .venv/bin/python examples/train_workers.py   # 4 async workers
    .venv/bin/python examples/train_workers.py --workers 2 --mode sync
    .venv/bin/python examples/train_workers.py --mode bounded_staleness --max-staleness 2

Each worker pulls the model with its version, computes the gradient of its own batch of a
synthetic regression task locally, and pushes it; the server's optimizer applies it according
to the training mode. Every worker prints its loss per step; at the end the served model is
evaluated on held-out data. The server is $PARAMHUB_TARGET or 127.0.0.1:50051.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch
import torch.nn.functional as F
from torch import nn

import paramhub

MODEL_ID = "train-workers-mlp"


def make_batch(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic regression: y = sum_i sin(x_i) + noise, x uniform in [-2, 2]^4."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 4, generator=g) * 4 - 2
    y = torch.sin(x).sum(dim=1, keepdim=True) + 0.05 * torch.randn(size, 1, generator=g)
    return x, y


def worker(rank: int, target: str | None, steps: int, batch: int) -> None:
    """One worker: pull, compute a local gradient, push, for `steps` steps."""
    with paramhub.connect(target, timeout=120) as client:
        net = client.model(MODEL_ID)
        local = None
        for step in range(steps):
            local, version = net.pull(local, return_version=True)
            local.zero_grad()
            x, y = make_batch(10_000 * rank + step, batch)
            loss = F.mse_loss(local(x), y)
            loss.backward()
            result = net.push_grads(local, version)
            print(f"worker {rank} step {step:3d} loss {loss.item():.4f} {result.outcome}"
                  f" (staleness {result.staleness})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="host:port (default $PARAMHUB_TARGET)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="steps per worker")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mode", default="async",
                        choices=["async", "sync", "bounded_staleness"])
    parser.add_argument("--max-staleness", type=int, default=2)
    parser.add_argument("--stale-policy", default="reject", choices=["reject", "scale"])
    parser.add_argument("--lr", type=float, default=0.005)
    args = parser.parse_args()

    with paramhub.connect(args.target) as client:
        if any(m.name == f"models/{MODEL_ID}" for m in client.list_models()):
            client.delete_model(MODEL_ID)
        torch.manual_seed(0)
        net = client.create_model(MODEL_ID, nn.Sequential(nn.Linear(4, 64), nn.ReLU(),
                                                           nn.Linear(64, 1)))
        paramhub.optim.Adam(net.parameters(), lr=args.lr)
        print("training config:", net.configure_training(
            args.mode, sync_workers=args.workers, max_staleness=args.max_staleness,
            stale_policy=args.stale_policy), sep="\n")
        x_test, y_test = make_batch(-1, 4096)
        with torch.no_grad():
            before = F.mse_loss(net(x_test), y_test).item()

        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, args.target, args.steps, args.batch))
                 for r in range(args.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit("a worker failed")

        with torch.no_grad():
            after = F.mse_loss(net(x_test), y_test).item()
        steps = paramhub.optim.get(net).steps
        print(f"held-out loss {before:.4f} -> {after:.4f} after {steps} server steps "
              f"({args.workers} workers x {args.steps} pushes, mode {args.mode})")


if __name__ == "__main__":
    main()
