"""Raw-frame (de)serializers for the bulk RPCs.

The servicer's bulk streams (GetTensor, PullState out; StreamSetSlice, PushState in) are
registered with (de)serializers that pass ready-made protobuf wire bytes through and read
incoming data fields as memoryviews (see paramhub._codec "Raw wire frames"). The wire format is
unchanged: a plain protobuf peer interoperates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory

from paramhub import _codec
from paramhub.common import rpcs
from paramhub.v1 import parameter_service_pb2 as pb

__all__ = ["HTTP2_OPTIONS", "SERVICE", "add_servicer"]

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterService"]

#: HTTP/2 settings for both ends: gRPC's default 16 KiB frames cut each 1 MiB chunk into 64
#: frames, each a trip through the transport; the largest frame HTTP/2 allows (2**24 - 1)
#: measured ~1.5x the throughput of streamed tensors on loopback (benchmarks/).
HTTP2_OPTIONS = [("grpc.http2.max_frame_size", (1 << 24) - 1)]


def _passthrough(message: Any) -> bytes:
    """Sends bytes that are already protobuf wire format as they are; serializes messages."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


def _data_or(cls: Any, tag: int) -> Callable[[bytes], Any]:
    def deserialize(buf: bytes) -> Any:
        view = _codec.parse_data_frame(buf, tag)
        return view if view is not None else cls.FromString(buf)
    return deserialize


def add_servicer(servicer: Any, server: grpc.Server) -> None:
    """Registers every ParameterService method of `servicer`, with raw-frame (de)serializers for
    the bulk streams. Replaces the generated add_ParameterServiceServicer_to_server."""
    handlers = {}
    for method in SERVICE.methods:
        req = message_factory.GetMessageClass(method.input_type)
        resp = message_factory.GetMessageClass(method.output_type)
        deserializer: Callable[[bytes], Any] = req.FromString
        serializer: Callable[[Any], bytes] = resp.SerializeToString
        facts = rpcs.FACTS[method.name]  # raw framing, as declared in the proto
        if facts.raw_response:
            serializer = _passthrough
        if facts.raw_request_field:  # a bytes field: tag = (field number << 3) | 2
            deserializer = _data_or(req, facts.raw_request_field << 3 | 2)
        factory = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(getattr(servicer, method.name),
                                        request_deserializer=deserializer,
                                        response_serializer=serializer)
    generic = grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
