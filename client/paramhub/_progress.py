"""Progress bars for big transfers: shown on a terminal, quiet otherwise.

`connect(..., progress=None)` (the default) shows a bar for transfers of at least
PROGRESS_MIN_BYTES when stderr is a TTY; `True` shows it whatever stderr is; `False` never.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["PROGRESS_MIN_BYTES", "Progress", "progress_for"]

#: Transfers smaller than this never show a bar.
PROGRESS_MIN_BYTES = 64 << 20


class Progress:
    """Counts bytes of one transfer into a rich progress bar (or does nothing)."""

    def __init__(self, description: str, total: int, *, enabled: bool) -> None:
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress,
                                   TextColumn, TimeRemainingColumn, TransferSpeedColumn)
        from rich.console import Console

        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(file=sys.stderr), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    @property
    def active(self) -> bool:
        """Whether a bar is shown."""
        return self._bar is not None

    def advance(self, nbytes: int) -> None:
        """Adds `nbytes` transferred bytes."""
        if self._bar is not None:
            self._bar.update(self._task, advance=nbytes)

    def close(self) -> None:
        """Removes the bar."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_for(setting: bool | None, description: str, total: int) -> Progress:
    """A Progress for a transfer of `total` bytes under the client's `progress` setting."""
    if setting is False or total < PROGRESS_MIN_BYTES:
        enabled = False
    elif setting is True:
        enabled = True
    else:
        enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return Progress(description, total, enabled=enabled)
