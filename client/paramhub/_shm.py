"""Same-host shared memory: anonymous memfd segments passed over a unix socket (Linux).

Used by both sides. A segment holds the bytes of exactly one transfer; it has no name (nothing
to leak in /dev/shm when a process dies) and lives until the last descriptor and mapping are
gone. Before mapping a peer's segment its size is sealed (F_SEAL_SHRINK | F_SEAL_GROW), so the
peer cannot truncate it under us (which would turn our reads into SIGBUS).

The client's side of the protocol (`ShmLink`): connect to the server's abstract unix socket named
by GetTransportInfo, read the 32-character greeting token, name the token in one gRPC call, and
send or receive the memfd over that connection. A connection whose token the server did not use
(a small read came inline) is kept for the next call.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
import threading
import time

import torch

from paramhub.errors import InvalidArgumentError

__all__ = ["shm_supported", "ShmSegment", "create_segment", "open_received", "ShmLink", "SEALS",
           "TOKEN_CHARS", "TOKEN_MAX_AGE", "Greeted", "send_segment", "receive_segment", "pass_segment",
           "SegmentPool", "receive_fd", "seal_received"]

log = logging.getLogger(__name__)

_MFD_FLAGS = getattr(os, "MFD_CLOEXEC", 0) | getattr(os, "MFD_ALLOW_SEALING", 0)
#: The seals a received segment must carry before it is mapped.
SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0) | getattr(fcntl, "F_SEAL_GROW", 0)
#: Length of the server's greeting token.
TOKEN_CHARS = 32
#: A kept connection older than this is replaced (the server expires tokens after 60 s).
TOKEN_MAX_AGE = 30.0


def shm_supported() -> bool:
    """Whether this platform has memfd, seals and SCM_RIGHTS (Linux)."""
    return (hasattr(os, "memfd_create") and hasattr(fcntl, "F_ADD_SEALS")
            and hasattr(socket, "send_fds") and hasattr(socket, "AF_UNIX"))


class ShmSegment:
    """A memfd mapped into this process, viewed as a flat uint8 tensor (`tensor`)."""

    def __init__(self, fd: int, nbytes: int, *, populate: bool = True) -> None:
        self.fd = fd
        self.nbytes = nbytes
        # MAP_POPULATE prefaults the whole mapping: only for segments whose every byte is used.
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self._mm = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.tensor: torch.Tensor | None = torch.frombuffer(self._mm, dtype=torch.uint8)

    @property
    def flat(self) -> torch.Tensor:
        """`tensor` of a segment not closed yet (ValueError after close)."""
        if self.tensor is None:
            raise ValueError("the shared-memory segment is closed")
        return self.tensor

    def release_fd(self) -> None:
        """Closes the descriptor; the mapping (and `tensor`) stay valid."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Drops the descriptor and the mapping (the mapping only once no view is left)."""
        self.tensor = None
        self.release_fd()
        try:
            self._mm.close()
        except BufferError:
            pass  # a tensor view is still alive; the mapping goes with it

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1


def create_segment(nbytes: int) -> ShmSegment:
    """A new anonymous writable memfd of `nbytes` bytes (at least 1: mmap needs a length)."""
    fd = os.memfd_create("paramhub", _MFD_FLAGS)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        return ShmSegment(fd, max(nbytes, 1))
    except BaseException:
        os.close(fd)
        raise


def seal_received(fd: int) -> int:
    """Seals a peer's memfd against shrinking and growing; returns its size. Raises
    InvalidArgumentError (SHM_UNAVAILABLE) if it cannot be sealed. Does not close `fd`."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError:
        # Already sealed with F_SEAL_SEAL (or not a memfd): only the size seals matter.
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        if seals & SEALS != SEALS:
            raise InvalidArgumentError("the shared-memory segment cannot be sealed",
                                       reason="SHM_UNAVAILABLE") from None
    return os.fstat(fd).st_size


def open_received(fd: int, nbytes: int, *, populate: bool = True) -> ShmSegment:
    """Maps the first `nbytes` bytes of a peer's memfd after sealing its size and checking it
    holds that many (never more than that is mapped).

    Takes ownership of `fd`. Raises InvalidArgumentError (SHM_UNAVAILABLE / BAD_TENSOR_BYTES).
    """
    try:
        size = seal_received(fd)
        if size < max(nbytes, 1):
            raise InvalidArgumentError(f"the shared-memory segment has {size} bytes, the value "
                                       f"needs {nbytes}", reason="BAD_TENSOR_BYTES")
        return ShmSegment(fd, max(nbytes, 1), populate=populate)
    except BaseException:
        os.close(fd)
        raise


def send_segment(conn: socket.socket, segment: ShmSegment) -> None:
    """Seals a filled segment's size, passes it over `conn`, and closes our descriptor."""
    try:
        fcntl.fcntl(segment.fd, fcntl.F_ADD_SEALS, SEALS)
        socket.send_fds(conn, [b"F"], [segment.fd])
    finally:
        segment.close()


