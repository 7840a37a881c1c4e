"""The write-ahead log: an append-only file of framed records, fsynced before a write is
acknowledged (under the default policy), and the value files big writes go to.

A record is

    magic | u32 header length | u64 payload length | u32 CRC-32 of header+payload
    | header (UTF-8 JSON) | payload (raw bytes that the header points into)

The magic names the record format's version: b"PHW2" is written (the header's contents are
described in wal_format.py); b"PHW1" records, written before, are still read (`Record.version`
tells the reader which it holds).

Nothing is pickled. A crash can leave a torn last record; `read_records` stops at the first
record that is incomplete or fails its CRC, and the owner truncates the file there. Such a record
was never acknowledged: under `fsync="always"` a write is acknowledged only after its record is
completely written and fsynced. Only a torn *tail* is dropped: a bad record followed by an
intact one (the log was damaged, not cut short) raises `WalCorruptError` and recovery stops
there, leaving the file alone (`paramhub wal check|repair DATA_DIR`).

A failed append (ENOSPC, EIO, ...) truncates the file back to its last complete record before
the error propagates, so a later append never lands behind half a record; a full disk is
`ResourceExhaustedError` reason DISK_FULL (metadata: path, free bytes).

Fsync policies:
- "always": fdatasync after every record, before the write is acknowledged. Nothing acknowledged
  is lost on kill -9 or power loss. Writers that append at the same time share fsyncs (group
  commit): `append(..., defer=True)` writes the record to the OS and returns its end; the
  writer releases its model's lock and `wait_durable(end)` returns once one fdatasync has
  covered that end (the first waiter syncs for everyone queued behind it).
- "batch": records are written to the OS at once (so kill -9 loses nothing acknowledged) and a
  background thread fdatasyncs every `interval` seconds; power loss may lose the last interval.
- "off": records are written to the OS at once, never fsynced by paramhub; power loss may lose
  whatever the OS had not yet flushed.

Why ~550 lines: the record framing, the writer with its fsync policies and group commit, and the
reader share the format's constants; the record contents are in wal_format.py.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paramhub.common.errors import ResourceExhaustedError

log = logging.getLogger(__name__)

#: Record magics by format version; `MAGIC` is the one written.
MAGICS = {b"PHW1": 1, b"PHW2": 2}
MAGIC = b"PHW2"
VERSION = MAGICS[MAGIC]
_MAGIC_PREFIX = b"PHW"
_FRAME = struct.Struct("<4sIQI")
FSYNC_POLICIES = ("always", "batch", "off")
#: Largest header accepted when reading; anything larger is a corrupt frame.
_MAX_HEADER = 64 << 20
_PIECE = 8 << 20
#: Records whose payload is at most this many bytes are written with one syscall.
_SMALL = 64 << 10


#: errno values that mean "no space left" (a full disk or a quota).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


_FALLOC_FL_KEEP_SIZE = 1
try:
    _fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
except (OSError, AttributeError):  # not Linux
    _fallocate = None


def free_bytes(path: Path) -> int:
    """Bytes available to this process on the file system holding `path` (-1 if unknown)."""
    try:
        st = os.statvfs(path if path.is_dir() else path.parent)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def disk_full(path: Path, exc: OSError) -> ResourceExhaustedError | None:
    """RESOURCE_EXHAUSTED (DISK_FULL) for an ENOSPC/EDQUOT error on `path`; None otherwise."""
    if exc.errno not in _NO_SPACE:
        return None
    return ResourceExhaustedError(
        f"no space left for {path.name} ({exc.strerror}); nothing was written",
        reason="DISK_FULL", metadata={"limit": "disk", "path": str(path),
                                      "free_bytes": str(free_bytes(path))})


class WalCorruptError(Exception):
    """A log holds a corrupt record followed by intact ones: it was damaged, not cut short by
    a crash, so replaying only the prefix would silently drop acknowledged writes."""

    def __init__(self, path: Path, offset: int, next_valid: int) -> None:
        super().__init__(
            f"{path}: corrupt record at byte {offset}, yet an intact record follows at byte "
            f"{next_valid}; recovery stops here and leaves the file as it is. Inspect with "
            f"`paramhub wal check DATA_DIR`; `paramhub wal repair DATA_DIR MODEL` cuts the log "
            f"at byte {offset} (the bytes after it are kept in a .corrupt file)")
        self.path = path
        self.offset = offset
        self.next_valid = next_valid


def _view(buf: Any) -> memoryview:
    """A byte view of bytes, a memoryview, or a contiguous CPU uint8 tensor."""
    if hasattr(buf, "data_ptr"):  # a torch tensor of bytes
        n = buf.numel()
        if n == 0:
            return memoryview(b"")
        return memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")
    return memoryview(buf).cast("B")


class WalWriter:
    """Appends records to one log file. Not thread-safe: the owner serializes appends (the
    model's write lock does)."""

    def __init__(self, path: Path, fsync: str = "always", interval: float = 0.05) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, not {fsync!r}")
        self.path = path
        self.policy = fsync
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self.fd).st_size
        self._synced = self.size  # bytes an fdatasync has covered (group commit)
        self._syncing = False  # a waiter is in fdatasync for the others
        self._failed: OSError | None = None  # a deferred fdatasync failed: the log is unusable
        self._dirty = False
        self._closed = False
        self._reserved = False
        self._cv = threading.Condition()
        self._flusher: threading.Thread | None = None
        if fsync == "batch":
            self._interval = interval
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name=f"paramhub-wal-{path.parent.name}")
            self._flusher.start()

    def append(self, header: dict[str, Any], blobs: Sequence[Any] = (), *,
               defer: bool = False) -> int:
        """Writes one record (header JSON + the blobs concatenated as its payload) and, under
        "always", fdatasyncs it, unless `defer`: then the caller must `wait_durable` the
        returned end offset before acknowledging the write. Returns the file offset just past
        the record.

        The header should already hold the blobs' offsets (see `layout`)."""
        if self._failed is not None:
            raise self._failed_error()
        views = [_view(b) for b in blobs]
        head = json.dumps(header, separators=(",", ":")).encode()
        payload = sum(v.nbytes for v in views)
        crc = zlib.crc32(head)
        for v in views:
            crc = zlib.crc32(v, crc)
        frame = _FRAME.pack(MAGIC, len(head), payload, crc) + head
        try:
            if payload <= _SMALL:
                # One write (one syscall) for a small record instead of one per piece.
                self._write(b"".join([frame, *views]))
            else:
                self._write(frame)
                for v in views:
                    for start in range(0, v.nbytes, _PIECE):
                        self._write(v[start:start + _PIECE])
            if self.policy == "always" and not defer and self._synced == self.size:
                # Nothing else awaits an fsync: sync here (the failure is cut back cleanly).
                os.fdatasync(self.fd)
                synced = True
            else:
                synced = False
        except OSError as e:
            self._cut_back()
            raise disk_full(self.path, e) or e from None
        n = len(frame) + payload
        self.size += n
        if synced:
            with self._cv:
                self._synced = max(self._synced, self.size)
        if self._reserved:  # give back the preallocated space this record did not use
            self._reserved = False
            self._cut_back()
        if self.policy == "batch":
            with self._cv:
                self._dirty = True
        if self.policy == "always" and not defer and not synced:
            self.wait_durable(self.size)
        return self.size

    def wait_durable(self, end: int) -> None:
        """Returns once an fdatasync has covered the log up to `end` (under "always"; other
        policies return at once). Concurrent callers share one fdatasync: the first syncs
        everything written so far while the others wait for it (group commit)."""
        if self.policy != "always":
            return
        with self._cv:
            while self._synced < end:
                if self._failed is not None:
                    raise self._failed_error()
                if self._syncing or self._closed:
                    self._cv.wait()  # close() syncs everything and notifies
                    continue
                self._syncing = True
                target = self.size  # everything written by now, this record included
                self._cv.release()
                err: OSError | None = None
                try:
                    os.fdatasync(self.fd)
                except OSError as e:
                    err = e
                finally:
                    self._cv.acquire()
                    self._syncing = False
                    self._cv.notify_all()
                if err is not None:
                    # Records are in the file but may not be on disk, and Linux reports an
                    # fsync error once: no later fsync can vouch for them. The log refuses
                    # appends from now on (a restart recovers what is on disk).
                    log.error("fdatasync of %s failed: %s; the log refuses further writes",
                              self.path, err)
                    self._failed = err
                    raise self._failed_error()
                self._synced = max(self._synced, target)

    def _failed_error(self) -> Exception:
        err = self._failed
        assert err is not None
        return disk_full(self.path, err) or OSError(
            err.errno, f"{self.path}: an earlier fdatasync failed ({err.strerror}); this "
            "log takes no more writes until the server restarts")

    def reserve(self, nbytes: int) -> None:
        """Allocates disk space for the next `nbytes` bytes of appends (beyond the end of the
        file, which keeps its size), so that a write changed in place before it is logged (an
        optimizer step) learns of a full disk (DISK_FULL) before it changes anything. A no-op
        where the file system cannot preallocate. The next append releases what it left
        unused."""
        if nbytes <= 0 or _fallocate is None:
            return
        if _fallocate(self.fd, _FALLOC_FL_KEEP_SIZE, ctypes.c_int64(self.size),
                      ctypes.c_int64(nbytes)) != 0:
            err = ctypes.get_errno()
            if err in _NO_SPACE:
                self._cut_back()
                raise disk_full(self.path, OSError(err, os.strerror(err)))
            return  # EOPNOTSUPP and friends: appends find out as before
        self._reserved = True

    def _cut_back(self) -> None:
        """Drops whatever a failed append left after the last complete record."""
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            log.exception("%s: could not cut a failed append back to %d bytes", self.path,
                          self.size)

    def _write(self, data: Any) -> None:
        mv = memoryview(data).cast("B")
        while mv.nbytes:
            k = os.write(self.fd, mv)
            mv = mv[k:]

    def _flush_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait(self._interval)
                if self._closed:
                    return
                dirty, self._dirty = self._dirty, False
            if dirty:
                try:
                    os.fdatasync(self.fd)
                except OSError:  # closed underneath us during rotation
                    log.exception("background fsync of %s failed", self.path)

    @property
    def unsynced(self) -> bool:
        """Whether records were appended since the last fsync (only under "batch" or "off")."""
        return self._dirty

    def sync(self) -> None:
        """fdatasyncs now, whatever the policy."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        """Flushes (unless the policy is "off") and closes the file. Writers waiting for an
        fsync of this log are released once it is flushed."""
        with self._cv:
            if self._closed:
                return
            while self._syncing:  # a group-commit fsync is using the descriptor
                self._cv.wait()
            self._closed = True
            self._cv.notify_all()
        if self._flusher is not None:
            self._flusher.join()
        err: OSError | None = None
        try:
            if self.policy != "off" and self._failed is None:
                os.fdatasync(self.fd)
        except OSError as e:
            err = e
        finally:
            with self._cv:
                if err is not None:
                    self._failed = err
                elif self._failed is None:
                    self._synced = self.size
                self._cv.notify_all()
            os.close(self.fd)
        if err is not None:
            raise err


def layout(sizes: Sequence[int]) -> list[list[int]]:
    """[begin, end) payload offsets of consecutive blobs of these sizes."""
    out, off = [], 0
    for n in sizes:
        out.append([off, off + n])
        off += n
    return out


@dataclass
class Record:
    """One record read back: its header and its payload bytes."""

    header: dict[str, Any]
    payload: bytearray
    end: int  # file offset just past this record
    version: int = VERSION  # the record format it was written in (its magic)


def _frame_at(f: Any, pos: int, size: int
              ) -> tuple[int, dict[str, Any], bytearray, int] | None:
    """(end offset, header, payload, format version) of an intact record starting at `pos`,
    else None."""
    f.seek(pos)
    raw = f.read(_FRAME.size)
    if len(raw) < _FRAME.size:
        return None
    magic, hlen, plen, crc = _FRAME.unpack(raw)
    end = pos + _FRAME.size + hlen + plen
    if magic not in MAGICS or hlen > _MAX_HEADER or end > size:
        return None
    head = f.read(hlen)
    payload = bytearray(plen)
    if len(head) != hlen or f.readinto(payload) != plen:
        return None
    if zlib.crc32(payload, zlib.crc32(head)) != crc:
        return None
    try:
        header = json.loads(head)
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    return end, header, payload, MAGICS[magic]


def next_intact(path: Path, start: int) -> int | None:
    """Offset of the first intact record that starts after `start`, if any (a scan for the
    magic bytes; each candidate is checked in full)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = start + 1
        carry = b""
        while pos < size:
            f.seek(pos)
            block = f.read(_PIECE)
            if not block:
                return None
            data = carry + block
            base = pos - len(carry)
            k = data.find(_MAGIC_PREFIX)
            while k >= 0:
                if base + k > start and _frame_at(f, base + k, size) is not None:
                    return base + k
                k = data.find(_MAGIC_PREFIX, k + 1)
            carry = data[-(len(MAGIC) - 1):]
            pos += len(block)
    return None


