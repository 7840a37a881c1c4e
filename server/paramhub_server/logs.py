"""Structured logging: every record made while an RPC runs carries its request id and method.

The RPC pipeline (interceptors.py) sets the current request id for the thread that runs the
handler; `RequestContextFilter` copies it onto each log record, and `JsonFormatter` writes one
JSON object per line for log collectors. Tokens and tensor contents are never logged.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_local = threading.local()


def current_request_id() -> str | None:
    """The request id of the RPC this thread is running, if any."""
    return getattr(_local, "request_id", None)


def current_method() -> str | None:
    """The short method name ("GetTensor") of the RPC this thread is running, if any."""
    return getattr(_local, "method", None)


def current_role() -> str | None:
    """The authenticated role of the RPC this thread is running; None without auth."""
    return getattr(_local, "role", None)


def set_current_role(role: str) -> None:
    """Records the caller's role for the rest of the current request context."""
    _local.role = role


def enter_request(request_id: str, method: str) -> tuple[Any, Any, Any]:
    """Marks this thread as running `method` for `request_id`; returns the previous state for
    `leave_request` (a pair of plain calls: the RPC pipeline runs this twice per call, and a
    generator-based context manager costs several times as much)."""
    local = _local
    prev = (getattr(local, "request_id", None), getattr(local, "method", None),
            getattr(local, "role", None))
    local.request_id, local.method, local.role = request_id, method, None
    return prev


def leave_request(prev: tuple[Any, Any, Any]) -> None:
    """Restores the state `enter_request` returned."""
    _local.request_id, _local.method, _local.role = prev


@contextmanager
def request_context(request_id: str, method: str) -> Iterator[None]:
    """Marks this thread as running `method` for `request_id` (restores the previous state)."""
    prev = enter_request(request_id, method)
    try:
        yield
    finally:
        leave_request(prev)


class RequestContextFilter(logging.Filter):
    """Adds `request_id` and `method` attributes ("-" outside an RPC) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id() or "-"
        if not hasattr(record, "method"):
            record.method = current_method() or "-"
        return True


#: Record attributes that are not "extra" fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, method, and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and k not in out:
                out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Configures the root logger for the server process (text or json lines on stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
