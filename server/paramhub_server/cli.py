"""`paramhub` command line (typer + rich). Imports stay lazy so `paramhub health` (the Docker
HEALTHCHECK) starts without loading torch.


    paramhub serve [flags]          run the server (first stdout line: host:port; SIGTERM drains)
    paramhub health                 grpc.health.v1 check (exit 0 when SERVING): the Docker HEALTHCHECK
    paramhub models                 the models a server holds
    paramhub tree MODEL             the module tree with shapes, dtypes, counts, shared/tied marks
    paramhub stats MODEL [PARAM]    server-side statistics and a histogram
    paramhub get MODEL PARAM [IDX]  a parameter's values, e.g. `paramhub get mlp 0.weight "0, :3"`
    paramhub ui [--allow-edits]     the web inspector (paramhub_server/ui), on 127.0.0.1:8080
    paramhub wal check|repair DIR   what recovery makes of each model's log; cut a damaged one

Client commands take --target/--token (or $PARAMHUB_TARGET/$PARAMHUB_TOKEN) and TLS flags.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import enum

import typer


class LogLevel(str, enum.Enum):
    """--log-level choices."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class Fsync(str, enum.Enum):
    """--fsync choices (see core/wal.py)."""

    always = "always"
    batch = "batch"
    off = "off"


class LogFormat(str, enum.Enum):
    """--log-format choices."""

    text = "text"
    json = "json"


