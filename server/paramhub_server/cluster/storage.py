"""Each rank's durable copy of its parts of the sharded models (torch and files only).

    DATA_DIR/rank-{r}/sharded/{model}/
        meta.json              spec, sharding plan, model version, each storage's version
                               (the snapshot's)
        {group}-{version}.safetensors   this rank's part of one storage
        log.bin                records since the snapshot: [8-byte length][safetensors]

A record is a safetensors blob whose metadata says what it is (`record`):

    prepare   a write's part on this rank, before the ranks vote: the changed elements' ids and
              new values, the write's id (the model version it makes), the new versions
    commit    the decision for the prepared write `write` (no tensors)
    abort     the prepared write `write` is dropped (written when recovery resolves it so)
    (none)    a committed write in one record -- what this code wrote before prepares were
              logged, and what `append` still writes: replayed as committed

A prepare is fsynced before the rank votes, a commit before it confirms (and rank 0
acknowledges only after every rank confirmed). Replay applies a prepare only when its commit
follows; a prepare left without one at the end of the log is *in doubt* (`replay` returns it)
and cluster/commit.py resolves it with the other ranks. A prepare followed by another prepare
was refused by the vote and is skipped. A log larger than the rank's part is folded into a new
snapshot after a commit (never while a prepare is open).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from paramhub.common import pb
from paramhub_server.cluster.sharding import (FSDP, ShardedModel, contiguous_strides,
                                              entries_of, parse_plan, skeleton_of)

#: Each rank's log of committed writes to one sharded model (beside its snapshot files).
LOG_NAME = "log.bin"


def snapshot(root: Path, m: ShardedModel, groups: Sequence[int]) -> None:
    """Writes the given parts, then the metadata naming their versions; each file is
    fsynced and renamed into place, so a crash leaves the old or the new file."""
    from safetensors.torch import save_file

    d = root / m.id
    d.mkdir(parents=True, exist_ok=True)
    for g in groups:
        e = m.entries[g]
        tmp = d / f".{g}.tmp"
        save_file({"t": e.local.contiguous()}, str(tmp))
        fsync(tmp)
        os.replace(tmp, d / f"{g}-{e.version}.safetensors")
    meta = {"spec": base64.b64encode(m.spec.SerializeToString()).decode(), "shard": m.plan,
            "version": m.version, "versions": [e.version for e in m.entries]}
    tmp = d / ".meta.tmp"
    tmp.write_text(json.dumps(meta))
    fsync(tmp)
    os.replace(tmp, d / "meta.json")
    fsync(d)
    # The log's records are in the snapshot now, and older generations are garbage once
    # the metadata names the new ones.
    (d / LOG_NAME).unlink(missing_ok=True)
    keep = {f"{e.group}-{e.version}.safetensors" for e in m.entries}
    for p in d.glob("*.safetensors"):
        if p.name not in keep:
            p.unlink(missing_ok=True)

#: group -> [(flat ids into this rank's part, their new values)], in write order. The ids may
#: be a slice (a contiguous run, e.g. a whole part): logged as its two bounds.
Staged = dict[int, list[tuple[torch.Tensor | slice, torch.Tensor]]]
#: What the writers take (read only, so a dict of lists of (tensor, tensor) is one too).
Changes = Mapping[int, Sequence[tuple[torch.Tensor | slice, torch.Tensor]]]


@dataclass
class Prepared:
    """A prepared write read back from the log: this rank's changes and the versions it
    makes (`write` is the model version after it, the write's id)."""

    write: int
    versions: dict[int, int]
    staged: Staged


def append(root: Path, m: ShardedModel, staged: Changes) -> None:
    """Appends one committed write (this rank's changed elements and the new versions, already
    applied to `m`) as one record, fsynced; once the log outgrows the rank's part, it is folded
    into a new snapshot. (A write that spans ranks uses `log_prepare` + `log_commit` instead,
    so that a crash between two ranks' commits can be resolved.)"""
    _write(root, m, _encode(staged, {"model_version": str(m.version), "versions": json.dumps(
        {str(g): m.entries[g].version for g in staged})}))
    maybe_fold(root, m)


def log_prepare(root: Path, m: ShardedModel, staged: Changes, write: int,
                versions: dict[int, int]) -> None:
    """Logs this rank's part of write `write` (not applied yet), fsynced: after this the rank
    can apply it at recovery if another rank committed it."""
    _write(root, m, _encode(staged, {"record": "prepare", "write": str(write),
                                     "versions": json.dumps(
                                         {str(g): v for g, v in versions.items()})}))


def log_commit(root: Path, m: ShardedModel, write: int) -> None:
    """Logs the decision to commit the prepared write `write`, fsynced."""
    _write(root, m, _encode({}, {"record": "commit", "write": str(write)}))


def log_abort(root: Path, m: ShardedModel, write: int) -> None:
    """Logs that the prepared write `write` is dropped, fsynced."""
    _write(root, m, _encode({}, {"record": "abort", "write": str(write)}))


def maybe_fold(root: Path, m: ShardedModel) -> None:
    """Folds the log into a new snapshot once it outgrows this rank's part (call only when no
    prepare is open)."""
    path = root / m.id / LOG_NAME
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size > max(m.local_bytes(), 1 << 20):
        snapshot(root, m, [e.group for e in m.entries])


def apply(m: ShardedModel, staged: Changes, versions: dict[int, int], model_version: int
          ) -> None:
    """Applies a write's changes to this rank's parts and sets the versions it makes."""
    for g, changes in staged.items():
        flat = m.entries[g].local.view(-1)
        for ids, vals in changes:
            flat[ids] = vals
    for g, v in versions.items():
        m.entries[g].version = v
    m.version = model_version


def _encode(staged: Changes, meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for g, changes in staged.items():
        for i, (ids, vals) in enumerate(changes):
            if isinstance(ids, slice):
                tensors[f"{g}.{i}.run"] = torch.tensor([ids.start, ids.stop], dtype=torch.int64)
            else:
                tensors[f"{g}.{i}.ids"] = ids.contiguous()
            tensors[f"{g}.{i}.vals"] = vals.contiguous()
    return save(tensors, metadata=meta)


def _write(root: Path, m: ShardedModel, record: bytes) -> None:
    path = root / m.id / LOG_NAME
    with open(path, "ab") as f:
        f.write(len(record).to_bytes(8, "little") + record)
        f.flush()
        os.fsync(f.fileno())


def _staged(raw: bytes) -> Staged:
    from safetensors.torch import load

    tensors = load(raw)
    out: Staged = {}
    for key in sorted((k for k in tensors if k.endswith(".vals")),
                      key=lambda k: tuple(int(x) for x in k.split(".")[:2])):
        stem = key[:-len(".vals")]
        run = tensors.get(stem + ".run")
        ids = slice(int(run[0]), int(run[1])) if run is not None else tensors[stem + ".ids"]
        out.setdefault(int(key.split(".")[0]), []).append((ids, tensors[key]))
    return out


def replay(d: Path, m: ShardedModel) -> Prepared | None:
    """Applies the log's committed records newer than the snapshot; returns the prepared write
    left in doubt at its end (no commit or abort after it), or None. A torn last record (a
    crash while it was written: never confirmed, never acknowledged) ends the replay."""
    path = d / LOG_NAME
    if not path.exists():
        return None
    data = path.read_bytes()
    pos = 0
    open_: tuple[int, dict[int, int], bytes] | None = None
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 8], "little")
        if pos + 8 + size > len(data):
            break
        raw = data[pos + 8:pos + 8 + size]
        pos += 8 + size
        meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__",
                                                                             {})
        kind = meta.get("record")
        if kind is None:  # one committed write (the format before prepares were logged)
            if int(meta["model_version"]) > m.version:
                apply(m, _staged(raw), {int(g): v for g, v in
                                        json.loads(meta["versions"]).items()},
                      int(meta["model_version"]))
            continue
        write = int(meta["write"])
        if kind == "prepare":
            # A prepare before this one without a commit was refused by the vote.
            open_ = (write, {int(g): v for g, v in json.loads(meta["versions"]).items()}, raw)
        elif kind == "commit" and open_ is not None and open_[0] == write:
            if write > m.version:
                apply(m, _staged(open_[2]), open_[1], write)
            open_ = None
        elif kind == "abort" and open_ is not None and open_[0] == write:
            open_ = None
    if open_ is None or open_[0] <= m.version:
        return None
    return Prepared(open_[0], open_[1], _staged(open_[2]))


