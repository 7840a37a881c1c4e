"""The write fast path's math (sharding.local_run): for a box of step-1 slices, each rank's
run of flat ids and the slices of the value that land there pick exactly the elements and
values the general path (region_ids + to_local) picks, for any Shard(d) and Replicate; and the
common whole-tensor / whole-rows writes do take it."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from paramhub_server.cluster import sharding
from paramhub_server.cluster.sharding import local_run, placement_of, region_ids, to_local

SHAPES = [(7,), (5, 3), (3, 5), (2, 3, 5), (4, 1, 6), (9, 2)]
INDEXES = [(), (slice(None),), (slice(1, 4),), (slice(-3, None),), (slice(5, 2),),
           (slice(0, 100),), (slice(None), slice(1, 2)), (slice(2, 3), slice(None)),
           (slice(1, 2), slice(0, 1)), (slice(None), slice(None), slice(2, 4)),
           (slice(0, 1), slice(1, 3), slice(None)), (slice(0, 2), slice(None), slice(None)),
           (slice(None, None, 2),), (0,), (Ellipsis,)]


def placements(shape: tuple[int, ...], world: int) -> list[Shard | Replicate]:
    return [Replicate()] + [placement_of(shape, world, d)[0] for d in range(len(shape))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("world", [2, 3])
def test_runs_pick_what_the_id_path_picks(shape: tuple[int, ...], world: int) -> None:
    taken = 0
    for p in placements(shape, world):
        for index in INDEXES:
            if len(index) > len(shape):
                continue
            sel = region_ids(shape, index)
            value = torch.arange(sel.numel(), dtype=torch.float64).view(sel.shape) + 0.5
            for rank in range(world):
                fast = local_run(shape, p, world, rank, index)
                if fast is None:
                    continue
                taken += 1
                region, box, vsel, run = fast
                assert region == tuple(sel.shape), (p, index)
                mask, ids = to_local(shape, p, world, rank, sel)
                assert torch.equal(torch.arange(run.start, run.stop), ids), (p, index, rank)
                assert torch.equal(value[vsel].reshape(-1), value[mask]), (p, index, rank)
                part = torch.arange(sharding.numel(sharding.local_shape(shape, p, world, rank)))
                part = part.view(sharding.local_shape(shape, p, world, rank))
                assert torch.equal(part[box].reshape(-1), part.reshape(-1)[run]), (p, index)
    assert taken > 0


@pytest.mark.parametrize("index", [(slice(None, None, 2),), (0,), (Ellipsis,),
                                   (torch.tensor([0, 1]),), (slice(1, 2.5),)])
def test_other_indexes_take_the_id_path(index: tuple) -> None:
    assert local_run((4, 6), Shard(0), 2, 0, index) is None


def test_whole_tensors_and_whole_rows_take_runs() -> None:
    # The whole tensor on any placement; whole rows of a Shard(0) or replicated tensor.
    for p in [Shard(0), Shard(1), Replicate()]:
        for rank in range(2):
            assert local_run((8, 6), p, 2, rank, ()) is not None
            assert local_run((8, 6), p, 2, rank, (slice(0, 8),)) is not None
    assert local_run((8, 6), Shard(0), 2, 1, (slice(2, 7),))[3] == slice(0, 18)
    assert local_run((8, 6), Replicate(), 2, 1, (slice(2, 7),))[3] == slice(12, 42)
    # Columns of a Shard(1) part over several rows are not one run.
    assert local_run((8, 6), Shard(1), 2, 0, (slice(None), slice(0, 2))) is None
