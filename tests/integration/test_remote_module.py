"""The mirror `create_model` / `model` return has what the RemoteModule protocol declares, while
staying the served classes (type checks by class keep working)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

import paramhub
from paramhub.module import RemoteModule

_DECLARED = sorted(n for n, v in vars(RemoteModule).items()
                   if not n.startswith("_") and (inspect.isfunction(v)))


def test_remote_module_protocol_matches_the_mirror(client):
    net = client.create_model("m", nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    again = client.model("m")
    assert _DECLARED  # the protocol declares methods (pull, push_grads, watch, ...)
    for mirror in (net, again):
        missing = [n for n in _DECLARED if not callable(getattr(mirror, n, None))]
        assert not missing
        assert mirror.model_id == "m" and mirror.paramhub_client is client
        assert type(mirror[0]) == nn.Linear  # noqa: E721 - the point: exactly the class
        assert type(mirror) == nn.Sequential  # noqa: E721
        assert paramhub.is_remote(mirror[0])
        assert mirror(torch.ones(2, 4)).shape == (2, 3)
    assert paramhub.RemoteModule is RemoteModule
