"""The RPC pipeline every ParameterService call passes through, in order:

1. request id: taken from `x-request-id` metadata when well-formed, else generated; attached to
   every log record made while the call runs and sent back in the trailing metadata of every
   error (errors.py) and, when the client chose it, of successes too (with the status, so it
   costs no extra HTTP/2 write);
2. authentication and role check (auth.py), when the server has an auth file;
3. readiness: UNAVAILABLE (reason NOT_READY) while the server is still loading;
4. decoding: requests arrive as raw bytes and are parsed here, so bytes that are not a valid
   message answer INVALID_ARGUMENT (reason BAD_REQUEST_BYTES) instead of grpc's INTERNAL
   "Exception deserializing request!"; responses are serialized here too, which gives exact
   byte counts without serializing twice;
5. admission of the waiting classes (admission.py): watch streams, streaming transfers and
   sync-round pushes run on thread pools of their own, counted per class and per client;
6. metrics and one access-log line per call: method, status code, latency, bytes in and out.

grpc.health.v1 and reflection bypass the pipeline: they stay open and cheap. Rejections use the
same error table as the servicer (paramhub.errors classes -> status + ErrorInfo).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from paramhub.errors import InvalidArgumentError, ParamhubError, UnavailableError
from paramhub_server.admission import CALL, Admission, method_class
from paramhub_server.auth import CLUSTER_SERVICE, SERVICE, Authenticator
from paramhub_server.errors import status_of
from paramhub_server.logs import (enter_request, leave_request, request_context,
                                  set_current_role)
from paramhub_server.metrics import Metrics

log = logging.getLogger(__name__)
access_log = logging.getLogger("paramhub_server.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_REQUEST_ID_MATCH = _REQUEST_ID.fullmatch

#: Generated request ids: 8 random hex characters per server process plus a counter (16
#: characters, unique per process lifetime; ~1 us instead of uuid4's ~3 us).
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A fresh 16-character request id."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def _code_name(context: grpc.ServicerContext, default: str) -> str:
    code = context.code()
    if code is None:
        return default
    return getattr(code, "name", str(code))


def _given_request_id(metadata: Any) -> str | None:
    """The client's `x-request-id` when present and well-formed."""
    for k, v in metadata or ():
        if k == "x-request-id":
            if isinstance(v, str) and _REQUEST_ID_MATCH(v):
                return v
            break
    return None


class _Call:
    """Per-call bookkeeping. The peer is only looked up when a log line needs it."""

    __slots__ = ("method", "request_id", "echo", "start", "received", "sent", "context", "who",
                 "client")

    def __init__(self, method: str, metadata: Any, context: grpc.ServicerContext) -> None:
        given = _given_request_id(metadata)
        self.method = method
        self.request_id = given or new_request_id()
        self.echo = given is not None  # the client chose it: sent back on success too
        self.context = context
        self.start = time.perf_counter()
        self.received = 0
        self.sent = 0
        self.who = "-"
        self.client: str | None = None  # set once admitted to a waiting class


