"""The CUDA paths: a server holding models on the GPU, tensors crossing device and wire.

Skipped without a CUDA device (conftest.py); run on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import paramhub
from paramhub.common import pb

pytestmark = pytest.mark.cuda


def test_cuda_seeded_create_matches_local_cpu_and_lives_on_gpu(cuda_client):
    with torch.device("meta"):
        meta = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(),
                             nn.Linear(8 * 6 * 6, 4))
    net = cuda_client.create_model("conv", meta, seed=3)
    torch.manual_seed(3)
    local = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4))
    for (n, p), (_, lp) in zip(net.state_dict().items(), local.state_dict().items(), strict=True):
        assert torch.equal(p.fetch(), lp), n
    assert net[0].weight.device.type == "cuda"
    info = cuda_client.describe_model("conv")
    assert info.model.device.startswith("cuda")
    assert all(t.device.startswith("cuda") for t in info.tensors)


def test_cuda_forward_setslice_init_and_lstm(cuda_client):
    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    net = cuda_client.create_model("mlp", local)
    X = torch.rand(2, 4)
    assert torch.allclose(net(X), local(X).detach(), atol=1e-5)
    net[0].weight.data[:] += 1
    net[0].weight.data[0, 0] = 42
    w = net[0].weight.fetch()
    assert w[0, 0].item() == 42 and torch.allclose(w[1:], local[0].weight.detach()[1:] + 1)
    resp = cuda_client.apply_init("mlp", "normal_", [pb.InitTarget(parameter="2.weight")],
                                  {"std": 0.5}, seed=11)
    assert resp.updated[0].version >= 1
    torch.manual_seed(11)
    expect = torch.empty(1, 8)
    nn.init.normal_(expect, std=0.5)
    assert torch.equal(net[2].weight.fetch(), expect)
    torch.manual_seed(1)
    lstm_local = nn.LSTM(3, 5, num_layers=2, batch_first=True)
    lstm = cuda_client.create_model("lstm", lstm_local)
    x = torch.rand(2, 7, 3)
    out, (h, c) = lstm(x)
    lout, (lh, lc) = lstm_local(x)
    assert torch.allclose(out, lout.detach(), atol=1e-4) and torch.allclose(h, lh.detach(),
                                                                            atol=1e-4)
    # cuDNN packs LSTM weights into one buffer: they must still be separate storages.
    assert cuda_client.shared_groups(lstm) == []


def test_cuda_tied_weights_stay_tied(cuda_client):
    enc = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    enc[1].weight = enc[0].weight
    net = cuda_client.create_model("tied", enc)
    assert net[0].weight is net[1].weight
    assert cuda_client.check_shared(net, "0.weight", "1.weight")
    net[0].weight.data[3] = 7
    assert (net[1].weight.fetch()[3] == 7).all()


def test_cuda_large_tensor_round_trip(cuda_client):
    n = 64 << 20  # 256 MiB of float32
    with torch.device("meta"):
        meta = nn.Sequential(nn.Embedding(n // 1024, 1024))
    net = cuda_client.create_model("big", meta, seed=0)
    value = torch.arange(n, dtype=torch.float32).reshape(n // 1024, 1024)
    net[0].weight.data.copy_(value)
    assert torch.equal(net[0].weight.fetch(), value)


def test_cuda_serve_subprocess_reports_cuda(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "paramhub_server", "--port", "0",
                             "--device", "cuda", "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        target = proc.stdout.readline().strip()
        with paramhub.connect(target) as c:
            c.create_model("m", nn.Linear(2, 2))
            assert c.describe_model("m").model.device.startswith("cuda")
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0


def test_cuda_bad_indices_are_errors_not_device_asserts(cuda_client):
    """An out-of-range index tensor or embedding index would be a device-side assert on CUDA,
    which breaks every later CUDA call of the server: both are refused before the kernel."""
    torch.manual_seed(0)
    net = cuda_client.create_model("emb", nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
    before = net[0].weight.fetch()
    with pytest.raises(paramhub.OutOfRangeError):
        net[0].weight.data[torch.tensor([3, 10])] = 1.0
    with pytest.raises(paramhub.OutOfRangeError):
        net[0].weight.data[torch.tensor([-11])]
    with pytest.raises(paramhub.InvalidArgumentError):
        net(torch.tensor([[1, 10]]))
    # The device still works for everyone.
    assert torch.equal(net[0].weight.fetch(), before)
    assert net(torch.tensor([[1, 9]])).shape == (1, 2, 2)
