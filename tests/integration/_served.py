"""`paramhub serve` as a subprocess whose peak memory a test can measure, and raw calls that
return the refusal as a ParamhubError (for the hostile-input and fuzz tests)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

import paramhub
from paramhub.errors import from_rpc_error
from paramhub.common import pb

SERVICE = "/paramhub.v1.ParameterService/"
MiB = 1 << 20
METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["ParameterService"].methods}


def raw(channel: grpc.Channel, method: str, msgs: Sequence[Any], *, stream: bool = False,
         timeout: float = 60.0) -> Any:
    """Sends messages to `method` as a hostile client would (any content, any order); returns
    the answer, or the ParamhubError it was refused with."""
    ser = lambda m: m if isinstance(m, bytes) else m.SerializeToString()  # noqa: E731
    try:
        if stream:
            return channel.stream_unary(SERVICE + method, ser, bytes)(iter(msgs),
                                                                      timeout=timeout)
        if METHODS[method].server_streaming:  # the answers, all of them
            return list(channel.unary_stream(SERVICE + method, ser, bytes)(msgs[0],
                                                                           timeout=timeout))
        return channel.unary_unary(SERVICE + method, ser, bytes)(msgs[0], timeout=timeout)
    except grpc.RpcError as e:
        return from_rpc_error(e)


class Served:
    """`paramhub serve` as a subprocess, with its peak memory."""

    def __init__(self, data_dir: Path, *flags: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "paramhub_server", "--port", "0", "--data-dir",
             str(data_dir), "--fsync", "off", "--device", "cpu", "--log-level", "WARNING",
             *flags], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line, "the server did not start"
        self.target = line
        self.channel = grpc.insecure_channel(self.target,
                                             options=[("grpc.max_send_message_length", -1),
                                                      ("grpc.max_receive_message_length", -1)])
        self.client = paramhub.connect(self.target, timeout=120)
        self.client.wait_ready(timeout=60)

    def reset_peak(self) -> int:
        """Resets the peak RSS to the current RSS; returns it (bytes)."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")
        return self._status("VmRSS")

    def peak(self) -> int:
        """Peak RSS since the last reset (bytes)."""
        return self._status("VmHWM")

    def _status(self, key: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(key)

    def growth(self, fn: Any) -> tuple[Any, int]:
        """(fn's result, how far the server's peak RSS rose above its RSS before fn)."""
        base = self.reset_peak()
        out = fn()
        return out, self.peak() - base

    def close(self) -> None:
        self.client.close()
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


