"""Durability under --data-dir: WAL + snapshots survive restarts and kill -9; checkpoints."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import paramhub
from paramhub import _spec
from paramhub.common import spec as plain_spec
from paramhub.errors import (AlreadyExistsError, ConflictError, FailedPreconditionError,
                             InvalidArgumentError, NotFoundError, UnavailableError)
from paramhub.common import pb
from paramhub_server.app import build_server


def _create(client: paramhub.Client, model_id: str, module: nn.Module, seed: int = 0) -> None:
    client.create_model_from_spec(model_id, _spec.spec_from_module(module), seed=seed)


def _restart(server, settings):
    server.stop(grace=None)
    return build_server(settings)


# --------------------------------------------------------------------------- restart

def test_models_writes_versions_and_request_ids_survive_a_restart(settings):
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
            _create(c, "m", net)
            c.set_slice("m", "0.weight", (slice(0, 2), 1), torch.tensor([5.0, 6.0]))
            c.set_slice("m", "0.bias", None, 1.0, "add", request_id="add-once")
            c.apply_init("m", "zeros_", [pb.InitTarget(parameter="2.bias")])
            with c.batch("m"):
                c.set_slice("m", "2.weight", None, 0.5)
                c.set_slice("m", "1.running_mean", None, 2.0, kind="buffers")
            c.set_training("m", False, "1")
            before = {t.name: c.get_tensor("m", t.name, kind="buffers" if t.kind == 2
                                           else "parameters")
                      for t in c.list_parameters("m", include_buffers=True)}
            mv = c.model_version("m")
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            for name, (value, version) in before.items():
                kind = "buffers" if "running" in name or "num_batches" in name else "parameters"
                got, got_v = c.get_tensor("m", name, kind=kind)
                assert torch.equal(got, value) and got_v == version, name
            assert c.model_version("m") == mv
            described = c.describe_model("m")
            assert [m.training for m in described.modules if m.path == "1"] == [False]
            # The remembered request id survived: the retry is not applied again.
            c.set_slice("m", "0.bias", None, 1.0, "add", request_id="add-once")
            assert torch.equal(c.get_tensor("m", "0.bias")[0], before["0.bias"][0])
            # Versions continue.
            assert c.set_slice("m", "0.bias", None, 0.0) == before["0.bias"][1] + 1
            assert c.model_version("m") == mv + 1
    finally:
        srv.stop(grace=None)


def test_deleted_model_stays_deleted_after_restart(settings):
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            _create(c, "gone", nn.Linear(2, 2))
            _create(c, "kept", nn.Linear(2, 2))
            c.delete_model("gone")
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            assert [m.name for m in c.list_models()] == ["models/kept"]
            _create(c, "gone", nn.Linear(2, 2))  # the id is free again
    finally:
        srv.stop(grace=None)


def test_compaction_folds_the_log_and_recovery_uses_the_snapshot(settings):
    settings = dataclasses.replace(settings, compact_bytes=4096)
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            _create(c, "m", nn.Linear(16, 16))  # ~1 KiB snapshot
            for i in range(40):  # each record > 1 KiB: compactions run in the background
                c.set_slice("m", "weight", None, torch.full((16, 16), float(i)))
            r = c.compact("m")
            assert r.model_version == 40 and r.log_bytes >= 0
            c.set_slice("m", "bias", None, 3.0)
            expected = c.get_tensor("m", "weight")
        d = settings.data_dir / "models" / "m"
        snaps = sorted(p.name for p in d.glob("snapshot-*"))
        assert len(snaps) == 1 and snaps[0] != "snapshot-00000001.safetensors"
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            got = c.get_tensor("m", "weight")
            assert torch.equal(got[0], expected[0]) and got[1] == expected[1] == 40
            assert c.get_tensor("m", "bias")[0].tolist() == [3.0] * 16
            assert c.model_version("m") == 41
    finally:
        srv.stop(grace=None)


def test_torn_log_tail_is_ignored_and_truncated(settings):
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            _create(c, "m", nn.Linear(2, 2))
            c.set_slice("m", "bias", None, 1.0)
        srv.stop(grace=None)
        wal = next((settings.data_dir / "models" / "m").glob("wal-*.log"))
        good = wal.stat().st_size
        with open(wal, "ab") as f:  # half a record, as a crash mid-append leaves
            f.write(b"PHW1\x10\x00\x00\x00\xff\xff\x00\x00\x00\x00\x00\x00garbage")
        srv = build_server(settings)
        assert wal.stat().st_size == good
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            value, version = c.get_tensor("m", "bias")
            assert value.tolist() == [1.0, 1.0] and version == 1
            assert c.set_slice("m", "bias", None, 2.0) == 2
    finally:
        srv.stop(grace=None)


def test_registry_refuses_creates_and_deletes_until_recovery_is_done(settings):
    from paramhub_server.core.registry import Registry
    from paramhub_server.core.store import Store

    store = Store(settings.data_dir)
    try:
        reg = Registry(torch.device("cpu"), store=store)
        spec = plain_spec.spec_from_module(nn.Linear(2, 2))  # the core takes dataclasses
        with pytest.raises(UnavailableError) as e:
            reg.create("m", spec, seed=0, device="")
        assert e.value.reason == "STARTING"
        with pytest.raises(UnavailableError):
            reg.delete("m")
        assert reg.list() == [] and not (settings.data_dir / "models" / "m").exists()
        assert reg.recover() == []
        reg.create("m", spec, seed=0, device="")
        assert [m.id for m in reg.list()] == ["m"]
    finally:
        store.close()


# --------------------------------------------------------------------------- checkpoints

def test_checkpoints_create_list_restore_delete(client):
    _create(client, "m", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    client.set_slice("m", "0.weight", None, 1.0)
    info = client.create_checkpoint("m", "one")
    assert info.name == "one" and info.model_version == 1 and info.num_bytes > 0
    client.set_slice("m", "0.weight", None, 9.0)
    client.create_checkpoint("m", "nine")
    assert [c.name for c in client.list_checkpoints("m")] == ["one", "nine"]
    v = client.tensor_version("m", "0.weight")
    r = client.restore_checkpoint("m", "one")
    assert r.model_version == 3
    value, version = client.get_tensor("m", "0.weight")
    assert value.tolist() == [[1.0, 1.0], [1.0, 1.0]] and version == v + 1
    client.delete_checkpoint("m", "one")
    assert [c.name for c in client.list_checkpoints("m")] == ["nine"]


def test_checkpoint_bad_inputs_change_nothing(client, settings):
    _create(client, "m", nn.Linear(2, 2))
    client.create_checkpoint("m", "c")
    before = client.get_tensor("m", "weight")
    with pytest.raises(AlreadyExistsError) as e:
        client.create_checkpoint("m", "c")
    assert e.value.reason == "CHECKPOINT_EXISTS"
    for bad in ("", "../x", ".hidden", "a/b", "x" * 129):
        with pytest.raises(InvalidArgumentError) as e2:
            client.create_checkpoint("m", bad)
        assert e2.value.reason == "BAD_CHECKPOINT_NAME"
    with pytest.raises(NotFoundError) as e3:
        client.restore_checkpoint("m", "missing")
    assert e3.value.reason == "CHECKPOINT_NOT_FOUND"
    with pytest.raises(NotFoundError):
        client.delete_checkpoint("m", "missing")
    with pytest.raises(InvalidArgumentError):
        client.restore_checkpoint("m", "../c")
    with pytest.raises(ConflictError):
        client.restore_checkpoint("m", "c", expected_model_version=99)
    after = client.get_tensor("m", "weight")
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert [c.name for c in client.list_checkpoints("m")] == ["c"]
    assert sorted(p.name for p in (settings.data_dir / "models" / "m" / "checkpoints")
                  .iterdir()) == ["c.safetensors"]


def test_checkpoints_need_a_data_dir(settings):
    srv = build_server(dataclasses.replace(settings, data_dir=None))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            _create(c, "m", nn.Linear(2, 2))
            with pytest.raises(FailedPreconditionError) as e:
                c.create_checkpoint("m", "c")
            assert e.value.code == "FAILED_PRECONDITION" and e.value.reason == "NO_DATA_DIR"
    finally:
        srv.stop(grace=None)


def test_exported_checkpoint_loads_with_safetensors_into_a_local_module(client, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    local = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    local[2].weight = nn.Parameter(torch.randn(3, 4))
    client.create_model_from_spec("m", _spec.spec_from_module(local), values=local.state_dict())
    client.set_slice("m", "0.bias", None, 4.0)
    client.create_checkpoint("m", "c")
    client.set_slice("m", "0.bias", None, 5.0)
    path = client.export_checkpoint("m", tmp_path / "c.safetensors", "c")
    state = safetensors_torch.load_file(path)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    fresh.load_state_dict(state, strict=True)
    assert fresh[0].bias.tolist() == [4.0] * 4
    assert torch.equal(fresh[2].weight, local[2].weight)
    current = safetensors_torch.load_file(client.export_checkpoint("m", tmp_path / "now.st"))
    assert current["0.bias"].tolist() == [5.0] * 4
    assert set(current) == set(local.state_dict())


# --------------------------------------------------------------------------- kill -9

def _spawn(data_dir: Path, fsync: str = "always", *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("paramhub")), "serve", "--port", "0", "--data-dir",
         str(data_dir), "--fsync", fsync, "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the server printed no address"
    return proc, line


@pytest.mark.slow
@pytest.mark.parametrize("fsync,compact", [("always", ""), ("batch", ""), ("always", "4194304")])
def test_kill_9_during_acknowledged_writes_loses_nothing_acknowledged(tmp_path, fsync, compact):
    """Each write is a 2 MiB whole-tensor value (a value file of its own, then its record) and
    a counter; with --compact-bytes 4 MiB a compaction (adopting the value files) runs every
    couple of writes, so the kill also lands inside compactions. After restart nothing
    acknowledged is missing and no value file is left that nothing references."""
    data = tmp_path / "data"
    extra = ("--compact-bytes", compact) if compact else ()
    proc, target = _spawn(data, fsync, *extra)
    acked: list[tuple[int, int]] = []  # (i, version) of acknowledged writes
    in_flight: list[int] = []
    try:
        with paramhub.connect(target, timeout=30) as c:
            c.wait_ready(60)
            _create(c, "m", nn.Linear(512, 512, dtype=torch.float64))  # 2 MiB weight
            c.set_slice("m", "bias", None, 0.0)
            c.set_slice("m", "weight", None, 0.0)
            base = c.model_version("m")
            stop = threading.Event()

            def writer() -> None:
                i = 0
                try:
                    while not stop.is_set():
                        i += 1
                        in_flight.append(i)
                        # A 2 MiB whole-tensor write (a torn one would mix values) and a
                        # counter, in one batch.
                        with c.batch("m", request_id=f"w{i}") as b:
                            c.set_slice("m", "weight", None, torch.full((512, 512), float(i)))
                            c.set_slice("m", "bias", 0, 1.0, "add")
                        acked.append((i, b.model_version))
                except paramhub.ParamhubError:
                    pass  # the server died under us

            t = threading.Thread(target=writer)
            t.start()
            deadline = time.monotonic() + 30
            while len(acked) < 25 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            stop.set()
            t.join(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= 25
    last_i, last_v = acked[-1]
    proc, target = _spawn(data, fsync, *extra)
    try:
        with paramhub.connect(target, timeout=60) as c:
            c.wait_ready(60)
            w, wv = c.get_tensor("m", "weight")
            bias, _ = c.get_tensor("m", "bias")
            n = int(bias[0].item())
            # Every acknowledged write is there; at most the one in flight beyond it, whole.
            assert n in (last_i, last_i + 1)
            assert w.min().item() == w.max().item() == float(n)
            assert bias[1:].abs().sum().item() == 0
            assert c.model_version("m") == base + n
            # Retrying the in-flight write with its request id applies it exactly once.
            with c.batch("m", request_id=f"w{last_i + 1}"):
                c.set_slice("m", "weight", None, torch.full((512, 512), float(last_i + 1)))
                c.set_slice("m", "bias", 0, 1.0, "add")
            assert c.get_tensor("m", "bias")[0][0].item() == last_i + 1
            # Versions continue from where they were.
            assert c.set_slice("m", "bias", 1, 0.0) == wv + (2 if n == last_i else 1)
            assert c.model_version("m") == base + last_i + 2
            from paramhub_server.core.store import check_model_dir

            check = check_model_dir(data / "models" / "m")
            assert not check.corrupt and check.orphans == [], check
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- record formats

_V1_FIXTURE = Path(__file__).parent / "data" / "wal_v1"


def test_log_written_in_record_format_1_replays_and_takes_format_2_appends(settings):
    """A model directory whose log was written in format 1 (b"PHW1"; dtypes as wire enum
    numbers, tensor indices as serialized SetSliceRequest; made with the code of that time:
    masks, index tensors, slices with steps, a batch, train(), an SGD optimizer and a pushed
    step) loads with the values, versions and flags it had; writes after it append format 2
    records to the same log, and both replay after another restart."""
    import json
    import shutil

    from paramhub_server.core.wal import read_records

    shutil.copytree(_V1_FIXTURE / "models", settings.data_dir / "models")
    expected = json.loads((_V1_FIXTURE / "expected.json").read_text())
    wal = settings.data_dir / "models" / "m" / "wal-00000001.log"
    assert {r.version for r in read_records(wal)} == {1}

    def check(c: paramhub.Client, model_version: int, bias0: float | None = None) -> None:
        assert c.model_version("m") == model_version
        for info in c.list_parameters("m", include_buffers=True):
            kind = "parameters" if info.kind == pb.TENSOR_KIND_PARAMETER else "buffers"
            value, version = c.get_tensor("m", info.name, kind=kind)
            want = expected["tensors"][info.name]
            want_value = torch.tensor(want["value"], dtype=value.dtype)
            if bias0 is not None and info.name == "0.bias":
                want_value[0] = bias0
                want["version"] += 1
            assert torch.equal(value, want_value), info.name
            assert version == want["version"] and str(value.dtype) == want["dtype"], info.name
        flags = {m.path: m.training for m in c.describe_model("m").modules}
        assert flags == expected["training"]

    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(60)
            check(c, expected["model_version"])
            # A remembered request id from the format-1 log still answers its retry.
            c.set_slice("m", "0.bias", None, 1.0, "add", request_id="add-once")
            check(c, expected["model_version"])
            c.set_slice("m", "0.bias", (torch.tensor([0]),), torch.tensor([9.0]))
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(60)
            check(c, expected["model_version"] + 1, bias0=9.0)
    finally:
        srv.stop(grace=None)
    records = list(read_records(wal))
    assert [r.version for r in records][-1] == 2 and records[0].version == 1
    new = records[-1].header["changes"][0]
    # Format 2: the index tensor is described in the record, not a serialized API message.
    assert "idx" not in new and new["ix"][0]["dtype"] == "int64" and new["dtype"] == "float32"
