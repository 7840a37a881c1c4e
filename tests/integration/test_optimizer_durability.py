"""Durability of training state under --data-dir: the optimizer (configuration + torch's state
tensors) and the training mode survive restarts and kill -9, are folded in by compaction, and are
saved in and restored from checkpoints.

"Bit for bit" comparisons are against a second server of the same kind on the same machine that
ran the same steps without a restart; the comparison with local torch.optim is within float
tolerance (the server's backward pass may reduce in another order).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramhub
from paramhub.errors import InvalidArgumentError, NotFoundError
from paramhub_server.app import build_server
from paramhub_server.core import safetensors_io as st

sys.path.insert(0, str(Path(__file__).parent))
from _ps_worker import batch  # noqa: E402

CASES = [
    ("SGD", {"lr": 0.05, "momentum": 0.9}, "autograd"),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99)}, "push"),
]
IDS = ["sgd-momentum-autograd", "adam-push_grads"]


def seed_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def values_of(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.fetch() for n, p in net.named_parameters()}


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    """Optimizer state_dicts equal bit for bit (tensors) and exactly (options)."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys(), i
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)


def assert_values_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def train_steps(net: nn.Module, opt: paramhub.optim.Optimizer, how: str, steps: range) -> None:
    """Steps `steps` of the seed MLP's regression task, by remote autograd + opt.step() or by
    pull / local backward / push_grads (async: one step per push)."""
    for step in steps:
        X, y = batch(0, step, 16)
        if how == "autograd":
            opt.zero_grad()
            F.mse_loss(net(X), y).backward()
            opt.step()
        else:
            local, version = net.pull(return_version=True)
            F.mse_loss(local(X), y).backward()
            r = net.push_grads(local, version)
            assert r.outcome == "applied", r


def torch_reference(name: str, kwargs: dict, steps: int) -> tuple[nn.Module,
                                                                  torch.optim.Optimizer]:
    local = seed_mlp()
    lopt = getattr(torch.optim, name)(local.parameters(), **kwargs)
    for step in range(steps):
        X, y = batch(0, step, 16)
        lopt.zero_grad()
        F.mse_loss(local(X), y).backward()
        lopt.step()
    return local, lopt


# --------------------------------------------------------------------------- subprocess server

class Serve:
    """`paramhub serve --port 0 --data-dir X` as a user starts it."""

    def __init__(self, data_dir: Path, fsync: str = "always") -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("paramhub")), "serve", "--port", "0",
             "--data-dir", str(data_dir), "--fsync", fsync, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.target = self.proc.stdout.readline().strip()
        assert self.target, "the server printed no address"

    def kill_9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _connect(target: str) -> paramhub.Client:
    c = paramhub.connect(target, timeout=60)
    c.wait_ready(60)
    return c


