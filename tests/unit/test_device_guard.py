"""The host-side index guards a CUDA server installs (core.model.guard_device_indexing): an
out-of-range index reaching a CUDA kernel is a device-side assert that aborts every later CUDA
call of the process, so the guard must run for every way the index can be passed. These run on
the CPU (the guard is the same code; the CUDA suite re-runs the server path on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from paramhub_server.core.model import DeviceIndexError, guard_device_indexing

BAD_IDS = torch.tensor([[0, 9]])


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
@pytest.mark.parametrize("form", ["positional", "keyword"])
def test_embedding_guard_checks_every_argument_form(cls, form):
    m = cls(5, 3)
    guard_device_indexing(m)
    with pytest.raises(DeviceIndexError):
        m(BAD_IDS) if form == "positional" else m(input=BAD_IDS)
    good = torch.tensor([[0, 4]])
    assert m(good).shape[-1] == 3 and m(input=good).shape[-1] == 3


def _unpool_cases():
    x1, i1 = nn.MaxPool1d(2, return_indices=True)(torch.rand(1, 2, 8))
    x2, i2 = nn.MaxPool2d(2, return_indices=True)(torch.rand(1, 2, 4, 4))
    x3, i3 = nn.MaxPool3d(2, return_indices=True)(torch.rand(1, 2, 4, 4, 4))
    return [(nn.MaxUnpool1d(2), x1, i1, 8), (nn.MaxUnpool2d(2), x2, i2, 16),
            (nn.MaxUnpool3d(2), x3, i3, 64)]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("form", ["positional", "indices=", "input=, indices=",
                                  "output_size="])
def test_maxunpool_guard_checks_indices_in_every_argument_form(case, form):
    m, x, indices, limit = _unpool_cases()[case]
    guard_device_indexing(m)
    good = m(x, indices)  # in range: unchanged behaviour
    bad = indices.clone()
    bad.view(-1)[0] = limit  # one past the output's spatial size
    calls = {"positional": lambda: m(x, bad), "indices=": lambda: m(x, indices=bad),
             "input=, indices=": lambda: m(input=x, indices=bad),
             "output_size=": lambda: m(x, bad, output_size=good.shape[2:])}
    with pytest.raises(DeviceIndexError):
        calls[form]()
    negative = indices.clone()
    negative.view(-1)[-1] = -1
    with pytest.raises(DeviceIndexError):
        m(x, negative)