app = typer.Typer(name="paramhub", help="paramhub: serve PyTorch models over gRPC and inspect "
                  "them (serve, health, models, tree, stats, get).", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind; a non-loopback one needs "
                                           "--auth-file, mTLS or --insecure")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind; 0 picks a free one")] = 50051,
    device: Annotated[Optional[str], typer.Option(
        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")] = None,
    data_dir: Annotated[Path, typer.Option(help="directory for persistent state")
                        ] = Path("var/paramhub"),
    in_memory: Annotated[bool, typer.Option(
        "--in-memory", help="keep models in memory only: no data dir, lost on exit")] = False,
    fsync: Annotated[Fsync, typer.Option(
        help="when the write-ahead log is fsynced: before each write is acknowledged (always), "
             "every --fsync-interval in the background (batch), or never (off)")
    ] = Fsync.always,
    fsync_interval: Annotated[float, typer.Option(
        help="seconds between background fsyncs with --fsync batch")] = 0.05,
    compact_bytes: Annotated[int, typer.Option(
        help="compact a model's log into a snapshot once it exceeds this many bytes and the "
             "snapshot's size")] = 64 << 20,
    log_level: Annotated[LogLevel, typer.Option()] = LogLevel.INFO,
    log_format: Annotated[LogFormat, typer.Option(help="json: one object per line")
                          ] = LogFormat.text,
    max_workers: Annotated[int, typer.Option(
        help="threads for unary calls; watch streams, streaming transfers and sync-round "
             "pushes have pools of their own")] = 16,
    max_watchers: Annotated[int, typer.Option(
        help="WatchModel streams open at once; more answer RESOURCE_EXHAUSTED")] = 1024,
    max_transfers: Annotated[int, typer.Option(
        help="streaming transfers (GetTensor, PullState, uploads) at once")] = 64,
    max_round_waiters: Annotated[int, typer.Option(
        help="PushGrads calls at once (sync-round pushes wait for the round's last)")] = 256,
    client_share: Annotated[float, typer.Option(
        help="share of each of the three limits above one client may hold")] = 0.25,
    max_message_bytes: Annotated[int, typer.Option(
        help="largest single gRPC message (tensors are streamed beneath it)")] = 64 << 20,
    max_model_bytes: Annotated[Optional[int], typer.Option(
        help="largest model a CreateModel may build (default unlimited)")] = None,
    max_total_bytes: Annotated[Optional[int], typer.Option(
        help="memory budget over all models, bytes (default unlimited)")] = None,
    max_concurrent_rpcs: Annotated[Optional[int], typer.Option(
        help="RPCs in progress at once; more answer RESOURCE_EXHAUSTED (default unlimited)")
    ] = None,
    max_tensor_elements: Annotated[int, typer.Option(
        help="most elements of a tensor a request carries or announces")] = 1 << 31,
    max_spec_nodes: Annotated[int, typer.Option(help="most modules in a spec")] = 100_000,
    max_spec_depth: Annotated[int, typer.Option(help="deepest module nesting (<= 64)")] = 64,
    auth_file: Annotated[Optional[Path], typer.Option(
        help="file of '<role> <token>' lines; roles read < write < admin")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="allow a non-loopback address without authentication")] = False,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM server certificate chain")
                        ] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="PEM server private key")] = None,
    tls_client_ca: Annotated[Optional[Path], typer.Option(
        help="PEM CA bundle; clients must present a certificate it signed (mTLS)")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(
        help="serve Prometheus /metrics on this port (0 picks one)")] = None,
    shm: Annotated[bool, typer.Option(
        "--shm/--no-shm", help="offer the same-host shared-memory transport")] = True,
    data_port: Annotated[int, typer.Option(
        help="TCP port of the data channel that carries tensors of 16 MiB or more across "
             "hosts, on --host (0 picks a free one; in TLS on a TLS server)")] = 0,
    no_data_port: Annotated[bool, typer.Option(
        "--no-data-port", help="no data channel: big tensors stream over gRPC")] = False,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="serve user-defined nn.Module classes that clients send "
        "(this RUNS THEIR PYTHON CODE in the server; admin callers only)")] = False,
    model_package: Annotated[Optional[list[str]], typer.Option(metavar="PKG",
        help="a package whose nn.Module classes clients may name (repeatable); only its "
             "classes and torch.nn's are loaded, without --trust-remote-code")] = None,
) -> None:
    """Run the paramhub gRPC server until SIGTERM or SIGINT, then drain."""
    from paramhub_server import logs
    from paramhub_server.app import ConfigError, build_server
    from paramhub_server.auth import AuthFileError
    from paramhub_server.settings import Settings, default_device

    log_level, log_format = LogLevel(log_level).value, LogFormat(log_format).value
    logs.configure(log_level, log_format)
    settings = Settings(host=host, port=port, device=device or default_device(),
                        data_dir=None if in_memory else data_dir,
                        fsync=Fsync(fsync).value, fsync_interval_s=fsync_interval,
                        compact_bytes=compact_bytes, log_level=log_level, max_workers=max_workers,
                        max_watchers=max_watchers, max_transfers=max_transfers,
                        max_round_waiters=max_round_waiters, client_share=client_share,
                        max_message_bytes=max_message_bytes, max_model_bytes=max_model_bytes,
                        auth_file=auth_file, insecure=insecure, tls_cert=tls_cert,
                        tls_key=tls_key, tls_client_ca=tls_client_ca,
                        max_total_bytes=max_total_bytes, max_concurrent_rpcs=max_concurrent_rpcs,
                        max_tensor_elements=max_tensor_elements, max_spec_nodes=max_spec_nodes,
                        max_spec_depth=max_spec_depth, metrics_port=metrics_port,
                        log_format=log_format, shm=shm, data_channel=not no_data_port,
                        data_port=data_port, trust_remote_code=trust_remote_code,
                        model_packages=tuple(model_package or ()))
    # Under torchrun: this rank's port and data dir, then the process group (cluster/launch.py).
    from paramhub_server.cluster import launch as cluster_launch
    launch = cluster_launch.prepare(settings)
    if launch is not None:
        settings = launch.settings
    # Handlers first: a SIGTERM right after the address line (or during recovery) drains.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # Recovery from the data directory runs in the background (readiness NOT_SERVING
        # meanwhile), so the port is known and printed at once.
        server = build_server(settings, wait_ready=False,
                              loader=launch.loader if launch is not None else None)
    except (ConfigError, AuthFileError) as e:
        print(f"paramhub serve: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    except (OSError, RuntimeError) as e:
        # e.g. the port is taken: one line, not a traceback.
        print(f"paramhub: cannot serve on {settings.host}:{settings.port}: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    if launch is not None:
        launch.bound(server)
    # First line of output: the bound address, so scripts and tests can read the port.
    print(f"{settings.host}:{server.port}", flush=True)
    if server.metrics_port is not None:
        logging.getLogger(__name__).info("metrics port %d", server.metrics_port)
    stop.wait()
    logging.getLogger(__name__).info("draining (up to %.0fs)", settings.grace_seconds)
    server.stop(settings.grace_seconds)
    if launch is not None:
        launch.stop()
    # Every log is flushed and closed and grpc has cancelled what the grace left. A handler
    # thread still stuck in torch or a socket would hold the interpreter's exit (it joins the
    # executors' threads) past the promised drain time: leave without waiting for it.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


# Client commands live in their own module; importing it registers them on `app`.
from paramhub_server import inspect_cli as _inspect_cli  # noqa: E402,F401
from paramhub_server import wal_cli as _wal_cli  # noqa: E402,F401


@app.command()
def ui(target: _inspect_cli.Target = None, token: _inspect_cli.Token = None,
       host: Annotated[str, typer.Option(help="address the web page binds")] = "127.0.0.1",
       port: Annotated[int, typer.Option(help="port of the web page; 0 picks one")] = 8080,
       allow_edits: Annotated[bool, typer.Option(
           "--allow-edits", help="offer edits (values, inits, checkpoints) as far as the "
                                 "token's role allows")] = False,
       tls: _inspect_cli.Tls = False, tls_ca: _inspect_cli.TlsCa = None,
       tls_cert: _inspect_cli.TlsCert = None, tls_key: _inspect_cli.TlsKey = None,
       server_name: _inspect_cli.ServerName = None, timeout: _inspect_cli.Timeout = 30.0,
       log_level: Annotated[LogLevel, typer.Option()] = LogLevel.WARNING) -> None:
    """Serve the web inspector (first stdout line: its address): live models, trees,
    statistics and histograms, values; edits with --allow-edits."""
    from paramhub_server.ui.serve import main as ui_main

    with _inspect_cli._connect(target, token, tls, tls_ca, tls_cert, tls_key, server_name,
                               timeout) as client:
        code = ui_main(client, host=host, port=port, allow_edits=allow_edits,
                       log_level=LogLevel(log_level).value.lower())
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `paramhub` console script; returns the exit status (commands signal
    failure with typer.Exit(code); usage errors exit 2)."""
    try:
        app(args=argv, prog_name="paramhub")
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    return 0