@pytest.mark.parametrize("name,kwargs,how", CASES, ids=IDS)
def test_optimizer_state_survives_kill_9_and_training_continues_bit_for_bit(
        tmp_path, name, kwargs, how) -> None:
    n, m = 6, 5
    # The reference: the same N + M steps on a server that is never restarted.
    ref = Serve(tmp_path / "ref")
    try:
        with _connect(ref.target) as c:
            net = c.create_model("mlp", seed_mlp())
            opt = getattr(paramhub.optim, name)(net.parameters(), **kwargs)
            train_steps(net, opt, how, range(n + m))
            ref_values, ref_state = values_of(net), opt.state_dict()
            ref_steps = opt.steps  # as of state_dict() (push_grads does not refresh it)
    finally:
        ref.stop()

    data = tmp_path / "data"
    srv = Serve(data)
    try:
        with _connect(srv.target) as c:
            net = c.create_model("mlp", seed_mlp())
            opt = getattr(paramhub.optim, name)(net.parameters(), **kwargs)
            train_steps(net, opt, how, range(n))
            before_state, before_values = opt.state_dict(), values_of(net)
            before_version = c.model_version("mlp")
            assert opt.steps == n
            srv.kill_9()  # right after the last acknowledged step: no clean shutdown
    finally:
        srv.stop()
    srv = Serve(data)
    try:
        with _connect(srv.target) as c:
            net = c.model("mlp")
            opt = paramhub.optim.get(net)  # the optimizer came back with the model
            assert type(opt).__name__ == name and opt.steps == n
            assert_state_dicts_equal(opt.state_dict(), before_state)
            assert_values_equal(values_of(net), before_values)
            assert c.model_version("mlp") == before_version
            # The same construction attaches to the recovered optimizer (state kept).
            again = getattr(paramhub.optim, name)(net.parameters(), **kwargs)
            assert not again.created and again.steps == n
            train_steps(net, again, how, range(n, n + m))
            assert_values_equal(values_of(net), ref_values)
            assert_state_dicts_equal(again.state_dict(), ref_state)
            assert again.steps == ref_steps == n + m
    finally:
        srv.stop()
    local, lopt = torch_reference(name, kwargs, n + m)
    for k, p in local.named_parameters():
        torch.testing.assert_close(ref_values[k], p.detach(), msg=k)
    lstate = lopt.state_dict()["state"]
    for i in lstate:
        for k in lstate[i]:
            torch.testing.assert_close(ref_state["state"][i][k], lstate[i][k], msg=f"{i}/{k}")


def test_training_mode_and_staleness_history_survive_kill_9(tmp_path) -> None:
    srv = Serve(tmp_path / "data")
    try:
        with _connect(srv.target) as c:
            net = c.create_model("ps", seed_mlp())
            paramhub.optim.SGD(net.parameters(), lr=0.1)
            net.configure_training("bounded_staleness", max_staleness=1, stale_policy="reject")
            old_local, old_version = net.pull(return_version=True)
            for step in range(3):
                local, v = net.pull(return_version=True)
                X, y = batch(0, step, 8)
                F.mse_loss(local(X), y).backward()
                assert net.push_grads(local, v).outcome == "applied"
            srv.kill_9()
    finally:
        srv.stop()
    srv = Serve(tmp_path / "data")
    try:
        with _connect(srv.target) as c:
            net = c.model("ps")
            before = values_of(net)
            X, y = batch(0, 10, 8)
            F.mse_loss(old_local(X), y).backward()
            # Still bounded staleness with "reject", and the 3 steps since old_version count.
            r = net.push_grads(old_local, old_version)
            assert (r.outcome, r.staleness, r.steps) == ("rejected", 3, 3)
            assert_values_equal(values_of(net), before)
            # A sync configuration is durable too.
            net.configure_training("sync", sync_workers=2)
            srv.kill_9()
    finally:
        srv.stop()
    srv = Serve(tmp_path / "data")
    try:
        with _connect(srv.target) as c:
            net = c.model("ps")
            local, v = net.pull(return_version=True)
            X, y = batch(0, 11, 8)
            F.mse_loss(local(X), y).backward()
            # Two pushes make ONE averaged step (async would make two).
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda _: net.push_grads(local, v, timeout=60),
                                        range(2)))
            assert [(r.outcome, r.steps) for r in results] == [("applied", 4)] * 2
    finally:
        srv.stop()


# --------------------------------------------------------------------------- in-process server

def _restart(server, settings):
    server.stop(grace=None)
    return build_server(settings)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_replaced_optimizer_and_empty_steps_survive_a_restart(settings, device) -> None:
    settings = dataclasses.replace(settings, device=device)
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("m", seed_mlp())
            sgd = paramhub.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
            train_steps(net, sgd, "autograd", range(2))
            adam = paramhub.optim.Adam(
                [{"params": net[0].parameters(), "lr": 0.02}, {"params": net[2].parameters()}],
                lr=0.01, replace=True)
            train_steps(net, adam, "autograd", range(2, 4))
            adam.zero_grad()
            adam.step()  # no gradients: changes nothing but the step count
            assert adam.steps == 3
            state, values = adam.state_dict(), values_of(net)
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.model("m")
            opt = paramhub.optim.get(net)
            assert isinstance(opt, paramhub.optim.Adam) and opt.steps == 3
            assert [g["lr"] for g in opt.param_groups] == [0.02, 0.01]
            assert_state_dicts_equal(opt.state_dict(), state)
            assert_values_equal(values_of(net), values)
    finally:
        srv.stop(grace=None)