def _bad_record_end(path: Path, pos: int, size: int) -> int:
    """Where the bad record at `pos` ends by its own frame: `size` if its frame says it runs
    past the end of the file (a torn append: everything after `pos` is its), the end it
    announces if its frame is readable (bytes inside its payload are never taken for a record),
    else `pos + 1` (the frame itself is damaged: any later offset may start a record)."""
    with open(path, "rb") as f:
        f.seek(pos)
        raw = f.read(_FRAME.size)
    if len(raw) < _FRAME.size:
        return size
    magic, hlen, plen, _ = _FRAME.unpack(raw)
    if magic not in MAGICS or hlen > _MAX_HEADER:
        return pos + 1
    return min(size, pos + _FRAME.size + hlen + plen)


def read_records(path: Path) -> Iterator[Record]:
    """Yields every complete, intact record of a log in order, one at a time.

    Stops at the first torn or corrupt record (the tail a crash leaves): the `end` of the last
    record yielded is the length of the valid prefix, to which the caller truncates the file
    before appending again. If an intact record follows the bad one, the log was damaged rather
    than cut short: WalCorruptError, raised after the records before it were yielded.
    """
    if not path.exists():
        return
    size = path.stat().st_size
    valid = 0
    with open(path, "rb") as f:
        while valid < size:
            rec = _frame_at(f, valid, size)
            if rec is None:
                break
            valid, header, payload, version = rec
            yield Record(header, payload, valid, version)
    if valid < size:
        following = next_intact(path, _bad_record_end(path, valid, size) - 1)
        if following is not None:
            raise WalCorruptError(path, valid, following)
        log.warning("%s: ignoring %d bytes of torn log tail", path, size - valid)


