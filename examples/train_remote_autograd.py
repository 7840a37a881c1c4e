"""A thin client trains a served model: remote autograd + a server-side optimizer.

    make serve                                            # in another terminal
    .venv/bin/python examples/train_remote_autograd.py

The training loop is plain PyTorch; only the lines that create `net` and `opt` differ. The
forward and backward passes run on the server (`net(X)` is a Forward RPC recorded in local
autograd, `loss.backward()` sends the output gradient back in a Backward RPC), the gradients
and the Adam state stay there, and `opt.step()` is one RPC. The server is $PARAMHUB_TARGET or
127.0.0.1:50051.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import paramhub

MODEL_ID = "remote-autograd-mlp"


def make_batch(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic regression: y = sum_i sin(x_i) + noise, x uniform in [-2, 2]^4."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 4, generator=g) * 4 - 2
    y = torch.sin(x).sum(dim=1, keepdim=True) + 0.05 * torch.randn(size, 1, generator=g)
    return x, y


def main() -> None:
    client = paramhub.connect()
    if any(m.name == f"models/{MODEL_ID}" for m in client.list_models()):
        client.delete_model(MODEL_ID)
    torch.manual_seed(0)
    net = client.create_model(MODEL_ID, nn.Sequential(nn.Linear(4, 64), nn.ReLU(),
                                                      nn.Linear(64, 1)))
    opt = paramhub.optim.Adam(net.parameters(), lr=0.01)

    x_test, y_test = make_batch(-1, 4096)
    for step in range(200):
        X, y = make_batch(step, 64)
        opt.zero_grad()
        loss = F.mse_loss(net(X), y)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == 199:
            with torch.no_grad():  # a plain Forward: no graph, nothing for Backward
                test = F.mse_loss(net(x_test), y_test).item()
            print(f"step {step:3d}  train loss {loss.item():.4f}  held-out {test:.4f}")
    print("server-side gradient of 2.bias:", net[2].bias.grad)
    print("Adam state entries:", sorted(opt.state_dict()["state"][0]))
    print(f"RPCs: {dict(client.rpc_counts)}")


if __name__ == "__main__":
    main()