def test_compaction_with_an_optimizer_folds_its_state_into_the_snapshot(settings) -> None:
    settings = dataclasses.replace(settings, compact_bytes=2048)
    n, m = 8, 4
    ref = build_server(dataclasses.replace(settings, data_dir=None))  # memory only
    try:
        with paramhub.connect(f"127.0.0.1:{ref.port}", timeout=60) as c:
            net = c.create_model("m", seed_mlp())
            opt = paramhub.optim.Adam(net.parameters(), lr=0.01)
            train_steps(net, opt, "autograd", range(n + m))
            ref_values, ref_state = values_of(net), opt.state_dict()
    finally:
        ref.stop(grace=None)
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("m", seed_mlp())
            opt = paramhub.optim.Adam(net.parameters(), lr=0.01)
            train_steps(net, opt, "autograd", range(n))  # background compactions meanwhile
            c.compact("m")
            state = opt.state_dict()
        d = settings.data_dir / "models" / "m"
        snaps = sorted(d.glob("snapshot-*"))
        assert len(snaps) == 1 and snaps[0].name != "snapshot-00000001.safetensors"
        header, meta, _ = st.read_header(snaps[0])
        stored = json.loads(meta["paramhub.state"])["train"]
        assert stored["meta"]["optimizer"]["type"] == "Adam"
        assert stored["meta"]["optimizer"]["steps"] == n
        assert {f"paramhub.optimizer/{k}" for k in stored["tensors"]} <= set(header)
        assert "paramhub.optimizer/0.weight/exp_avg" in header
        assert next(d.glob("wal-*")).stat().st_size == 0  # everything is in the snapshot
        srv = _restart(srv, settings)
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.model("m")
            opt = paramhub.optim.get(net)
            assert opt.steps == n
            assert_state_dicts_equal(opt.state_dict(), state)
            train_steps(net, opt, "autograd", range(n, n + m))
            assert_values_equal(values_of(net), ref_values)
            assert_state_dicts_equal(opt.state_dict(), ref_state)
    finally:
        srv.stop(grace=None)


@pytest.mark.parametrize("device", DEVICES)
def test_restore_checkpoint_restores_the_optimizer_of_that_point(settings, tmp_path,
                                                                 device) -> None:
    settings = dataclasses.replace(settings, device=device)
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("m", seed_mlp())
            opt = paramhub.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            train_steps(net, opt, "autograd", range(4))
            c.create_checkpoint("m", "at4")
            at4_state, at4_values = opt.state_dict(), values_of(net)
            # Later: other steps, then another optimizer configuration altogether.
            train_steps(net, opt, "autograd", range(4, 7))
            adam = paramhub.optim.Adam(net.parameters(), lr=0.01, replace=True)
            train_steps(net, adam, "autograd", range(7, 8))
            c.restore_checkpoint("m", "at4")
            back = paramhub.optim.get(net)
            assert isinstance(back, paramhub.optim.SGD) and back.steps == 4
            assert_state_dicts_equal(back.state_dict(), at4_state)
            assert_values_equal(values_of(net), at4_values)
            # Training on from the checkpoint is training on from step 4.
            train_steps(net, back, "autograd", range(4, 9))
            after_restore = values_of(net)
            state_after_restore = back.state_dict()
            # The exported checkpoint is still a plain state_dict (no optimizer keys).
            safetensors_torch = pytest.importorskip("safetensors.torch")
            plain = safetensors_torch.load_file(
                c.export_checkpoint("m", tmp_path / "at4.safetensors", "at4"))
            fresh = seed_mlp()
            fresh.load_state_dict(plain, strict=True)
            assert_values_equal({k: p.detach() for k, p in fresh.named_parameters()}, at4_values)
        srv = _restart(srv, settings)  # the restore and the steps after it are durable
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.model("m")
            opt = paramhub.optim.get(net)
            assert opt.steps == 9
            assert_state_dicts_equal(opt.state_dict(), state_after_restore)
            assert_values_equal(values_of(net), after_restore)
    finally:
        srv.stop(grace=None)
    local, lopt = torch_reference("SGD", {"lr": 0.05, "momentum": 0.9}, 9)
    for k, p in local.named_parameters():
        torch.testing.assert_close(after_restore[k], p.detach(), msg=k)


