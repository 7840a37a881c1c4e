"""Durable models under a data directory: snapshots, a write-ahead log, checkpoints.

Layout (one directory per model; a model id never starts with "."):

    {data_dir}/models/{id}/model.json                 spec (ModelSpec as JSON) and device
    {data_dir}/models/{id}/snapshot-{gen}.safetensors  every storage once, by its first name;
                                                      the optimizer's state tensors as
                                                      "paramhub.optimizer/{param}/{key}" and the
                                                      staleness history; metadata
                                                      "paramhub.state" holds versions, training
                                                      flags, recent request ids, the optimizer's
                                                      and the training mode's configuration
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
- Compaction writes snapshot {gen+1} (temporary file, fsync, rename: the rename is the commit
  point) while holding the model's read lock (readers go on, writers wait), starts wal-{gen+1}
  and deletes generation {gen}. It runs in the background once a log outgrows both
  `compact_bytes` and the snapshot, and on CompactModel.
- Recovery loads the newest snapshot, replays its log up to the first torn record (a crash
  mid-append; never acknowledged), truncates the log there and removes leftovers.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paramhub import _codec
from paramhub.common import spec as _spec
from paramhub.errors import (AlreadyExistsError, FailedPreconditionError, InvalidArgumentError,
                             NotFoundError)
from paramhub.common import pb
from paramhub_server.core import safetensors_io as st
from paramhub_server.core import training
from paramhub_server.core.model import (MAX_RECENT_REQUESTS, Change, Extra, Program,
                                        ServedModel, SnapshotState, WriteContext, WriteResult)
from paramhub_server.core.wal import (WalCorruptError, WalWriter, disk_full, layout,
                                      read_records)

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


def _index_to_json(index: tuple[Any, ...]) -> list[Any] | None:
    """A write's index as JSON when it holds only ints, slices, Ellipsis and None (an int,
    [start, stop, step], "..." and null); None when it holds a tensor (logged as IndexItems).
    Cheaper than serializing IndexItems for the common small write, and readable in the log."""
    out: list[Any] = []
    for i in index:
        kind = type(i)
        if kind is int or i is None:
            out.append(i)
        elif kind is slice:
            out.append([i.start, i.stop, i.step])
        elif i is Ellipsis:
            out.append("...")
        else:
            return None
    return out


def _index_from_json(items: list[Any]) -> tuple[Any, ...]:
    """The inverse of `_index_to_json`."""
    return tuple(slice(*i) if isinstance(i, list) else Ellipsis if i == "..." else i
                 for i in items)


def _result_to_json(r: WriteResult) -> list[Any]:
    return [r.rpc, [[n, v] for n, v in r.updated], r.model_version]


def _result_from_json(j: list[Any]) -> WriteResult:
    return WriteResult(j[0], [(n, int(v)) for n, v in j[1]], int(j[2]))


class Store:
    """The data directory: creates, opens, deletes and compacts durable models."""

    def __init__(self, data_dir: Path, *, fsync: str = "always", fsync_interval: float = 0.05,
                 compact_bytes: int = 64 << 20) -> None:
        self.root = Path(data_dir)
        self.models_dir = self.root / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.compact_bytes = compact_bytes
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
        state = {n: torch.empty(shape, dtype=_codec.dtype_from_proto(dt))
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
                meta["program_state"] = {n: [_codec.dtype_to_proto(d), list(shape)]
                                         for n, (d, shape) in p.state.items()}
                st.write_file(tmp / _CONSTANTS, list(p.constants.items()), {},
                              fsync=self.fsync != "off")
            _write_text(tmp / "model.json", json.dumps(meta, indent=1))
            snap = tmp / _snapshot_name(1)
            os.replace(_write_snapshot(snap, model, self.fsync != "off"), snap)
            size = snap.stat().st_size
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
        model.journal = ModelStore(self, model.id, final, 1, size)

    def open(self, model: ServedModel) -> ModelStore:
        """Recovers a stored model's state into `model` and attaches its journal."""
        d = self.models_dir / model.id
        gens = sorted(int(m.group(1)) for p in d.iterdir()
                      if (m := _SNAPSHOT.fullmatch(p.name)))
        if not gens:
            raise ValueError(f"model {model.id}: no snapshot in {d}")
        gen = gens[-1]
        snap = d / _snapshot_name(gen)
        # Lazy modules loaded with values (but not yet run) keep their lazy spec: their
        # tensors take the snapshot's shapes, as load_state_dict gave them.
        header, _, _ = st.read_header(snap)
        lazy = {n: header[n]["shape"] for n, _ in model.uninitialized if n in header}
        if lazy:
            model.materialize_shapes(lazy)
        firsts = [n for n, _ in model.state_entries(every_name=False)]
        values, meta = st.read_file(snap, firsts)
        state = json.loads(meta[_STATE_KEY])
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
        wal_path = d / _wal_name(gen)
        valid = 0
        n = 0
        try:
            for rec in read_records(wal_path):
                _replay(model, rec.header, rec.payload)
                valid = rec.end
                n += 1
        except WalCorruptError as e:
            log.error("model %s is NOT loaded: %s", model.id, e)
            raise
        if wal_path.exists() and wal_path.stat().st_size != valid:
            with open(wal_path, "r+b") as f:
                f.truncate(valid)
                os.fsync(f.fileno())
        for p in d.iterdir():  # older generations and temporary files of a crashed compaction
            m = _SNAPSHOT.fullmatch(p.name) or _WAL.fullmatch(p.name)
            if (m and int(m.group(1)) < gen) or p.name.endswith(".tmp"):
                p.unlink()
        (d / "checkpoints").mkdir(exist_ok=True)
        for p in (d / "checkpoints").glob("*.tmp"):
            p.unlink()
        log.info("recovered model %s: snapshot %d + %d log records, version %d",
                 model.id, gen, n, model.version)
        ms = ModelStore(self, model.id, d, gen, snap.stat().st_size)
        model.journal = ms
        return ms

    def delete(self, model: ServedModel) -> None:
        """Removes a model's directory (its checkpoints too). Caller holds its write lock."""
        if isinstance(model.journal, ModelStore):
            model.journal.close()
        model.journal = None
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
                with model.lock.read():
                    if isinstance(model.journal, ModelStore):
                        model.journal.snapshot(model)
            except Exception:  # noqa: BLE001 - logged; the log keeps every write meanwhile
                log.exception("background compaction of %s failed", model.id)