@dataclass
class Scan:
    """What `scan` found in a log: intact records, where the intact prefix ends, the file size,
    and for a damaged log where the corrupt record starts and the next intact one."""

    records: int
    valid: int
    size: int
    corrupt_at: int | None = None
    next_valid: int | None = None

    @property
    def state(self) -> str:
        """"ok", "torn tail" (a crash cut the last record short: dropped at recovery) or
        "corrupt" (recovery refuses the model)."""
        if self.corrupt_at is not None:
            return "corrupt"
        return "ok" if self.valid == self.size else "torn tail"


def scan(path: Path) -> Scan:
    """Reads a whole log and says what recovery would make of it."""
    records = valid = 0
    try:
        for rec in read_records(path):
            records += 1
            valid = rec.end
    except WalCorruptError as e:
        return Scan(records, valid, path.stat().st_size, e.offset, e.next_valid)
    return Scan(records, valid, path.stat().st_size if path.exists() else 0)


def cut(path: Path, offset: int) -> Path | None:
    """Truncates a log at `offset`, first copying the bytes after it to
    `{path}.corrupt-{time}` (returned; None when there was nothing to cut)."""
    size = path.stat().st_size
    if offset >= size:
        return None
    keep = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    with open(path, "r+b") as f, open(keep, "wb") as out:
        f.seek(offset)
        while block := f.read(_PIECE):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
        f.truncate(offset)
        os.fsync(f.fileno())
    return keep


