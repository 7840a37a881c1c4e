from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_READ: _ClassVar[Role]
    ROLE_WRITE: _ClassVar[Role]
    ROLE_ADMIN: _ClassVar[Role]

class Wait(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WAIT_UNSPECIFIED: _ClassVar[Wait]
    WAIT_WATCH: _ClassVar[Wait]
    WAIT_ROUND: _ClassVar[Wait]
ROLE_UNSPECIFIED: Role
ROLE_READ: Role
ROLE_WRITE: Role
ROLE_ADMIN: Role
WAIT_UNSPECIFIED: Wait
WAIT_WATCH: Wait
WAIT_ROUND: Wait
RPC_FIELD_NUMBER: _ClassVar[int]
rpc: _descriptor.FieldDescriptor

class RpcFacts(_message.Message):
    __slots__ = ("role", "idempotent", "writes", "raw_response", "raw_request_field", "wait")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    RAW_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RAW_REQUEST_FIELD_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    role: Role
    idempotent: bool
    writes: bool
    raw_response: bool
    raw_request_field: int
    wait: Wait
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., idempotent: _Optional[bool] = ..., writes: _Optional[bool] = ..., raw_response: _Optional[bool] = ..., raw_request_field: _Optional[int] = ..., wait: _Optional[_Union[Wait, str]] = ...) -> None: ...
