"""The channel: credentials and options, the retry policy, deadlines, metadata, raw call handles.

`open_channel` makes the grpc channel `paramhub.connect()` hands to `Client`. `Calls` is the
base of `Client`: the stub, the raw-frame handles of the bulk RPCs, and `_call` / `_stream`,
which give every call its deadline and metadata, count it, and turn grpc.RpcError into the
exceptions of `paramhub.errors`. The transfer layer, batches, watches and the cluster module
make their calls through these too.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from paramhub import _codec, _data
from paramhub.common import rpcs
from paramhub.errors import from_rpc_error
from paramhub.common import pb
from paramhub.v1 import parameter_service_pb2_grpc as pb_grpc

__all__ = ["Calls", "DEFAULT_TARGET", "open_channel", "target_host"]

DEFAULT_TARGET = "127.0.0.1:50051"
T = TypeVar("T")

# Retries on UNAVAILABLE for the RPCs that are safe to repeat (`idempotent` in their proto
# option): reads, and writes that carry a request id (the SDK always sends one; the server
# applies an id once and answers a retry with the original result). Forward is not retried: in
# training mode it updates buffers.
_IDEMPOTENT = rpcs.names(idempotent=True)
_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "paramhub.v1.ParameterService", "method": m} for m in _IDEMPOTENT],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]
})

_SERVICE = "/paramhub.v1.ParameterService/"

#: RPCs whose writes record their writer (the server's `write_context`; `writes` in their proto
#: option): only these carry the x-paramhub-writer header.
_WRITER_METHODS = frozenset(rpcs.names(writes=True))


def _passthrough(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _parse_pull(buf: bytes) -> Any:
    # PullStateResponse: data messages (field 3) as memoryviews, the manifest as a message.
    view = _codec.parse_data_frame(buf, 0x1A)
    return view if view is not None else pb.PullStateResponse.FromString(buf)


def target_host(target: str) -> str | None:
    """The host of a "host:port" target ("[v6]:port" and "dns:///host:port" too); None for
    unix sockets and anything else the data channel cannot reach."""
    t = target
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme):]
            break
    if not t or t.startswith("unix") or "/" in t or "," in t:
        return None
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        return host if sep and rest.startswith(":") and host else None
    host, sep, port = t.rpartition(":")
    return host if sep and host and port.isdigit() else None


def open_channel(target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 client_cert: bytes | None = None, client_key: bytes | None = None,
                 options: Sequence[tuple[str, Any]] = ()
                 ) -> tuple[grpc.Channel, _data.TlsConfig | None]:
    """The channel to `target` (TLS when asked or when certificates are given) and the TLS
    settings the data channel reuses (None without TLS)."""
    opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1),
            # Largest HTTP/2 frames: see paramhub_server.transport.HTTP2_OPTIONS.
            ("grpc.http2.max_frame_size", (1 << 24) - 1),
            # Each Client its own connection (grpc otherwise shares one among a process's
            # channels to a target): the server tells clients apart by connection when it has
            # no credentials to go by, and shares its stream limits out per client.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.service_config", _SERVICE_CONFIG), ("grpc.enable_retries", 1), *options]
    if tls or root_certificates or client_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates,
                                             private_key=client_key,
                                             certificate_chain=client_cert)
        channel = grpc.secure_channel(target, creds, options=opts)
        override = dict(opts).get("grpc.ssl_target_name_override")
        tls_config: _data.TlsConfig | None = _data.TlsConfig(
            root_certificates, client_cert, client_key,
            str(override) if override is not None else None)
    else:
        channel = grpc.insecure_channel(target, options=opts)
        tls_config = None
    return channel, tls_config


class Calls:
    """The calls of one channel: stub, raw handles, deadlines, metadata, counts, errors."""

    def __init__(self, channel: grpc.Channel, *, timeout: float | None = 30.0,
                 token: str | None = None, target: str = "") -> None:
        self.channel = channel
        self.target = target
        self.timeout = timeout
        #: Shown as the writer of this client's writes in watch events.
        self.writer_id = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        #: Every call carries the token; writes also name their writer (one more header per
        #: call costs ~20 us of a ~450 us round trip on a 2-core VM, so reads go without it).
        self._read_metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ())
        self._metadata = self._read_metadata + (("x-paramhub-writer", self.writer_id),)
        self.stub = pb_grpc.ParameterServiceStub(channel)
        # The bulk RPCs again, with raw-frame (de)serializers (same wire format; see _codec).
        self._get_tensor_raw = channel.unary_stream(
            _SERVICE + "GetTensor", request_serializer=pb.GetTensorRequest.SerializeToString,
            response_deserializer=_codec.parse_wrapped_chunk)
        self._stream_set_slice_raw = channel.stream_unary(
            _SERVICE + "StreamSetSlice", request_serializer=_passthrough,
            response_deserializer=pb.StreamSetSliceResponse.FromString)
        self._pull_state_raw = channel.unary_stream(
            _SERVICE + "PullState", request_serializer=pb.PullStateRequest.SerializeToString,
            response_deserializer=_parse_pull)
        self._get_inline_raw = channel.unary_unary(
            _SERVICE + "GetTensorInline",
            request_serializer=pb.GetTensorInlineRequest.SerializeToString,
            response_deserializer=_codec.parse_inline)
        self._push_state_raw = channel.stream_unary(
            _SERVICE + "PushState", request_serializer=_passthrough,
            response_deserializer=pb.PushStateResponse.FromString)
        #: RPCs made by this client, by method name (e.g. {"GetTensor": 3}); for measuring.
        self.rpc_counts: Counter[str] = Counter()
        self._method_names: dict[Any, str] = {}

    def _count(self, fn: Any) -> tuple[tuple[str, str], ...]:
        """Counts a call of `fn`; returns the metadata it carries."""
        name = self._method_names.get(fn)
        if name is None:
            method = getattr(fn, "_method", b"")
            if isinstance(method, bytes):
                method = method.decode()
            name = self._method_names[fn] = str(method).rsplit("/", 1)[-1]
        self.rpc_counts[name] += 1
        return self._metadata if name in _WRITER_METHODS else self._read_metadata

    def _call(self, fn: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        metadata = self._count(fn)
        try:
            return fn(request, timeout=timeout if timeout is not None else self.timeout,
                      metadata=metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def _stream(self, fn: Callable[..., Iterator[T]], request: Any,
                timeout: float | None = None) -> Iterator[T]:
        metadata = self._count(fn)
        try:
            yield from fn(request, timeout=timeout if timeout is not None else self.timeout,
                          metadata=metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
