from paramhub.v1 import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetClusterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RankInfo(_message.Message):
    __slots__ = ("rank", "address", "device", "held_bytes")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    address: str
    device: str
    held_bytes: int
    def __init__(self, rank: _Optional[int] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., held_bytes: _Optional[int] = ...) -> None: ...

class GetClusterInfoResponse(_message.Message):
    __slots__ = ("world_size", "ranks")
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    world_size: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankInfo]
    def __init__(self, world_size: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankInfo, _Mapping]]] = ...) -> None: ...

class ReadShardRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReadShardResponse(_message.Message):
    __slots__ = ("shape", "dtype", "row_start", "row_stop", "version", "data", "placement", "model_version")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_STOP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    row_start: int
    row_stop: int
    version: int
    data: bytes
    placement: str
    model_version: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., row_start: _Optional[int] = ..., row_stop: _Optional[int] = ..., version: _Optional[int] = ..., data: _Optional[bytes] = ..., placement: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class DescribePlacementRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TensorPlacement(_message.Message):
    __slots__ = ("name", "placement", "row_bounds", "note", "kind")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    ROW_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    placement: str
    row_bounds: _containers.RepeatedScalarFieldContainer[int]
    note: str
    kind: str
    def __init__(self, name: _Optional[str] = ..., placement: _Optional[str] = ..., row_bounds: _Optional[_Iterable[int]] = ..., note: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class DescribePlacementResponse(_message.Message):
    __slots__ = ("shard", "tensors")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    shard: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorPlacement]
    def __init__(self, shard: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorPlacement, _Mapping]]] = ...) -> None: ...

class StageShardRequest(_message.Message):
    __slots__ = ("name", "write_id", "dtype", "row_start", "row_stop", "data", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_STOP_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    write_id: str
    dtype: str
    row_start: int
    row_stop: int
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., write_id: _Optional[str] = ..., dtype: _Optional[str] = ..., row_start: _Optional[int] = ..., row_stop: _Optional[int] = ..., data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class StageShardResponse(_message.Message):
    __slots__ = ("staged_bytes",)
    STAGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    staged_bytes: int
    def __init__(self, staged_bytes: _Optional[int] = ...) -> None: ...

class CommitStagedWriteRequest(_message.Message):
    __slots__ = ("name", "write_id", "expected_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    write_id: str
    expected_version: int
    def __init__(self, name: _Optional[str] = ..., write_id: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class CommitStagedWriteResponse(_message.Message):
    __slots__ = ("version", "model_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    model_version: int
    def __init__(self, version: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class CommitStagedStateRequest(_message.Message):
    __slots__ = ("model", "write_id", "names", "expected_model_version", "abort")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    model: str
    write_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    expected_model_version: int
    abort: bool
    def __init__(self, model: _Optional[str] = ..., write_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., expected_model_version: _Optional[int] = ..., abort: _Optional[bool] = ...) -> None: ...

class CommitStagedStateResponse(_message.Message):
    __slots__ = ("updated", "model_version")
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    updated: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorVersion]
    model_version: int
    def __init__(self, updated: _Optional[_Iterable[_Union[_tensors_pb2.TensorVersion, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...
