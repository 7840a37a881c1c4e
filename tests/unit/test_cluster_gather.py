"""The gathered pass of cluster/compute.py in one process (a 1-rank gloo group): the output
equals the local module's, and a rank holds at most one module's full tensors at a time
(the FSDP-style gather), except for a unit (MultiheadAttention) gathered whole."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from paramhub import _spec


@pytest.fixture(scope="module")
def mesh() -> Iterator[object]:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded(module: nn.Module, mesh: object):
    from torch.distributed.tensor import distribute_tensor

    from paramhub_server.cluster.sharding import ShardedModel, entries_of, skeleton_of

    spec = _spec.spec_from_module(module)
    skeleton = skeleton_of(spec)
    entries = entries_of(skeleton, 1)
    values = module.state_dict()
    for e in entries:
        e.dt = distribute_tensor(values[e.names[0]].detach().clone(), mesh, [e.placement])
    return ShardedModel("m", spec, entries, skeleton=skeleton)


def _bytes(*modules: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())


def test_pass_gathers_one_module_at_a_time(mesh) -> None:
    from paramhub_server.cluster.compute import Pass, _run

    torch.manual_seed(0)
    local = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 8))
    m = _sharded(local, mesh)
    X = torch.randn(4, 16)
    p = Pass(grad=False)
    with torch.no_grad():
        out = _run(m, "", [X], {}, 0, p)
        torch.testing.assert_close(out, local(X))
    assert p.peak_bytes == _bytes(local[2])  # the largest layer, not the model
    assert p.peak_bytes < _bytes(local)
    assert p.live_bytes == 0  # everything gathered was dropped
    assert all(t.device.type == "meta" for t in m.skeleton.state_dict().values())


def test_attention_is_gathered_as_one_unit(mesh) -> None:
    from paramhub_server.cluster.compute import Pass, _run

    torch.manual_seed(0)
    local = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    m = _sharded(local, mesh)
    X = torch.randn(2, 3, 8)
    p = Pass(grad=False)
    with torch.no_grad():
        torch.testing.assert_close(_run(m, "", [X], {}, 0, p), local(X))
    # The layer reads its children's tensors (fast-path checks): the whole layer is one unit.
    assert p.peak_bytes == _bytes(local)
    p = Pass(grad=False)
    with torch.no_grad():
        torch.testing.assert_close(_run(m, "self_attn", [X, X, X], {}, 0, p)[0],
                                   local.self_attn(X, X, X)[0])
    assert p.peak_bytes == _bytes(local.self_attn)


def test_recovery_drops_a_state_file_newer_than_the_model(mesh, tmp_path) -> None:
    """A step whose state file was written but whose parameters never reached the log (a crash
    between the two): recovery keeps the state of the model's version and deletes the newer
    file, so a later write of that version cannot pick it up."""
    from types import SimpleNamespace

    from paramhub_server.cluster import compute, optim

    torch.manual_seed(0)
    m = _sharded(nn.Sequential(nn.Linear(4, 3)), mesh)
    rank = SimpleNamespace(root=tmp_path, models={"m": m}, mesh=mesh, world=1, rank=0)
    opt = optim._build(m, "SGD", [(["0.weight", "0.bias"], {})], {"lr": 0.1})
    optim._save_optimizer(rank, m, opt)  # the optimizer at version 1, no steps
    opt.steps, m.version = 1, 2
    optim._save_optimizer(rank, m, opt)  # the lost step's file
    m.version = 1  # the parameters' log never got version 2
    optim.recover(rank)
    got = compute.state_of(m).optimizer
    assert got is not None and got.steps == 0 and got.type == "SGD"
    assert sorted(p.name for p in (tmp_path / "m" / "optim").iterdir()) == ["1.safetensors"]
