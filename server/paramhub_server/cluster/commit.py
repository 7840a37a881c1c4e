"""A write's commit over the ranks, and the resolution of writes left in doubt by a crash.

The commit (`two_phase`, run by every rank inside a write command):

    1. each rank computes its part of the write beside the live tensors (the prepare) and,
       when it can, logs it (storage.log_prepare, fsynced)
    2. vote: all_gather of "prepared and logged"
    3. every rank logs the commit (fsynced), then applies its part and bumps the versions
    4. confirm: all_gather; only after it does rank 0 acknowledge

So when any rank has logged a commit, every rank has its prepare on disk. A crash can leave
ranks disagreeing (one logged the commit, another died before it): at start (`resolve`) the
ranks exchange their models' versions and open prepares; a prepare whose write some rank has
committed is applied (and its commit logged), any other open prepare is dropped (an abort is
logged). Nothing acknowledged is lost (every rank logged its commit before the confirm), and
nothing half-applied is served.

Test-only crash points: PARAMHUB_CLUSTER_CRASH_AT="point[:n]" makes this rank os._exit(17) at
`point` of its n-th two-phase write since start (n defaults to 1); the points are
"after-prepare-log" (before the vote), "before-commit-log" and "after-commit-log" (before
applying and confirming).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from paramhub.common.errors import InvalidArgumentError, ParamhubError
from paramhub_server.cluster import storage

if TYPE_CHECKING:
    from paramhub_server.cluster.engine import Cluster
    from paramhub_server.cluster.sharding import ShardedModel

log = logging.getLogger(__name__)

#: The environment variable of the test-only crash points.
CRASH_ENV = "PARAMHUB_CLUSTER_CRASH_AT"
CRASH_POINTS = ("after-prepare-log", "before-commit-log", "after-commit-log")

_writes = 0


def _crash_at() -> tuple[str, int] | None:
    raw = os.environ.get(CRASH_ENV, "")
    if not raw:
        return None
    point, _, n = raw.partition(":")
    if point not in CRASH_POINTS:
        raise ValueError(f"{CRASH_ENV}={raw!r}: the points are {', '.join(CRASH_POINTS)}")
    return point, int(n or 1)


_CRASH = _crash_at()


def _fault(point: str) -> None:
    if _CRASH is not None and _CRASH == (point, _writes):
        log.error("%s=%s: exiting here", CRASH_ENV, os.environ.get(CRASH_ENV))
        logging.shutdown()
        os._exit(17)


def two_phase(cluster: Cluster, m: ShardedModel, staged: storage.Changes,
              error: ParamhubError | None) -> None:
    """Commits `staged` (this rank's part of one write on `m`, computed beside the live
    tensors; `error` when this rank refused it) on every rank or on none; every rank calls it
    for the same write. Raises this rank's refusal, or INVALID_ARGUMENT with the reason of
    the first rank that refused (rank 0 answers the caller with its own or that one).
    Bumps the version of every storage in `staged` and the model's, by one."""
    global _writes
    _writes += 1
    write = m.version + 1
    versions = {g: m.entries[g].version + 1 for g in staged}
    if error is None and cluster.root is not None:
        storage.log_prepare(cluster.root, m, staged, write, versions)
        _fault("after-prepare-log")
    votes: list[Any] = [None] * cluster.world
    dist.all_gather_object(votes, None if error is None else error.reason)
    if error is not None:
        raise error
    refused = next((r for r, v in enumerate(votes) if v is not None), None)
    if refused is not None:  # (a slice write is refused by every rank alike)
        raise InvalidArgumentError(f"rank {refused} refused the write ({votes[refused]})",
                                   reason=votes[refused] or "BAD_WRITE",
                                   metadata={"rank": str(refused)})
    if cluster.root is not None:
        _fault("before-commit-log")
        storage.log_commit(cluster.root, m, write)
        _fault("after-commit-log")
    with cluster._lock:  # routed readers (ReadShard) copy under the same lock
        storage.apply(m, staged, versions, write)
    if cluster.root is not None:
        storage.maybe_fold(cluster.root, m)
    cluster._confirm()


def resolve(cluster: Cluster, in_doubt: dict[str, storage.Prepared]) -> None:
    """At start, on every rank (collective): settles each model's write left in doubt, then
    leaves out (loudly) any model the ranks still disagree on."""
    mine = {mid: (m.version, in_doubt[mid].write if mid in in_doubt else None)
            for mid, m in cluster.models.items()}
    every: list[Any] = [None] * cluster.world
    dist.all_gather_object(every, mine)
    for mid, prepared in in_doubt.items():
        m = cluster.models[mid]
        # Committed somewhere: some rank is already at the version this write makes.
        committed = any(theirs.get(mid, (0, None))[0] >= prepared.write for theirs in every)
        assert cluster.root is not None  # in-doubt writes come from a log
        if committed and m.version == prepared.write - 1:
            storage.apply(m, prepared.staged, prepared.versions, prepared.write)
            storage.log_commit(cluster.root, m, prepared.write)
            log.warning("model %s: write %d was in doubt on rank %d and committed by another "
                        "rank: applied", mid, prepared.write, cluster.rank)
        else:
            storage.log_abort(cluster.root, m, prepared.write)
            log.warning("model %s: write %d was in doubt on rank %d and committed by no rank: "
                        "dropped", mid, prepared.write, cluster.rank)
    versions = {mid: (m.version, [e.version for e in m.entries])
                for mid, m in cluster.models.items()}
    every = [None] * cluster.world
    dist.all_gather_object(every, versions)
    for r, theirs in enumerate(every):
        for mid in set(theirs) | set(versions):
            if theirs.get(mid) != versions.get(mid):
                # Not a crash between commits (that is resolved above): a model on some ranks
                # only (a crash during its create) or a lost file. Left out rather than torn.
                log.error("model %s differs between rank %d and rank %d (%s vs %s); "
                          "not served", mid, cluster.rank, r, versions.get(mid),
                          theirs.get(mid))
                cluster.models.pop(mid, None)