def test_restore_of_a_checkpoint_without_optimizer_clears_the_optimizer_state(client) -> None:
    net = client.create_model("m", seed_mlp())
    client.create_checkpoint("m", "fresh")
    opt = paramhub.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.configure_training("bounded_staleness", max_staleness=0)
    train_steps(net, opt, "autograd", range(3))
    assert opt.state_dict()["state"]
    client.restore_checkpoint("m", "fresh")
    opt = paramhub.optim.get(net)
    # Same configuration, no state, no steps: the optimizer as it was at that point.
    assert isinstance(opt, paramhub.optim.SGD) and opt.steps == 0
    assert opt.state_dict()["state"] == {}
    assert opt.param_groups[0]["momentum"] == 0.9
    # The training mode is the checkpoint's too (async): a 1-step-old push is applied.
    old, version = net.pull(return_version=True)
    train_steps(net, opt, "autograd", range(1))
    X, y = batch(0, 5, 8)
    F.mse_loss(old(X), y).backward()
    assert net.push_grads(old, version).outcome == "applied"


def test_checkpoint_training_state_bad_files_change_nothing(client, settings) -> None:
    net = client.create_model("m", seed_mlp())
    opt = paramhub.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    train_steps(net, opt, "autograd", range(2))
    client.create_checkpoint("m", "c")
    train_steps(net, opt, "autograd", range(2, 3))
    state, values, version = opt.state_dict(), values_of(net), client.model_version("m")
    d = settings.data_dir / "models" / "m" / "checkpoints"
    assert (d / "training" / "c.safetensors").exists()
    # The training file of the checkpoint went missing: refused, nothing changed.
    (d / "training" / "c.safetensors").rename(d / "c.moved")
    with pytest.raises(InvalidArgumentError) as e:
        client.restore_checkpoint("m", "c")
    assert e.value.reason == "CHECKPOINT_MISMATCH"
    assert_state_dicts_equal(opt.state_dict(), state)
    assert_values_equal(values_of(net), values)
    assert client.model_version("m") == version
    # Deleting a checkpoint removes its training file too.
    (d / "c.moved").rename(d / "training" / "c.safetensors")
    client.delete_checkpoint("m", "c")
    assert not (d / "training" / "c.safetensors").exists()
    with pytest.raises(NotFoundError):
        client.restore_checkpoint("m", "c")


def test_checkpoint_of_a_model_whose_optimizer_lost_its_parameters_is_refused(client,
                                                                               settings) -> None:
    """A training file naming a parameter the model lacks (tampered or foreign) is refused."""
    from paramhub_server.core import store

    net = client.create_model("m", seed_mlp())
    opt = paramhub.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    train_steps(net, opt, "autograd", range(2))
    client.create_checkpoint("m", "c")
    path = settings.data_dir / "models" / "m" / "checkpoints" / "training" / "c.safetensors"
    tensors, meta = st.read_file(path)
    stored = json.loads(meta[store._TRAINING_KEY])
    stored["meta"]["optimizer"]["groups"][0]["parameters"][0] = "9.weight"
    st.write_file(path, list(tensors.items()), {store._TRAINING_KEY: json.dumps(stored)})
    state, values = opt.state_dict(), values_of(net)
    with pytest.raises(InvalidArgumentError) as e:
        client.restore_checkpoint("m", "c")
    assert e.value.reason == "CHECKPOINT_MISMATCH"
    assert_state_dicts_equal(opt.state_dict(), state)
    assert_values_equal(values_of(net), values)