class ModelStore:
    """One model's durable state; the `Journal` a ServedModel calls under its locks."""

    def __init__(self, store: Store, model_id: str, directory: Path, gen: int,
                 snapshot_bytes: int) -> None:
        self.store = store
        self.model_id = model_id
        self.dir = directory
        self.gen = gen
        self.snapshot_bytes = snapshot_bytes
        self.wal = WalWriter(directory / _wal_name(gen), store.fsync, store.fsync_interval)
        self._lock = threading.Lock()  # snapshots and checkpoint files, one at a time

    # --------------------------------------------------------------- Journal (write lock held)

    def log_write(self, model: ServedModel, op: str, rpc: str, changes: Sequence[Change],
                  result: WriteResult, ctx: WriteContext, time_ns: int,
                  extra: Extra | None = None) -> None:
        """Appends a write's record (fsynced under "always") before it is applied; `extra`
        (an optimizer step's new state) goes into the same record as "aux"."""
        blobs: list[Any] = []
        entries = []
        off = 0  # payload offset of the next blob
        for c in changes:
            entry: dict[str, Any] = {"name": c.ref.name, "idx": None}
            if c.index:
                simple = _index_to_json(c.index)
                if simple is not None:
                    entry["ix"] = simple
                else:  # tensor indices travel as their serialized IndexItems
                    raw = pb.SetSliceRequest(
                        index=_codec.index_to_proto(c.index)).SerializeToString()
                    entry["idx"] = [off, off + len(raw)]
                    off += len(raw)
                    blobs.append(raw)
            value = c.value
            n = value.numel() * value.element_size()
            # Small values as bytes (one copy, no views); big ones are written from their memory.
            data = _codec.tensor_bytes(value) if n <= _SMALL_VALUE else _codec._byte_view(value)
            entry["dtype"] = _codec.dtype_to_proto(c.value.dtype)
            entry["shape"] = list(c.value.shape)
            entry["data"] = [off, off + n]
            off += n
            blobs.append(data)
            entries.append(entry)
        header = {"t": "write", "op": op, "result": _result_to_json(result),
                  "rid": ctx.request_id, "writer": ctx.writer, "time": time_ns,
                  "changes": entries}
        if extra is not None:
            aux, tensors = extra
            header["aux"] = {**aux, "tensors": _tensor_entries(tensors, blobs)}
            _resolve_offsets(header, blobs)
        self.wal.append(header, blobs)

    def log_record(self, model: ServedModel, header: dict[str, Any],
                   tensors: Sequence[tuple[str, torch.Tensor]] = ()) -> None:
        """Appends a record that is not a tensor write (optimizer created, training mode
        configured, an empty step), with `tensors` as its payload."""
        blobs: list[Any] = []
        header = {**header, "tensors": _tensor_entries(tensors, blobs)}
        _resolve_offsets(header, blobs)
        self.wal.append(header, blobs)
        self.after_commit(model)

    def reserve(self, nbytes: int) -> None:
        """Disk space for the next record of about `nbytes` bytes (DISK_FULL if there is none),
        before a write that changes tensors in place runs."""
        self.wal.reserve(nbytes)

    def log_training(self, model: ServedModel, path: str, training: bool) -> None:
        """Appends a train()/eval() record."""
        self.wal.append({"t": "train", "path": path, "training": training})

    def after_commit(self, model: ServedModel) -> None:
        """Schedules a compaction once the log outgrows the threshold and the snapshot."""
        if self.wal.size > max(self.store.compact_bytes, self.snapshot_bytes):
            self.store.request_compaction(model)

    def snapshot(self, model: ServedModel) -> int:
        """Compaction: writes snapshot gen+1 from the current state, starts a new log and drops
        the old generation. Caller holds the model's read or write lock. Returns the log bytes
        folded in. On failure (a full disk: DISK_FULL) nothing changes and no file is left."""
        with self._lock:
            return self.commit_snapshot(self.prepare_snapshot(model))

    def prepare_snapshot(self, model: ServedModel, override: SnapshotState | None = None
                         ) -> PreparedSnapshot:
        """Writes snapshot gen+1 (of the current state, or of the state `override` describes:
        a restore that is not applied yet) to a temporary file and creates the new, empty log;
        `commit_snapshot` makes it the current generation. On failure nothing is left behind."""
        new_gen = self.gen + 1
        path = self.dir / _snapshot_name(new_gen)
        tmp = _write_snapshot(path, model, self.store.fsync != "off", override)
        try:
            # The new log exists before the snapshot is renamed into place: recovery takes the
            # newest snapshot and replays its (possibly empty) log.
            wal_path = self.dir / _wal_name(new_gen)
            wal_path.unlink(missing_ok=True)  # a leftover of a failed attempt
            try:
                wal = WalWriter(wal_path, self.store.fsync, self.store.fsync_interval)
            except OSError as e:
                wal_path.unlink(missing_ok=True)
                raise disk_full(wal_path, e) or e from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return PreparedSnapshot(new_gen, tmp, path, wal, self.wal.size)

    def commit_snapshot(self, prepared: PreparedSnapshot) -> int:
        """Renames a prepared snapshot into place (the commit point), switches to its log and
        drops the old generation. Returns the log bytes folded in."""
        os.replace(prepared.tmp, prepared.path)
        st.fsync_dir(self.dir)
        size = prepared.path.stat().st_size
        old_gen, old_wal = self.gen, self.wal
        self.wal = prepared.wal
        self.gen, self.snapshot_bytes = prepared.gen, size
        old_wal.close()
        for p in (self.dir / _snapshot_name(old_gen), self.dir / _wal_name(old_gen)):
            p.unlink(missing_ok=True)
        log.info("compacted model %s: %d log bytes into snapshot %d (%d bytes)",
                 self.model_id, prepared.folded, prepared.gen, size)
        return prepared.folded

    def abandon_snapshot(self, prepared: PreparedSnapshot) -> None:
        """Drops a prepared snapshot that will not be committed."""
        prepared.wal.close()
        prepared.tmp.unlink(missing_ok=True)
        (self.dir / _wal_name(prepared.gen)).unlink(missing_ok=True)

    def close(self) -> None:
        """Closes the log (flushing it)."""
        self.wal.close()

    def lag(self) -> tuple[int, bool]:
        """(log bytes not yet folded into a snapshot, whether appends await an fsync)."""
        return self.wal.size, self.wal.unsynced

    # --------------------------------------------------------------- checkpoints

    def _checkpoint_path(self, name: str) -> Path:
        return self.dir / "checkpoints" / f"{check_checkpoint_name(name)}.safetensors"

    def create_checkpoint(self, model: ServedModel, name: str) -> pb.CheckpointInfo:
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
        return pb.CheckpointInfo(name=name, model_version=info["model_version"],
                                 created_unix_nanos=info["created_ns"], num_bytes=size)

    def checkpoint_info(self, name: str) -> pb.CheckpointInfo:
        """A checkpoint's description; NotFoundError (CHECKPOINT_NOT_FOUND) if absent."""
        path = self._checkpoint_path(name)
        if not path.exists():
            raise NotFoundError(f"checkpoint {name!r} of {self.model_id!r} does not exist",
                                reason="CHECKPOINT_NOT_FOUND",
                                metadata={"model": self.model_id, "checkpoint": name})
        _, meta, _ = st.read_header(path)
        info = json.loads(meta.get(_CHECKPOINT_KEY, "{}"))
        return pb.CheckpointInfo(name=name, model_version=int(info.get("model_version", 0)),
                                 created_unix_nanos=int(info.get("created_ns", 0)),
                                 num_bytes=path.stat().st_size)

    def list_checkpoints(self) -> list[pb.CheckpointInfo]:
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


