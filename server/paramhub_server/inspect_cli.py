"""Client-side `paramhub` commands: health, models, tree, stats, get, checkpoint.

They speak to a server through the SDK (paramhub.connect) and draw with rich. Index strings for
`get` and `stats` are parsed here (ints, slices, `...`, `None`), never evaluated.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from paramhub_server.cli import app

if TYPE_CHECKING:
    import paramhub
    from paramhub.common import pb

Target = Annotated[Optional[str], typer.Option(
    envvar="PARAMHUB_TARGET", help="host:port (default 127.0.0.1:50051)")]
Token = Annotated[Optional[str], typer.Option(envvar="PARAMHUB_TOKEN", help="bearer token",
                                              show_default=False)]
Tls = Annotated[bool, typer.Option("--tls", help="connect with TLS")]
TlsCa = Annotated[Optional[Path], typer.Option(help="PEM CA that signed the server certificate")]
TlsCert = Annotated[Optional[Path], typer.Option(help="PEM client certificate (mTLS)")]
TlsKey = Annotated[Optional[Path], typer.Option(help="PEM client key (mTLS)")]
ServerName = Annotated[Optional[str], typer.Option(
    help="expected name in the server certificate, if not the target's host")]
Timeout = Annotated[float, typer.Option(help="deadline of each call, seconds")]


def _connect(target: str | None, token: str | None, tls: bool, tls_ca: Path | None,
             tls_cert: Path | None, tls_key: Path | None, server_name: str | None,
             timeout: float) -> paramhub.Client:
    import paramhub

    def read(p: Path | None) -> bytes | None:
        return p.read_bytes() if p is not None else None

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return paramhub.connect(target, token=token, timeout=timeout,
                            tls=tls or tls_ca is not None or tls_cert is not None,
                            root_certificates=read(tls_ca), client_cert=read(tls_cert),
                            client_key=read(tls_key), options=options)


def _fail(e: Any) -> typer.Exit:
    Console(stderr=True).print(f"[red]error[/red] {e.code} {e.reason}: {e}", markup=True,
                               highlight=False)
    return typer.Exit(1)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _dtype(value: int) -> str:
    from paramhub.v1 import tensor_pb2 as tpb

    name = tpb.Dtype.Name(value)
    return name.removeprefix("DTYPE_").lower()


# ------------------------------------------------------------------------------------ health


@app.command()
def health(target: Target = None, service: Annotated[str, typer.Option(
               help='"" (overall), "liveness", "readiness" or paramhub.v1.ParameterService')
           ] = "readiness",
           tls: Tls = False, tls_ca: TlsCa = None, tls_cert: TlsCert = None,
           tls_key: TlsKey = None, server_name: ServerName = None,
           timeout: Timeout = 5.0) -> None:
    """grpc.health.v1 check: prints the status; exit 0 when SERVING, 1 otherwise."""
    import os

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = target or os.environ.get("PARAMHUB_TARGET") or "127.0.0.1:50051"
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    if tls or tls_ca is not None or tls_cert is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=tls_ca.read_bytes() if tls_ca else None,
            private_key=tls_key.read_bytes() if tls_key else None,
            certificate_chain=tls_cert.read_bytes() if tls_cert else None)
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as e:
        status = f"{e.code().name}"
        resp = None
    finally:
        channel.close()
    print(status)
    if resp is None or resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------ models


@app.command()
def models(target: Target = None, token: Token = None, tls: Tls = False, tls_ca: TlsCa = None,
           tls_cert: TlsCert = None, tls_key: TlsKey = None, server_name: ServerName = None,
           timeout: Timeout = 30.0) -> None:
    """List the models the server holds."""
    from paramhub.errors import ParamhubError

    with _connect(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout) as c:
        try:
            infos = c.list_models()
        except ParamhubError as e:
            raise _fail(e) from None
    table = Table(box=None, header_style="bold")
    for col in ("model", "root", "device", "parameters", "bytes", "version"):
        table.add_column(col, justify="right" if col in ("parameters", "bytes", "version")
                         else "left")
    for m in infos:
        table.add_row(m.name.removeprefix("models/"), m.root_class, m.device,
                      f"{m.num_parameters:,}", _human_bytes(m.num_bytes), str(m.version))
    Console().print(table)


# ------------------------------------------------------------------------------------ tree


def build_tree(desc: pb.DescribeModelResponse) -> Tree:
    """A rich Tree of a described model: one node per module path (a shared module is expanded
    at its first path and marked at the others), parameters and buffers as leaves with dtype,
    shape and element count, tied names marked with the name they share storage with."""
    from paramhub.common import pb

    modules = {m.path: m for m in desc.modules}
    by_owner: dict[str, list[pb.TensorInfo]] = {}
    first_of_group: dict[int, str] = {}
    for t in desc.tensors:
        owner, _, _ = t.name.rpartition(".")
        by_owner.setdefault(owner, []).append(t)
        first_of_group.setdefault(t.storage_group, t.name)

    def numel(t: pb.TensorInfo) -> int:
        return math.prod(t.shape)

    def params_under(path: str) -> int:
        prefix = f"{path}." if path else ""
        seen: set[int] = set()
        total = 0
        for t in desc.tensors:
            if (t.kind == pb.TENSOR_KIND_PARAMETER and t.name.startswith(prefix)
                    and t.storage_group not in seen):
                seen.add(t.storage_group)
                total += numel(t)
        return total

    def label(path: str, m: pb.ModuleInfo) -> Text:
        name = path.rpartition(".")[2] if path else desc.model.name.removeprefix("models/")
        text = Text()
        text.append(f"{name}: ", style="bold")
        text.append(m.class_name, style="cyan")
        if m.extra_repr:
            text.append(f"({m.extra_repr})", style="dim")
        n = params_under(path)
        if n:
            text.append(f"  {n:,} params", style="green")
        if not m.training:
            text.append("  eval", style="yellow")
        return text

    seen_groups: dict[int, str] = {}

    def add(node: Tree, path: str) -> None:
        m = modules[path]
        for t in by_owner.get(path, []):
            leaf = Text()
            leaf.append(t.name.rpartition(".")[2], style="bold" if t.kind ==
                        pb.TENSOR_KIND_PARAMETER else "italic")
            leaf.append(f"  {_dtype(t.dtype)} {list(t.shape)}  {numel(t):,}")
            if t.kind == pb.TENSOR_KIND_BUFFER:
                leaf.append("  buffer", style="dim")
            first = first_of_group[t.storage_group]
            if first != t.name:
                leaf.append(f"  tied -> {first}", style="magenta")
            node.add(leaf)
        for child in m.children:
            cpath = f"{path}.{child}" if path else child
            cm = modules.get(cpath)
            if cm is None:
                continue
            if cm.module_group in seen_groups:
                text = Text()
                text.append(f"{child}: ", style="bold")
                text.append(cm.class_name, style="cyan")
                text.append(f"  shared -> {seen_groups[cm.module_group] or '(root)'}",
                            style="magenta")
                node.add(text)
                continue
            seen_groups[cm.module_group] = cpath
            add(node.add(label(cpath, cm)), cpath)

    root = modules[""]
    seen_groups[root.module_group] = ""
    tree = Tree(label("", root))
    add(tree, "")
    return tree


@app.command()
def tree(model: str, target: Target = None, token: Token = None, tls: Tls = False,
         tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None,
         server_name: ServerName = None, timeout: Timeout = 30.0) -> None:
    """Print a model's module tree: shapes, dtypes, parameter counts, shared modules and tied
    parameters."""
    from paramhub.errors import ParamhubError

    with _connect(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout) as c:
        try:
            desc = c.describe_model(model)
        except ParamhubError as e:
            raise _fail(e) from None
    console = Console()
    console.print(build_tree(desc))
    info = desc.model
    console.print(f"{info.num_parameters:,} parameters, {_human_bytes(info.num_bytes)} on "
                  f"{info.device}, version {info.version}", highlight=False)


# ------------------------------------------------------------------------------------ index

_INT = r"[+-]?\d+"


def parse_index(text: str) -> Any:
    """Parses "0, 1:3, ..., None, ::2" into a torch index tuple (no eval)."""
    items: list[Any] = []
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    for raw in text.split(","):
        part = raw.strip()
        if part == "...":
            items.append(Ellipsis)
        elif part == "None":
            items.append(None)
        elif re.fullmatch(_INT, part):
            items.append(int(part))
        elif re.fullmatch(rf"({_INT})?:({_INT})?(:({_INT})?)?", part):
            bits = part.split(":")
            vals = [int(b) if b else None for b in bits] + [None] * (3 - len(bits))
            items.append(slice(*vals))
        else:
            raise typer.BadParameter(f"index part {part!r} is not an int, a slice, ... or None")
    return tuple(items)


# ------------------------------------------------------------------------------------ stats

_BAR = "█"


def render_stats(resp: pb.ProbeResponse, title: str, console: Console) -> None:
    """The probe's numbers as a table, then its histogram as horizontal bars."""
    s = resp.stats
    table = Table(title=title, box=None, show_header=False, title_justify="left",
                  title_style="bold")
    table.add_column("stat", style="bold")
    table.add_column("value", justify="right")
    if s.dtype:
        table.add_row("dtype", _dtype(s.dtype))
        table.add_row("shape", str(list(s.shape)))
    rows = [("numel", f"{s.numel:,}"), ("min", f"{s.min:.6g}"), ("max", f"{s.max:.6g}"),
            ("mean", f"{s.mean:.6g}"), ("std", f"{s.std:.6g}"), ("norm", f"{s.norm:.6g}"),
            ("nan", f"{s.nan_count:,}"), ("inf", f"{s.inf_count:,}"),
            ("version", str(s.version)), ("sha256", s.checksum_sha256[:16] + "…")]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    counts = list(s.histogram_counts)
    if counts:
        width = 40
        top = max(counts) or 1
        step = (s.histogram_max - s.histogram_min) / len(counts)
        hist = Table(box=None, show_header=False, padding=(0, 1))
        hist.add_column("bin", justify="right", style="dim")
        hist.add_column("bar", style="green", no_wrap=True)
        hist.add_column("count", justify="right")
        for i, n in enumerate(counts):
            lo = s.histogram_min + i * step
            bar = _BAR * max(1 if n else 0, round(width * n / top))
            hist.add_row(f"{lo:+.4f}", bar, f"{n:,}")
        console.print(hist)


