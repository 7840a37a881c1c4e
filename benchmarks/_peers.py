"""Processes the benchmark talks to: a raw TCP sender/receiver, a bare gRPC echo server, and
torch.distributed.rpc (TensorPipe) workers. Run as `python -m benchmarks._peers MODE ...`."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from concurrent import futures

import torch

ECHO_METHOD = "/bench.Echo/Echo"


def _recv_into(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def tcp_server(nbytes: int) -> None:
    """Serves b"G" (send nbytes from a tensor) and b"P" (receive nbytes into a preallocated
    tensor, answer b"k") on one connection at a time."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    src_view = _tensor_memory(src)
    dst_view = _tensor_memory(dst)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                op = conn.recv(1)
                if not op:
                    break
                if op == b"G":
                    conn.sendall(src_view)
                elif op == b"P":
                    _recv_into(conn, dst_view)
                    conn.sendall(b"k")
                elif op == b"Q":
                    return


def _tensor_memory(t: torch.Tensor) -> memoryview:
    import ctypes
    return memoryview((ctypes.c_char * t.numel()).from_address(t.data_ptr())).cast("B")


def echo_server() -> None:
    """A bare gRPC unary echo (bytes in, same bytes out): the floor of a gRPC-Python call."""
    import grpc

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    server.stop(None)


# --------------------------------------------------------------------------- TensorPipe

_TENSOR: torch.Tensor | None = None


def _make(nbytes: int) -> torch.Tensor:
    global _TENSOR
    if _TENSOR is None or _TENSOR.numel() * 4 != nbytes:
        _TENSOR = torch.ones(nbytes // 4, dtype=torch.float32)
    return _TENSOR


def _consume(t: torch.Tensor) -> int:
    return t.numel()


def tensorpipe(rank: int, port: int, nbytes: int, repeats: int, transports: str) -> None:
    """rank 0 pulls (rpc_sync returning the tensor) and pushes (tensor as argument) `nbytes`
    float32 to/from rank 1; prints {"pull": [s...], "push": [s...]}."""
    import torch.distributed.rpc as rpc

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=600)
    if transports:
        opts._transports = transports.split(",")
        opts._channels = ["basic"]
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=opts)
    if rank == 0:
        rpc.rpc_sync("w1", _make, args=(nbytes,))  # warm-up (and the callee's allocation)
        out: dict[str, list[float]] = {"pull": [], "push": []}
        local = torch.ones(nbytes // 4, dtype=torch.float32)
        for _ in range(repeats):
            t0 = time.perf_counter()
            rpc.rpc_sync("w1", _make, args=(nbytes,))
            out["pull"].append(time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            rpc.rpc_sync("w1", _consume, args=(local,))
            out["push"].append(time.perf_counter() - t0)
        print(json.dumps(out), flush=True)
    rpc.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["tcp", "echo", "tensorpipe"])
    p.add_argument("--nbytes", type=int, default=0)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--transports", default="")
    a = p.parse_args()
    if a.mode == "tcp":
        tcp_server(a.nbytes)
    elif a.mode == "echo":
        echo_server()
    else:
        tensorpipe(a.rank, a.port, a.nbytes, a.repeats, a.transports)


if __name__ == "__main__":
    main()
