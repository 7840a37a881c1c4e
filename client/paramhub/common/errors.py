"""The one error table of paramhub.

Each exception class names the gRPC status code it travels as (`code`) and a default
machine-readable `reason` (google.rpc.ErrorInfo.reason). The server's core raises these same
classes (it never imports grpc); the servicer's decorator turns them into status codes from
`code`, and the SDK's `from_rpc_error` turns status codes back into these classes. Tests assert
on `code` and `reason`, never on message text.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ParamhubError",
    "NotFoundError",
    "AlreadyExistsError",
    "InvalidArgumentError",
    "OutOfRangeError",
    "ConflictError",
    "ResourceExhaustedError",
    "AuthError",
    "PermissionDeniedError",
    "UnavailableError",
    "DeadlineExceededError",
    "InternalError",
    "UnimplementedError",
    "FailedPreconditionError",
    "from_rpc_error",
    "ERROR_DOMAIN",
]

#: ErrorInfo.domain of every error the server raises.
ERROR_DOMAIN = "paramhub.dev"


class ParamhubError(Exception):
    """Base class of every paramhub error.

    Attributes:
        code: the gRPC status code name this error travels as (e.g. "NOT_FOUND").
        reason: UPPER_SNAKE ErrorInfo reason (e.g. "MODEL_NOT_FOUND").
        metadata: ErrorInfo metadata (string to string), e.g. {"model": "mlp"}.
    """

    code = "UNKNOWN"
    default_reason = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})

    def __str__(self) -> str:
        return self.message


class NotFoundError(ParamhubError, LookupError):
    """Unknown model, parameter, buffer or module path (NOT_FOUND)."""

    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExistsError(ParamhubError):
    """A model with that id already exists (ALREADY_EXISTS)."""

    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class InvalidArgumentError(ParamhubError, ValueError):
    """Bad spec, dtype, shape, index, init scheme or op (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"


class OutOfRangeError(ParamhubError, IndexError):
    """An index is out of the tensor's bounds (OUT_OF_RANGE)."""

    code = "OUT_OF_RANGE"
    default_reason = "INDEX_OUT_OF_RANGE"


class ConflictError(ParamhubError):
    """expected_version did not match the current version (ABORTED)."""

    code = "ABORTED"
    default_reason = "VERSION_MISMATCH"


class ResourceExhaustedError(ParamhubError):
    """A memory, size or quota limit was hit (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"
    default_reason = "LIMIT_EXCEEDED"


class AuthError(ParamhubError):
    """Missing or wrong credentials (UNAUTHENTICATED)."""

    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class PermissionDeniedError(ParamhubError, PermissionError):
    """The credentials' role is too low for the call (PERMISSION_DENIED)."""

    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class UnavailableError(ParamhubError):
    """The server is starting, draining or unreachable (UNAVAILABLE)."""

    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class DeadlineExceededError(ParamhubError, TimeoutError):
    """The call's deadline passed (DEADLINE_EXCEEDED)."""

    code = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"


class UnimplementedError(ParamhubError, NotImplementedError):
    """The server does not implement the call (UNIMPLEMENTED)."""

    code = "UNIMPLEMENTED"
    default_reason = "UNIMPLEMENTED"


class FailedPreconditionError(ParamhubError):
    """The call needs a server state it is not in, e.g. checkpoints on a server without a data
    directory (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class InternalError(ParamhubError):
    """A server bug (INTERNAL); the message is generic, the server log has the details."""

    code = "INTERNAL"
    default_reason = "INTERNAL"


_BY_CODE: dict[str, type[ParamhubError]] = {
    cls.code: cls
    for cls in (NotFoundError, AlreadyExistsError, InvalidArgumentError, OutOfRangeError,
                ConflictError, ResourceExhaustedError, AuthError, PermissionDeniedError,
                UnavailableError, DeadlineExceededError, UnimplementedError, FailedPreconditionError,
                InternalError)
}


def error_class_for_code(code_name: str) -> type[ParamhubError]:
    """The exception class for a gRPC status code name; ParamhubError for unknown ones."""
    return _BY_CODE.get(code_name, ParamhubError)


def from_rpc_error(err: Any) -> ParamhubError:
    """Converts a grpc.RpcError into the matching paramhub exception.

    The ErrorInfo detail (reason, metadata) is read from the rich status when present.
    """
    code = err.code()
    code_name = code.name if code is not None else "UNKNOWN"
    message = err.details() or code_name
    reason = None
    metadata: dict[str, str] = {}
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    metadata = dict(info.metadata)
    except (ImportError, ValueError, AttributeError):
        pass
    cls = error_class_for_code(code_name)
    exc = cls(message, reason=reason, metadata=metadata)
    if cls is ParamhubError:
        exc.code = code_name
    return exc
