"""Server settings, frozen once parsed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


def default_device() -> str:
    """cuda when a CUDA device is available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Settings:
    """Everything `build_server` needs."""

    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "cpu"
    #: Where models, logs and checkpoints are kept; None keeps models in memory only.
    data_dir: Path | None = Path("var/paramhub")
    #: When the write-ahead log is fsynced: "always" (before each write is acknowledged),
    #: "batch" (every fsync_interval_s in the background) or "off" (left to the OS).
    fsync: str = "always"
    #: Seconds between background fsyncs under fsync="batch".
    fsync_interval_s: float = 0.05
    #: A model's log is compacted into a new snapshot once it is larger than this and than
    #: the model's last snapshot.
    compact_bytes: int = 64 << 20
    log_level: str = "INFO"
    #: Threads for unary calls (the short ones); calls that wait have pools of their own.
    max_workers: int = 16
    #: WatchModel streams open at once (admission.py); more answer RESOURCE_EXHAUSTED.
    max_watchers: int = 1024
    #: Streaming transfers (GetTensor, PullState, uploads, ...) in progress at once.
    max_transfers: int = 64
    #: PushGrads calls in progress at once (a sync round's pushes wait for its step here: a
    #: round of more workers than this cannot complete, and configuring one is refused).
    max_round_waiters: int = 256
    #: Share of each of the three limits above that one client may hold.
    client_share: float = 0.25
    #: Largest single gRPC message in bytes (big tensors are streamed in chunks beneath it).
    max_message_bytes: int = 64 << 20
    #: Largest model (parameters + buffers) a CreateModel may build; None = unlimited.
    max_model_bytes: int | None = None
    #: Seconds SIGTERM waits for in-flight RPCs before stopping.
    grace_seconds: float = 10.0
    #: File of "<role> <token>" lines (roles read < write < admin); None = no authentication.
    auth_file: Path | None = None
    #: Allow binding a non-loopback address without an auth file or mTLS.
    insecure: bool = False
    #: PEM server certificate chain and private key: serve TLS instead of plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: PEM CA bundle: clients must present a certificate it signed (mTLS).
    tls_client_ca: Path | None = None
    #: Memory budget over all models (parameters + buffers, bytes); None = unlimited.
    max_total_bytes: int | None = None
    #: RPCs in progress at once; more are answered RESOURCE_EXHAUSTED. None = unlimited.
    max_concurrent_rpcs: int | None = None
    #: Most elements of any tensor a request carries or announces (values, index tensors,
    #: Forward inputs, streamed uploads).
    max_tensor_elements: int | None = 1 << 31
    #: Most module nodes in a CreateModel spec.
    max_spec_nodes: int = 100_000
    #: Deepest module nesting in a spec (64 at most: the spec format's own cap).
    max_spec_depth: int = 64
    #: Port of the Prometheus /metrics endpoint (0 picks a free one); None = no endpoint.
    metrics_port: int | None = None
    #: Log line format: "text" or "json" (one object per line).
    log_format: str = "text"
    #: Offer the same-host shared-memory transport (`--no-shm` turns it off).
    shm: bool = True
    #: Offer the data channel for big tensors across hosts (`--no-data-port` turns it off; in TLS
    #: with the server's certificates on a TLS server).
    data_channel: bool = True
    #: TCP port of the data channel on `host` (0 picks a free one).
    data_port: int = 0
    #: Serve user-defined nn.Module classes sent by admin clients (runs their code).
    trust_remote_code: bool = False
    #: Packages whose nn.Module classes clients may name without --trust-remote-code.
    model_packages: tuple[str, ...] = ()
