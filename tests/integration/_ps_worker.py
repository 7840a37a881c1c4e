"""A parameter-server worker process used by test_training.py (run as a script).

    python _ps_worker.py TARGET MODEL WORKER STEPS BATCH OUT.json

Each step pulls the model with its version, computes the MSE gradient of this worker's batch for
that step (data drawn from a generator seeded by (worker, step), so a single process can redo
the same computation), and pushes it. Writes the outcomes and losses as JSON.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import paramhub


def batch(worker: int, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic regression batch of (worker, step): y = sum of sin(x) with a little noise."""
    g = torch.Generator().manual_seed(1000 * worker + step)
    x = torch.rand(size, 4, generator=g) * 4 - 2
    y = torch.sin(x).sum(dim=1, keepdim=True) + 0.05 * torch.randn(size, 1, generator=g)
    return x, y


def main() -> None:
    target, model_id, worker, steps, size, out = sys.argv[1:7]
    worker_i, steps_i, size_i = int(worker), int(steps), int(size)
    outcomes, losses = [], []
    with paramhub.connect(target, timeout=120) as client:
        net = client.model(model_id)
        local = None
        for step in range(steps_i):
            local, version = net.pull(local, return_version=True)
            local.zero_grad()
            x, y = batch(worker_i, step, size_i)
            loss = F.mse_loss(local(x), y)
            loss.backward()
            result = net.push_grads(local, version)
            outcomes.append(result.outcome)
            losses.append(loss.item())
    with open(out, "w") as f:
        json.dump({"outcomes": outcomes, "losses": losses}, f)


if __name__ == "__main__":
    main()
