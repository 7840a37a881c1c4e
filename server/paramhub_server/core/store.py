"""Durable models under a data directory: snapshots, a write-ahead log, checkpoints.

Layout (one directory per model; a model id never starts with "."):

    {data_dir}/models/{id}/model.json                 spec (ModelSpec as JSON) and device
    {data_dir}/models/{id}/snapshot-{gen}.safetensors  every storage under 1 MiB once, by its
                                                      first name (metadata "files" names the
                                                      value file of each bigger one);
                                                      the optimizer's state tensors as
                                                      "paramhub.optimizer/{param}/{key}" and the
                                                      staleness history; metadata
                                                      "paramhub.state" holds versions, training
                                                      flags, recent request ids, the optimizer's
                                                      and the training mode's configuration
    {data_dir}/models/{id}/values/{token}.bin         one storage's raw bytes: a whole-tensor write
                                                      of >= 1 MiB (written once, named by its log
                                                      record, adopted by later snapshots)
    {data_dir}/models/{id}/wal-{gen}.log              writes committed after snapshot {gen}
    {data_dir}/models/{id}/checkpoints/{name}.safetensors   a plain state_dict (every key)
    {data_dir}/models/{id}/checkpoints/training/{name}.safetensors   its optimizer state and
                                                      configuration and the training mode (kept
                                                      apart so the plain file stays loadable
                                                      with load_state_dict(strict=True))

Protocol:
- CreateModel writes model.json and snapshot 1 into a hidden directory, fsyncs, and renames it
  into place before the model is registered (and the create acknowledged).
- Every write appends a record to the current log (values of the changed regions, the index,
  the resulting versions, the request id) before the write touches any tensor and before it is
  acknowledged; under fsync "always" the record is fsynced first (see wal.py). An optimizer
  step is one record holding the parameters it changed AND their new optimizer state; creating
  an optimizer and configuring the training mode are records of their own.
- Compaction holds the model's read lock only to capture what changed since the last snapshot
  (per tensor: value files already written are adopted, not copied) and to switch to
  wal-{gen+1}; it then writes snapshot {gen+1} and its new value files with no model lock held
  (temporary file, fsync, rename: the rename is the commit point) and deletes generation {gen}.
  It runs in the background once the log and the value files written since the last snapshot
  outgrow both `compact_bytes` and the snapshot, and on CompactModel.
- Recovery loads the newest snapshot, replays every log from its generation on up to the first
  torn record (a crash mid-append; never acknowledged), truncates the log there and removes
  leftovers, value files nothing references included.

Why one module of ~1,200 lines: the layout above, recovery, compaction and checkpoints share its
names and the model directory's lock. The snapshot capture/write helpers and the check/repair
code (`paramhub wal`) are the parts that can move to modules of their own next.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paramhub.common import buffers, dtypes
from paramhub.common import spec as _spec
from paramhub.common.errors import (AlreadyExistsError, FailedPreconditionError, InvalidArgumentError,
                             NotFoundError)
from paramhub_server.core import safetensors_io as st
from paramhub_server.core import training, wal_format
from paramhub_server.core.model import (MAX_RECENT_REQUESTS, Change, Extra, Program,
                                        ServedModel, SnapshotState, TensorRef, WriteContext,
                                        WriteResult)
from paramhub_server.core.wal import (Scan, ValueFileError, WalCorruptError, WalWriter,
                                      disk_full, map_value_file, read_records, read_value_file,
                                      write_value_file)
from paramhub_server.core.wal import cut as wal_cut
from paramhub_server.core.wal import scan as wal_scan

log = logging.getLogger(__name__)

FORMAT = 1
_STATE_KEY = "paramhub.state"
#: An exported program's tensor constants (model directory).
_CONSTANTS = "constants.safetensors"
_CHECKPOINT_KEY = "paramhub.checkpoint"
_TRAINING_KEY = "paramhub.training"
#: Snapshot keys of the optimizer state ("{prefix}{param}/{key}") and the staleness history.
_OPTIMIZER_PREFIX = "paramhub.optimizer/"
_STEP_VERSIONS = "paramhub.train/step_versions"
#: Model ids and checkpoint names: 1-128 characters of [A-Za-z0-9_.-], starting with a letter or
#: digit (safe as one directory or file name; a model id never starts with ".").
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: Whole-tensor values of at least this many bytes are written once, to a value file of their
#: own that the log record references and snapshots adopt (smaller ones go into the log).
VALUE_FILE_BYTES = 1 << 20
#: The directory of value files inside a model's directory.
_VALUES = "values"
_SNAPSHOT = re.compile(r"snapshot-(\d{8})\.safetensors")
_WAL = re.compile(r"wal-(\d{8})\.log")


def check_checkpoint_name(name: str) -> str:
    """Validates a checkpoint name (same rules as model ids)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"checkpoint name {name[:200]!r} must be 1-128 characters of [A-Za-z0-9_.-] "
            "starting with a letter or digit", reason="BAD_CHECKPOINT_NAME")
    return name


#: Logged values up to this size are copied into bytes rather than viewed in place.
_SMALL_VALUE = 4096


def _result_to_json(r: WriteResult) -> list[Any]:
    return [r.rpc, [[n, v] for n, v in r.updated], r.model_version]


def _result_from_json(j: list[Any]) -> WriteResult:
    return WriteResult(j[0], [(n, int(v)) for n, v in j[1]], int(j[2]))


