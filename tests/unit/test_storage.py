"""The storage pieces without a server: safetensors files, the WAL framing, the watch queue."""

from __future__ import annotations

import pytest
import torch

from paramhub_server.core import safetensors_io as st
from paramhub_server.core import watch
from paramhub_server.core.wal import WalWriter, layout, read_records

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
          torch.complex128, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
          torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
          torch.float8_e5m2]


def _sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    return torch.arange(15, dtype=torch.float64).reshape(shape).to(dtype) if dtype not in (
        torch.uint16, torch.uint32, torch.uint64) else torch.arange(15).reshape(shape).to(dtype)


def test_safetensors_round_trip_every_dtype_and_odd_shapes(tmp_path):
    entries = [(f"t.{i}", _sample(d)) for i, d in enumerate(DTYPES)]
    entries += [("scalar", torch.tensor(2.5)), ("empty", torch.empty(0, 3)),
                ("strided", torch.arange(20.0).reshape(4, 5).t())]
    path = tmp_path / "x.safetensors"
    size = st.write_file(path, entries, {"k": "v"})
    assert size == path.stat().st_size
    got, meta = st.read_file(path)
    assert meta == {"k": "v"} and list(got) == [n for n, _ in entries]
    for name, t in entries:
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name].view(torch.uint8) if t.dtype.is_floating_point
                           and t.element_size() == 1 else got[name], t.contiguous()
                           .view(torch.uint8) if t.dtype.is_floating_point
                           and t.element_size() == 1 else t), name


def test_safetensors_file_loads_with_the_reference_reader(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    entries = [(str(d), _sample(d)) for d in DTYPES if d != torch.complex128]
    path = tmp_path / "x.safetensors"
    st.write_file(path, entries, {})
    ref = safetensors_torch.load_file(str(path))
    for name, t in entries:
        assert ref[name].dtype == t.dtype
        assert torch.equal(ref[name].view(torch.uint8), t.view(torch.uint8)), name
    # And the bytes our streaming exporter yields are the same file.
    assert b"".join(st.iter_file_bytes(entries, {}, piece=7)) == path.read_bytes()


def test_safetensors_rejects_truncated_or_malformed_files(tmp_path):
    path = tmp_path / "x.safetensors"
    st.write_file(path, [("a", torch.ones(100))], {})
    data = path.read_bytes()
    for bad in (data[:4], data[:20], data[:-1], b"\xff" * 8 + data[8:]):
        path.write_bytes(bad)
        with pytest.raises(st.FormatError):
            st.read_file(path)


@pytest.mark.parametrize("policy", ["always", "batch", "off"])
def test_wal_round_trip_and_torn_tail(tmp_path, policy):
    path = tmp_path / "wal.log"
    w = WalWriter(path, policy, interval=0.01)
    blob = torch.arange(1000, dtype=torch.int32).view(torch.uint8)
    for i in range(5):
        w.append({"i": i, "data": layout([blob.numel(), 3])}, [blob, b"abc"])
    w.close()
    records = list(read_records(path))
    assert [r.header["i"] for r in records] == list(range(5))
    assert bytes(records[2].payload[-3:]) == b"abc"
    assert torch.equal(torch.frombuffer(records[4].payload, dtype=torch.uint8,
                                        count=blob.numel()).view(torch.int32),
                       torch.arange(1000, dtype=torch.int32))
    full = path.stat().st_size
    good = records[3].end
    # A crash in the middle of record 5 (torn tail) and a flipped bit (CRC) both stop reading.
    path.write_bytes(path.read_bytes()[:full - 10])
    assert [r.header["i"] for r in read_records(path)] == [0, 1, 2, 3]
    data = bytearray(path.read_bytes()[:good])
    data[good - 5] ^= 0x40
    path.write_bytes(bytes(data))
    assert [r.header["i"] for r in read_records(path)] == [0, 1, 2]


def test_wal_rejects_an_unknown_fsync_policy(tmp_path):
    with pytest.raises(ValueError):
        WalWriter(tmp_path / "w.log", "sometimes")


def test_watch_queue_overflow_becomes_one_resync_then_events_continue():
    hub = watch.WatchHub()
    w = hub.subscribe(model_version=7, max_queue=3)
    for v in range(8, 20):
        hub.publish(watch.Event(watch.WRITE, v, op="set_slice.add"))
    kinds = []
    while (ev := w.get(0)) is not None:
        kinds.append((ev.kind, ev.model_version))
    # Each overflow drops what is pending (the last one at 19) and leaves one RESYNC carrying
    # the newest version: the watcher re-reads once, never misses anything silently.
    assert kinds == [(watch.RESYNC, 19)]
    hub.publish(watch.Event(watch.WRITE, 20))
    assert w.get(0).model_version == 20
    w.close()
    assert w.get(0).kind == watch.CLOSED and len(hub) == 0


def test_watch_first_event_is_started_and_order_is_kept():
    hub = watch.WatchHub()
    w = hub.subscribe(model_version=0, max_queue=100)
    for v in range(1, 51):
        hub.publish(watch.Event(watch.WRITE, v))
    events = [w.get(0) for _ in range(51)]
    assert events[0].kind == watch.STARTED
    assert [e.model_version for e in events[1:]] == list(range(1, 51))
    assert w.get(0) is None


@pytest.mark.parametrize("policy", ["always", "off"])
def test_logged_writes_replay_every_index_kind(tmp_path, policy):
    """Writes logged with each index kind (ints, slices with steps, Ellipsis, None: compact JSON
    in the record; tensor indices: serialized IndexItems) come back bit for bit on recovery,
    with their versions."""
    from torch import nn

    from paramhub.common import spec as _spec
    from paramhub_server.core.registry import Registry
    from paramhub_server.core.store import Store

    spec = _spec.spec_from_module(nn.Linear(6, 5).to("meta"))
    writes = [
        ("weight", (2,), torch.tensor(1.5)),
        ("weight", (0, 4), torch.tensor(-2.0)),
        ("weight", (slice(1, None, 2), slice(None, 3)), torch.full((2, 3), 7.0)),
        ("weight", (Ellipsis, slice(0, 6, 5)), torch.arange(10.0).reshape(5, 2)),
        ("bias", (None, slice(None)), torch.arange(5.0).reshape(1, 5)),
        ("weight", (torch.tensor([4, 0]), slice(2, 4)), torch.tensor([[8.0, 9.0], [1.0, 2.0]])),
        ("bias", (torch.tensor([True, False, True, False, True]),), torch.tensor(3.0)),
        ("bias", (), torch.full((5,), 0.25)),
    ]

    def open_registry() -> Registry:
        reg = Registry(torch.device("cpu"), store=Store(tmp_path, fsync=policy))
        reg.recover()
        return reg

    reg = open_registry()
    reg.create("m", spec, seed=0, device="")
    m = reg.get("m")
    expected = {k: v.clone() for k, v in m.module.state_dict().items()}
    for name, index, value in writes:
        m.set_slice(name, index, "assign", value)
        expected[name][index] = value
    versions, model_version = list(m.versions), m.version
    reg.close()

    again = open_registry()
    back = again.get("m")
    for k, v in expected.items():
        assert torch.equal(back.module.state_dict()[k], v), k
    assert (back.versions, back.version) == (versions, model_version)
    again.close()