# ----------------------------------------------------------------------------- value files
# A big whole-tensor value is written once, to a file of its own (exactly its bytes), and
# fdatasynced (with its directory) before the log record that references it is appended; a
# snapshot then references the same file instead of copying it. A value file that no record or
# snapshot references (a crash between the file and its record) is removed at recovery.


class ValueFileError(WalCorruptError):
    """A log record or snapshot references a value file that is missing or of the wrong size:
    the data directory was damaged (the file is synced before any reference to it)."""

    def __init__(self, path: Path, offset: int, value_file: Path, detail: str) -> None:
        Exception.__init__(
            self, f"{path}: the record at byte {offset} references value file "
            f"{value_file.name}, which is {detail}; recovery stops here. `paramhub wal repair "
            f"DATA_DIR MODEL` cuts the log at byte {offset}")
        self.path = path
        self.offset = offset
        self.next_valid = offset
        self.value_file = value_file


def write_value_file(path: Path, data: Any, fsync: bool) -> int:
    """Writes `data` (bytes, a memoryview or a uint8 tensor) to a new file at `path` and, if
    `fsync`, fdatasyncs it; removes the file and raises (DISK_FULL for a full disk) on failure.
    The caller syncs the directory. Returns the byte count."""
    view = _view(data)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise disk_full(path, e) or e from None
    try:
        for start in range(0, view.nbytes, _PIECE):
            piece = view[start:start + _PIECE]
            while piece.nbytes:
                k = os.write(fd, piece)
                piece = piece[k:]
        if fsync:
            os.fdatasync(fd)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise disk_full(path, e) or e from None
    os.close(fd)
    return view.nbytes


def map_value_file(path: Path, nbytes: int) -> mmap.mmap:
    """A private, prefaulted mapping of a value file just written (its pages are in the page
    cache): the bytes as the file holds them, without another copy in memory. Writes to the
    mapping (none are made) would stay private."""
    fd = os.open(path, os.O_RDONLY)
    try:
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def read_value_file(path: Path, into: Any) -> None:
    """Reads a value file into `into` (a writable uint8 tensor or buffer of its exact size);
    FileNotFoundError or ValueError (size) if it is not what the reference says."""
    view = _view(into)
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size != view.nbytes:
            raise ValueError(f"{size} bytes where {view.nbytes} were expected")
        got = 0
        while got < view.nbytes:
            k = f.readinto(view[got:got + _PIECE])
            if not k:
                raise ValueError(f"{got} bytes where {view.nbytes} were expected")
            got += k