class Store:
    """The data directory: creates, opens, deletes and compacts durable models."""

    def __init__(self, data_dir: Path, *, fsync: str = "always", fsync_interval: float = 0.05,
                 compact_bytes: int = 64 << 20, value_file_bytes: int = VALUE_FILE_BYTES) -> None:
        self.root = Path(data_dir)
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.compact_bytes = compact_bytes
        self.value_file_bytes = value_file_bytes
        self._queue: queue.Queue[ServedModel | None] = queue.Queue()
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._compactor = threading.Thread(target=self._compact_loop, daemon=True,
                                           name="paramhub-compactor")
        self._compactor.start()

    # ------------------------------------------------------------------------- models

    def model_ids(self) -> list[str]:
        """Ids of the stored models; removes leftovers of interrupted creates and deletes."""
        ids = []
        for p in sorted(self.models_dir.iterdir()):
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir() and (p / "model.json").exists():
                ids.append(p.name)
        return ids

    def read_meta(self, model_id: str) -> tuple[_spec.ModelSpec, str]:
        """(spec, device string) of a stored model. The spec is the newest snapshot's when it
        records one (a model whose lazy modules materialized after creation has a new one)."""
        d = self.models_dir / model_id
        meta = json.loads((d / "model.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"model {model_id}: unknown storage format {meta.get('format')}")
        spec = meta["spec"]
        gens = sorted(int(m.group(1)) for p in d.iterdir()
                      if (m := _SNAPSHOT.fullmatch(p.name)))
        if gens:
            _, snap_meta, _ = st.read_header(d / _snapshot_name(gens[-1]))
            spec = json.loads(snap_meta[_STATE_KEY]).get("spec", spec)
        return _spec.spec_from_json(spec), meta["device"]

    def read_program(self, model_id: str) -> tuple[Program, dict[str, torch.Tensor]] | None:
        """An exported program model's definition and empty state tensors to build it with
        (the snapshot fills them); None for other models."""
        d = self.models_dir / model_id
        meta = json.loads((d / "model.json").read_text())
        if "exported_program" not in meta:
            return None
        constants, _ = st.read_file(d / _CONSTANTS)
        state = {n: torch.empty(shape, dtype=dtypes.dtype_from_proto(dt))
                 for n, (dt, shape) in meta["program_state"].items()}
        program = Program(base64.b64decode(meta["exported_program"]),
                          list(meta["module_tree"]),
                          [tuple(t) for t in meta["program_ties"]], constants,
                          {n: (t.dtype, tuple(t.shape)) for n, t in state.items()})
        return program, state

    def read_source(self, model_id: str) -> bytes:
        """A user-defined module's pickle (empty for a spec model): the newest snapshot's when
        it records one (lazy modules materialized after creation), else the created one."""
        d = self.models_dir / model_id
        source = json.loads((d / "model.json").read_text()).get("module_pickle", "")
        gens = sorted(int(m.group(1)) for p in d.iterdir()
                      if (m := _SNAPSHOT.fullmatch(p.name)))
        if gens and source:
            _, snap_meta, _ = st.read_header(d / _snapshot_name(gens[-1]))
            source = json.loads(snap_meta[_STATE_KEY]).get("module_pickle", source)
        return base64.b64decode(source)

    def create(self, model: ServedModel) -> None:
        """Persists a new model (spec + snapshot 1) and attaches its journal. Nothing is left
        behind if it fails."""
        final = self.models_dir / model.id
        tmp = self.models_dir / f".create-{model.id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = {"format": FORMAT, "model_id": model.id, "device": str(model.device),
                    "spec": _spec.spec_to_json(model.spec)}
            if model.source:  # a user-defined module: its pickle (paramhub._code)
                meta["module_pickle"] = base64.b64encode(model.source).decode()
            if model.program is not None:  # an exported program (paramhub._program)
                p = model.program
                meta["exported_program"] = base64.b64encode(p.program).decode()
                meta["module_tree"] = list(p.tree)
                meta["program_ties"] = [list(t) for t in p.ties]
                meta["program_state"] = {n: [dtypes.dtype_to_proto(d), list(shape)]
                                         for n, (d, shape) in p.state.items()}
                st.write_file(tmp / _CONSTANTS, list(p.constants.items()), {},
                              fsync=self.fsync != "off")
            _write_text(tmp / "model.json", json.dumps(meta, indent=1))
            (tmp / _VALUES).mkdir()
            prep = _capture(model, tmp, 1, {}, self.value_file_bytes, copy=False)
            _write_prepared(prep, tmp / _VALUES, self.fsync != "off")
            assert prep.tmp is not None
            os.replace(prep.tmp, prep.path)
            size = _snapshot_bytes(prep.path, prep.manifest)
            (tmp / "checkpoints").mkdir()
            if final.exists():  # a stale directory of a model that failed to load
                raise AlreadyExistsError(f"model {model.id!r} already exists on disk",
                                         reason="MODEL_EXISTS", metadata={"model": model.id})
            os.replace(tmp, final)
            st.fsync_dir(self.models_dir)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full(tmp, e) or e from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        ms = ModelStore(self, model, final, 1, 1, size)
        ms.files = {n: e["file"] for n, e in prep.manifest.items()}
        ms.snap_files = set(ms.files.values())

    def open(self, model: ServedModel) -> ModelStore:
        """Recovers a stored model's state into `model` and attaches its journal.

        The newest snapshot is loaded (its big tensors from the value files it names), then
        every log of its generation or later is replayed in order (a compaction that crashed
        after starting its log but before its snapshot leaves two), each up to its first torn
        record, which is cut off. Value files nothing references (a crash between a value file
        and its record, or in a compaction) and older generations are removed."""
        d = self.models_dir / model.id
        gens = sorted(int(m.group(1)) for p in d.iterdir()
                      if (m := _SNAPSHOT.fullmatch(p.name)))
        if not gens:
            raise ValueError(f"model {model.id}: no snapshot in {d}")
        gen = gens[-1]
        snap = d / _snapshot_name(gen)
        values_dir = d / _VALUES
        values_dir.mkdir(exist_ok=True)
        # Lazy modules loaded with values (but not yet run) keep their lazy spec: their
        # tensors take the snapshot's shapes, as load_state_dict gave them.
        header, meta, _ = st.read_header(snap)
        state = json.loads(meta[_STATE_KEY])
        manifest: dict[str, dict[str, Any]] = state.get("files", {})
        shapes = {**{n: e["shape"] for n, e in header.items()},
                  **{n: e["shape"] for n, e in manifest.items()}}
        lazy = {n: shapes[n] for n, _ in model.uninitialized if n in shapes}
        if lazy:
            model.materialize_shapes(lazy)
        firsts = [n for n, _ in model.state_entries(every_name=False)]
        values, _ = st.read_file(snap, [n for n in firsts if n not in manifest])
        for n, e in manifest.items():
            values[n] = _read_value(values_dir, e, snap, 0)
        model.restore_state(values, state["versions"], state["model_version"],
                            state.get("training"))
        del values
        train = state.get("train")
        if train is not None:
            keys = [_OPTIMIZER_PREFIX + k for k in train["tensors"]]
            if train.get("step_versions"):
                keys.append(_STEP_VERSIONS)
            extra, _ = st.read_file(snap, keys)
            history = extra.pop(_STEP_VERSIONS, torch.empty(0, dtype=torch.int64)).tolist()
            training.load_training_state(
                model, train["meta"],
                {k.removeprefix(_OPTIMIZER_PREFIX): t for k, t in extra.items()}, history)
        for rid, j in state.get("recent", []):
            model.remember(rid, _result_from_json(j))
        files = {n: e["file"] for n, e in manifest.items()}
        log_files: dict[str, int] = {}
        logs = sorted((int(m.group(1)), p) for p in d.iterdir()
                      if (m := _WAL.fullmatch(p.name)) and int(m.group(1)) >= gen)
        replayed = 0
        for _, wal_path in logs:
            valid = 0
            try:
                for rec in read_records(wal_path):
                    _replay(model, rec.header, rec.payload, values_dir, wal_path, valid)
                    for name, fname, size in _record_files(model, rec.header):
                        files[name] = fname
                        log_files[fname] = size
                    for name in _inline_writes(model, rec.header):
                        files.pop(name, None)
                    valid = rec.end
                    replayed += 1
            except WalCorruptError as e:
                log.error("model %s is NOT loaded: %s", model.id, e)
                raise
            if wal_path.stat().st_size != valid:
                with open(wal_path, "r+b") as f:
                    f.truncate(valid)
                    os.fsync(f.fileno())
        wal_gen = logs[-1][0] if logs else gen
        live = {e["file"] for e in manifest.values()} | set(log_files)
        for p in values_dir.iterdir():  # value files nothing references
            if p.name not in live:
                log.info("model %s: removing unreferenced value file %s", model.id, p.name)
                p.unlink()
        for p in d.iterdir():  # older generations and temporary files of a crashed compaction
            m = _SNAPSHOT.fullmatch(p.name) or _WAL.fullmatch(p.name)
            if (m and int(m.group(1)) < gen) or p.name.endswith(".tmp"):
                p.unlink()
        (d / "checkpoints").mkdir(exist_ok=True)
        for p in (d / "checkpoints").glob("*.tmp"):
            p.unlink()
        log.info("recovered model %s: snapshot %d + %d log records, version %d",
                 model.id, gen, replayed, model.version)
        ms = ModelStore(self, model, d, gen, wal_gen, _snapshot_bytes(snap, manifest))
        ms.files = files
        ms.snap_files = {e["file"] for e in manifest.values()}
        ms.log_files = log_files
        return ms

    def delete(self, model: ServedModel) -> None:
        """Removes a model's directory (its checkpoints too). Caller holds its write lock."""
        if isinstance(model.journal, ModelStore):
            model.journal.close()
        model.journal = None
        model.lock.after_write = None
        d = self.models_dir / model.id
        if d.exists():
            gone = self.models_dir / f".deleted-{model.id}-{uuid.uuid4().hex[:8]}"
            os.replace(d, gone)
            st.fsync_dir(self.models_dir)
            shutil.rmtree(gone, ignore_errors=True)

    def close(self) -> None:
        """Stops the background compactor (models' logs are closed by their owners)."""
        self._queue.put(None)
        self._compactor.join(timeout=60)

    # ------------------------------------------------------------------------- compaction

    def request_compaction(self, model: ServedModel) -> None:
        """Queues a background compaction of `model` (once, however often asked)."""
        with self._pending_lock:
            if model.id in self._pending:
                return
            self._pending.add(model.id)
        self._queue.put(model)

    def _compact_loop(self) -> None:
        while True:
            model = self._queue.get()
            if model is None:
                return
            with self._pending_lock:
                self._pending.discard(model.id)
            try:
                journal = model.journal
                if isinstance(journal, ModelStore):
                    journal.compact(model, wait=False)
            except Exception:  # noqa: BLE001 - logged; the log keeps every write meanwhile
                log.exception("background compaction of %s failed", model.id)


class ModelStore:
    """One model's durable state; the `Journal` a ServedModel calls under its locks.

    Value-file bookkeeping: `files` maps a storage (its first name) to the value file holding
    its current value when its last write was a whole-tensor value file (a compaction adopts
    those without copying); `snap_files` are the files the committed snapshot names;
    `log_files` (file -> bytes) those named by log records since the last compaction began."""

    def __init__(self, store: Store, model: ServedModel, directory: Path, gen: int,
                 wal_gen: int, snapshot_bytes: int) -> None:
        self.store = store
        self.model_id = model.id
        self.dir = directory
        self.values_dir = directory / _VALUES
        self.values_dir.mkdir(exist_ok=True)
        self.gen = gen  # of the committed snapshot
        self.wal_gen = wal_gen  # of the log appended to (> gen while a compaction runs)
        self.snapshot_bytes = snapshot_bytes
        self.wal = WalWriter(directory / _wal_name(wal_gen), store.fsync, store.fsync_interval)
        self._lock = threading.Lock()  # snapshots and checkpoint files, one at a time
        self._meta = threading.Lock()  # the bookkeeping below: writers vs a compaction
        self.files: dict[str, str] = {}
        self.snap_files: set[str] = set()
        self.log_files: dict[str, int] = {}
        self.closed = False
        self._pending = threading.local()  # (log, end) of this thread's deferred record
        model.journal = self
        # Group commit: a write's record is fsynced after the model's write lock is released
        # (readers and other writers go on) and before the write is acknowledged.
        model.lock.after_write = self._after_write

    # --------------------------------------------------------------- Journal (write lock held)

    def log_write(self, model: ServedModel, op: str, rpc: str, changes: Sequence[Change],
                  result: WriteResult, ctx: WriteContext, time_ns: int,
                  extra: Extra | None = None) -> None:
        """Appends a write's record before it is applied; `extra` (an optimizer step's new
        state) goes into the same record as "aux". A big whole-tensor value is written (and
        fdatasynced) to a value file first and the record references it. Under "always" the
        record's fsync happens when the write lock is released (`_after_write`)."""
        blobs: list[Any] = []
        entries = []
        written: list[tuple[str, str, int]] = []  # (storage, value file, bytes)
        inline: list[str] = []
        off = 0  # payload offset of the next blob
        try:
            for c in changes:
                first = model._first[c.ref.group]
                value = c.value
                n = value.numel() * value.element_size()
                entry: dict[str, Any] = {"name": c.ref.name}
                if (n >= self.store.value_file_bytes
                        and wal_format.whole(c.index, value.shape, c.ref.get().shape)):
                    pre = getattr(self._pending, "pre", None)
                    if pre is not None and pre[0] is value:  # written before the lock
                        fname, self._pending.pre = pre[1], None
                    else:
                        fname = self._write_value(value)
                    written.append((first, fname, n))
                    entry.update(ix=[], dtype=wal_format.dtype_name(value.dtype),
                                 shape=list(value.shape), file=fname)
                else:
                    if c.index:
                        entry["ix"], off = wal_format.encode_index(c.index, blobs, off)
                    # Small values as bytes (one copy, no views); big ones from their memory.
                    data = (buffers.tensor_bytes(value) if n <= _SMALL_VALUE
                            else buffers.byte_view(value))
                    e, off = wal_format.tensor_entry(value, blobs, off, data)
                    entry.update(e)
                    inline.append(first)
                entries.append(entry)
            if written and self.store.fsync != "off":
                st.fsync_dir(self.values_dir)  # the files' names are durable before the record
            header: dict[str, Any] = {
                "t": "write", "op": op, "result": _result_to_json(result), "rid": ctx.request_id,
                "writer": ctx.writer, "time": time_ns, "changes": entries}
            if extra is not None:
                aux, tensors = extra
                header["aux"] = {**aux, "tensors": _tensor_entries(tensors, blobs, off)[0]}
            end = self.wal.append(header, blobs, defer=True)
        except BaseException:
            for _, fname, _ in written:
                (self.values_dir / fname).unlink(missing_ok=True)
            raise
        with self._meta:
            for first in inline:
                self.files.pop(first, None)
            for first, fname, n in written:
                self.files[first] = fname
                self.log_files[fname] = n
        if self.wal.policy == "always":
            self._pending.at = (self.wal, end)

    def _write_value(self, value: torch.Tensor) -> str:
        """Writes a value file (fdatasynced unless fsync is "off"); returns its name."""
        fname = f"{uuid.uuid4().hex}.bin"
        write_value_file(self.values_dir / fname, buffers.byte_view(value),
                         self.store.fsync != "off")
        return fname

    def prewrite(self, ref: TensorRef, index: tuple[Any, ...], op: str,
                 value: torch.Tensor, *, volatile: bool = False) -> torch.Tensor | None:
        """Called before the write lock is taken: a big whole-tensor assign's value file is
        written and synced now, so that the lock is held only for the small log record and the
        copy into the tensor (readers of the model do not wait for the value's disk write).
        `log_write` uses the file if the planned change's value is the tensor this returns (an
        assign of the tensor's dtype and device keeps it); otherwise it is removed when the
        lock is released. Returns None when the write takes no value file.

        `volatile`: `value` lives in memory another process may still change (a client's
        shared memory). The file is written straight from it, and the value returned (the one
        the write must apply) is the file's own bytes, mapped from the page cache, so the
        tensor and the log cannot disagree, at one copy fewer than copying `value` first."""
        if op != "assign":
            return None
        t = ref.get()
        nbytes = value.numel() * value.element_size()
        if (nbytes < self.store.value_file_bytes
                or value.dtype != t.dtype or value.device != t.device
                or not wal_format.whole(index, value.shape, t.shape)):
            return None
        fname = self._write_value(value)
        if volatile:
            try:
                mapped = map_value_file(self.values_dir / fname, nbytes)
            except BaseException:
                (self.values_dir / fname).unlink(missing_ok=True)
                raise
            value = torch.frombuffer(mapped, dtype=value.dtype).view(value.shape)
        if self.store.fsync != "off":
            st.fsync_dir(self.values_dir)
        self._pending.pre = (value, fname)
        return value

    def _after_write(self, ok: bool) -> None:
        """Runs when the model's write lock is released: waits until the fsync that covers
        this thread's record is done (shared with other writers). A write-locked call that
        logged nothing (a retried request answered from memory) waits for the log written so
        far, so nothing is acknowledged before the record it answers from is durable."""
        pending = getattr(self._pending, "at", None)
        self._pending.at = None
        pre = getattr(self._pending, "pre", None)
        if pre is not None:  # written before the lock, then not used (a conflict, a retry)
            self._pending.pre = None
            (self.values_dir / pre[1]).unlink(missing_ok=True)
        if not ok:
            return
        if pending is not None:
            pending[0].wait_durable(pending[1])
        else:
            wal = self.wal
            wal.wait_durable(wal.size)

    def log_record(self, model: ServedModel, header: dict[str, Any],
                   tensors: Sequence[tuple[str, torch.Tensor]] = ()) -> None:
        """Appends a record that is not a tensor write (optimizer created, training mode
        configured, an empty step), with `tensors` as its payload."""
        blobs: list[Any] = []
        header = {**header, "tensors": _tensor_entries(tensors, blobs, 0)[0]}
        self.wal.append(header, blobs)
        self.after_commit(model)

    def reserve(self, nbytes: int) -> None:
        """Disk space for the next record of about `nbytes` bytes (DISK_FULL if there is none),
        before a write that changes tensors in place runs."""
        self.wal.reserve(nbytes)

    def log_training(self, model: ServedModel, path: str, training: bool) -> None:
        """Appends a train()/eval() record."""
        self.wal.append({"t": "train", "path": path, "training": training})

    def _lag_bytes(self) -> int:
        # list() copies the values in one step (a metrics thread reads this while writers add).
        return self.wal.size + sum(list(self.log_files.values()))

    def after_commit(self, model: ServedModel) -> None:
        """Schedules a compaction once the log and the value files written since the last one
        outgrow the threshold and the snapshot."""
        if self._lag_bytes() > max(self.store.compact_bytes, self.snapshot_bytes):
            self.store.request_compaction(model)

    # --------------------------------------------------------------- compaction

    def compact(self, model: ServedModel, *, wait: bool) -> tuple[int, int] | None:
        """Compaction that holds the model's read lock only while it decides what to write,
        copies the tensors whose value no value file holds, and switches writes to a new log
        (generation gen+1); the snapshot and its new value files are then written and synced
        without any model lock (readers and writers go on), and renamed into place (the commit
        point). Recovery before the rename replays both logs on the old snapshot. Returns
        (model version of the snapshot, bytes folded), or None if another compaction ran
        (`wait=False`) or the model went away."""
        deadline = time.monotonic() + 600
        while True:
            with model.lock.read():
                if model.journal is not self or self.closed:
                    return None
                if self._lock.acquire(blocking=False):
                    try:
                        prep = self._start(model)
                    except BaseException:
                        self._lock.release()
                        raise
                    break
            if not wait or time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        try:
            return prep.model_version, self._finish(prep)
        finally:
            self._lock.release()

    def _start(self, model: ServedModel) -> PreparedSnapshot:
        """Under the read lock: capture the state and switch to the next log."""
        gen = max(self.gen, self.wal_gen) + 1
        prep = _capture(model, self.dir, gen, self.files, self.store.value_file_bytes,
                        copy=True)
        wal_path = self.dir / _wal_name(gen)
        wal_path.unlink(missing_ok=True)  # a leftover of a failed attempt
        try:
            wal = WalWriter(wal_path, self.store.fsync, self.store.fsync_interval)
        except OSError as e:
            wal_path.unlink(missing_ok=True)
            raise disk_full(wal_path, e) or e from None
        prep.old_wal, self.wal, self.wal_gen = self.wal, wal, gen
        with self._meta:
            prep.old_files = self.snap_files | set(self.log_files)
            prep.folded = prep.old_wal.size + sum(self.log_files.values())
            prep.saved_log_files, self.log_files = self.log_files, {}
            for n, entry in prep.manifest.items():
                self.files[n] = entry["file"]
        return prep

    def _finish(self, prep: PreparedSnapshot) -> int:
        """Without model locks: write, sync and commit what `_start` captured."""
        assert prep.old_wal is not None
        try:
            prep.old_wal.close()  # synced: it stays the log of record until the rename
            _write_prepared(prep, self.values_dir, self.store.fsync != "off")
            if self.closed:  # the model was deleted meanwhile
                raise RuntimeError(f"model {self.model_id} was closed during compaction")
        except BaseException:
            _remove_prepared(prep, self.values_dir)
            with self._meta:
                for n, fname, _ in prep.to_write:
                    if self.files.get(n) == fname:
                        del self.files[n]
                self.log_files = {**prep.saved_log_files, **self.log_files}
            raise
        assert prep.tmp is not None
        os.replace(prep.tmp, prep.path)
        st.fsync_dir(self.dir)
        self._committed(prep, prep.old_files)
        return prep.folded

    def snapshot(self, model: ServedModel) -> int:
        """Compaction while the caller holds the model's read or write lock (structure changes).
        Returns the log bytes folded in. On failure (a full disk: DISK_FULL) nothing changes
        and no file is left."""
        return self.commit_snapshot(self.prepare_snapshot(model))

    def prepare_snapshot(self, model: ServedModel, override: SnapshotState | None = None
                         ) -> PreparedSnapshot:
        """Writes snapshot gen+1 (of the current state, or of the state `override` describes:
        a restore that is not applied yet) to a temporary file with the value files it needs
        and creates the new, empty log; `commit_snapshot` makes it the current generation and
        `abandon_snapshot` drops it. The caller holds the model's lock throughout. On failure
        nothing is left behind."""
        self._lock.acquire()
        try:
            gen = max(self.gen, self.wal_gen) + 1
            prep = _capture(model, self.dir, gen, self.files, self.store.value_file_bytes,
                            copy=False, override=override)
            _write_prepared(prep, self.values_dir, self.store.fsync != "off")
            try:
                # The new log exists before the snapshot is renamed into place: recovery takes
                # the newest snapshot and replays its (possibly empty) log.
                wal_path = self.dir / _wal_name(gen)
                wal_path.unlink(missing_ok=True)  # a leftover of a failed attempt
                try:
                    prep.wal = WalWriter(wal_path, self.store.fsync, self.store.fsync_interval)
                except OSError as e:
                    wal_path.unlink(missing_ok=True)
                    raise disk_full(wal_path, e) or e from None
            except BaseException:
                _remove_prepared(prep, self.values_dir)
                raise
            prep.folded = self.wal.size + sum(self.log_files.values())
            return prep
        except BaseException:
            self._lock.release()
            raise

    def commit_snapshot(self, prepared: PreparedSnapshot) -> int:
        """Renames a prepared snapshot into place (the commit point), switches to its log and
        drops the old generation. Returns the log bytes folded in."""
        try:
            assert prepared.wal is not None and prepared.tmp is not None
            os.replace(prepared.tmp, prepared.path)
            st.fsync_dir(self.dir)
            old_wal, self.wal, self.wal_gen = self.wal, prepared.wal, prepared.gen
            with self._meta:
                old = self.snap_files | set(self.log_files)
                self.log_files = {}
                self.files = {n: e["file"] for n, e in prepared.manifest.items()}
            old_wal.close()
            self._committed(prepared, old)
            return prepared.folded
        finally:
            self._lock.release()

    def abandon_snapshot(self, prepared: PreparedSnapshot) -> None:
        """Drops a prepared snapshot that will not be committed."""
        try:
            if prepared.wal is not None:
                prepared.wal.close()
            _remove_prepared(prepared, self.values_dir)
            (self.dir / _wal_name(prepared.gen)).unlink(missing_ok=True)
        finally:
            self._lock.release()

    def _committed(self, prep: PreparedSnapshot, old_files: set[str]) -> None:
        """After the rename: the new generation is current; the older ones and the value files
        only they referenced go."""
        self.gen = prep.gen
        keep = {e["file"] for e in prep.manifest.values()}
        self.snapshot_bytes = prep.path.stat().st_size + sum(
            _entry_bytes(e) for e in prep.manifest.values())
        for p in self.dir.iterdir():
            m = _SNAPSHOT.fullmatch(p.name) or _WAL.fullmatch(p.name)
            if m and int(m.group(1)) < prep.gen:
                p.unlink(missing_ok=True)
        for f in old_files - keep:
            (self.values_dir / f).unlink(missing_ok=True)
        self.snap_files = keep
        log.info("compacted model %s: %d log bytes into snapshot %d (%d bytes, %d value files "
                 "written, %d adopted)", self.model_id, prep.folded, prep.gen,
                 self.snapshot_bytes, len(prep.to_write), len(keep) - len(prep.to_write))

    def close(self) -> None:
        """Closes the log (flushing it), after a compaction in progress is done."""
        with self._lock:
            self.closed = True
            self.wal.close()

    def lag(self) -> tuple[int, bool]:
        """(log and value-file bytes not yet folded into a snapshot, whether appends await an
        fsync)."""
        return self._lag_bytes(), self.wal.unsynced

    # --------------------------------------------------------------- checkpoints

    def _checkpoint_path(self, name: str) -> Path:
        return self.dir / "checkpoints" / f"{check_checkpoint_name(name)}.safetensors"

    def create_checkpoint(self, model: ServedModel, name: str) -> Checkpoint:
        """Writes the model's values as a plain state_dict file. Caller holds a read lock."""
        path = self._checkpoint_path(name)
        with self._lock:
            if path.exists():
                raise AlreadyExistsError(f"checkpoint {name!r} of {model.id!r} exists",
                                         reason="CHECKPOINT_EXISTS",
                                         metadata={"model": model.id, "checkpoint": name})
            info: dict[str, Any] = {"model_version": model.version,
                                    "created_ns": time.time_ns(), "model_id": model.id}
            meta, tensors = training.training_state(model)
            tpath = self._training_path(name)
            if meta is None:
                info["training"] = None
                tpath.unlink(missing_ok=True)  # a leftover of a crashed create or delete
            else:
                # Written first: the plain file (the checkpoint's commit point) names it by a
                # token, so a leftover from another checkpoint of this name is never taken.
                token = uuid.uuid4().hex
                info["training"] = {"token": token}
                tpath.parent.mkdir(exist_ok=True)
                st.write_file(tpath, [(_OPTIMIZER_PREFIX + k, t) for k, t in tensors],
                              {_TRAINING_KEY: json.dumps({"token": token, "meta": meta})},
                              fsync=self.store.fsync != "off")
            try:
                size = st.write_file(path, model.state_entries(every_name=True),
                                     {_CHECKPOINT_KEY: json.dumps(info)},
                                     fsync=self.store.fsync != "off")
            except BaseException:
                if meta is not None:
                    tpath.unlink(missing_ok=True)  # nobody names it: the checkpoint failed
                raise
        return Checkpoint(name=name, model_version=info["model_version"],
                                 created_unix_nanos=info["created_ns"], num_bytes=size)

    def checkpoint_info(self, name: str) -> Checkpoint:
        """A checkpoint's description; NotFoundError (CHECKPOINT_NOT_FOUND) if absent."""
        path = self._checkpoint_path(name)
        if not path.exists():
            raise NotFoundError(f"checkpoint {name!r} of {self.model_id!r} does not exist",
                                reason="CHECKPOINT_NOT_FOUND",
                                metadata={"model": self.model_id, "checkpoint": name})
        _, meta, _ = st.read_header(path)
        info = json.loads(meta.get(_CHECKPOINT_KEY, "{}"))
        return Checkpoint(name=name, model_version=int(info.get("model_version", 0)),
                                 created_unix_nanos=int(info.get("created_ns", 0)),
                                 num_bytes=path.stat().st_size)

    def list_checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, oldest first."""
        infos = [self.checkpoint_info(p.name.removesuffix(".safetensors"))
                 for p in (self.dir / "checkpoints").glob("*.safetensors")]
        return sorted(infos, key=lambda i: (i.created_unix_nanos, i.name))

    def _training_path(self, name: str) -> Path:
        return self.dir / "checkpoints" / "training" / f"{check_checkpoint_name(name)}.safetensors"

    def read_checkpoint_training(self, name: str
                                 ) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]] | None:
        """The checkpoint's training state: None for a checkpoint written before training state
        was saved (a restore leaves the optimizer alone), else (meta or None if the model had
        none then, optimizer state tensors)."""
        _, meta, _ = st.read_header(self._checkpoint_path(name))
        info = json.loads(meta.get(_CHECKPOINT_KEY, "{}"))
        if "training" not in info:
            return None
        if info["training"] is None:
            return None, {}
        try:
            tensors, tmeta = st.read_file(self._training_path(name))
            stored = json.loads(tmeta[_TRAINING_KEY])
        except (OSError, KeyError, ValueError, st.FormatError):
            stored = None
        if stored is None or stored.get("token") != info["training"].get("token"):
            raise InvalidArgumentError(f"checkpoint {name!r} lacks its training state file",
                                       reason="CHECKPOINT_MISMATCH",
                                       metadata={"checkpoint": name})
        return stored["meta"], {k.removeprefix(_OPTIMIZER_PREFIX): t
                                for k, t in tensors.items()}

    def read_checkpoint(self, name: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors of `names`."""
        self.checkpoint_info(name)
        try:
            values, _ = st.read_file(self._checkpoint_path(name), names)
        except st.FormatError as e:
            raise InvalidArgumentError(f"checkpoint {name!r} cannot be restored: {e}",
                                       reason="CHECKPOINT_MISMATCH") from None
        return values

    def delete_checkpoint(self, name: str) -> None:
        """Removes a checkpoint."""
        self.checkpoint_info(name)
        with self._lock:
            self._checkpoint_path(name).unlink(missing_ok=True)  # the commit point
            st.fsync_dir(self.dir / "checkpoints")
            self._training_path(name).unlink(missing_ok=True)

    def checkpoint_bytes(self, name: str, piece: int = 1 << 20) -> Iterator[bytes]:
        """The checkpoint file's bytes (a plain safetensors state_dict), in pieces."""
        self.checkpoint_info(name)
        with open(self._checkpoint_path(name), "rb") as f:  # opened now: a delete can't race
            while chunk := f.read(piece):
                yield chunk


# ----------------------------------------------------------------------------- operations
# What the servicer calls: each takes the model's lock it needs.


def journal_of(model: ServedModel) -> ModelStore:
    """The model's ModelStore; FailedPreconditionError (NO_DATA_DIR) on a memory-only server."""
    if not isinstance(model.journal, ModelStore):
        raise FailedPreconditionError("this server keeps models in memory only (no --data-dir):"
                                      " it has no checkpoints or log", reason="NO_DATA_DIR")
    return model.journal


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as listed: its name, the model version it holds, when it was made (ns since
    the epoch) and its file's size in bytes."""
    name: str
    model_version: int
    created_unix_nanos: int
    num_bytes: int


def create_checkpoint(model: ServedModel, name: str) -> Checkpoint:
    """Saves the model's current values (one consistent version) as checkpoint `name`, with
    its optimizer (configuration and state) and training mode."""
    check_checkpoint_name(name)
    with model.lock.read():
        return journal_of(model).create_checkpoint(model, name)


def restore_checkpoint(model: ServedModel, name: str, expected_model_version: int | None = None,
                       ctx: WriteContext | None = None) -> WriteResult:
    """Rolls the model back to checkpoint `name` as one write (versions keep growing), the
    optimizer (configuration and state) and training mode included: they become the
    checkpoint's, as `optimizer.load_state_dict` of a torch checkpoint would."""
    journal = journal_of(model)
    firsts = [n for n, _ in model.state_entries(every_name=False)]
    values = journal.read_checkpoint(name, firsts)
    stored = journal.read_checkpoint_training(name)
    if stored is None:  # a checkpoint from before training state was saved
        return model.restore_values(values, "restore_checkpoint", expected_model_version,
                                    ctx=ctx or WriteContext())
    tr = training.trainer(model)
    with tr.cond:  # taken before the model's lock, as by steps and pushes
        try:
            install = training.prepare_restore(model, *stored)
        except (NotFoundError, InvalidArgumentError) as e:
            raise InvalidArgumentError(f"checkpoint {name!r} cannot be restored: {e}",
                                       reason="CHECKPOINT_MISMATCH",
                                       metadata={"checkpoint": name}) from None
        saved = (tr.optimizer, tr.config, tr.round, tr.round.discarded)

        def undo() -> None:
            # The condition is held throughout: no waiter saw the installed state.
            tr.optimizer, tr.config, tr.round = saved[:3]
            tr.round.discarded = saved[3]

        return model.restore_values(values, "restore_checkpoint", expected_model_version,
                                    ctx=ctx or WriteContext(), before_commit=install,
                                    undo=undo)


def export_bytes(model: ServedModel, name: str = "") -> Iterator[bytes]:
    """A plain safetensors state_dict of checkpoint `name` (or of the current values, copied
    under the read lock so that no lock is held while the bytes are sent)."""
    if name:
        return journal_of(model).checkpoint_bytes(name)
    with model.lock.read():
        entries = [(n, t.to("cpu", copy=True)) for n, t in model.state_entries(every_name=True)]
        info = {"model_version": model.version, "created_ns": time.time_ns(),
                "model_id": model.id}
    return st.iter_file_bytes(entries, {_CHECKPOINT_KEY: json.dumps(info)})


def compact(model: ServedModel) -> tuple[int, int]:
    """Compacts now; returns (model version of the snapshot, log bytes folded in)."""
    journal = journal_of(model)
    done = journal.compact(model, wait=True)
    if done is None:
        raise FailedPreconditionError(f"model {model.id!r} is being deleted",
                                      reason="NO_DATA_DIR")
    return done



# ----------------------------------------------------------------------------- helpers


def _snapshot_name(gen: int) -> str:
    return f"snapshot-{gen:08d}.safetensors"


def _wal_name(gen: int) -> str:
    return f"wal-{gen:08d}.log"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class PreparedSnapshot:
    """A snapshot captured (what to write), then written to its temporary file."""

    gen: int
    path: Path
    model_version: int
    state: dict[str, Any]
    inline: list[tuple[str, torch.Tensor]]  # small storages, optimizer state, history
    to_write: list[tuple[str, str, torch.Tensor]]  # (storage, new value file, value)
    manifest: dict[str, dict[str, Any]]  # storage -> {"file", "dtype", "shape"}
    tmp: Path | None = None
    wal: WalWriter | None = None  # the new log, switched to at commit (prepare_snapshot)
    old_wal: WalWriter | None = None  # the log switched away from (compact)
    folded: int = 0
    old_files: set[str] = field(default_factory=set)
    saved_log_files: dict[str, int] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)


