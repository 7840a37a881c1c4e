"""Counting a process's open file descriptors by what they point at (/proc/PID/fd), for the
tests that check the transports leak nothing."""

from __future__ import annotations

import os


def count_fds(prefix: str, pid: int | str = "self") -> int:
    """Open descriptors of a process whose link target starts with `prefix` (e.g. "socket:",
    "/memfd:paramhub")."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                n += 1
        except OSError:  # closed meanwhile
            pass
    return n