class Pipeline(grpc.ServerInterceptor):
    """See the module docstring. `ready()` tells whether the server has finished loading."""

    def __init__(self, *, authenticator: Authenticator | None, metrics: Metrics | None,
                 ready: Callable[[], bool], admission: Admission | None = None) -> None:
        self.authenticator = authenticator
        self.admission = admission
        self.metrics = metrics
        self.ready = ready
        #: Wrapped handlers by full method name, built on a method's first call: the set of
        #: registered methods is fixed once the server starts, and building a wrapper per call
        #: (closures and a handler tuple, on grpc's polling thread) was ~5 us of every call.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    # ------------------------------------------------------------------------ grpc hook

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        full = details.method
        wrapped = self._handlers.get(full)
        if wrapped is not None:
            return wrapped
        handler = continuation(details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED; nothing is cached
            return None
        service, _, method = full.lstrip("/").rpartition("/")
        wrapped = (self._wrap(handler, full, method) if service in (SERVICE, CLUSTER_SERVICE)
                   else handler)
        self._handlers[full] = wrapped
        return wrapped

    # ------------------------------------------------------------------------ stages

    def _admit(self, call: _Call, full: str, metadata: Any,
               context: grpc.ServicerContext, gate: Any = None) -> None:
        """Stages 1-3 and 5; aborts the call (raises) on rejection."""
        # A request id the client chose is echoed in the trailing metadata (not the initial: an
        # explicit send_initial_metadata is a separate HTTP/2 write, ~100 us per small call).
        # Generated ids are not sent on success: a trailer costs ~20 us of a ~450 us small call
        # (measured A/B, benchmarks' latency loop), and errors carry the id anyway (errors.py).
        if call.echo:
            context.set_trailing_metadata((("x-request-id", call.request_id),))
        try:
            if self.authenticator is not None:
                principal = self.authenticator.authenticate(tuple(metadata or ()))
                call.who = f"{principal.role}:{principal.label}"
                self.authenticator.authorize(principal, full)
                set_current_role(principal.role)
            if not self.ready():
                raise UnavailableError("the server is still loading its models",
                                       reason="NOT_READY")
            if gate is not None:
                # Told apart by credentials when there are any, else by connection.
                client = call.who if self.authenticator is not None else context.peer()
                gate.enter(client)
                call.client = client
        except ParamhubError as exc:
            context.abort_with_status(status_of(exc))

    def _finish(self, call: _Call, code: str) -> None:
        seconds = time.perf_counter() - call.start
        if self.metrics is not None:
            self.metrics.finished(call.method, code, seconds, call.received, call.sent)
        level = logging.INFO if code not in ("INTERNAL", "UNKNOWN") else logging.ERROR
        if not access_log.isEnabledFor(level):
            return
        peer = call.context.peer()
        access_log.log(level, "%s %s %.2fms in=%dB out=%dB peer=%s who=%s", call.method, code,
                       seconds * 1e3, call.received, call.sent, peer, call.who,
                       extra={"rpc_code": code, "duration_ms": round(seconds * 1e3, 3),
                              "bytes_in": call.received, "bytes_out": call.sent,
                              "peer": peer, "who": call.who})

    # ------------------------------------------------------------------------ wrapping

    def _wrap(self, handler: grpc.RpcMethodHandler, full: str,
              method: str) -> grpc.RpcMethodHandler:
        """The pipeline around one method's handler (built once per method)."""
        parse = handler.request_deserializer
        serialize = handler.response_serializer

        def decode(call: _Call, raw: bytes) -> Any:
            call.received += len(raw)
            if parse is None:
                return raw
            try:
                return parse(raw)
            except (DecodeError, ValueError, RecursionError, TypeError):
                raise InvalidArgumentError(
                    f"the request body is not a valid {method} message ({len(raw)} bytes)",
                    reason="BAD_REQUEST_BYTES", metadata={"method": method}) from None

        def encode(call: _Call, msg: Any) -> bytes:
            data = serialize(msg) if serialize is not None else msg
            call.sent += len(data)
            return data

        def requests(call: _Call, raw_iter: Iterator[bytes]) -> Iterator[Any]:
            # Parsed lazily inside the servicer's own loop, so a bad message mid-stream is
            # answered by the servicer's error decorator like any other bad input.
            for raw in raw_iter:
                yield decode(call, raw)

        request_streaming = handler.request_streaming
        cls = method_class(method, request_streaming=request_streaming,
                           response_streaming=handler.response_streaming)
        gate = pool = None
        if cls != CALL and self.admission is not None:
            gate, pool = self.admission.gates[cls], self.admission.pools[cls]

        def admit(call: _Call, metadata: Any, request: Any,
                  context: grpc.ServicerContext) -> Any:
            """Stages 1-5: the handler's argument (aborts the call on rejection)."""
            self._admit(call, full, metadata, context, gate)
            if request_streaming:
                return requests(call, request)
            try:
                return decode(call, request)
            except ParamhubError as exc:
                context.abort_with_status(status_of(exc))

        if not handler.response_streaming:
            behavior = handler.stream_unary if request_streaming else handler.unary_unary

            def unary_response(request: Any, context: grpc.ServicerContext) -> bytes:
                metadata = context.invocation_metadata()
                call = _Call(method, metadata, context)
                code = "UNKNOWN"
                prev = enter_request(call.request_id, method)
                try:
                    arg = admit(call, metadata, request, context)
                    out = encode(call, behavior(arg, context))
                    code = _code_name(context, "OK")
                    return out
                except BaseException:
                    code = _code_name(context, "UNKNOWN")
                    raise
                finally:
                    if call.client is not None:
                        gate.leave(call.client)  # type: ignore[union-attr]
                    self._finish(call, code)
                    leave_request(prev)

            if pool is not None:
                unary_response.experimental_thread_pool = pool  # type: ignore[attr-defined]
            make = (grpc.stream_unary_rpc_method_handler if request_streaming
                    else grpc.unary_unary_rpc_method_handler)
            return make(unary_response)

        behavior = handler.stream_stream if request_streaming else handler.unary_stream

        def stream_response(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
            metadata = context.invocation_metadata()
            call = _Call(method, metadata, context)
            request_id = call.request_id
            code = "UNKNOWN"
            try:
                with request_context(request_id, method):
                    arg = admit(call, metadata, request, context)
                    responses = iter(behavior(arg, context))
                while True:
                    # The request context is set around each step only: between steps the
                    # thread is grpc's, and may run other calls.
                    with request_context(request_id, method):
                        try:
                            msg = next(responses)
                        except StopIteration:
                            break
                        data = encode(call, msg)
                    yield data
                code = _code_name(context, "OK")
            except GeneratorExit:
                code = "CANCELLED"
                raise
            except BaseException:
                code = _code_name(context, "UNKNOWN")
                raise
            finally:
                if call.client is not None:
                    gate.leave(call.client)  # type: ignore[union-attr]
                with request_context(request_id, method):
                    self._finish(call, code)

        if pool is not None:
            stream_response.experimental_thread_pool = pool  # type: ignore[attr-defined]
        make = (grpc.stream_stream_rpc_method_handler if request_streaming
                else grpc.unary_stream_rpc_method_handler)
        return make(stream_response)
