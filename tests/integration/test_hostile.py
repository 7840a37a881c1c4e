"""Hostile and unlucky clients, damaged logs and full disks: nothing acknowledged is lost and no
small request makes the server commit a large amount of memory.

Each test drives the real server (in-process on port 0, or `paramhub serve` as a subprocess
where its peak memory is measured) through the real SDK or through raw gRPC messages, the way
a broken or malicious client would send them, and checks the status code and ErrorInfo reason
and that nothing changed.

Server memory is measured as the subprocess's peak RSS (VmHWM in /proc/PID/status, reset
through /proc/PID/clear_refs before each request), so each amplification test fails when the
server allocates what the request announces instead of refusing it first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch import nn

import paramhub
from paramhub import _codec, _shm, _spec
from paramhub.errors import ParamhubError
from paramhub.common import pb
from paramhub.v1 import parameter_service_pb2_grpc as pb_grpc
from paramhub.v1 import tensor_pb2 as tpb
from paramhub_server import cli
from paramhub_server.app import build_server
from paramhub_server.core.wal import _FRAME as WAL_FRAME
from paramhub_server.transport import _GreetingChannel

from _served import MiB, Served, raw as _raw


# ------------------------------------------------------------------------------ helpers


def _refused(answer: Any, code: str, reason: str) -> ParamhubError:
    assert isinstance(answer, ParamhubError), f"accepted: {answer!r}"
    assert (answer.code, answer.reason) == (code, reason), answer
    return answer


def _all_refused_without_growth(s: Any, calls: Any, code: str, reason: str,
                                before: str) -> None:
    """Every answer of `calls()` is refused with (code, reason), the server's RSS barely grew
    meanwhile, and model "m" still has the checksum `before`."""
    answers, growth = s.growth(calls)
    for a in answers:
        _refused(a, code, reason)
    assert growth < SMALL_GROWTH, f"server RSS grew {growth / MiB:.0f} MiB"
    assert s.client.probe("m").stats.checksum_sha256 == before


def _tensor_name(model: str, param: str) -> str:
    return f"models/{model}/parameters/{param}"


def _index(*items: Any) -> list[pb.IndexItem]:
    return _codec.index_to_proto(tuple(items))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    """A factory of `paramhub serve` subprocesses (closed after the test)."""
    started: list[Served] = []

    def start(*flags: str) -> Served:
        s = Served(tmp_path / f"served{len(started)}", *flags)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


#: Peak RSS growth allowed for a refused request (interpreter noise, gRPC buffers).
SMALL_GROWTH = 160 * MiB


def _restart(server: Any, settings: Any) -> Any:
    server.stop(grace=None)
    return build_server(settings)


# ------------------------------------------------------------------------ shared memory


@pytest.mark.parametrize("rows", [None, 1024])
def test_shm_write_is_owned_by_the_server_before_it_is_logged(settings, tmp_path, rows):
    """A client keeps changing its memfd while the server logs and applies a whole-tensor
    shm SetSlice (its value file is written from the memfd and applied from the file) or a
    region's (applied from a private copy): what was served before a restart is exactly what
    recovery brings back, and later acknowledged writes survive."""
    srv = build_server(settings)
    try:
        target = f"127.0.0.1:{srv.port}"
        with paramhub.connect(target, timeout=60) as c:
            c.create_model("m", nn.Sequential(nn.Linear(2048, 2048, bias=True)))
            info = c.transport_info()
            assert info.shm_address, "the shm channel is off"
            link = _shm.ShmLink(info.shm_address)
            stub = pb_grpc.ParameterServiceStub(grpc.insecure_channel(target))
            shape = [2048, 2048] if rows is None else [rows, 2048]
            index = [] if rows is None else _index(slice(0, rows))
            nbytes = shape[0] * 2048 * 4
            for round_ in range(3):
                seg = _shm.create_segment(nbytes)
                values = seg.tensor.view(torch.float32)
                values.fill_(1.0)
                stop = threading.Event()

                def flip() -> None:
                    k = 0
                    while not stop.is_set():
                        values.fill_(float(k % 7))
                        k += 1

                flipper = threading.Thread(target=flip)
                greeted = link.connect()
                socket.send_fds(greeted.conn, [b"F"], [seg.fd])
                flipper.start()
                try:
                    stub.SetSlice(pb.SetSliceRequest(
                        name=_tensor_name("m", "0.weight"), op=pb.SLICE_OP_ASSIGN,
                        index=index, value=tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=shape),
                        shm_token=greeted.token, request_id=f"flip-{round_}"), timeout=60)
                finally:
                    stop.set()
                    flipper.join()
                    greeted.close()
                    seg.close()
                c.set_slice("m", "0.bias", 0, float(round_))  # a later acknowledged write
            before = c.probe("m", include_buffers=True).stats.checksum_sha256
            version = c.describe_model("m").model.version
        srv = _restart(srv, settings)
        with paramhub.connect(target.rsplit(":", 1)[0] + f":{srv.port}", timeout=60) as c:
            c.wait_ready(timeout=60)
            assert c.describe_model("m").model.version == version == 6
            assert c.probe("m", include_buffers=True).stats.checksum_sha256 == before
    finally:
        srv.stop(grace=None)


def test_shm_client_buffer_maps_only_the_result(served):
    """A read into the client's own buffer maps only the result's bytes of its memfd: a sparse
    1 GiB memfd for a 64-byte read does not grow the server's memory."""
    s = served()
    s.client.create_model("m", nn.Linear(4, 4))
    address = s.client.transport_info().shm_address
    link = _shm.ShmLink(address)
    fd = os.memfd_create("big", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 30)  # sparse: no page is allocated yet
    try:
        greeted = link.connect()
        socket.send_fds(greeted.conn, [b"F"], [fd])

        def read() -> Any:
            return _raw(s.channel, "GetTensor", [pb.GetTensorRequest(
                name=_tensor_name("m", "weight"), shm_token=greeted.token,
                shm_client_buffer=True)])

        answer, growth = s.growth(read)
        greeted.close()
    finally:
        os.close(fd)
    assert not isinstance(answer, ParamhubError), answer
    assert growth < SMALL_GROWTH, f"server RSS grew {growth / MiB:.0f} MiB"