def create_checkpoint(model: ServedModel, name: str) -> pb.CheckpointInfo:
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
    with model.lock.read():
        return model.version, journal.snapshot(model)


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
    """A snapshot written to its temporary file, with its new (empty) log open."""

    gen: int
    tmp: Path
    path: Path
    wal: WalWriter
    folded: int


def _write_snapshot(path: Path, model: ServedModel, fsync: bool,
                    override: SnapshotState | None = None) -> Path:
    """Writes the snapshot to `{path}.tmp` (removed on failure); returns that path."""
    entries = model.state_entries(every_name=False)
    versions = {n: model.tensor_version(n) for n, _ in entries}
    model_version = model.version
    recent = list(model.recent.items())
    if override is not None:
        entries = [(n, override.values.get(n, t)) for n, t in entries]
        versions.update(dict(override.result.updated))
        model_version = override.result.model_version
        if override.request_id:
            recent = [(r, w) for r, w in recent if r != override.request_id]
            recent.append((override.request_id, override.result))
    state: dict[str, Any] = {
        "model_version": model_version,
        "versions": versions,
        "training": model.training_flags(),
        # The spec the values fit: it changes when lazy modules materialize.
        "spec": _spec.spec_to_json(model.spec),
        **({"module_pickle": base64.b64encode(model.source).decode()} if model.source else {}),
        "recent": [[rid, _result_to_json(r)] for rid, r in recent[-MAX_RECENT_REQUESTS:]]}
    meta, tensors = training.training_state(model)
    if meta is not None:
        history = training.step_history(model)
        state["train"] = {"meta": meta, "tensors": [k for k, _ in tensors],
                          "step_versions": bool(history)}
        entries = entries + [(_OPTIMIZER_PREFIX + k, t) for k, t in tensors]
        if history:
            entries.append((_STEP_VERSIONS, torch.tensor(history, dtype=torch.int64)))
    return st.write_tmp(path, entries, {_STATE_KEY: json.dumps(state)}, fsync=fsync)


