from paramhub.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorField(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_FIELD_UNSPECIFIED: _ClassVar[TensorField]
    TENSOR_FIELD_VALUE: _ClassVar[TensorField]
    TENSOR_FIELD_GRAD: _ClassVar[TensorField]

class SliceOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLICE_OP_UNSPECIFIED: _ClassVar[SliceOp]
    SLICE_OP_ASSIGN: _ClassVar[SliceOp]
    SLICE_OP_ADD: _ClassVar[SliceOp]
    SLICE_OP_SUB: _ClassVar[SliceOp]
    SLICE_OP_MUL: _ClassVar[SliceOp]
    SLICE_OP_DIV: _ClassVar[SliceOp]
TENSOR_FIELD_UNSPECIFIED: TensorField
TENSOR_FIELD_VALUE: TensorField
TENSOR_FIELD_GRAD: TensorField
SLICE_OP_UNSPECIFIED: SliceOp
SLICE_OP_ASSIGN: SliceOp
SLICE_OP_ADD: SliceOp
SLICE_OP_SUB: SliceOp
SLICE_OP_MUL: SliceOp
SLICE_OP_DIV: SliceOp

class GetTensorRequest(_message.Message):
    __slots__ = ("name", "index", "field", "chunk_bytes", "shm_token", "shm_client_buffer", "data_token", "transfer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHM_CLIENT_BUFFER_FIELD_NUMBER: _ClassVar[int]
    DATA_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.IndexItem]
    field: TensorField
    chunk_bytes: int
    shm_token: str
    shm_client_buffer: bool
    data_token: str
    transfer: _tensor_pb2.Transfer
    def __init__(self, name: _Optional[str] = ..., index: _Optional[_Iterable[_Union[_tensor_pb2.IndexItem, _Mapping]]] = ..., field: _Optional[_Union[TensorField, str]] = ..., chunk_bytes: _Optional[int] = ..., shm_token: _Optional[str] = ..., shm_client_buffer: _Optional[bool] = ..., data_token: _Optional[str] = ..., transfer: _Optional[_Union[_tensor_pb2.Transfer, _Mapping]] = ...) -> None: ...

class SetSliceRequest(_message.Message):
    __slots__ = ("name", "index", "op", "value", "expected_version", "request_id", "shm_token", "data_token", "transfer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DATA_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.IndexItem]
    op: SliceOp
    value: _tensor_pb2.Tensor
    expected_version: int
    request_id: str
    shm_token: str
    data_token: str
    transfer: _tensor_pb2.Transfer
    def __init__(self, name: _Optional[str] = ..., index: _Optional[_Iterable[_Union[_tensor_pb2.IndexItem, _Mapping]]] = ..., op: _Optional[_Union[SliceOp, str]] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expected_version: _Optional[int] = ..., request_id: _Optional[str] = ..., shm_token: _Optional[str] = ..., data_token: _Optional[str] = ..., transfer: _Optional[_Union[_tensor_pb2.Transfer, _Mapping]] = ...) -> None: ...

class StreamSetSliceRequest(_message.Message):
    __slots__ = ("request", "data")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    request: SetSliceRequest
    data: bytes
    def __init__(self, request: _Optional[_Union[SetSliceRequest, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SetSliceResponse(_message.Message):
    __slots__ = ("version", "model_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    model_version: int
    def __init__(self, version: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class ModuleSelector(_message.Message):
    __slots__ = ("path", "module_class", "parameter")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODULE_CLASS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    path: str
    module_class: str
    parameter: str
    def __init__(self, path: _Optional[str] = ..., module_class: _Optional[str] = ..., parameter: _Optional[str] = ...) -> None: ...

class InitTarget(_message.Message):
    __slots__ = ("parameter", "glob", "module")
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    GLOB_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    parameter: str
    glob: str
    module: ModuleSelector
    def __init__(self, parameter: _Optional[str] = ..., glob: _Optional[str] = ..., module: _Optional[_Union[ModuleSelector, _Mapping]] = ...) -> None: ...

class ApplyInitRequest(_message.Message):
    __slots__ = ("model", "targets", "scheme", "args", "seed", "expected_model_version", "request_id", "generator_state")
    class ArgsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_STATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    targets: _containers.RepeatedCompositeFieldContainer[InitTarget]
    scheme: str
    args: _containers.MessageMap[str, _tensor_pb2.Value]
    seed: int
    expected_model_version: int
    request_id: str
    generator_state: bytes
    def __init__(self, model: _Optional[str] = ..., targets: _Optional[_Iterable[_Union[InitTarget, _Mapping]]] = ..., scheme: _Optional[str] = ..., args: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., seed: _Optional[int] = ..., expected_model_version: _Optional[int] = ..., request_id: _Optional[str] = ..., generator_state: _Optional[bytes] = ...) -> None: ...

class TensorVersion(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ApplyInitResponse(_message.Message):
    __slots__ = ("updated", "model_version", "generator_state")
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_STATE_FIELD_NUMBER: _ClassVar[int]
    updated: _containers.RepeatedCompositeFieldContainer[TensorVersion]
    model_version: int
    generator_state: bytes
    def __init__(self, updated: _Optional[_Iterable[_Union[TensorVersion, _Mapping]]] = ..., model_version: _Optional[int] = ..., generator_state: _Optional[bytes] = ...) -> None: ...

class CheckSharedRequest(_message.Message):
    __slots__ = ("model", "names")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    model: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class SharedGroup(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckSharedResponse(_message.Message):
    __slots__ = ("shared", "groups")
    SHARED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    shared: bool
    groups: _containers.RepeatedCompositeFieldContainer[SharedGroup]
    def __init__(self, shared: _Optional[bool] = ..., groups: _Optional[_Iterable[_Union[SharedGroup, _Mapping]]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("name", "index", "histogram_bins", "histogram_min", "histogram_max", "field", "include_buffers", "per_tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_BINS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_MIN_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_MAX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    PER_TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.IndexItem]
    histogram_bins: int
    histogram_min: float
    histogram_max: float
    field: TensorField
    include_buffers: bool
    per_tensor: bool
    def __init__(self, name: _Optional[str] = ..., index: _Optional[_Iterable[_Union[_tensor_pb2.IndexItem, _Mapping]]] = ..., histogram_bins: _Optional[int] = ..., histogram_min: _Optional[float] = ..., histogram_max: _Optional[float] = ..., field: _Optional[_Union[TensorField, str]] = ..., include_buffers: _Optional[bool] = ..., per_tensor: _Optional[bool] = ...) -> None: ...

class TensorStats(_message.Message):
    __slots__ = ("name", "dtype", "shape", "numel", "nan_count", "inf_count", "min", "max", "mean", "std", "norm", "histogram_counts", "histogram_min", "histogram_max", "checksum_sha256", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    NAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    INF_COUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_COUNTS_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_MIN_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_MAX_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_SHA256_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _tensor_pb2.Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    numel: int
    nan_count: int
    inf_count: int
    min: float
    max: float
    mean: float
    std: float
    norm: float
    histogram_counts: _containers.RepeatedScalarFieldContainer[int]
    histogram_min: float
    histogram_max: float
    checksum_sha256: str
    version: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., numel: _Optional[int] = ..., nan_count: _Optional[int] = ..., inf_count: _Optional[int] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., norm: _Optional[float] = ..., histogram_counts: _Optional[_Iterable[int]] = ..., histogram_min: _Optional[float] = ..., histogram_max: _Optional[float] = ..., checksum_sha256: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("stats", "tensors", "model_version")
    STATS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    stats: TensorStats
    tensors: _containers.RepeatedCompositeFieldContainer[TensorStats]
    model_version: int
    def __init__(self, stats: _Optional[_Union[TensorStats, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorStats, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetTensorResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class StreamSetSliceResponse(_message.Message):
    __slots__ = ("version", "model_version")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    model_version: int
    def __init__(self, version: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class ApplyBatchHeader(_message.Message):
    __slots__ = ("model", "expected_model_version", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    expected_model_version: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., expected_model_version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class BatchWrite(_message.Message):
    __slots__ = ("set_slice", "apply_init")
    SET_SLICE_FIELD_NUMBER: _ClassVar[int]
    APPLY_INIT_FIELD_NUMBER: _ClassVar[int]
    set_slice: SetSliceRequest
    apply_init: ApplyInitRequest
    def __init__(self, set_slice: _Optional[_Union[SetSliceRequest, _Mapping]] = ..., apply_init: _Optional[_Union[ApplyInitRequest, _Mapping]] = ...) -> None: ...

class ApplyBatchRequest(_message.Message):
    __slots__ = ("header", "write", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ApplyBatchHeader
    write: BatchWrite
    data: bytes
    def __init__(self, header: _Optional[_Union[ApplyBatchHeader, _Mapping]] = ..., write: _Optional[_Union[BatchWrite, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ApplyBatchResponse(_message.Message):
    __slots__ = ("updated", "model_version")
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    updated: _containers.RepeatedCompositeFieldContainer[TensorVersion]
    model_version: int
    def __init__(self, updated: _Optional[_Iterable[_Union[TensorVersion, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...