# ------------------------------------------------------------------------ damaged logs


def _write_some(target: str, n: int) -> tuple[int, str]:
    with paramhub.connect(target, timeout=60) as c:
        for k in range(n):
            c.set_slice("m", "0.weight", (k // 4, k % 4), float(k + 1))
        return (c.describe_model("m").model.version,
                c.probe("m", include_buffers=True).stats.checksum_sha256)


def _wal(settings: Any) -> Path:
    logs = sorted((settings.data_dir / "models" / "m").glob("wal-*.log"))
    assert len(logs) == 1
    return logs[0]


def _wal_cmd(*args: str, capsys: Any) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["wal", *args])
    return code, capsys.readouterr().out


def test_corrupt_record_mid_log_stops_recovery_and_repair_cuts_it(settings, capsys):
    """A corrupt record followed by intact ones is an error: the model is not loaded and its
    log is left as it is (recovery never silently drops acknowledged writes); `paramhub wal
    check` names it; `paramhub wal repair` cuts the log there, keeping the cut bytes."""
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.create_model("m", nn.Sequential(nn.Linear(4, 4)))
        version, _ = _write_some(f"127.0.0.1:{srv.port}", 6)
        srv.stop(grace=None)
        wal = _wal(settings)
        data = bytearray(wal.read_bytes())
        size = len(data)
        data[size // 2] ^= 0xFF  # a flipped byte inside a middle record
        wal.write_bytes(bytes(data))
        assert _wal_cmd("check", str(settings.data_dir), capsys=capsys)[0] == 1

        srv = build_server(settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(timeout=60)
            with pytest.raises(paramhub.errors.NotFoundError):
                c.describe_model("m")  # not loaded: neither a prefix nor a silent cut
        srv.stop(grace=None)
        assert wal.read_bytes() == bytes(data), "recovery changed a damaged log"

        code, out = _wal_cmd("repair", str(settings.data_dir), "m", capsys=capsys)
        assert code == 0 and "cut at byte" in out
        assert list(wal.parent.glob(wal.name + ".corrupt-*"))
        assert _wal_cmd("check", str(settings.data_dir), capsys=capsys)[0] == 0
        srv = build_server(settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(timeout=60)
            assert 0 < c.describe_model("m").model.version < version
    finally:
        srv.stop(grace=None)


def test_torn_tail_is_dropped_and_later_writes_survive(settings, capsys):
    """Half a record at the end (a crash mid-append) is dropped at recovery, as before."""
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.create_model("m", nn.Sequential(nn.Linear(4, 4)))
        version, checksum = _write_some(f"127.0.0.1:{srv.port}", 3)
        srv.stop(grace=None)
        wal = _wal(settings)
        data = wal.read_bytes()
        _, hlen, plen, _ = WAL_FRAME.unpack(data[:WAL_FRAME.size])
        with open(wal, "ab") as f:  # a copy of the first record, cut short
            f.write(data[:WAL_FRAME.size + hlen + plen - 5])
        code, out = _wal_cmd("check", str(settings.data_dir), capsys=capsys)
        assert code == 0 and "torn tail" in out
        srv = build_server(settings)
        target = f"127.0.0.1:{srv.port}"
        with paramhub.connect(target, timeout=60) as c:
            c.wait_ready(timeout=60)
            assert c.describe_model("m").model.version == version
            assert c.probe("m", include_buffers=True).stats.checksum_sha256 == checksum
        version, checksum = _write_some(target, 2)
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(timeout=60)
            assert c.describe_model("m").model.version == version
            assert c.probe("m", include_buffers=True).stats.checksum_sha256 == checksum
    finally:
        srv.stop(grace=None)


# ------------------------------------------------------------------------ full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs (unmounted after the test); skipped where mounting is impossible."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@contextlib.contextmanager
def _filled(disk: Path, leave: int) -> Iterator[None]:
    """Fills the file system but `leave` bytes; frees them again at exit."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * MiB
        while True:
            try:
                os.write(fd, block)
            except OSError:
                break
        while True:  # the last partial block
            try:
                os.write(fd, b"\0" * 4096)
            except OSError:
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(size - leave, 0))
    finally:
        os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def _disk_full(e: pytest.ExceptionInfo) -> None:
    assert (e.value.code, e.value.reason) == ("RESOURCE_EXHAUSTED", "DISK_FULL"), e.value
    assert e.value.metadata["path"] and int(e.value.metadata["free_bytes"]) >= 0


def test_disk_full_write_answers_disk_full_and_later_writes_survive(settings, small_disk):
    settings = dataclasses.replace(settings, data_dir=small_disk / "data")
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("m", nn.Sequential(nn.Linear(256, 256)))
            before = net[0].weight.data.clone()
            version = c.describe_model("m").model.version
            wal = _wal(settings)
            wal_size = wal.stat().st_size
            with _filled(small_disk, 64 << 10):
                for _ in range(3):  # bigger than what is left, again and again
                    with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
                        c.set_slice("m", "0.weight", (), torch.full((256, 256), 7.0))
                    _disk_full(e)
                assert wal.stat().st_size == wal_size, "half a record was left in the log"
                assert torch.equal(net[0].weight.data, before), "a refused write was applied"
                assert c.describe_model("m").model.version == version
            for k in range(5):  # space is back: writes are acknowledged again
                c.set_slice("m", "0.weight", (k,), float(k))
            expected = net[0].weight.data.clone()
            version = c.describe_model("m").model.version
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(timeout=60)
            assert c.describe_model("m").model.version == version
            assert torch.equal(c.model("m")[0].weight.data, expected)
    finally:
        srv.stop(grace=None)


def test_disk_full_checkpoint_compaction_and_restore_change_nothing(settings, small_disk):
    settings = dataclasses.replace(settings, data_dir=small_disk / "data")
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("m", nn.Sequential(nn.Linear(512, 512)))
            c.create_checkpoint("m", "zero")
            c.set_slice("m", "0.weight", (), 3.0)  # a value file of its own (1 MiB)...
            c.set_slice("m", "0.weight", (0, 0), 5.0)  # ...no longer current: compaction writes
            values = net[0].weight.data.clone()
            version = c.describe_model("m").model.version
            value_files = sorted((settings.data_dir / "models" / "m" / "values").iterdir())
            with _filled(small_disk, 64 << 10):
                with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
                    c.create_checkpoint("m", "full")
                _disk_full(e)
                assert [i.name for i in c.list_checkpoints("m")] == ["zero"]
                with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
                    c.compact("m")
                _disk_full(e)
                with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
                    c.restore_checkpoint("m", "zero")
                _disk_full(e)
                with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
                    c.create_model("other", nn.Sequential(nn.Linear(512, 512)))
                _disk_full(e)
                assert [m.name for m in c.list_models()] == ["models/m"]
                assert _tmp_files(settings.data_dir) == []
                assert sorted(p.name for p in (settings.data_dir / "models").iterdir()) == ["m"]
                assert sorted((settings.data_dir / "models" / "m" / "values").iterdir()) == \
                    value_files, "a failed compaction or restore left a value file behind"
                assert c.describe_model("m").model.version == version
                assert torch.equal(net[0].weight.data, values), "a failed restore applied"
            c.set_slice("m", "0.bias", 0, 1.0)
            expected = c.probe("m", include_buffers=True).stats.checksum_sha256
            version = c.describe_model("m").model.version
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(timeout=60)
            assert c.describe_model("m").model.version == version
            assert c.probe("m", include_buffers=True).stats.checksum_sha256 == expected
            c.restore_checkpoint("m", "zero")  # with space, it works
            assert c.describe_model("m").model.version == version + 1
    finally:
        srv.stop(grace=None)


def test_disk_full_optimizer_step_and_training_forward_change_nothing(settings, small_disk):
    """Steps and training-mode passes change tensors in place before they are logged: on a
    full disk they are refused (DISK_FULL) with parameters, optimizer state, buffers and
    versions unchanged, and go on once space is back."""
    settings = dataclasses.replace(settings, data_dir=small_disk / "data")
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.create_model("m", nn.Sequential(nn.Linear(512, 512)))
            bn = c.create_model("bn", nn.BatchNorm1d(1 << 16))  # 512 KiB of buffers
            c.create_optimizer("m", "SGD", [(["0.weight", "0.bias"], {})],
                               {"lr": 0.1, "momentum": 0.9})
            grads = {"0.weight": torch.ones(512, 512), "0.bias": torch.ones(512)}
            c.push_grads("m", grads, c.describe_model("m").model.version)
            before = c.probe("m", include_buffers=True).stats.checksum_sha256
            state = {k: v.clone() for k, v in c.get_optimizer_state("m")[1].items()}
            version = c.describe_model("m").model.version
            with _filled(small_disk, 64 << 10):
                with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
                    c.push_grads("m", grads, version)
                _disk_full(e)
                with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
                    c.optimizer_step("m")
                _disk_full(e)
                with pytest.raises(paramhub.errors.ResourceExhaustedError) as e:
                    bn(torch.rand(2, 1 << 16))  # training mode: BatchNorm updates its buffers
                _disk_full(e)
                assert c.describe_model("m").model.version == version
                assert c.probe("m", include_buffers=True).stats.checksum_sha256 == before
                assert c.describe_model("bn").model.version == 0
                assert torch.equal(bn.running_mean.data, torch.zeros(1 << 16))
                after = c.get_optimizer_state("m")[1]
                assert state.keys() == after.keys()
                assert all(torch.equal(state[k], after[k]) for k in state)
            c.push_grads("m", grads, version)
            expected = c.probe("m", include_buffers=True).stats.checksum_sha256
            version = c.describe_model("m").model.version
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            c.wait_ready(timeout=60)
            assert c.describe_model("m").model.version == version
            assert c.probe("m", include_buffers=True).stats.checksum_sha256 == expected
    finally:
        srv.stop(grace=None)


# ------------------------------------------------------------------------ amplification


def test_inline_read_of_a_broadcast_index_is_refused_before_it_is_built(served):
    """Index tensors of shapes (N,1) and (1,N) select N x N elements of a 100x100 weight:
    GetTensorInline refuses from the index's shape, without building the region."""
    s = served()
    s.client.create_model("m", nn.Linear(100, 100))
    n = 16384  # a 1 GiB region of float32
    rows = torch.zeros(n, 1, dtype=torch.int64)
    cols = torch.zeros(1, n, dtype=torch.int64)
    answer, growth = s.growth(lambda: _raw(s.channel, "GetTensorInline", [
        pb.GetTensorInlineRequest(name=_tensor_name("m", "weight"), index=_index(rows, cols))]))
    _refused(answer, "RESOURCE_EXHAUSTED", "MESSAGE_TOO_LARGE")
    assert growth < SMALL_GROWTH, f"server RSS grew {growth / MiB:.0f} MiB"


def test_broadcast_index_over_max_tensor_elements_is_refused(served):
    """GetTensor, SetSlice and Probe refuse an index whose region exceeds
    --max-tensor-elements before building it."""
    s = served("--max-tensor-elements", str(1 << 20))
    s.client.create_model("m", nn.Linear(100, 100))
    n = 4096  # 16 M elements
    index = _index(torch.zeros(n, 1, dtype=torch.int64), torch.zeros(1, n, dtype=torch.int64))
    name = _tensor_name("m", "weight")
    before = s.client.probe("m").stats.checksum_sha256

    def calls() -> list[Any]:
        return [_raw(s.channel, "GetTensor", [pb.GetTensorRequest(name=name, index=index)]),
                _raw(s.channel, "SetSlice", [pb.SetSliceRequest(
                    name=name, index=index, op=pb.SLICE_OP_ADD,
                    value=_codec.tensor_to_proto(torch.tensor(1.0)))]),
                _raw(s.channel, "Probe", [pb.ProbeRequest(name=name, index=index)])]

    _all_refused_without_growth(s, calls, "RESOURCE_EXHAUSTED", "TENSOR_TOO_LARGE", before)


def test_announced_upload_larger_than_its_target_is_refused_before_allocating(served):
    """StreamSetSlice, PushGrads and a streamed ApplyBatch write announcing 512 MiB for a
    4x4 weight are refused from the header: nothing allocated, nothing changed."""
    s = served()
    s.client.create_model("m", nn.Linear(4, 4))
    before = s.client.probe("m").stats.checksum_sha256
    big = [1 << 27]  # 512 MiB of float32
    value = tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=big)
    req = pb.SetSliceRequest(name=_tensor_name("m", "weight"), op=pb.SLICE_OP_ASSIGN,
                             value=value)
    chunk = tpb.TensorChunk(header=tpb.TensorHeader(name="weight", dtype=tpb.DTYPE_FLOAT32,
                                                    shape=big), data=b"\0" * 64)

    def calls() -> list[Any]:
        return [
            _raw(s.channel, "StreamSetSlice", [pb.StreamSetSliceRequest(request=req),
                                               pb.StreamSetSliceRequest(data=b"\0" * 64)],
                 stream=True),
            _raw(s.channel, "PushGrads", [
                pb.PushGradsRequest(header=pb.PushGradsHeader(model="models/m")),
                pb.PushGradsRequest(chunk=chunk)], stream=True),
            _raw(s.channel, "ApplyBatch", [
                pb.ApplyBatchRequest(header=pb.ApplyBatchHeader(model="models/m")),
                pb.ApplyBatchRequest(write=pb.BatchWrite(set_slice=req)),
                pb.ApplyBatchRequest(data=b"\0" * 64)], stream=True),
        ]

    _all_refused_without_growth(s, calls, "INVALID_ARGUMENT", "BAD_SHAPE", before)


def test_apply_batch_bytes_are_bounded_as_they_arrive(served):
    """Many oversized values for a 16-byte bias are refused at the first one; many right-size
    values for a weight are refused once the batch holds more than the model plus one
    message (BATCH_TOO_LARGE), not at the end of the stream."""
    s = served("--max-message-bytes", str(8 * MiB))
    s.client.create_model("m", nn.Linear(512, 512))
    before = s.client.probe("m").stats.checksum_sha256

    def messages(name: str, count: int, rows: int) -> Iterator[pb.ApplyBatchRequest]:
        shape = [rows, 512] if name == "weight" else [rows * 512]
        yield pb.ApplyBatchRequest(header=pb.ApplyBatchHeader(model="models/m"))
        data = b"\0" * (rows * 512 * 4)
        for _ in range(count):
            yield pb.ApplyBatchRequest(write=pb.BatchWrite(set_slice=pb.SetSliceRequest(
                name=_tensor_name("m", name), op=pb.SLICE_OP_ASSIGN,
                value=tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=shape, data=data))))

    answer, growth = s.growth(lambda: _raw(s.channel, "ApplyBatch",
                                           messages("bias", 300, 512), stream=True))
    _refused(answer, "INVALID_ARGUMENT", "BAD_SHAPE")
    assert growth < SMALL_GROWTH, f"server RSS grew {growth / MiB:.0f} MiB"
    answer = _raw(s.channel, "ApplyBatch", messages("weight", 40, 512), stream=True)
    _refused(answer, "RESOURCE_EXHAUSTED", "BATCH_TOO_LARGE")
    assert s.client.probe("m").stats.checksum_sha256 == before


def test_forward_output_over_the_message_limit_is_resource_exhausted(served):
    """An output larger than --max-message-bytes is refused from its size before it is
    encoded: RESOURCE_EXHAUSTED (MESSAGE_TOO_LARGE), also past protobuf's 2 GiB."""
    s = served("--max-message-bytes", str(64 * MiB))
    s.client.create_model_from_spec("up", _spec.spec_from_module(
        nn.Upsample(scale_factor=(1, 1024), mode="nearest")))
    x = torch.zeros(1, 1, 1, 1 << 20, dtype=torch.float16)  # 2 MiB in, 2 GiB out
    answer = _raw(s.channel, "Forward", [pb.ForwardRequest(
        model="models/up", args=[_codec.value_to_proto(x)])])
    _refused(answer, "RESOURCE_EXHAUSTED", "MESSAGE_TOO_LARGE")


# ------------------------------------------------------------------------ other hostile input


def test_huge_empty_shape_is_bad_shape(client):
    client.create_model("m", nn.Linear(4, 4))
    channel = grpc.insecure_channel(client.target)
    answer = _raw(channel, "SetSlice", [pb.SetSliceRequest(
        name=_tensor_name("m", "weight"), op=pb.SLICE_OP_ASSIGN,
        value=tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=[0, 2**62, 2**62]))])
    _refused(answer, "INVALID_ARGUMENT", "BAD_SHAPE")
    channel.close()


def test_create_model_refuses_a_key_uploaded_twice(client):
    net = nn.Linear(4, 4)
    spec = _spec.spec_from_module(net)

    def msgs() -> Iterator[pb.CreateModelRequest]:
        yield pb.CreateModelRequest(header=pb.CreateModelHeader(model_id="twice", spec=spec))
        for value in (torch.zeros(4, 4), torch.ones(4, 4)):
            for chunk in _codec.iter_tensor_chunks(value, name="weight"):
                yield pb.CreateModelRequest(chunk=chunk)

    channel = grpc.insecure_channel(client.target)
    _refused(_raw(channel, "CreateModel", msgs(), stream=True), "INVALID_ARGUMENT",
             "DUPLICATE_TENSOR")
    assert [m.name for m in client.list_models()] == []
    channel.close()


_HOLDER = """
import socket, sys
address, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("\\0" + address)
    held.append(s)
    held.append(socket.create_connection(("127.0.0.1", port)))
print("ready", flush=True)
sys.stdin.read()
"""


def test_idle_greeted_connections_cannot_push_clients_off_the_fast_paths(server, target):
    """Another process holds more idle connections than the server keeps pending, on the shm
    socket and on the data port: a client arriving after them still gets shared memory and
    the data channel (the idle ones are evicted, oldest first, per peer)."""
    n = _GreetingChannel.MAX_PENDING + 44
    shm, data = server.transport.shm, server.transport.data
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, shm.address, str(data.port),
                               str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        # Until the server has greeted every one of them (well within the 60 s a greeted
        # connection may wait for its call).
        deadline = time.monotonic() + 20
        while (shm.evicted + data.evicted < 2 * (n - _GreetingChannel.MAX_PER_PEER)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        with paramhub.connect(target, timeout=60) as c:
            c.create_model("m", nn.Sequential(nn.Linear(2048, 2048)))
            moved = shm.sent + shm.received
            c.get_tensor("m", "0.weight")  # 16 MiB: shared memory
            assert shm.sent + shm.received == moved + 1, "the read fell back to gRPC"
        with paramhub.connect(target, timeout=60, shm=False) as c:
            sent = data.sent
            c.get_tensor("m", "0.weight")
            assert data.sent == sent + 1, "the read fell back to gRPC"
        assert shm.pending <= _GreetingChannel.MAX_PER_PEER + 1
        assert data.pending <= _GreetingChannel.MAX_PER_PEER + 1
    finally:
        holder.stdin.close()
        holder.wait(30)
        holder.stdout.close()