def _capture(model: ServedModel, directory: Path, gen: int, files: dict[str, str],
             threshold: int, *, copy: bool, override: SnapshotState | None = None
             ) -> PreparedSnapshot:
    """What snapshot `gen` holds (caller holds the model's lock): storages of at least
    `threshold` bytes in value files (the one in `files` that holds a storage's current value
    is adopted; others get a new one), the rest inline. With `copy`, the tensors to write are
    copied, so the lock can be released before they are written."""
    entries = model.state_entries(every_name=False)
    versions = {n: model.tensor_version(n) for n, _ in entries}
    model_version = model.version
    recent = list(model.recent.items())
    overridden: dict[str, torch.Tensor] = {}
    if override is not None:
        overridden = override.values
        versions.update(dict(override.result.updated))
        model_version = override.result.model_version
        if override.request_id:
            recent = [(r, w) for r, w in recent if r != override.request_id]
            recent.append((override.request_id, override.result))

    def owned(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True) if copy else t

    inline: list[tuple[str, torch.Tensor]] = []
    to_write: list[tuple[str, str, torch.Tensor]] = []
    manifest: dict[str, dict[str, Any]] = {}
    for n, t in entries:
        v = overridden.get(n, t)
        if v.numel() * v.element_size() < threshold:
            inline.append((n, owned(v) if n not in overridden else v))
            continue
        f = None if n in overridden else files.get(n)
        if f is None:
            f = f"{uuid.uuid4().hex}.bin"
            to_write.append((n, f, owned(v) if n not in overridden else v))
        manifest[n] = {"file": f, "dtype": wal_format.dtype_name(v.dtype),
                       "shape": list(v.shape)}
    state: dict[str, Any] = {
        "model_version": model_version,
        "versions": versions,
        "training": model.training_flags(),
        # The spec the values fit: it changes when lazy modules materialize.
        "spec": _spec.spec_to_json(model.spec),
        **({"module_pickle": base64.b64encode(model.source).decode()} if model.source else {}),
        "recent": [[rid, _result_to_json(r)] for rid, r in recent[-MAX_RECENT_REQUESTS:]],
        "files": manifest}
    meta, tensors = training.training_state(model)
    if meta is not None:
        history = training.step_history(model)
        state["train"] = {"meta": meta, "tensors": [k for k, _ in tensors],
                          "step_versions": bool(history)}
        inline += [(_OPTIMIZER_PREFIX + k, owned(t)) for k, t in tensors]
        if history:
            inline.append((_STEP_VERSIONS, torch.tensor(history, dtype=torch.int64)))
    return PreparedSnapshot(gen, directory / _snapshot_name(gen), model_version, state, inline,
                            to_write, manifest)


