"""The placement math of sharded models (cluster/sharding.py) against torch: each rank's part
of a Shard(d) tensor is the one torch.chunk (DTensor's layout) gives it, for uneven splits too;
the logical -> local id map of any Shard(d) picks exactly those elements; tensor-parallel plans
place tensors as ColwiseParallel / RowwiseParallel do, and bad plans are refused."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard

from paramhub.common.errors import InvalidArgumentError
from paramhub_server.cluster import sharding
from paramhub_server.cluster.sharding import (entries_of, local_bounds, local_shape,
                                              parse_plan, placement_of, region_ids, to_local)

SHAPES = [(7,), (5, 3), (3, 5), (2, 3, 5), (4, 1, 6), (9, 2)]


def parts_by_torch(t: torch.Tensor, dim: int, world: int) -> list[torch.Tensor]:
    """Each rank's part as DTensor's Shard(dim) makes it: torch.chunk, then empty parts for
    the ranks left without a chunk."""
    chunks = list(torch.chunk(t, world, dim=dim))
    empty = list(t.shape)
    empty[dim] = 0
    return chunks + [t.new_empty(empty)] * (world - len(chunks))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_parts_match_torch_chunk(shape: tuple[int, ...], world: int) -> None:
    t = torch.arange(sharding.numel(shape)).view(shape)
    for dim in range(len(shape)):
        p, note = placement_of(shape, world, dim)
        if shape[dim] < world:
            assert p == Replicate() and note.startswith(f"dim {dim} has {shape[dim]} < ")
            continue
        assert p == Shard(dim) and note == ""
        for rank, expected in enumerate(parts_by_torch(t, dim, world)):
            start, stop = local_bounds(shape, p, world, rank)
            assert torch.equal(t.narrow(dim, start, stop - start), expected)
            assert local_shape(shape, p, world, rank) == tuple(expected.shape)


def test_parts_match_dtensor_layout() -> None:
    """The same sizes and offsets as DTensor's own computation of a rank's shard."""
    helper = getattr(Shard, "local_shard_size_and_offset", None) or getattr(
        Shard, "_local_shard_size_and_offset", None)
    if helper is None:
        pytest.skip("this torch has no Shard.local_shard_size_and_offset")
    for n, world in itertools.product(range(0, 12), range(2, 6)):
        for rank in range(world):
            start, stop = sharding.local_rows(n, world, rank)
            assert (stop - start, start) == tuple(helper(n, world, rank)), (n, world, rank)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("world", [2, 3])
def test_to_local_maps_every_index_to_its_owner(shape: tuple[int, ...], world: int) -> None:
    """For a mix of indices, the elements each rank picks from its own part (through
    to_local) reassemble t[index] exactly, for every Shard(d)."""
    t = torch.randn(shape)
    indices = [(), (slice(None, None, 2),), (..., -1), (t > 0,),
               (torch.tensor([0, shape[0] - 1, 0]),)]
    if len(shape) >= 2 and shape[1] >= 2:
        indices += [(slice(1, None), slice(0, 2)), (torch.tensor([1, 0]), torch.tensor([0, 1]))]
    for dim in range(len(shape)):
        p, _ = placement_of(shape, world, dim)
        parts = [t.narrow(dim, *_span(local_bounds(shape, p, world, r))).contiguous()
                 if isinstance(p, Shard) else t for r in range(world)]
        for index in indices:
            sel = region_ids(shape, index)
            out = torch.full(sel.shape, float("nan"))
            owners = torch.zeros(sel.shape, dtype=torch.int64)
            for r in range(world):
                mask, ids = to_local(shape, p, world, r, sel)
                out[mask] = parts[r].reshape(-1)[ids].to(out.dtype)
                owners += mask
            assert torch.equal(out, t[index]), (shape, dim, index)
            # one owner per element (a replicated tensor: every rank)
            assert torch.all(owners == (1 if isinstance(p, Shard) else world))


def _span(bounds: tuple[int, int]) -> tuple[int, int]:
    return bounds[0], bounds[1] - bounds[0]


def _placements(module: nn.Module, plan, world: int = 2) -> dict[str, tuple]:
    return {n: (e.placement, e.note) for e in entries_of(module, world, plan)
            for n in e.names}


def test_tensor_parallel_styles_place_like_torch() -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4),
                          nn.Embedding(12, 4), nn.Linear(4, 1), nn.LayerNorm(1))
    got = _placements(model, {"0": "colwise", "1": "colwise", "3": "rowwise", "4": "rowwise",
                              "5": "colwise"})
    assert got["0.weight"] == (Shard(1), "")
    assert got["1.weight"] == (Shard(0), "") and got["1.bias"] == (Shard(0), "")
    assert got["3.weight"] == (Shard(1), "") and got["3.bias"] == (Replicate(), "")
    assert got["4.weight"] == (Shard(0), "")
    # Linear(4, 1) colwise: one output row for two ranks -> replicated, and said why.
    assert got["5.weight"][0] == Replicate() and "dim 0 has 1 < 2" in got["5.weight"][1]
    assert got["6.weight"] == (Replicate(), "")  # not in the plan
    # fsdp is unchanged: every tensor on dim 0
    assert all(p == Shard(0) for n, (p, _) in _placements(model, "fsdp").items()
               if n not in ("5.weight", "5.bias", "6.weight", "6.bias"))


def test_plan_wildcards_match_per_atom() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                          nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    got = _placements(model, {"*.0": "colwise", "*.1": "rowwise"})
    assert [got[f"{i}.{j}.weight"][0] for i in (0, 1) for j in (0, 1)] == \
        [Shard(0), Shard(1), Shard(0), Shard(1)]


def test_tied_weights_follow_the_named_module() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    entries = entries_of(model, 2, {"0": "rowwise"})
    (w,) = [e for e in entries if "0.weight" in e.names]
    assert w.names == ["0.weight", "2.weight"] and w.placement == Shard(1)
    assert entries_of(model, 2, {"0": "rowwise", "2": "rowwise"})[0].placement == Shard(1)


@pytest.mark.parametrize("plan, words", [
    ({"3": "colwise"}, "does not have"),
    ({"0.weight": "colwise"}, "does not have"),
    ({"*.9": "colwise"}, "does not have"),
    ({"1": "colwise"}, "ReLU"),
    ({"": "rowwise"}, "Sequential"),
    ({"0": "colwise", "2": "rowwise"}, "tied"),
])
def test_bad_plans_are_refused(plan, words) -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(InvalidArgumentError) as e:
        entries_of(model, 2, parse_plan(sharding.plan_text(plan)))
    assert e.value.reason == "BAD_SHARD" and words in str(e.value)


@pytest.mark.parametrize("text", ["", "tp", "[1]", '{"0": "sequence"}', '{"0": 3}', "{bad"])
def test_malformed_plan_text_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        parse_plan(text)
    assert e.value.reason == "BAD_SHARD"


def test_plan_text_round_trips() -> None:
    plan = {"b": "rowwise", "a.*": "colwise"}
    assert parse_plan(sharding.plan_text(plan)) == plan
    assert sharding.plan_text(plan) == '{"a.*":"colwise","b":"rowwise"}'
    assert parse_plan("fsdp") == "fsdp"


def test_sdk_placement_is_a_pair_with_a_note() -> None:
    """describe_placement's values compare as (placement, bounds) pairs, carry .note and
    .dim, and survive copy and pickle."""
    import copy
    import pickle

    from paramhub._cluster import Placement

    p = Placement("shard(1)", (0, 5, 10), "why")
    assert p == ("shard(1)", (0, 5, 10)) and p.dim == 1
    assert Placement("replicate", ()).dim is None
    for q in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert q == p and q.note == "why"