def test_a_torn_step_record_is_dropped_whole(settings) -> None:
    """A crash in the middle of a step's log record: recovery has the previous step's
    parameters AND optimizer state, never the parameters of one and the state of another."""
    from paramhub_server.core.wal import read_records

    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.create_model("m", seed_mlp())
            opt = paramhub.optim.Adam(net.parameters(), lr=0.01)
            train_steps(net, opt, "autograd", range(2))
            state2, values2 = opt.state_dict(), values_of(net)
            train_steps(net, opt, "autograd", range(2, 3))
    finally:
        srv.stop(grace=None)
    wal = next((settings.data_dir / "models" / "m").glob("wal-*.log"))
    records = list(read_records(wal))
    last = records[-1]
    assert last.header["t"] == "write" and last.header["aux"]["steps"] == 3
    assert {e["key"] for e in last.header["aux"]["tensors"]} >= {"0.weight/exp_avg",
                                                                 "0.weight/exp_avg_sq"}
    start = records[-2].end
    with open(wal, "r+b") as f:  # cut the step record after its parameters, inside its state
        f.truncate(start + (last.end - start) * 3 // 4)
    srv = build_server(settings)
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=60) as c:
            net = c.model("m")
            opt = paramhub.optim.get(net)
            assert opt.steps == 2
            assert_state_dicts_equal(opt.state_dict(), state2)
            assert_values_equal(values_of(net), values2)
    finally:
        srv.stop(grace=None)


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"weight": torch.randn(256, 256, generator=g), "bias": torch.randn(256, generator=g)}


@pytest.mark.slow
def test_kill_9_during_acknowledged_steps_loses_no_step_and_tears_none(tmp_path,
                                                                       settings) -> None:
    """Steps stream in (async pushes) while the server is killed: after the restart the
    optimizer has taken every acknowledged step and at most the one in flight, and values and
    state are exactly those of a server that took that many steps."""
    srv = Serve(tmp_path / "data")
    acked: list[int] = []
    wrong: list[object] = []
    try:
        with _connect(srv.target) as c:
            torch.manual_seed(0)
            net = c.create_model("m", nn.Linear(256, 256))
            paramhub.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            stop = threading.Event()

            def pusher() -> None:
                i = 0
                try:
                    while not stop.is_set():
                        r = net.push_grads(_grads(i), c.model_version("m"))
                        if (r.outcome, r.steps) != ("applied", i + 1):
                            wrong.append(r)
                        acked.append(r.steps)
                        i += 1
                except paramhub.ParamhubError:
                    pass  # the server died under us

            t = threading.Thread(target=pusher)
            t.start()
            deadline = time.monotonic() + 60
            while len(acked) < 20 and time.monotonic() < deadline:
                time.sleep(0.01)
            srv.kill_9()
            stop.set()
            t.join(60)
    finally:
        srv.stop()
    assert len(acked) >= 20 and not wrong
    srv = Serve(tmp_path / "data")
    try:
        with _connect(srv.target) as c:
            net = c.model("m")
            opt = paramhub.optim.get(net)
            state, values = opt.state_dict(), values_of(net)
            n = opt.steps
            assert n in (acked[-1], acked[-1] + 1)
    finally:
        srv.stop()
    ref = build_server(dataclasses.replace(settings, data_dir=None))
    try:
        with paramhub.connect(f"127.0.0.1:{ref.port}", timeout=60) as c:
            torch.manual_seed(0)
            net = c.create_model("m", nn.Linear(256, 256))
            opt = paramhub.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            for i in range(n):
                net.push_grads(_grads(i), c.model_version("m"))
            assert_state_dicts_equal(opt.state_dict(), state)
            assert_values_equal(values_of(net), values)
    finally:
        ref.stop(grace=None)
