"""A tensor larger than protobuf's 2 GiB message ceiling, both ways, through the real server."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import paramhub
from paramhub import _spec

# 1,100,000 x 1024 float16 = 2.10 GiB: past 2**31 bytes (protobuf's hard message limit).
ROWS, DIM = 1_100_000, 1024


@pytest.mark.slow
def test_tensor_over_2_gib_round_trip_over_grpc(server, target):
    spec = _spec.spec_from_module(nn.Embedding(ROWS, DIM, dtype=torch.float16, device="meta"))
    # Both side channels off: the bytes must go through gRPC streams (checked below).
    with paramhub.connect(target, timeout=600, shm=False, data_channel=False) as c:
        c.create_model_from_spec("huge", spec, seed=0)
        live = server.registry.get("huge").module.weight
        assert live.numel() * live.element_size() > 2**31
        got, version = c.get_tensor("huge", "weight")
        assert version == 0 and got.dtype == torch.float16 and got.shape == (ROWS, DIM)
        assert torch.equal(got, live)
        # Change the first and last rows locally and write the whole tensor back (streamed).
        got[0] = 1.5
        got[-1] = -2.0
        assert c.set_slice("huge", "weight", None, got) == 1
        assert torch.equal(live[0], torch.full((DIM,), 1.5, dtype=torch.float16))
        assert torch.equal(live[-1], torch.full((DIM,), -2.0, dtype=torch.float16))
        assert torch.equal(live, got)
    channels = [server.transport.data, server.transport.shm]
    assert [(ch.sent, ch.received) for ch in channels] == [(0, 0), (0, 0)]
    prom = server.metrics.prom
    assert prom.get_sample_value("paramhub_sent_bytes_total", {"method": "GetTensor"}) > 2**31
    assert prom.get_sample_value("paramhub_received_bytes_total",
                                 {"method": "StreamSetSlice"}) > 2**31
    del got, live
    gc.collect()
