from paramhub.v1 import tensor_pb2 as _tensor_pb2
from paramhub.v1 import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetTransportInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTransportInfoResponse(_message.Message):
    __slots__ = ("max_message_bytes", "chunk_bytes", "shm_address", "data_port", "inline_bytes", "inline_read_bytes", "shm_min_bytes", "data_min_bytes")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    INLINE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INLINE_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    chunk_bytes: int
    shm_address: str
    data_port: int
    inline_bytes: int
    inline_read_bytes: int
    shm_min_bytes: int
    data_min_bytes: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., shm_address: _Optional[str] = ..., data_port: _Optional[int] = ..., inline_bytes: _Optional[int] = ..., inline_read_bytes: _Optional[int] = ..., shm_min_bytes: _Optional[int] = ..., data_min_bytes: _Optional[int] = ...) -> None: ...

class PullStateRequest(_message.Message):
    __slots__ = ("model", "names", "prefix", "glob", "parameters_only", "chunk_bytes", "shm_token", "transfer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    GLOB_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_ONLY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    model: str
    names: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    glob: str
    parameters_only: bool
    chunk_bytes: int
    shm_token: str
    transfer: _tensor_pb2.Transfer
    def __init__(self, model: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ..., glob: _Optional[str] = ..., parameters_only: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., shm_token: _Optional[str] = ..., transfer: _Optional[_Union[_tensor_pb2.Transfer, _Mapping]] = ...) -> None: ...

class PullStateResponse(_message.Message):
    __slots__ = ("headers", "model_version", "data", "shm")
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    headers: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorHeader]
    model_version: int
    data: bytes
    shm: bool
    def __init__(self, headers: _Optional[_Iterable[_Union[_tensor_pb2.TensorHeader, _Mapping]]] = ..., model_version: _Optional[int] = ..., data: _Optional[bytes] = ..., shm: _Optional[bool] = ...) -> None: ...

class PushStateHeader(_message.Message):
    __slots__ = ("model", "tensors", "expected_model_version", "shm_token", "transfer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorHeader]
    expected_model_version: int
    shm_token: str
    transfer: _tensor_pb2.Transfer
    def __init__(self, model: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorHeader, _Mapping]]] = ..., expected_model_version: _Optional[int] = ..., shm_token: _Optional[str] = ..., transfer: _Optional[_Union[_tensor_pb2.Transfer, _Mapping]] = ...) -> None: ...

class PushStateRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PushStateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PushStateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushStateResponse(_message.Message):
    __slots__ = ("updated", "model_version")
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    updated: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorVersion]
    model_version: int
    def __init__(self, updated: _Optional[_Iterable[_Union[_tensors_pb2.TensorVersion, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetTensorInlineRequest(_message.Message):
    __slots__ = ("name", "index", "field")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.IndexItem]
    field: _tensors_pb2.TensorField
    def __init__(self, name: _Optional[str] = ..., index: _Optional[_Iterable[_Union[_tensor_pb2.IndexItem, _Mapping]]] = ..., field: _Optional[_Union[_tensors_pb2.TensorField, str]] = ...) -> None: ...

class GetTensorInlineResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: _tensor_pb2.TensorHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
