"""The journal's on-disk layout: big whole-tensor values written once to value files that the log
references and snapshots adopt, per-tensor compaction, the crash points of that layout, `paramhub
wal check|repair` on it, and group commit of fsyncs.

Crash points are reproduced exactly: the core's own steps are run up to the point and the
process state is dropped (as kill -9 would), then a fresh store recovers from the files."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import paramhub
from paramhub.common import spec as _spec
from paramhub_server import cli
from paramhub_server.app import build_server
from paramhub_server.core import store as store_mod
from paramhub_server.core import wal as wal_mod
from paramhub_server.core.model import WriteContext
from paramhub_server.core.registry import Registry
from paramhub_server.core.store import Store
from paramhub_server.core.wal import read_records

MiB = 1 << 20


def _values(d: Path) -> set[str]:
    return {p.name for p in (d / "values").iterdir()}


def _manifest(d: Path) -> dict[str, Any]:
    import json

    from paramhub_server.core import safetensors_io as st

    snap = sorted(d.glob("snapshot-*.safetensors"))[-1]
    _, meta, _ = st.read_header(snap)
    return json.loads(meta["paramhub.state"])["files"]


def test_big_write_is_one_value_file_that_compaction_adopts_per_tensor(settings):
    srv = build_server(settings)
    d = settings.data_dir / "models" / "m"
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("m", nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 1024)))
            created = _manifest(d)
            assert set(created) == {"0.weight", "1.weight"}  # 2 MiB each; biases inline
            assert _values(d) == {e["file"] for e in created.values()}

            net[0].weight.copy_(torch.full((512, 1024), 2.0))
            rec = list(read_records(next(d.glob("wal-*.log"))))[-1]
            (change,) = rec.header["changes"]
            assert "file" in change and len(rec.payload) == 0  # the value is not in the log
            assert _values(d) == {e["file"] for e in created.values()} | {change["file"]}

            c.compact("m")
            adopted = _manifest(d)
            # The written file is adopted, the untouched tensor keeps its file, the replaced
            # one is gone: no value was written again.
            assert adopted["0.weight"]["file"] == change["file"]
            assert adopted["1.weight"]["file"] == created["1.weight"]["file"]
            assert _values(d) == {change["file"], created["1.weight"]["file"]}
            assert sorted(d.glob("snapshot-*"))[-1].stat().st_size < 64 << 10

            # A slice write makes 1.weight's file stale: the next compaction writes that one
            # tensor only.
            c.set_slice("m", "1.weight", (0, slice(0, 4)), 7.0)
            c.compact("m")
            again = _manifest(d)
            assert again["0.weight"]["file"] == change["file"]
            assert again["1.weight"]["file"] not in (created["1.weight"]["file"],)
            assert _values(d) == {change["file"], again["1.weight"]["file"]}
            expected = {k: v.clone() for k, v in net.state_dict().items()}
        srv.stop(grace=None)
        srv = build_server(settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(60)
            got = c.model("m").state_dict()
            assert all(torch.equal(got[k], v) for k, v in expected.items())
    finally:
        srv.stop(grace=None)


# --------------------------------------------------------------------------- crash points


def _open(root: Path, fsync: str = "always") -> Registry:
    reg = Registry(torch.device("cpu"), store=Store(root, fsync=fsync))
    reg.recover()
    return reg


def _state(m: Any) -> tuple[dict[str, torch.Tensor], list[int], int]:
    return ({k: v.clone() for k, v in m.module.state_dict().items()}, list(m.versions),
            m.version)


def _same(a: tuple, b: tuple) -> None:
    assert a[1:] == b[1:]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k


def _model(root: Path) -> tuple[Registry, Any]:
    reg = _open(root)
    spec = _spec.spec_from_module(nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 1024))
                                  .to("meta"))
    reg.create("m", spec, seed=0, device="")
    m = reg.get("m")
    m.set_slice("0.weight", (), "assign", torch.full((512, 1024), 3.0))
    m.set_slice("1.weight", (slice(0, 2),), "add", torch.ones(2, 512))
    return reg, m


def test_crash_between_value_file_and_its_record_loses_nothing_and_leaves_no_file(tmp_path):
    reg, m = _model(tmp_path)
    d = tmp_path / "models" / "m"
    ms = m.journal
    before = _state(m)
    files = _values(d)
    # The first half of a big write: its value file, written and synced; no record yet.
    ms._write_value(torch.full((512, 1024), 9.0))
    assert len(_values(d)) == len(files) + 1
    again = _open(tmp_path)  # the process died here
    _same(_state(again.get("m")), before)
    assert _values(d) == files
    again.close()


@pytest.mark.parametrize("point", ["after_switch", "after_files", "after_rename"])
def test_crash_inside_a_compaction_loses_nothing_and_cleans_up(tmp_path, point):
    """A compaction switches to log gen+1 under the read lock, then writes its value files and
    snapshot without locks, renames it (the commit point) and deletes the old generation: a
    crash after each step recovers every write, those that landed in the new log meanwhile
    included, and leaves no unreferenced file."""
    reg, m = _model(tmp_path)
    d = tmp_path / "models" / "m"
    ms = m.journal
    with m.lock.read():
        prep = ms._start(m)
    # Writes go on during the compaction's I/O, into the new log: a big one (value file) and
    # a small one.
    m.set_slice("1.weight", (), "assign", torch.full((1024, 512), 5.0))
    m.set_slice("0.bias", (3,), "assign", torch.tensor(1.5))
    assert len(list(d.glob("wal-*.log"))) == 2
    if point != "after_switch":
        prep.old_wal.close()
        store_mod._write_prepared(prep, d / "values", True)
        assert list(d.glob("*.tmp"))
    if point == "after_rename":
        os.replace(prep.tmp, prep.path)
    before = _state(m)
    again = _open(tmp_path)  # the process died here
    back = again.get("m")
    _same(_state(back), before)
    assert not list(d.glob("*.tmp"))
    live = {e["file"] for e in _manifest(d).values()}
    for log_path in d.glob("wal-*.log"):
        for rec in read_records(log_path):
            live |= {f for f, _ in store_mod.wal_format.record_files(rec.header)}
    assert _values(d) == live, "a value file nothing references was left"
    # The recovered store compacts and restarts cleanly from here.
    back.set_slice("0.weight", (0, 0), "assign", torch.tensor(-1.0))
    store_mod.compact(back)
    assert len(list(d.glob("wal-*.log"))) == len(list(d.glob("snapshot-*"))) == 1
    after = _state(back)
    again.close()
    last = _open(tmp_path)
    _same(_state(last.get("m")), after)
    last.close()


# --------------------------------------------------------------------------- wal check|repair


def _wal_cmd(*args: str, capsys: Any) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["wal", *args])
    return code, capsys.readouterr().out


def test_wal_check_and_repair_know_value_files(tmp_path, capsys):
    reg, m = _model(tmp_path)
    d = tmp_path / "models" / "m"
    good = _state(m)
    m.set_slice("0.weight", (), "assign", torch.full((512, 1024), 4.0))
    last = m.journal.files["0.weight"]
    reg.close()
    (d / "values" / "0123.bin").write_bytes(b"x" * 10)  # an orphan
    code, out = _wal_cmd("check", str(tmp_path), capsys=capsys)
    assert code == 0 and "1 unreferenced value files" in out

    (d / "values" / last).unlink()  # the value file of the last acknowledged write is lost
    code, out = _wal_cmd("check", str(tmp_path), capsys=capsys)
    assert code == 1 and "CORRUPT" in out and last in out
    reg = _open(tmp_path)  # the model is not loaded (nor cut silently)
    with pytest.raises(paramhub.errors.NotFoundError):
        reg.get("m")
    reg.close()
    assert (d / "wal-00000001.log").exists()
    code, out = _wal_cmd("repair", str(tmp_path), "m", capsys=capsys)
    assert code == 0 and "cut at byte" in out and "removed 1 unreferenced" in out
    assert _wal_cmd("check", str(tmp_path), capsys=capsys)[0] == 0
    reg = _open(tmp_path)
    _same(_state(reg.get("m")), good)  # the writes before the lost file
    reg.close()


# --------------------------------------------------------------------------- group commit


def test_concurrent_writes_share_fsyncs_and_each_is_acknowledged_after_its_own(tmp_path,
                                                                             monkeypatch):
    """8 writers under --fsync always: fewer fdatasyncs than writes, and every write returns
    only after an fdatasync that started once its record was in the file."""
    reg = _open(tmp_path)
    reg.create("m", _spec.spec_from_module(nn.Linear(8, 8).to("meta")), seed=0, device="")
    m = reg.get("m")
    wal = m.journal.wal
    real = os.fdatasync
    covered: list[int] = []  # log bytes each finished fdatasync covered, in order
    lock = threading.Lock()

    def slow_fdatasync(fd: int) -> None:
        size = os.fstat(fd).st_size
        time.sleep(0.02)  # a slow disk: writers pile up behind each sync
        real(fd)
        if fd == wal.fd:
            with lock:
                covered.append(size)

    monkeypatch.setattr(wal_mod.os, "fdatasync", slow_fdatasync)
    acked: dict[str, int] = {}  # request id -> log bytes covered when it returned

    def writer(i: int) -> None:
        for k in range(10):
            rid = f"w{i}-{k}"
            m.set_slice("weight", (i, k % 8), "add", torch.tensor(1.0),
                        ctx=WriteContext(request_id=rid))
            with lock:
                acked[rid] = max(covered, default=0)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    monkeypatch.undo()
    assert len(acked) == 80 and m.version == 80
    assert len(covered) < 80, f"{len(covered)} fdatasyncs for 80 writes: none was shared"
    ends = {r.header["rid"]: r.end for r in read_records(wal.path)}
    for rid, cov in acked.items():
        assert ends[rid] <= cov, f"{rid} was acknowledged before its record was synced"
    reg.close()


def test_reads_go_on_while_a_big_write_is_written_to_disk(tmp_path, monkeypatch):
    """A big whole-tensor write's value file is written and synced before the model's write
    lock is taken: a read of the model completes while that disk write is in progress, and the
    write then lands whole (one value file, no second copy)."""
    reg, m = _model(tmp_path)
    d = tmp_path / "models" / "m"
    in_write, read_done = threading.Event(), threading.Event()
    real = store_mod.write_value_file

    def slow_value_write(*args: Any, **kwargs: Any) -> int:
        in_write.set()
        read_done.wait(20)  # held until the reader got through (or gave up)
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "write_value_file", slow_value_write)
    files = _values(d)
    writer = threading.Thread(target=m.set_slice, args=("0.weight", (), "assign",
                                                        torch.full((512, 1024), 8.0)))
    writer.start()
    assert in_write.wait(20)
    got = m.read("0.weight", ())  # would wait for the writer if it held the lock
    read_done.set()
    writer.join(60)
    monkeypatch.undo()
    assert torch.equal(got.tensor, torch.full((512, 1024), 3.0))  # the value before the write
    assert torch.equal(m.module.state_dict()["0.weight"], torch.full((512, 1024), 8.0))
    assert len(_values(d) - files) == 1 and m.journal.files["0.weight"] in _values(d) - files
    reg.close()
