"""Raw calls: any ParameterService method with any bytes as the request body (identity
serializers), the way a hostile or broken client would send them."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from paramhub.common import pb

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterService"]
METHODS = {m.name: m for m in SERVICE.methods}


def _ident(b: bytes) -> bytes:
    return b


def call_raw(channel: grpc.Channel, method: str, bodies: Sequence[bytes], *,
             metadata: Sequence[tuple[str, str]] = (), timeout: float = 30.0
             ) -> tuple[grpc.StatusCode, list[bytes]]:
    """Sends `bodies` (one for unary-request methods) to `method`; returns (code, responses)."""
    m = METHODS[method]
    path = f"/{SERVICE.full_name}/{method}"
    md = tuple(metadata)
    try:
        if m.client_streaming and m.server_streaming:
            out = list(channel.stream_stream(path, _ident, _ident)(iter(bodies), timeout=timeout,
                                                                   metadata=md))
        elif m.client_streaming:
            out = [channel.stream_unary(path, _ident, _ident)(iter(bodies), timeout=timeout,
                                                              metadata=md)]
        elif m.server_streaming:
            out = list(channel.unary_stream(path, _ident, _ident)(bodies[0], timeout=timeout,
                                                                  metadata=md))
        else:
            out = [channel.unary_unary(path, _ident, _ident)(bodies[0], timeout=timeout,
                                                             metadata=md)]
        return grpc.StatusCode.OK, out
    except grpc.RpcError as e:
        return e.code(), []
