"""`paramhub wal check|repair DATA_DIR`: what recovery will make of each model's write-ahead
log, and an explicit cut of a damaged one (run with the server stopped).

A log whose last record is torn (a crash mid-append) is fine: recovery drops that record, which
was never acknowledged. A log with a corrupt record followed by intact ones was damaged: the
server refuses to load that model (it never silently drops acknowledged writes). `repair` cuts
such a log at the corrupt record, keeping the cut bytes beside it in a `.corrupt-{time}` file;
the writes after that point are lost, which is why it is a separate, explicit step.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from paramhub_server.cli import app

wal_app = typer.Typer(name="wal", no_args_is_help=True,
                      help="check or repair the write-ahead logs of a data directory "
                      "(server stopped)")
app.add_typer(wal_app)

_WAL = re.compile(r"wal-(\d{8})\.log")


def _logs(data_dir: Path, model: str | None) -> list[tuple[str, Path]]:
    """(model id, path of its current log) for every model, or for one."""
    models = data_dir / "models"
    if not models.is_dir():
        raise typer.BadParameter(f"{data_dir} holds no models directory")
    dirs = [models / model] if model else sorted(p for p in models.iterdir()
                                                 if p.is_dir() and not p.name.startswith("."))
    out = []
    for d in dirs:
        if not d.is_dir():
            raise typer.BadParameter(f"no model {d.name!r} in {data_dir}")
        gens = sorted((int(m.group(1)), p) for p in d.iterdir()
                      if (m := _WAL.fullmatch(p.name)))
        if gens:
            out.append((d.name, gens[-1][1]))
    return out


@wal_app.command("check")
def wal_check(data_dir: Path, model: Annotated[Optional[str], typer.Argument(
        help="one model (default: every model)")] = None) -> None:
    """Says, per model, whether its log is ok, has a torn tail (dropped at recovery) or is
    corrupt (the server will not load the model). Exit status 1 if any log is corrupt."""
    from paramhub_server.core import wal

    bad = 0
    for model_id, path in _logs(data_dir, model):
        s = wal.scan(path)
        line = f"{model_id}  {path.name}  {s.records} records, {s.valid} of {s.size} bytes: "
        if s.state == "corrupt":
            bad += 1
            line += (f"CORRUPT at byte {s.corrupt_at}; an intact record follows at byte "
                     f"{s.next_valid} (`paramhub wal repair {data_dir} {model_id}` cuts it)")
        elif s.state == "torn tail":
            line += f"torn tail of {s.size - s.valid} bytes (dropped at recovery)"
        else:
            line += "ok"
        typer.echo(line)
    raise typer.Exit(1 if bad else 0)


@wal_app.command("repair")
def wal_repair(data_dir: Path, model: str) -> None:
    """Cuts a corrupt log at its first bad record (the cut bytes are kept in a .corrupt file
    beside it); the model then loads with the writes before that point."""
    from paramhub_server.core import wal

    for model_id, path in _logs(data_dir, model):
        s = wal.scan(path)
        if s.state != "corrupt":
            typer.echo(f"{model_id}  {path.name}: {s.state}, nothing to repair")
            continue
        kept = wal.cut(path, s.valid)
        typer.echo(f"{model_id}  {path.name}: cut at byte {s.valid} ({s.size - s.valid} bytes "
                   f"moved to {kept.name if kept else '-'}); {s.records} records kept")