def _write_prepared(prep: PreparedSnapshot, values_dir: Path, fsync: bool) -> None:
    """Writes the captured snapshot's new value files (synced, with their directory) and then
    the snapshot itself to its temporary file; on failure removes what it wrote."""
    try:
        for _, fname, t in prep.to_write:
            write_value_file(values_dir / fname, buffers.byte_view(t), fsync)
            prep.written.append(fname)
        if prep.written and fsync:
            st.fsync_dir(values_dir)
        prep.tmp = st.write_tmp(prep.path, prep.inline, {_STATE_KEY: json.dumps(prep.state)},
                                fsync=fsync)
    except BaseException:
        _remove_prepared(prep, values_dir)
        raise
    prep.to_write = [(n, f, torch.empty(0)) for n, f, _ in prep.to_write]  # copies released
    prep.inline = []


def _remove_prepared(prep: PreparedSnapshot, values_dir: Path) -> None:
    for fname in prep.written:
        (values_dir / fname).unlink(missing_ok=True)
    prep.written = []
    if prep.tmp is not None:
        prep.tmp.unlink(missing_ok=True)


def _entry_bytes(e: dict[str, Any]) -> int:
    n = wal_format.dtype_of(e["dtype"]).itemsize
    for s in e["shape"]:
        n *= int(s)
    return n


