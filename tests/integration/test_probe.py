"""Probe: server-side statistics match torch on the same values, for parameters, slices,
gradients-absent, whole models; bad arguments rejected."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from torch import nn

from paramhub import _spec
from paramhub.client import tensor_checksum
from paramhub.errors import InvalidArgumentError, NotFoundError, OutOfRangeError
from paramhub_server.core import probe as core_probe


def _serve(client, net, model_id="m"):
    client.create_model_from_spec(model_id, _spec.spec_from_module(net), values=net.state_dict())


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))


def test_probe_parameter_matches_torch(client):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    _serve(client, net)
    w = net[0].weight.detach().double()
    s = client.probe("m", "0.weight", bins=7).stats
    assert s.numel == 512 and list(s.shape) == [32, 16]
    for got, want in ((s.min, w.min()), (s.max, w.max()), (s.mean, w.mean()),
                      (s.std, w.std()), (s.norm, w.norm())):
        assert _close(got, float(want))
    assert list(s.histogram_counts) == [int(x) for x in torch.histc(w, 7, float(w.min()),
                                                                     float(w.max()))]
    assert sum(s.histogram_counts) == 512
    assert s.checksum_sha256 == tensor_checksum(net[0].weight.detach())


def test_probe_slice_nan_inf_and_range(client):
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, float("nan"), 3.0, float("inf")],
                                       [-1.0, 2.0, -float("inf"), 0.5],
                                       [0.0, 0.0, 0.0, 0.0]]))
    _serve(client, net)
    s = client.probe("m", "weight", (slice(0, 2),), bins=4, hist_range=(-2, 2)).stats
    assert (s.numel, s.nan_count, s.inf_count) == (8, 1, 2)
    finite = torch.tensor([1.0, 3.0, -1.0, 2.0, 0.5], dtype=torch.float64)
    assert _close(s.min, -1.0) and _close(s.max, 3.0) and _close(s.mean, float(finite.mean()))
    assert _close(s.std, float(finite.std())) and _close(s.norm, float(finite.norm()))
    assert list(s.histogram_counts) == [int(x) for x in torch.histc(finite, 4, -2, 2)]
    assert (s.histogram_min, s.histogram_max) == (-2.0, 2.0)
    region = net.weight.detach()[0:2]
    assert s.checksum_sha256 == tensor_checksum(region)
    one = client.probe("m", "weight", (2,)).stats
    assert (one.min, one.max, one.std) == (0.0, 0.0, 0.0)


def test_probe_whole_model_ties_once_and_checksum_changes_with_writes(client):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    net = nn.Sequential(emb, nn.BatchNorm1d(4), head)
    _serve(client, net)
    r = client.probe("m", per_tensor=True)
    names = [t.name for t in r.tensors]
    assert names == ["0.weight", "1.weight", "1.bias"]  # 2.weight is tied to 0.weight
    assert r.stats.numel == 40 + 4 + 4
    lines = "".join(f"{n} float32 {list(net.state_dict()[n].shape)} "
                    f"{tensor_checksum(net.state_dict()[n])}\n" for n in names)
    assert r.stats.checksum_sha256 == hashlib.sha256(lines.encode()).hexdigest()
    with_buffers = client.probe("m", include_buffers=True)
    assert with_buffers.stats.numel == 48 + 4 + 4 + 1
    client.set_slice("m", "1.bias", (0,), 1.0)
    after = client.probe("m")
    assert after.stats.checksum_sha256 != r.stats.checksum_sha256
    assert after.model_version == r.model_version + 1


@pytest.mark.parametrize("kwargs,exc,reason", [
    (dict(name="nope"), NotFoundError, "TENSOR_NOT_FOUND"),
    (dict(name="weight", grad=True), NotFoundError, "GRAD_NOT_SET"),
    (dict(name="weight", index=(7,)), OutOfRangeError, "INDEX_OUT_OF_RANGE"),
    (dict(name="weight", bins=5000), InvalidArgumentError, "BAD_ARGUMENT"),
    (dict(name="weight", bins=-1), InvalidArgumentError, "BAD_ARGUMENT"),
    (dict(name="weight", bins=3, hist_range=(2, 1)), InvalidArgumentError, "BAD_ARGUMENT"),
    (dict(name="weight", bins=3, hist_range=(0, float("inf"))), InvalidArgumentError,
     "BAD_ARGUMENT"),
    (dict(name=None, index=(0,)), InvalidArgumentError, "BAD_INDEX"),
])
def test_probe_rejects(client, kwargs, exc, reason):
    _serve(client, nn.Linear(3, 2))
    before = client.probe("m").stats.checksum_sha256
    name = kwargs.pop("name")
    with pytest.raises(exc) as e:
        client.probe("m", name, **kwargs)
    assert e.value.reason == reason
    assert client.probe("m").stats.checksum_sha256 == before


def test_compute_chunked_matches_one_shot(monkeypatch):
    monkeypatch.setattr(core_probe, "CHUNK_ELEMENTS", 7)
    torch.manual_seed(1)
    t = torch.randn(10, 13) * 3 + 1
    t[0, 0] = float("nan")
    s = core_probe.compute([t], name="t", bins=9)
    f = t.double()[torch.isfinite(t)]
    assert _close(s.mean, float(f.mean())) and math.isclose(s.std, float(f.std()), rel_tol=1e-12)
    assert s.histogram_counts == [int(x) for x in torch.histc(f, 9, float(f.min()),
                                                              float(f.max()))]
    assert s.checksum_sha256 == tensor_checksum(t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64, torch.bool,
                                   torch.complex64, torch.uint8])
def test_compute_other_dtypes(dtype):
    t = (torch.arange(12) % 5).to(dtype)
    s = core_probe.compute([t], name="t", bins=2)
    ref = t.abs().double() if dtype.is_complex else t.double()
    assert _close(s.mean, float(ref.mean())) and s.numel == 12
    assert s.checksum_sha256 == tensor_checksum(t)


@pytest.mark.parametrize("hist_min,hist_max", [(5.0, None), (None, -5.0), (-1.7e308, 1.7e308)])
def test_probe_rejects_empty_or_overflowing_histogram_range(client, hist_min, hist_max):
    """Found by the fuzz suite: a one-sided range past the data used to reach torch.histc."""
    from paramhub.common import pb

    _serve(client, nn.Linear(3, 2))
    req = pb.ProbeRequest(name="models/m/parameters/weight", histogram_bins=4)
    if hist_min is not None:
        req.histogram_min = hist_min
    if hist_max is not None:
        req.histogram_max = hist_max
    with pytest.raises(InvalidArgumentError) as e:
        client._call(client.stub.Probe, req)
    assert e.value.reason == "BAD_ARGUMENT"


def test_probe_constant_huge_values_histogram():
    t = torch.full((4,), 1e300, dtype=torch.float64)
    s = core_probe.compute([t], name="t", bins=3)
    assert sum(s.histogram_counts) == 4 and s.histogram_min < 1e300 < s.histogram_max


@pytest.mark.parametrize("index", [(0, slice(5, None, 2**40)), (0, slice(None, None, 2**62)),
                                   (slice(1, None, 2**62), 0)])
def test_get_and_probe_huge_step_slices(client, index):
    """Found by the fuzz suite: empty or one-element regions with huge strides reached
    Tensor.view(uint8) and answered INTERNAL."""
    net = nn.Linear(4, 4)
    _serve(client, net)
    t, _ = client.get_tensor("m", "weight", index)
    want = net.weight.detach()[index]
    assert torch.equal(t, want)
    assert client.probe("m", "weight", index).stats.checksum_sha256 == tensor_checksum(want)


def test_step_overflowing_torch_strides_is_invalid_argument(client):
    _serve(client, nn.Linear(4, 4))
    for call in (lambda: client.get_tensor("m", "weight", (slice(None, None, 2**63 - 1), 0)),
                 lambda: client.probe("m", "weight", (slice(None, None, 2**63 - 1), 0))):
        with pytest.raises(InvalidArgumentError) as e:
            call()
        assert e.value.reason == "BAD_INDEX"
