"""A 2-rank cluster whose ranks are separate "hosts" (network namespaces on a bridge, links
rate-limited with tc; benchmarks/cluster_netns.py makes and removes them): the SDK in this
namespace learns the ranks from the front door and reads a sharded tensor's parts straight
from each rank's own address. Needs root and iproute2 (skipped otherwise); no timing is
asserted (the bench measures the scaling)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch import nn

import paramhub

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                       or shutil.which("tc") is None,
                       reason="needs root, ip and tc (network namespaces)"),
]


def test_routed_read_across_namespaces(tmp_path) -> None:
    from benchmarks.cluster_netns import cluster, hosts

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(256, 2048))  # a 2 MiB weight: routed
    with hosts(2, mbit=200) as where, cluster(where, tmp_path / "ranks.log") as target:
        with paramhub.connect(target, timeout=120) as c:
            ranks = c.cluster_info()
            assert [r.address for r in ranks] == [f"{addr}:50051" for _, _, addr in where]
            net = c.create_model("m", module, shard="fsdp")
            before = c.rpc_counts.get("GetTensor", 0)
            net[0].weight.data[2040:, :2] = 5.0  # rows on the second "host"
            expected = module[0].weight.detach().clone()
            expected[2040:, :2] = 5.0
            assert torch.equal(net[0].weight.fetch(), expected)
            assert c.rpc_counts.get("GetTensor", 0) == before  # the parts came from the ranks
            assert all(r.held_bytes > 0 for r in c.cluster_info())
    assert not any(ns in os.popen("ip netns list").read() for ns, _, _ in where)