def recover(root: Path, world: int, mesh: DeviceMesh,
            in_doubt: dict[str, Prepared] | None = None) -> dict[str, ShardedModel]:
    """Every sharded model this rank's directory holds: its snapshot, then its log's committed
    writes. Each model's write left in doubt at the end of its log goes into `in_doubt`."""
    from safetensors.torch import load_file

    models: dict[str, ShardedModel] = {}
    if not root.exists():
        return models

    for d in sorted(root.iterdir()):
        meta_path = d / "meta.json"
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        spec = pb.ModelSpec.FromString(base64.b64decode(meta["spec"]))
        skeleton = skeleton_of(spec)
        plan = meta.get("shard", FSDP)  # (directories written before plans: "fsdp")
        entries = entries_of(skeleton, world, parse_plan(plan))
        for e, v in zip(entries, meta["versions"]):
            e.version = v
            local = load_file(str(d / f"{e.group}-{v}.safetensors"))["t"]
            e.dt = DTensor.from_local(local, mesh, [e.placement], run_check=False,
                                      shape=torch.Size(e.shape),
                                      stride=contiguous_strides(e.shape))
        m = ShardedModel(d.name, spec, entries, version=meta["version"], skeleton=skeleton,
                         plan=plan)
        pending = replay(d, m)
        if pending is not None and in_doubt is not None:
            in_doubt[m.id] = pending
        models[m.id] = m
    return models



def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
