"""A cluster rank's log (cluster/storage.py): prepares count only once committed, a prepare
left open is returned in doubt, a refused prepare is superseded, aborts drop, torn records end
the replay, and logs in the format written before prepares were logged still replay."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import Replicate

from paramhub.common import pb
from paramhub_server.cluster import storage
from paramhub_server.cluster.sharding import PARAMETER, Entry, ShardedModel


class _Part:
    """This rank's part, standing in for the DTensor whose local tensor it is."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def to_local(self) -> torch.Tensor:
        return self.t


def model(root: Path) -> ShardedModel:
    """A one-tensor model (4 x 3 zeros, versions 1) with its directory under `root`."""
    e = Entry(0, ["w"], PARAMETER, torch.float32, (4, 3), Replicate())
    e.dt = _Part(torch.zeros(4, 3))  # type: ignore[assignment]
    m = ShardedModel("m", pb.ModelSpec(), [e])
    (root / m.id).mkdir(parents=True, exist_ok=True)
    return m


def write(value: float, ids: torch.Tensor | slice) -> storage.Staged:
    n = ids.stop - ids.start if isinstance(ids, slice) else ids.numel()
    return {0: [(ids, torch.full((n,), value))]}


def test_prepare_counts_once_committed(tmp_path: Path) -> None:
    m = model(tmp_path)
    storage.log_prepare(tmp_path, m, write(1.0, torch.tensor([0, 5])), 2, {0: 2})
    storage.log_commit(tmp_path, m, 2)
    # A whole-part write is logged as one run of ids.
    storage.log_prepare(tmp_path, m, write(3.0, slice(6, 12)), 3, {0: 3})
    storage.log_commit(tmp_path, m, 3)
    storage.log_prepare(tmp_path, m, write(9.0, torch.tensor([1])), 4, {0: 4})  # no commit
    fresh = model(tmp_path)
    pending = storage.replay(tmp_path / "m", fresh)
    expected = torch.zeros(12)
    expected[[0, 5]] = 1.0
    expected[6:12] = 3.0
    assert torch.equal(fresh.entries[0].local.view(-1), expected)
    assert (fresh.version, fresh.entries[0].version) == (3, 3)
    # The last prepare is in doubt: returned, not applied.
    assert pending is not None and (pending.write, pending.versions) == (4, {0: 4})
    (ids, vals), = pending.staged[0]
    assert torch.equal(ids, torch.tensor([1])) and torch.equal(vals, torch.tensor([9.0]))


def test_refused_and_aborted_prepares_are_dropped(tmp_path: Path) -> None:
    m = model(tmp_path)
    storage.log_prepare(tmp_path, m, write(7.0, torch.tensor([0])), 2, {0: 2})  # refused
    storage.log_prepare(tmp_path, m, write(2.0, torch.tensor([1])), 2, {0: 2})
    storage.log_commit(tmp_path, m, 2)
    storage.log_prepare(tmp_path, m, write(5.0, torch.tensor([2])), 3, {0: 3})
    storage.log_abort(tmp_path, m, 3)  # resolved as dropped
    fresh = model(tmp_path)
    assert storage.replay(tmp_path / "m", fresh) is None
    assert fresh.entries[0].local.view(-1)[:3].tolist() == [0.0, 2.0, 0.0]
    assert fresh.version == 2


def test_torn_last_record_ends_the_replay(tmp_path: Path) -> None:
    m = model(tmp_path)
    storage.log_prepare(tmp_path, m, write(1.0, torch.tensor([0])), 2, {0: 2})
    storage.log_commit(tmp_path, m, 2)
    storage.log_prepare(tmp_path, m, write(4.0, torch.tensor([3])), 3, {0: 3})
    log = tmp_path / "m" / storage.LOG_NAME
    log.write_bytes(log.read_bytes()[:-10])  # the crash was in the middle of the prepare
    fresh = model(tmp_path)
    assert storage.replay(tmp_path / "m", fresh) is None
    assert fresh.entries[0].local.view(-1)[[0, 3]].tolist() == [1.0, 0.0]


def test_logs_of_the_earlier_format_replay(tmp_path: Path) -> None:
    """append() writes the record format from before prepares were logged (one committed
    write); a log of such records, even followed by new ones, replays."""
    m = model(tmp_path)
    m.entries[0].local.view(-1)[[2, 4]] = 6.0
    m.entries[0].version, m.version = 2, 2
    storage.append(tmp_path, m, write(6.0, torch.tensor([2, 4])))
    storage.log_prepare(tmp_path, m, write(8.0, torch.tensor([4])), 3, {0: 3})
    storage.log_commit(tmp_path, m, 3)
    fresh = model(tmp_path)
    assert storage.replay(tmp_path / "m", fresh) is None
    assert fresh.entries[0].local.view(-1)[[2, 4]].tolist() == [6.0, 8.0]
    assert (fresh.version, fresh.entries[0].version) == (3, 3)