def _tensor_entries(tensors: Sequence[tuple[str, torch.Tensor]], blobs: list[Any]
                    ) -> list[dict[str, Any]]:
    """Appends the tensors' bytes to `blobs`; returns their header entries (offsets resolved
    by `_resolve_offsets`)."""
    out = []
    for key, t in tensors:
        if t.device.type != "cpu":
            t = t.to("cpu")
        out.append({"key": key, "dtype": _codec.dtype_to_proto(t.dtype), "shape": list(t.shape),
                    "data": len(blobs)})
        blobs.append(_codec._byte_view(t))
    return out


def _resolve_offsets(header: dict[str, Any], blobs: Sequence[Any]) -> None:
    """Turns the blob numbers of tensor entries ("tensors", "aux.tensors") into payload
    offsets."""
    offsets = layout([b.numel() if hasattr(b, "numel") else len(b) for b in blobs])
    for e in header.get("tensors", []) + header.get("aux", {}).get("tensors", []):
        e["data"] = offsets[e["data"]]


def _tensors_from(entries: Sequence[dict[str, Any]], payload: bytearray
                  ) -> dict[str, torch.Tensor]:
    out = {}
    for e in entries:
        out[e["key"]] = _value_from(e, payload)
    return out


def _value_from(e: dict[str, Any], payload: bytearray) -> torch.Tensor:
    dtype = _codec.dtype_from_proto(e["dtype"])
    b, end = e["data"]
    if end > b:
        value = torch.frombuffer(payload, dtype=torch.uint8, offset=b, count=end - b)
        return value.view(dtype).reshape(e["shape"])
    return torch.empty(e["shape"], dtype=dtype)


def _replay(model: ServedModel, header: dict[str, Any], payload: bytearray) -> None:
    kind = header.get("t")
    if kind == "train":
        _spec.get_submodule(model.module, header["path"]).train(header["training"])
        return
    if kind != "write":
        training.replay_record(model, header, _tensors_from(header.get("tensors", []), payload))
        return
    changes = []
    for e in header["changes"]:
        index: tuple[Any, ...] = ()
        if "ix" in e:
            index = _index_from_json(e["ix"])
        elif e["idx"] is not None:
            b, end = e["idx"]
            index = _codec.index_from_proto(pb.SetSliceRequest.FromString(
                bytes(payload[b:end])).index)
        changes.append(Change(model.ref(e["name"]), index, _value_from(e, payload)))
    result = _result_from_json(header["result"])
    model.replay(changes, result)
    aux = header.get("aux")
    if aux is not None:
        training.replay_step(model, aux, _tensors_from(aux["tensors"], payload),
                             result.model_version)
    model.remember(header.get("rid", ""), result)