def pass_segment(conn: socket.socket, segment: ShmSegment) -> None:
    """Passes a segment over `conn` and keeps it (the peer gets its own descriptor)."""
    socket.send_fds(conn, [b"F"], [segment.fd])


def receive_segment(conn: socket.socket, nbytes: int) -> ShmSegment:
    """Receives one memfd of at least `nbytes` bytes over `conn` and maps `nbytes` of it."""
    return open_received(receive_fd(conn), nbytes)


def receive_fd(conn: socket.socket) -> int:
    """Receives one descriptor over `conn` (not mapped; the caller owns it)."""
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 4)
    except OSError as e:
        raise InvalidArgumentError(f"no shared-memory segment arrived: {e}",
                                   reason="SHM_UNAVAILABLE") from None
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise InvalidArgumentError("expected one shared-memory segment", reason="SHM_UNAVAILABLE")
    return fds[0]


class SegmentPool:
    """This process's own reusable segments, by exact size.

    Fresh shared memory costs a page fault and a zeroed page per 4 KiB on first touch (measured
    ~1.2 GB/s on a VM without huge pages for shmem), several times the cost of copying into warm
    pages; reusing our own segments for sends and receives avoids that. A segment only ever
    holds this process's own data and is never handed to another client.
    """

    def __init__(self, max_bytes: int = 1 << 30, max_segments: int = 4) -> None:
        self.max_bytes = max_bytes
        self.max_segments = max_segments
        self._free: list[ShmSegment] = []
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> ShmSegment:
        """A segment of exactly max(nbytes, 1) bytes (from the pool when one is free)."""
        size = max(nbytes, 1)
        with self._lock:
            for i, seg in enumerate(self._free):
                if seg.nbytes == size:
                    return self._free.pop(i)
        return create_segment(size)

    def release(self, segment: ShmSegment) -> None:
        """Returns a segment for reuse (or frees it when the pool is full)."""
        if segment.tensor is None or segment.fd < 0 or segment.nbytes > self.max_bytes:
            segment.close()
            return
        with self._lock:
            self._free.append(segment)
            evicted = []
            while (len(self._free) > self.max_segments
                   or sum(s.nbytes for s in self._free) > self.max_bytes):
                evicted.append(self._free.pop(0))
        for seg in evicted:
            seg.close()

    def close(self) -> None:
        """Frees every pooled segment."""
        with self._lock:
            free, self._free = self._free, []
        for seg in free:
            seg.close()


class Greeted:
    """A connection to the server's shm channel and the token it was greeted with."""

    __slots__ = ("conn", "token", "at")

    def __init__(self, conn: socket.socket, token: str) -> None:
        self.conn = conn
        self.token = token
        self.at = time.monotonic()

    def close(self) -> None:
        """Closes the connection (the server forgets the token)."""
        self.conn.close()


class ShmLink:
    """The client's end of the same-host channel: hands out greeted connections."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._spare: Greeted | None = None
        self._lock = threading.Lock()

    def connect(self) -> Greeted:
        """A greeted connection: the kept one if fresh enough, else a new one.

        Raises OSError when the server's socket cannot be reached (another host or network
        namespace) or does not greet.
        """
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            if time.monotonic() - spare.at < TOKEN_MAX_AGE:
                return spare
            spare.close()
        conn = self._open()
        try:
            token = b""
            while len(token) < TOKEN_CHARS:
                part = conn.recv(TOKEN_CHARS - len(token))
                if not part:
                    raise ConnectionError("the shared-memory channel closed before greeting")
                token += part
        except BaseException:
            conn.close()
            raise
        return Greeted(conn, token.decode("ascii"))

    def _open(self) -> socket.socket:
        """A new connection to the server's channel (the abstract unix socket here)."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(self.timeout)
            conn.connect("\0" + self.address)
        except BaseException:
            conn.close()
            raise
        return conn

    def keep(self, greeted: Greeted) -> None:
        """Returns an unused connection for the next call (or closes it if one is kept)."""
        with self._lock:
            if self._spare is None:
                self._spare = greeted
                return
        greeted.close()

    def close(self) -> None:
        """Closes the kept connection."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()
