"""One rank of a 2-rank torch.distributed client job (gloo, 127.0.0.1) that moves DTensors in
and out of a served model; started by tests/integration/test_dtensor.py with torchrun's
environment variables. Exits 0 when every check passed; prints one `RESULT <json>` line.

    python _dtensor_job.py TARGET MODEL SCENARIO   (SCENARIO: pull | push | badpush)
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import paramhub
from paramhub.errors import ParamhubError


#: Pulls of the "torn" scenario.
TORN_PULLS = 30


def layouts(ndim: int) -> list[list]:
    """The placements tried for a tensor of `ndim` dims."""
    out: list[list] = [[Shard(0)], [Replicate()]]
    if ndim >= 2:
        out.append([Shard(1)])
    return out


def new_state(reference: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The same new values on every rank (seeded by step)."""
    g = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in reference.items()}


def whole(c: paramhub.Client, model: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model, each read whole."""
    return {t.name: c.get_tensor(model, t.name)[0] for t in c.describe_model(model).tensors}


def main() -> int:
    target, model, scenario = sys.argv[1:4]
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    result: dict = {"rank": rank}
    with paramhub.connect(target, timeout=60) as c:
        full = whole(c, model)
        if scenario == "pull":
            checked = 0
            for name, t in full.items():
                for placements in layouts(t.dim()):
                    d = c.get_dtensor(model, name, mesh, placements)
                    assert isinstance(d, DTensor) and tuple(d.shape) == tuple(t.shape), name
                    assert d.placements == tuple(placements), (name, d.placements)
                    want = distribute_tensor(t, mesh, placements).to_local()
                    assert torch.equal(d.to_local(), want), (name, placements)
                    assert torch.equal(d.full_tensor(), t), (name, placements)
                    checked += 1
            plan = {n: [Shard(1)] if t.dim() >= 2 else [Replicate()] for n, t in full.items()}
            pulled, version = c.pull_dtensors(model, mesh, plan)
            assert set(pulled) == set(full)
            for name, d in pulled.items():
                assert torch.equal(d.full_tensor(), full[name]), name
            result.update(checked=checked, version=version)
        elif scenario == "torn":
            # A writer fills the whole model with one value per version while we pull: each
            # pull must hold one value everywhere, across both ranks' regions.
            plan = {n: [Shard(1)] if t.dim() >= 2 else [Shard(0)] for n, t in full.items()}
            seen, torn = set(), 0
            for _ in range(TORN_PULLS):
                try:
                    pulled, version = c.pull_dtensors(model, mesh, plan)
                except ParamhubError as e:
                    assert e.reason == "DTENSOR_PULL_TORN", e.reason
                    torn += 1
                    continue
                values = {float(v) for d in pulled.values() for v in d.full_tensor().unique()}
                assert len(values) == 1, (version, sorted(values))
                seen |= values
            result.update(distinct=len(seen), torn=torn)
        elif scenario in ("push", "badpush"):
            state = new_state(full, 0)
            if scenario == "badpush":
                first = next(iter(state))
                state[first] = torch.zeros(state[first].shape[0] + 2, *state[first].shape[1:])
            dstate = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in state.items()}
            try:
                result["versions"] = c.push_dtensors(model, dstate)
            except ParamhubError as e:
                result.update(error=type(e).__name__, reason=e.reason)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