@app.command()
def stats(model: str, param: Annotated[Optional[str], typer.Argument(
              help="state_dict key; omit for the whole model")] = None,
          index: Annotated[Optional[str], typer.Option(help='torch index, e.g. "0, :3"')
                           ] = None,
          bins: Annotated[int, typer.Option(help="histogram bins (0 = none)")] = 20,
          buffers: Annotated[bool, typer.Option("--buffers",
                                                help="whole model: include buffers")] = False,
          grad: Annotated[bool, typer.Option("--grad", help="the gradient, not the value")
                          ] = False,
          target: Target = None, token: Token = None, tls: Tls = False, tls_ca: TlsCa = None,
          tls_cert: TlsCert = None, tls_key: TlsKey = None, server_name: ServerName = None,
          timeout: Timeout = 60.0) -> None:
    """Statistics computed on the server (min, max, mean, std, norm, NaN/Inf, checksum) and a
    histogram drawn in the terminal, for a model, a parameter or a slice of one."""
    idx = parse_index(index) if index else None
    from paramhub.errors import ParamhubError

    with _connect(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout) as c:
        try:
            resp = c.probe(model, param, idx, bins=bins, include_buffers=buffers, grad=grad)
        except ParamhubError as e:
            raise _fail(e) from None
    title = f"{model}" + (f" {param}" if param else "") + (f"[{index}]" if index else "")
    render_stats(resp, title, Console())


