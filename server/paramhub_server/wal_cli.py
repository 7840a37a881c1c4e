"""`paramhub wal check|repair DATA_DIR`: what recovery will make of each model's write-ahead
log, and an explicit cut of a damaged one (run with the server stopped).

A log whose last record is torn (a crash mid-append) is fine: recovery drops that record, which
was never acknowledged. A log with a corrupt record followed by intact ones was damaged: the
server refuses to load that model (it never silently drops acknowledged writes). `repair` cuts
such a log at the corrupt record, keeping the cut bytes beside it in a `.corrupt-{time}` file;
the writes after that point are lost, which is why it is a separate, explicit step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from paramhub_server.cli import app

wal_app = typer.Typer(name="wal", no_args_is_help=True,
                      help="check or repair the write-ahead logs of a data directory "
                      "(server stopped)")
app.add_typer(wal_app)

def _dirs(data_dir: Path, model: str | None) -> list[Path]:
    """The model directories to look at: every model's, or one."""
    models = data_dir / "models"
    if not models.is_dir():
        raise typer.BadParameter(f"{data_dir} holds no models directory")
    dirs = [models / model] if model else sorted(p for p in models.iterdir()
                                                 if p.is_dir() and not p.name.startswith("."))
    for d in dirs:
        if not d.is_dir():
            raise typer.BadParameter(f"no model {d.name!r} in {data_dir}")
    return dirs


@wal_app.command("check")
def wal_check(data_dir: Path, model: Annotated[Optional[str], typer.Argument(
        help="one model (default: every model)")] = None) -> None:
    """Says, per model log, whether it is ok, has a torn tail (dropped at recovery) or is
    corrupt (a damaged record, or a record or snapshot naming a missing value file: the server
    will not load the model), and counts unreferenced value files (removed at recovery). Exit
    status 1 if any model is corrupt."""
    from paramhub_server.core import store

    bad = 0
    for d in _dirs(data_dir, model):
        check = store.check_model_dir(d)
        bad += check.corrupt
        for c in check.logs:
            s = c.scan
            line = f"{d.name}  {c.path.name}  {s.records} records, {s.valid} of {s.size} bytes: "
            if c.bad_file_at is not None:
                line += (f"CORRUPT: the record at byte {c.bad_file_at} names value file "
                         f"{c.bad_file}, which is missing or damaged (`paramhub wal repair "
                         f"{data_dir} {d.name}` cuts it)")
            elif s.state == "corrupt":
                line += (f"CORRUPT at byte {s.corrupt_at}; an intact record follows at byte "
                         f"{s.next_valid} (`paramhub wal repair {data_dir} {d.name}` cuts it)")
            elif s.state == "torn tail":
                line += f"torn tail of {s.size - s.valid} bytes (dropped at recovery)"
            else:
                line += "ok"
            typer.echo(line)
        if check.snapshot_missing:
            typer.echo(f"{d.name}  snapshot: CORRUPT: value files missing or damaged: "
                       f"{', '.join(check.snapshot_missing)} (restore a checkpoint)")
        if check.orphans:
            typer.echo(f"{d.name}  values: {len(check.orphans)} unreferenced value files "
                       "(removed at recovery)")
    raise typer.Exit(1 if bad else 0)


@wal_app.command("repair")
def wal_repair(data_dir: Path, model: str) -> None:
    """Cuts a corrupt log at its first bad record (the cut bytes are kept in a .corrupt file
    beside it; later logs of the model are cut whole) and removes unreferenced value files;
    the model then loads with the writes before that point."""
    from paramhub_server.core import store

    for d in _dirs(data_dir, model):
        done = store.repair_model_dir(d)
        for line in done or ["nothing to repair"]:
            typer.echo(f"{d.name}  {line}")
