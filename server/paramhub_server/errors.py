"""The one decorator that maps paramhub errors to gRPC status codes (STYLE.md §5).

Domain errors carry their status code name (`ParamhubError.code`); they are sent with a
google.rpc.ErrorInfo detail (reason, domain, metadata). Anything else is a bug: it is logged with
the request id and answered INTERNAL with a generic text.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from paramhub.errors import ERROR_DOMAIN, ParamhubError, ResourceExhaustedError
from paramhub_server.logs import current_request_id

log = logging.getLogger(__name__)


def _status(code_name: str, message: str, reason: str, metadata: dict[str, str]
            ) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN,
                                            metadata=metadata))
    status = rpc_status.to_status(status_pb2.Status(
        code=code_pb2.Code.Value(code_name), message=message, details=[detail]))
    request_id = current_request_id()
    if request_id:
        # The request id travels in trailing metadata (interceptors.py); aborting replaces the
        # trailers with the status's, so errors carry it here.
        status = status._replace(trailing_metadata=(*status.trailing_metadata,
                                                    ("x-request-id", request_id)))
    return status


def status_of(exc: ParamhubError) -> grpc.Status:
    """The grpc.Status (code, message, ErrorInfo) a paramhub error travels as."""
    return _status(exc.code, exc.message, exc.reason, exc.metadata)


def _out_of_memory(exc: BaseException) -> ParamhubError | None:
    """A failed allocation is a resource limit of this server, not a bug."""
    text = str(exc)
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
            isinstance(exc, RuntimeError) and "can't allocate memory" in text):
        return ResourceExhaustedError("the server could not allocate memory for this request",
                                      reason="OUT_OF_MEMORY", metadata={"limit": "memory"})
    return None


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, ParamhubError):
        context.abort_with_status(status_of(exc))
    oom = _out_of_memory(exc)
    if oom is not None:
        log.warning("out of memory in %s: %s", method, str(exc).splitlines()[0][:200])
        context.abort_with_status(status_of(oom))
    request_id = current_request_id() or uuid.uuid4().hex[:12]
    log.error("internal error in %s (request %s)", method, request_id, exc_info=exc)
    context.abort_with_status(_status("INTERNAL", f"internal error (request {request_id})",
                                      "INTERNAL", {"request_id": request_id}))


def rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a servicer method (plain or generator) with the error mapping."""
    method = fn.__name__
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
                _abort(context, exc, method)
        return stream

    @functools.wraps(fn)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
            _abort(context, exc, method)
    return unary
