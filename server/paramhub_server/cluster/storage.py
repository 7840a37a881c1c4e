"""Each rank's durable copy of its parts of the sharded models (torch and files only).

    DATA_DIR/rank-{r}/sharded/{model}/
        meta.json              spec, sharding plan, model version, each storage's version
                               (the snapshot's)
        {group}-{version}.safetensors   this rank's part of one storage
        log.bin                committed writes since the snapshot: [8-byte length][safetensors
                               of the changed elements' ids and values, versions in metadata]

A write's record is fsynced before the rank confirms the write (and rank 0 acknowledges only
after every rank confirmed). A log larger than the rank's part is folded into a new snapshot.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
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

def append(root: Path, m: ShardedModel,
           staged: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Appends one committed write (this rank's changed elements and the new versions)
    to the model's log on this rank, fsynced before the rank confirms; once the log
    outgrows the rank's part, it is folded into a new snapshot."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for g, changes in staged.items():
        for i, (ids, vals) in enumerate(changes):
            tensors[f"{g}.{i}.ids"] = ids.contiguous()
            tensors[f"{g}.{i}.vals"] = vals.contiguous()
    meta = {"model_version": str(m.version),
            "versions": json.dumps({str(g): m.entries[g].version for g in staged})}
    record = save(tensors, metadata=meta)
    path = root / m.id / LOG_NAME
    with open(path, "ab") as f:
        f.write(len(record).to_bytes(8, "little") + record)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    if size > max(m.local_bytes(), 1 << 20):
        snapshot(root, m, [e.group for e in m.entries])

def replay(d: Path, m: ShardedModel) -> int:
    """Applies the log's records newer than the snapshot; a torn last record (a crash
    while it was written: never confirmed, never acknowledged) ends the replay."""
    from safetensors.torch import load

    path = d / LOG_NAME
    if not path.exists():
        return 0
    data = path.read_bytes()
    pos = n = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos:pos + 8], "little")
        if pos + 8 + size > len(data):
            break
        raw = data[pos + 8:pos + 8 + size]
        pos += 8 + size
        meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__",
                                                                             {})
        if int(meta["model_version"]) <= m.version:
            continue
        tensors = load(raw)
        for key in sorted((k for k in tensors if k.endswith(".ids")),
                          key=lambda k: tuple(int(x) for x in k.split(".")[:2])):
            g = int(key.split(".")[0])
            m.entries[g].local.view(-1)[tensors[key]] = tensors[key[:-4] + ".vals"]
        for g, v in json.loads(meta["versions"]).items():
            m.entries[int(g)].version = v
        m.version = int(meta["model_version"])
        n += 1
    return n

def recover(root: Path, world: int, mesh: DeviceMesh) -> dict[str, ShardedModel]:
    """Every sharded model this rank's directory holds: its snapshot, then its log."""
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
        replay(d, m)
        models[m.id] = m
    return models



def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