def _snapshot_bytes(snap: Path, manifest: dict[str, dict[str, Any]]) -> int:
    return snap.stat().st_size + sum(_entry_bytes(e) for e in manifest.values())


def _read_value(values_dir: Path, e: dict[str, Any], ref: Path, offset: int) -> torch.Tensor:
    """The tensor a value-file entry names; ValueFileError if the file is missing or short."""
    t = torch.empty(e["shape"], dtype=wal_format.dtype_of(e["dtype"]))
    path = values_dir / e["file"]
    try:
        read_value_file(path, t.reshape(-1).view(torch.uint8))
    except FileNotFoundError:
        raise ValueFileError(ref, offset, path, "missing") from None
    except ValueError as err:
        raise ValueFileError(ref, offset, path, f"damaged ({err})") from None
    return t


def _tensor_entries(tensors: Sequence[tuple[str, torch.Tensor]], blobs: list[Any], offset: int
                    ) -> tuple[list[dict[str, Any]], int]:
    """Appends the tensors' bytes to `blobs` from payload `offset`; returns their entries."""
    out = []
    for key, t in tensors:
        e, offset = wal_format.tensor_entry(t, blobs, offset, buffers.byte_view(t))
        out.append({"key": key, **e})
    return out, offset


def _tensors_from(entries: Sequence[dict[str, Any]], payload: bytearray
                  ) -> dict[str, torch.Tensor]:
    return {e["key"]: wal_format.tensor_from(e, payload) for e in entries}