# ------------------------------------------------------------------------------------ get


@app.command()
def get(model: str, param: str, index: Annotated[Optional[str], typer.Argument(
            help='torch index, e.g. "0, 1:3"')] = None,
        buffer: Annotated[bool, typer.Option("--buffer", help="PARAM names a buffer")] = False,
        grad: Annotated[bool, typer.Option("--grad", help="the gradient, not the value")
                        ] = False,
        target: Target = None, token: Token = None, tls: Tls = False, tls_ca: TlsCa = None,
        tls_cert: TlsCert = None, tls_key: TlsKey = None, server_name: ServerName = None,
        timeout: Timeout = 60.0) -> None:
    """Print a parameter's (or a region's) values."""
    import torch

    idx = parse_index(index) if index else None
    from paramhub.errors import ParamhubError

    with _connect(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout) as c:
        try:
            t, version = c.get_tensor(model, param, idx,
                                      kind="buffers" if buffer else "parameters", grad=grad)
        except ParamhubError as e:
            raise _fail(e) from None
    where = f"{param}[{index}]" if index else param
    print(f"{model} {where}  {str(t.dtype).removeprefix('torch.')} {list(t.shape)}  "
          f"version {version}")
    with torch.no_grad():
        print(t)


# ------------------------------------------------------------------------------ checkpoints

