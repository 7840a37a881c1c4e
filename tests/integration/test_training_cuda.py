"""Remote training with the model on a GPU: autograd replay (dropout drawn on the device),
server-side optimizers and pushed gradients crossing device and wire.

Skipped without a CUDA device (conftest.py); run on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramhub

pytestmark = pytest.mark.cuda


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_cuda_backward_and_adam_match_local_cpu(cuda_client, monkeypatch):
    # cuDNN convolutions default to TF32 on Ampere and later (seen on an H200: 0.bias off by
    # more than 1e-4 after 10 Adam steps); the in-process server shares these flags.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    local = conv_net()
    net = cuda_client.create_model("conv", copy.deepcopy(local))
    assert net[0].weight.device.type == "cuda"
    opt = paramhub.optim.Adam(net.parameters(), lr=0.01)
    lopt = torch.optim.Adam(local.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        X = torch.randn(6, 1, 8, 8, generator=g).requires_grad_(True)
        Xl = X.detach().clone().requires_grad_(True)
        y = torch.randn(6, 3, generator=g)
        opt.zero_grad()
        F.mse_loss(net(X), y).backward()
        opt.step()
        lopt.zero_grad()
        F.mse_loss(local(Xl), y).backward()
        lopt.step()
        torch.testing.assert_close(X.grad, Xl.grad, rtol=1e-4, atol=1e-5)
    for (n, p), lp in zip(net.named_parameters(), local.parameters(), strict=True):
        torch.testing.assert_close(p.fetch(), lp.detach(), rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(net[1].running_mean.fetch(), local[1].running_mean,
                               rtol=1e-4, atol=1e-5)


def test_cuda_backward_replays_dropout_drawn_on_the_device(cuda_client):
    net = cuda_client.create_model("drop", nn.Sequential(nn.Dropout(0.5)))
    X = torch.ones(128, 32, requires_grad=True)
    out = net(X)
    kept = out != 0
    assert 0 < kept.sum() < kept.numel()
    out.sum().backward()
    assert torch.equal(X.grad, kept.float() * 2)


def test_cuda_push_grads_sync_step(cuda_client):
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    net = cuda_client.create_model("ps", copy.deepcopy(local))
    paramhub.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.configure_training("sync", sync_workers=1)
    lopt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        pulled, version = net.pull(return_version=True)
        x = torch.rand(8, 4)
        pulled.zero_grad()
        F.mse_loss(pulled(x), x.sum(1, keepdim=True)).backward()
        assert net.push_grads(pulled, version).outcome == "applied"
        lopt.zero_grad()
        F.mse_loss(local(x), x.sum(1, keepdim=True)).backward()
        lopt.step()
    for (n, p), lp in zip(net.named_parameters(), local.parameters(), strict=True):
        torch.testing.assert_close(p.fetch(), lp.detach(), rtol=1e-5, atol=1e-6, msg=n)