def _first_name(model: ServedModel, name: str) -> str:
    return model._first[model.ref(name).group]


def _record_files(model: ServedModel, header: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(storage, value file, bytes) of every whole-tensor value file a record wrote."""
    if header.get("t") != "write":
        return []
    return [(_first_name(model, e["name"]), e["file"], _entry_bytes(e))
            for e in header["changes"] if "file" in e]


def _inline_writes(model: ServedModel, header: dict[str, Any]) -> list[str]:
    """Storages a record wrote with values inside the log (no value file holds them now)."""
    if header.get("t") != "write":
        return []
    return [_first_name(model, e["name"]) for e in header["changes"] if "file" not in e]


def _replay(model: ServedModel, header: dict[str, Any], payload: bytearray, values_dir: Path,
            wal_path: Path, offset: int) -> None:
    kind = header.get("t")
    if kind == "train":
        _spec.get_submodule(model.module, header["path"]).train(header["training"])
        return
    if kind != "write":
        training.replay_record(model, header, _tensors_from(header.get("tensors", []), payload))
        return
    changes = []
    for e in header["changes"]:
        index = wal_format.decode_index(e, payload)
        value = (_read_value(values_dir, e, wal_path, offset) if "file" in e
                 else wal_format.tensor_from(e, payload))
        changes.append(Change(model.ref(e["name"]), index, value))
    result = _result_from_json(header["result"])
    model.replay(changes, result)
    aux = header.get("aux")
    if aux is not None:
        training.replay_step(model, aux, _tensors_from(aux["tensors"], payload),
                             result.model_version)
    model.remember(header.get("rid", ""), result)

# ----------------------------------------------------------------------------- offline check


@dataclass
class LogCheck:
    """One log of a model directory: what `wal.scan` found, and the first record that
    references a missing or damaged value file (its offset and the file), if any."""

    path: Path
    scan: Scan
    bad_file_at: int | None = None
    bad_file: str = ""

    @property
    def state(self) -> str:
        """"ok", "torn tail" or "corrupt" (a damaged record or a missing value file)."""
        return "corrupt" if self.bad_file_at is not None else self.scan.state

    @property
    def cut_at(self) -> int:
        """Where `repair` cuts this log: before the first damaged record."""
        at = [a for a in (self.scan.corrupt_at, self.bad_file_at) if a is not None]
        return min(at) if at else self.scan.valid


@dataclass
class DirCheck:
    """What recovery will make of one model directory (server stopped)."""

    model_id: str
    logs: list[LogCheck]
    snapshot_missing: list[str]  # value files the snapshot names that are missing or damaged
    orphans: list[str]  # value files nothing references (recovery removes them)

    @property
    def corrupt(self) -> bool:
        return bool(self.snapshot_missing) or any(c.state == "corrupt" for c in self.logs)


def _file_ok(values_dir: Path, fname: str, size: int) -> bool:
    try:
        return (values_dir / fname).stat().st_size == size
    except OSError:
        return False


def check_model_dir(d: Path) -> DirCheck:
    """Reads a model directory as recovery would: its newest snapshot's value files, every
    log from that generation on (records, and the value files they reference) and the value
    files nothing references."""
    values_dir = d / _VALUES
    gens = sorted(int(m.group(1)) for p in d.iterdir() if (m := _SNAPSHOT.fullmatch(p.name)))
    gen = gens[-1] if gens else 0
    manifest: dict[str, dict[str, Any]] = {}
    if gens:
        _, meta, _ = st.read_header(d / _snapshot_name(gen))
        manifest = json.loads(meta.get(_STATE_KEY, "{}")).get("files", {})
    live = {e["file"] for e in manifest.values()}
    missing = sorted(e["file"] for e in manifest.values()
                     if not _file_ok(values_dir, e["file"], _entry_bytes(e)))
    logs = []
    for _, path in sorted((int(m.group(1)), p) for p in d.iterdir()
                          if (m := _WAL.fullmatch(p.name)) and int(m.group(1)) >= gen):
        check = LogCheck(path, wal_scan(path))
        pos = 0
        try:
            for rec in read_records(path):
                for fname, size in wal_format.record_files(rec.header):
                    live.add(fname)
                    if check.bad_file_at is None and not _file_ok(values_dir, fname, size):
                        check.bad_file_at, check.bad_file = pos, fname
                pos = rec.end
        except WalCorruptError:
            pass
        logs.append(check)
    orphans = sorted(p.name for p in values_dir.iterdir()
                     if p.name not in live) if values_dir.is_dir() else []
    return DirCheck(d.name, logs, missing, orphans)


def repair_model_dir(d: Path) -> list[str]:
    """Cuts a damaged model directory's logs before their first bad record (a corrupt frame
    or a reference to a missing value file; the later logs are cut whole, since their writes
    came after), keeping the cut bytes in .corrupt files, and removes orphan value files.
    Returns what it did, one line each."""
    check = check_model_dir(d)
    done = []
    cutting = False
    for c in check.logs:
        if cutting or c.state == "corrupt":
            at = 0 if cutting else c.cut_at
            kept = wal_cut(c.path, at)
            done.append(f"{c.path.name}: cut at byte {at} ({c.scan.size - at} bytes moved to "
                        f"{kept.name if kept else '-'})")
            cutting = True
    for fname in check.orphans:
        (d / _VALUES / fname).unlink(missing_ok=True)
    if check.orphans:
        done.append(f"removed {len(check.orphans)} unreferenced value files")
    return done
