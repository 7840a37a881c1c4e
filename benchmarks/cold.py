"""Transfers as users meet them, each beside its reference measured in the same run.

    python -m benchmarks.cold                  # 256 MiB, 3 fresh processes per row
    python -m benchmarks.cold --mib 64 --repeats 2

Rows (the server is a default, durable `paramhub serve` started here on 127.0.0.1):
- cold fetch: a FRESH process connects, `client.model("m")`, `.weight.fetch()` of one float32
  parameter, vs a fresh process reading the same bytes over a raw TCP socket into a fresh
  tensor; the same with `shm=False` (the data channel). Times start after the imports (which
  are reported separately: they are the same for any torch program).
- fetch right after a write of the whole parameter vs an idle fetch (warm client).
- TLS bulk: a fetch with `shm=False` from a TLS server (the data channel wrapped in TLS) vs a
  raw TLS socket into a preallocated tensor.
- small calls: scalar `w.data[0, 0] = 42` p50 vs gRPC echo p50 + 1.5 x fdatasync p50 of the
  data dir; `net(X)` on the seed MLP in grad mode (and under no_grad) p50 vs echo p50.

Children are this module run with `--child MODE`; they print one JSON line. The machine is
shared with other work: numbers are noisy, compare rows only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ children

def _child(mode: str, target: str, nbytes: int, ca: str) -> None:
    t0 = time.perf_counter()
    import torch  # noqa: F401  (both kinds of child pay for torch)
    if mode.startswith("paramhub"):
        import paramhub
        import paramhub.client  # noqa: F401  (paramhub/__init__ is lazy: imports count as such)
        import paramhub.module  # noqa: F401
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    c1 = time.process_time()  # this process's CPU seconds (all threads) during the fetch
    if mode.startswith("paramhub"):
        kw: dict[str, Any] = {"shm": mode == "paramhub"}
        if mode == "paramhub-tls":
            kw["root_certificates"] = Path(ca).read_bytes()
            kw["shm"] = False
        with paramhub.connect(target, timeout=120, **kw) as client:
            net = client.model("m")
            value = net.weight.fetch()
            t_total = time.perf_counter() - t1
            assert value.numel() * value.element_size() == nbytes
            out = {"import": t_import, "fetch": t_total, "cpu": time.process_time() - c1,
                   "transport": _last_transport(client)}
    else:
        host, port = target.rsplit(":", 1)
        conn = socket.create_connection((host, int(port)))
        if mode == "raw-tls":
            ctx = ssl.create_default_context(cafile=ca)
            conn = ctx.wrap_socket(conn, server_hostname="localhost")
        dst = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(dst.numpy()).cast("B")
        conn.sendall(b"G")
        got = 0
        while got < nbytes:
            k = conn.recv_into(view[got:], nbytes - got)
            if k == 0:
                raise ConnectionError("peer closed")
            got += k
        out = {"import": t_import, "fetch": time.perf_counter() - t1,
               "cpu": time.process_time() - c1, "transport": "raw"}
        conn.close()
    print(json.dumps(out), flush=True)


def _last_transport(client: Any) -> str:
    counts = getattr(client, "transfers", None)
    if counts is None:
        return "?"
    return ",".join(f"{k}={v}" for k, v in sorted(counts.items()))


# ------------------------------------------------------------------------------ peers

class RawSender:
    """Serves b"G" -> nbytes from a tensor, on plain or TLS connections, in a thread."""

    def __init__(self, nbytes: int, tls: tuple[str, str] | None = None) -> None:
        import torch
        self.src = torch.ones(nbytes, dtype=torch.uint8)
        self.view = memoryview(self.src.numpy()).cast("B")
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.ctx = None
        if tls is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(*tls)
        self._stop = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                if self.ctx is not None:
                    conn = self.ctx.wrap_socket(conn, server_side=True)
                while conn.recv(1) == b"G":
                    conn.sendall(self.view)
            except OSError:
                pass
            finally:
                conn.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


class Server:
    """`paramhub serve` (default durability) as a subprocess."""

    def __init__(self, data_dir: str, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [PY, "-m", "paramhub_server", "--port", "0", "--data-dir", data_dir,
             "--device", "cpu", "--log-level", "WARNING", *flags],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.target = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if not self.target:
            raise RuntimeError("paramhub serve did not start")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fresh(mode: str, target: str, nbytes: int, ca: str = "", server_pid: int | None = None
           ) -> dict[str, Any]:
    """One fresh child; adds "peer_cpu": CPU seconds the sending side used meanwhile (the
    paramhub server process, or this process, whose thread is the raw sender)."""
    before = _cpu_of(server_pid) if server_pid else time.process_time()
    out = subprocess.run([PY, "-m", "benchmarks.cold", "--child", mode, "--target", target,
                          "--nbytes", str(nbytes), "--ca", ca],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"child {mode} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["peer_cpu"] = (_cpu_of(server_pid) if server_pid else time.process_time()) - before
    return result


def _p50(xs: list[float]) -> float:
    return statistics.median(xs)


def _fdatasync_p50(data_dir: str, n: int) -> float:
    path = os.path.join(data_dir, "fdatasync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        times = []
        for _ in range(n):
            os.write(fd, b"x" * 64)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    return _p50(times)


# ------------------------------------------------------------------------------ the run

def _create(client: Any, nbytes: int) -> None:
    import torch
    from torch import nn
    n = int((nbytes // 4) ** 0.5)
    while (nbytes // 4) % n:
        n -= 1
    with torch.device("meta"):
        module = nn.Linear(nbytes // 4 // n, n, bias=False)
    client.create_model("m", module, seed=0)


def run(args: argparse.Namespace) -> list[tuple[str, float, str, float, str]]:
    import grpc
    import torch
    from torch import nn

    import paramhub
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from _certs import issue, make_ca  # the test PKI: localhost / 127.0.0.1

    nbytes = args.mib * MIB
    rows: list[tuple[str, float, str, float, str]] = []
    gb = nbytes / 1e9
    tmp = tempfile.mkdtemp(prefix="paramhub-cold-")
    ca, ca_key, ca_cert = make_ca()
    leaf = issue(ca_key, ca_cert, "localhost", server=True)
    for name, data in (("ca.pem", ca.cert), ("cert.pem", leaf.cert), ("key.pem", leaf.key)):
        Path(tmp, name).write_bytes(data)
    ca_file, cert_file, key_file = (str(Path(tmp, n)) for n in ("ca.pem", "cert.pem", "key.pem"))

    server = Server(str(Path(tmp, "data")))
    tls_server = Server(str(Path(tmp, "data-tls")), "--tls-cert", cert_file,
                        "--tls-key", key_file)
    raw = RawSender(nbytes)
    raw_tls = RawSender(nbytes, (cert_file, key_file))
    echo = subprocess.Popen([PY, "-m", "benchmarks._peers", "echo"], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, cwd=ROOT)
    echo_port = int(echo.stdout.readline())  # type: ignore[union-attr]
    try:
        client = paramhub.connect(server.target, timeout=300)
        client.wait_ready()
        _create(client, nbytes)
        tls_client = paramhub.connect(tls_server.target, timeout=300,
                                      root_certificates=Path(ca_file).read_bytes())
        tls_client.wait_ready()
        _create(tls_client, nbytes)

        print(f"== cold fetch, {args.mib} MiB, {args.repeats} fresh processes per row",
              file=sys.stderr)
        samples: dict[str, list[dict[str, Any]]] = {
            "paramhub": [], "paramhub-noshm": [], "raw": [], "paramhub-tls": [], "raw-tls": []}
        targets = {"paramhub": server.target, "paramhub-noshm": server.target,
                   "raw": f"127.0.0.1:{raw.port}", "paramhub-tls": tls_server.target,
                   "raw-tls": f"127.0.0.1:{raw_tls.port}"}
        pids = {"paramhub": server.proc.pid, "paramhub-noshm": server.proc.pid,
                "paramhub-tls": tls_server.proc.pid}
        for _ in range(args.repeats):  # round-robin: load from elsewhere spreads evenly
            for mode in samples:
                samples[mode].append(_fresh(mode, targets[mode], nbytes, ca_file,
                                            pids.get(mode)))
        fetch = {m: _p50([s["fetch"] for s in v]) for m, v in samples.items()}
        best = {m: min(s["fetch"] for s in v) for m, v in samples.items()}
        imports = {m: _p50([s["import"] for s in v]) for m, v in samples.items()}
        cpu = {m: (_p50([s["cpu"] for s in v]), _p50([s["peer_cpu"] for s in v]))
               for m, v in samples.items()}
        for mode, label in (("paramhub", "cold fetch, fresh process (shm)"),
                            ("paramhub-noshm", "cold fetch, fresh process, shm=False"),
                            ("paramhub-tls", "cold fetch, fresh process, TLS server")):
            ref = "raw-tls" if mode == "paramhub-tls" else "raw"
            rows.append((label, gb / fetch[mode], f"raw {'TLS ' if ref == 'raw-tls' else ''}"
                         f"socket, fresh process: {gb / fetch[ref]:.2f} GB/s",
                         fetch[ref] / fetch[mode],
                         f"best {gb / best[mode]:.2f} vs {gb / best[ref]:.2f} GB/s; imports "
                         f"{imports[mode]:.2f}s vs {imports[ref]:.2f}s; CPU s client+sender "
                         f"{cpu[mode][0]:.2f}+{cpu[mode][1]:.2f} vs "
                         f"{cpu[ref][0]:.2f}+{cpu[ref][1]:.2f}; "
                         f"{samples[mode][-1]['transport']}"))

        print("== fetch after write", file=sys.stderr)
        net = client.model("m")
        value = torch.full(tuple(net.weight.shape), 0.5)
        after, idle = [], []
        for _ in range(args.repeats):
            net.weight.data.copy_(value)
            t0 = time.perf_counter()
            net.weight.fetch()
            after.append(time.perf_counter() - t0)
            time.sleep(args.settle)
            t0 = time.perf_counter()
            net.weight.fetch()
            idle.append(time.perf_counter() - t0)
        rows.append(("fetch right after a whole-tensor write", gb / _p50(after),
                     f"idle fetch {gb / _p50(idle):.2f} GB/s", _p50(idle) / _p50(after), ""))

        print(f"== small calls, {args.calls} calls", file=sys.stderr)
        with torch.device("meta"):
            mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        small = client.create_model("mlp", mlp, seed=0)
        w = small[0].weight
        x = torch.rand(2, 4)
        echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}")
        echo_call = echo_channel.unary_unary("/bench.Echo/Echo")
        payload = b"\x00" * 64

        def scalar() -> None:
            w.data[0, 0] = 42

        def forward_grad() -> None:
            with torch.enable_grad():
                small(x)

        def forward_nograd() -> None:
            with torch.no_grad():
                small(x)

        fns = {"echo": lambda: echo_call(payload, timeout=30), "scalar": scalar,
               "forward": forward_grad, "forward_nograd": forward_nograd}
        lat: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(10):
            for fn in fns.values():
                fn()
        for _ in range(args.calls):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                lat[k].append(time.perf_counter() - t0)
        sync = _fdatasync_p50(str(Path(tmp, "data")), args.calls)
        echo_p50 = _p50(lat["echo"])
        budget = echo_p50 + 1.5 * sync
        rows.append(("scalar w.data[0, 0] = 42 p50 (us)", _p50(lat["scalar"]) * 1e6,
                     f"echo {echo_p50 * 1e6:.0f} + 1.5 x fdatasync {sync * 1e6:.0f} = "
                     f"{budget * 1e6:.0f} us", _p50(lat["scalar"]) / budget, "target <= 1.0x"))
        rows.append(("net(X) seed MLP, grad mode p50 (us)", _p50(lat["forward"]) * 1e6,
                     f"echo {echo_p50 * 1e6:.0f} us", _p50(lat["forward"]) / echo_p50,
                     "target <= 1.25x"))
        rows.append(("net(X) seed MLP, no_grad p50 (us)", _p50(lat["forward_nograd"]) * 1e6,
                     f"echo {echo_p50 * 1e6:.0f} us", _p50(lat["forward_nograd"]) / echo_p50,
                     "the grad-mode row's SDK autograd node, left out"))
        echo_channel.close()
        client.close()
        tls_client.close()
    finally:
        echo.stdin.close()  # type: ignore[union-attr]
        echo.wait(timeout=30)
        raw.close()
        raw_tls.close()
        server.close()
        tls_server.close()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def render(rows: list[tuple[str, float, str, float, str]]) -> str:
    out = ["| what | paramhub | reference (same run) | ratio | notes |", "|---|---|---|---|---|"]
    for name, value, ref, ratio, note in rows:
        unit = "" if "(us)" in name else " GB/s"
        out.append(f"| {name} | {value:.{0 if unit == '' else 2}f}{unit} | {ref} | "
                   f"{ratio:.2f}x | {note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds between a write and the idle fetch")
    p.add_argument("--child", default="")
    p.add_argument("--target", default="")
    p.add_argument("--nbytes", type=int, default=0)
    p.add_argument("--ca", default="")
    a = p.parse_args(argv)
    if a.child:
        _child(a.child, a.target, a.nbytes, a.ca)
        return 0
    rows = run(a)
    print(f"load average before the table: {os.getloadavg()[0]:.1f} "
          f"({os.cpu_count()} CPUs)", file=sys.stderr)
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
