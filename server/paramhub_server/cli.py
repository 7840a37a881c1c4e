"""`paramhub` command line: `paramhub serve [flags]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from paramhub_server.settings import Settings, default_device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paramhub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the paramhub gRPC server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051,
                       help="port to bind; 0 picks a free one (default 50051)")
    serve.add_argument("--device", default=None,
                       help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    serve.add_argument("--data-dir", type=Path, default=Path("var/paramhub"),
                       help="directory for persistent state (default ./var/paramhub)")
    serve.add_argument("--in-memory", action="store_true",
                       help="keep models in memory only: no data dir, lost on exit")
    serve.add_argument("--fsync", default="always", choices=["always", "batch", "off"],
                       help="fsync the write-ahead log before acknowledging each write "
                            "(always, the default), in the background every "
                            "--fsync-interval (batch), or never (off)")
    serve.add_argument("--fsync-interval", type=float, default=0.05,
                       help="seconds between background fsyncs with --fsync batch (default 0.05)")
    serve.add_argument("--compact-bytes", type=int, default=64 << 20,
                       help="compact a model's log into a snapshot once it exceeds this many "
                            "bytes and the snapshot's size (default 64 MiB)")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    serve.add_argument("--max-workers", type=int, default=16, help="RPC threads (default 16)")
    serve.add_argument("--max-message-bytes", type=int, default=64 << 20,
                       help="largest single gRPC message (default 64 MiB; tensors are streamed)")
    serve.add_argument("--max-model-bytes", type=int, default=None,
                       help="largest model a CreateModel may build (default unlimited)")
    return parser


def serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGTERM or SIGINT, then drains."""
    from paramhub_server.app import build_server

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(host=args.host, port=args.port, device=args.device or default_device(),
                        data_dir=None if args.in_memory else args.data_dir,
                        fsync=args.fsync, fsync_interval_s=args.fsync_interval,
                        compact_bytes=args.compact_bytes, log_level=args.log_level,
                        max_workers=args.max_workers, max_message_bytes=args.max_message_bytes,
                        max_model_bytes=args.max_model_bytes)
    # Recovery runs in the background (health NOT_SERVING meanwhile), so the port is known and
    # printed at once.
    server = build_server(settings, wait_ready=False)
    # First line of output: the bound address, so scripts and tests can read the port.
    print(f"{settings.host}:{server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logging.getLogger(__name__).info("draining (up to %.0fs)", settings.grace_seconds)
    server.stop(settings.grace_seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `paramhub` console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
