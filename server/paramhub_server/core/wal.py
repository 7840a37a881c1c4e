"""The write-ahead log: an append-only file of framed records, fsynced before a write is
acknowledged (under the default policy).

A record is

    b"PHW1" | u32 header length | u64 payload length | u32 CRC-32 of header+payload
    | header (UTF-8 JSON) | payload (raw bytes that the header points into)

Nothing is pickled. A crash can leave a torn last record; `read_records` stops at the first
record that is incomplete or fails its CRC, and the owner truncates the file there. Such a record
was never acknowledged: under `fsync="always"` a write is acknowledged only after its record is
completely written and fsynced.

Fsync policies:
- "always": fdatasync after every record, before the write is acknowledged. Nothing acknowledged
  is lost on kill -9 or power loss.
- "batch": records are written to the OS at once (so kill -9 loses nothing acknowledged) and a
  background thread fdatasyncs every `interval` seconds; power loss may lose the last interval.
- "off": records are written to the OS at once, never fsynced by paramhub; power loss may lose
  whatever the OS had not yet flushed.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAGIC = b"PHW1"
_FRAME = struct.Struct("<4sIQI")
FSYNC_POLICIES = ("always", "batch", "off")
#: Largest header accepted when reading; anything larger is a corrupt frame.
_MAX_HEADER = 64 << 20
_PIECE = 8 << 20
#: Records whose payload is at most this many bytes are written with one syscall.
_SMALL = 64 << 10


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
        self._dirty = False
        self._closed = False
        self._cv = threading.Condition()
        self._flusher: threading.Thread | None = None
        if fsync == "batch":
            self._interval = interval
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name=f"paramhub-wal-{path.parent.name}")
            self._flusher.start()

    def append(self, header: dict[str, Any], blobs: Sequence[Any] = ()) -> int:
        """Writes one record (header JSON + the blobs concatenated as its payload) and, under
        "always", fdatasyncs it. Returns the record's size in bytes.

        The header should already hold the blobs' offsets (see `layout`)."""
        views = [_view(b) for b in blobs]
        head = json.dumps(header, separators=(",", ":")).encode()
        payload = sum(v.nbytes for v in views)
        crc = zlib.crc32(head)
        for v in views:
            crc = zlib.crc32(v, crc)
        frame = _FRAME.pack(MAGIC, len(head), payload, crc) + head
        if payload <= _SMALL:
            # One write (one syscall) for a small record instead of one per piece.
            self._write(b"".join([frame, *views]))
        else:
            self._write(frame)
            for v in views:
                for start in range(0, v.nbytes, _PIECE):
                    self._write(v[start:start + _PIECE])
        n = len(frame) + payload
        self.size += n
        if self.policy == "always":
            os.fdatasync(self.fd)
        elif self.policy == "batch":
            with self._cv:
                self._dirty = True
        return n

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
        """Flushes (unless the policy is "off") and closes the file."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        if self._flusher is not None:
            self._flusher.join()
        if self.policy != "off":
            os.fdatasync(self.fd)
        os.close(self.fd)


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


def read_records(path: Path) -> Iterator[Record]:
    """Yields every complete, intact record of a log in order, one at a time.

    Stops at the first torn or corrupt record (the tail a crash leaves): the `end` of the last
    record yielded is the length of the valid prefix, to which the caller truncates the file
    before appending again.
    """
    if not path.exists():
        return
    size = path.stat().st_size
    valid = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(_FRAME.size)
            if len(raw) < _FRAME.size:
                break
            magic, hlen, plen, crc = _FRAME.unpack(raw)
            if magic != MAGIC or hlen > _MAX_HEADER or valid + _FRAME.size + hlen + plen > size:
                break
            head = f.read(hlen)
            payload = bytearray(plen)
            if len(head) != hlen or f.readinto(payload) != plen:
                break
            if zlib.crc32(payload, zlib.crc32(head)) != crc:
                break
            try:
                header = json.loads(head)
            except ValueError:
                break
            valid += _FRAME.size + hlen + plen
            yield Record(header, payload, valid)
    if valid < size:
        log.warning("%s: ignoring %d bytes of torn or corrupt log tail", path, size - valid)