checkpoint_app = typer.Typer(name="checkpoint", no_args_is_help=True,
                             help="Named checkpoints of a model: create, list, restore, delete, "
                                  "export (needs a server with a data directory).")
app.add_typer(checkpoint_app)


def _checkpoint_call(target: str | None, token: str | None, tls: bool, tls_ca: Path | None,
                     tls_cert: Path | None, tls_key: Path | None, server_name: str | None,
                     timeout: float, fn: Any) -> Any:
    from paramhub.errors import ParamhubError

    with _connect(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout) as c:
        try:
            return fn(c)
        except ParamhubError as e:
            raise _fail(e) from None


@checkpoint_app.command("create")
def checkpoint_create(model: str, name: str, target: Target = None, token: Token = None,
                      tls: Tls = False, tls_ca: TlsCa = None, tls_cert: TlsCert = None,
                      tls_key: TlsKey = None, server_name: ServerName = None,
                      timeout: Timeout = 300.0) -> None:
    """Save the model's current values as checkpoint NAME."""
    info = _checkpoint_call(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout,
                            lambda c: c.create_checkpoint(model, name))
    Console().print(f"checkpoint {info.name} of {model} at version {info.model_version} "
                    f"({_human_bytes(info.num_bytes)})", highlight=False)


@checkpoint_app.command("list")
def checkpoint_list(model: str, target: Target = None, token: Token = None, tls: Tls = False,
                    tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None,
                    server_name: ServerName = None, timeout: Timeout = 30.0) -> None:
    """List the model's checkpoints, oldest first."""
    import datetime

    infos = _checkpoint_call(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout,
                             lambda c: c.list_checkpoints(model))
    table = Table(box=None, header_style="bold")
    for col in ("checkpoint", "model version", "created (UTC)", "bytes"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for i in infos:
        created = datetime.datetime.fromtimestamp(i.created_unix_nanos / 1e9,
                                                  tz=datetime.timezone.utc)
        table.add_row(i.name, str(i.model_version), created.strftime("%Y-%m-%d %H:%M:%S"),
                      _human_bytes(i.num_bytes))
    Console().print(table)


@checkpoint_app.command("restore")
def checkpoint_restore(model: str, name: str, target: Target = None, token: Token = None,
                       tls: Tls = False, tls_ca: TlsCa = None, tls_cert: TlsCert = None,
                       tls_key: TlsKey = None, server_name: ServerName = None,
                       timeout: Timeout = 300.0) -> None:
    """Roll the model back to checkpoint NAME (one write; versions keep growing)."""
    resp = _checkpoint_call(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout,
                            lambda c: c.restore_checkpoint(model, name))
    Console().print(f"restored {model} from {name}: model version {resp.model_version}",
                    highlight=False)


@checkpoint_app.command("delete")
def checkpoint_delete(model: str, name: str, target: Target = None, token: Token = None,
                      tls: Tls = False, tls_ca: TlsCa = None, tls_cert: TlsCert = None,
                      tls_key: TlsKey = None, server_name: ServerName = None,
                      timeout: Timeout = 30.0) -> None:
    """Delete checkpoint NAME."""
    _checkpoint_call(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout,
                     lambda c: c.delete_checkpoint(model, name))
    Console().print(f"deleted checkpoint {name} of {model}", highlight=False)


@checkpoint_app.command("export")
def checkpoint_export(model: str, path: Path, name: Annotated[str, typer.Option(
                          help="checkpoint to export (default: the current values)")] = "",
                      target: Target = None, token: Token = None, tls: Tls = False,
                      tls_ca: TlsCa = None, tls_cert: TlsCert = None, tls_key: TlsKey = None,
                      server_name: ServerName = None, timeout: Timeout = 600.0) -> None:
    """Write a checkpoint (or the current values) to PATH as a plain safetensors state_dict."""
    out = _checkpoint_call(target, token, tls, tls_ca, tls_cert, tls_key, server_name, timeout,
                           lambda c: c.export_checkpoint(model, path, name))
    Console().print(f"wrote {out}", highlight=False)
