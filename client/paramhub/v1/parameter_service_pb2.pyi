from paramhub.v1 import options_pb2 as _options_pb2
from paramhub.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    TENSOR_KIND_PARAMETER: _ClassVar[TensorKind]
    TENSOR_KIND_BUFFER: _ClassVar[TensorKind]

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

class TrainingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_MODE_UNSPECIFIED: _ClassVar[TrainingMode]
    TRAINING_MODE_ASYNC: _ClassVar[TrainingMode]
    TRAINING_MODE_SYNC: _ClassVar[TrainingMode]
    TRAINING_MODE_BOUNDED_STALENESS: _ClassVar[TrainingMode]

class StalePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STALE_POLICY_UNSPECIFIED: _ClassVar[StalePolicy]
    STALE_POLICY_REJECT: _ClassVar[StalePolicy]
    STALE_POLICY_SCALE: _ClassVar[StalePolicy]

class PushOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_OUTCOME_UNSPECIFIED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_APPLIED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_SCALED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_REJECTED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_QUEUED: _ClassVar[PushOutcome]

class WatchEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WATCH_EVENT_KIND_UNSPECIFIED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_STARTED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_WRITE: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_RESYNC: _ClassVar[WatchEventKind]
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_PARAMETER: TensorKind
TENSOR_KIND_BUFFER: TensorKind
TENSOR_FIELD_UNSPECIFIED: TensorField
TENSOR_FIELD_VALUE: TensorField
TENSOR_FIELD_GRAD: TensorField
SLICE_OP_UNSPECIFIED: SliceOp
SLICE_OP_ASSIGN: SliceOp
SLICE_OP_ADD: SliceOp
SLICE_OP_SUB: SliceOp
SLICE_OP_MUL: SliceOp
SLICE_OP_DIV: SliceOp
TRAINING_MODE_UNSPECIFIED: TrainingMode
TRAINING_MODE_ASYNC: TrainingMode
TRAINING_MODE_SYNC: TrainingMode
TRAINING_MODE_BOUNDED_STALENESS: TrainingMode
STALE_POLICY_UNSPECIFIED: StalePolicy
STALE_POLICY_REJECT: StalePolicy
STALE_POLICY_SCALE: StalePolicy
PUSH_OUTCOME_UNSPECIFIED: PushOutcome
PUSH_OUTCOME_APPLIED: PushOutcome
PUSH_OUTCOME_SCALED: PushOutcome
PUSH_OUTCOME_REJECTED: PushOutcome
PUSH_OUTCOME_QUEUED: PushOutcome
WATCH_EVENT_KIND_UNSPECIFIED: WatchEventKind
WATCH_EVENT_KIND_STARTED: WatchEventKind
WATCH_EVENT_KIND_WRITE: WatchEventKind
WATCH_EVENT_KIND_RESYNC: WatchEventKind

class ModelInfo(_message.Message):
    __slots__ = ("name", "device", "version", "num_parameters", "num_bytes", "root_class", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROOT_CLASS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    version: int
    num_parameters: int
    num_bytes: int
    root_class: str
    source: str
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., version: _Optional[int] = ..., num_parameters: _Optional[int] = ..., num_bytes: _Optional[int] = ..., root_class: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("nodes", "root", "ties")
    NODES_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    TIES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[ModuleNode]
    root: int
    ties: _containers.RepeatedCompositeFieldContainer[ParameterTie]
    def __init__(self, nodes: _Optional[_Iterable[_Union[ModuleNode, _Mapping]]] = ..., root: _Optional[int] = ..., ties: _Optional[_Iterable[_Union[ParameterTie, _Mapping]]] = ...) -> None: ...

class ModuleNode(_message.Message):
    __slots__ = ("type", "args", "kwargs", "children")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    type: str
    args: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Value]
    kwargs: _containers.MessageMap[str, _tensor_pb2.Value]
    children: _containers.RepeatedCompositeFieldContainer[ModuleChild]
    def __init__(self, type: _Optional[str] = ..., args: _Optional[_Iterable[_Union[_tensor_pb2.Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., children: _Optional[_Iterable[_Union[ModuleChild, _Mapping]]] = ...) -> None: ...

class ModuleChild(_message.Message):
    __slots__ = ("name", "node")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    node: int
    def __init__(self, name: _Optional[str] = ..., node: _Optional[int] = ...) -> None: ...

class ParameterTie(_message.Message):
    __slots__ = ("parameter", "source")
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    parameter: str
    source: str
    def __init__(self, parameter: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class CreateModelHeader(_message.Message):
    __slots__ = ("model_id", "spec", "seed", "device", "module_pickle", "exported_program", "module_tree", "program_ties", "program_constants")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODULE_PICKLE_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_PROGRAM_FIELD_NUMBER: _ClassVar[int]
    MODULE_TREE_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_TIES_FIELD_NUMBER: _ClassVar[int]
    PROGRAM_CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    spec: ModelSpec
    seed: int
    device: str
    module_pickle: bytes
    exported_program: bytes
    module_tree: _containers.RepeatedCompositeFieldContainer[ModuleInfo]
    program_ties: _containers.RepeatedCompositeFieldContainer[ParameterTie]
    program_constants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ..., module_pickle: _Optional[bytes] = ..., exported_program: _Optional[bytes] = ..., module_tree: _Optional[_Iterable[_Union[ModuleInfo, _Mapping]]] = ..., program_ties: _Optional[_Iterable[_Union[ParameterTie, _Mapping]]] = ..., program_constants: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: CreateModelHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[CreateModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class DeleteModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "kind", "dtype", "shape", "device", "requires_grad", "storage_group", "version", "has_grad")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_GRAD_FIELD_NUMBER: _ClassVar[int]
    STORAGE_GROUP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HAS_GRAD_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: TensorKind
    dtype: _tensor_pb2.Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    device: str
    requires_grad: bool
    storage_group: int
    version: int
    has_grad: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[TensorKind, str]] = ..., dtype: _Optional[_Union[_tensor_pb2.Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ..., requires_grad: _Optional[bool] = ..., storage_group: _Optional[int] = ..., version: _Optional[int] = ..., has_grad: _Optional[bool] = ...) -> None: ...

class ModuleInfo(_message.Message):
    __slots__ = ("path", "class_name", "extra_repr", "children", "module_group", "training", "class_module", "class_qualname", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    EXTRA_REPR_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    MODULE_GROUP_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    CLASS_MODULE_FIELD_NUMBER: _ClassVar[int]
    CLASS_QUALNAME_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    class_name: str
    extra_repr: str
    children: _containers.RepeatedScalarFieldContainer[str]
    module_group: int
    training: bool
    class_module: str
    class_qualname: str
    attributes: _containers.MessageMap[str, _tensor_pb2.Value]
    def __init__(self, path: _Optional[str] = ..., class_name: _Optional[str] = ..., extra_repr: _Optional[str] = ..., children: _Optional[_Iterable[str]] = ..., module_group: _Optional[int] = ..., training: _Optional[bool] = ..., class_module: _Optional[str] = ..., class_qualname: _Optional[str] = ..., attributes: _Optional[_Mapping[str, _tensor_pb2.Value]] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("model", "spec", "modules", "tensors", "uninitialized_parameters", "uninitialized_buffers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    UNINITIALIZED_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    UNINITIALIZED_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    spec: ModelSpec
    modules: _containers.RepeatedCompositeFieldContainer[ModuleInfo]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    uninitialized_parameters: _containers.RepeatedScalarFieldContainer[str]
    uninitialized_buffers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., modules: _Optional[_Iterable[_Union[ModuleInfo, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., uninitialized_parameters: _Optional[_Iterable[str]] = ..., uninitialized_buffers: _Optional[_Iterable[str]] = ...) -> None: ...

class ListParametersRequest(_message.Message):
    __slots__ = ("model", "prefix", "glob", "include_buffers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    GLOB_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prefix: str
    glob: str
    include_buffers: bool
    def __init__(self, model: _Optional[str] = ..., prefix: _Optional[str] = ..., glob: _Optional[str] = ..., include_buffers: _Optional[bool] = ...) -> None: ...

class ListParametersResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ...) -> None: ...

class GetTensorRequest(_message.Message):
    __slots__ = ("name", "index", "field", "chunk_bytes", "shm_token", "shm_client_buffer", "data_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SHM_CLIENT_BUFFER_FIELD_NUMBER: _ClassVar[int]
    DATA_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.IndexItem]
    field: TensorField
    chunk_bytes: int
    shm_token: str
    shm_client_buffer: bool
    data_token: str
    def __init__(self, name: _Optional[str] = ..., index: _Optional[_Iterable[_Union[_tensor_pb2.IndexItem, _Mapping]]] = ..., field: _Optional[_Union[TensorField, str]] = ..., chunk_bytes: _Optional[int] = ..., shm_token: _Optional[str] = ..., shm_client_buffer: _Optional[bool] = ..., data_token: _Optional[str] = ...) -> None: ...

class SetSliceRequest(_message.Message):
    __slots__ = ("name", "index", "op", "value", "expected_version", "request_id", "shm_token", "data_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DATA_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.IndexItem]
    op: SliceOp
    value: _tensor_pb2.Tensor
    expected_version: int
    request_id: str
    shm_token: str
    data_token: str
    def __init__(self, name: _Optional[str] = ..., index: _Optional[_Iterable[_Union[_tensor_pb2.IndexItem, _Mapping]]] = ..., op: _Optional[_Union[SliceOp, str]] = ..., value: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expected_version: _Optional[int] = ..., request_id: _Optional[str] = ..., shm_token: _Optional[str] = ..., data_token: _Optional[str] = ...) -> None: ...

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

class ForwardRequest(_message.Message):
    __slots__ = ("model", "module_path", "args", "kwargs", "seed", "generator_state")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODULE_PATH_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_STATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    module_path: str
    args: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Value]
    kwargs: _containers.MessageMap[str, _tensor_pb2.Value]
    seed: int
    generator_state: bytes
    def __init__(self, model: _Optional[str] = ..., module_path: _Optional[str] = ..., args: _Optional[_Iterable[_Union[_tensor_pb2.Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., seed: _Optional[int] = ..., generator_state: _Optional[bytes] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("output", "model_version", "materialized", "generator_state")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MATERIALIZED_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_STATE_FIELD_NUMBER: _ClassVar[int]
    output: _tensor_pb2.Value
    model_version: int
    materialized: bool
    generator_state: bytes
    def __init__(self, output: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ..., model_version: _Optional[int] = ..., materialized: _Optional[bool] = ..., generator_state: _Optional[bytes] = ...) -> None: ...

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

class SetTrainingModeRequest(_message.Message):
    __slots__ = ("model", "module_path", "training")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODULE_PATH_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    model: str
    module_path: str
    training: bool
    def __init__(self, model: _Optional[str] = ..., module_path: _Optional[str] = ..., training: _Optional[bool] = ...) -> None: ...

class SetTrainingModeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

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

class BackwardRequest(_message.Message):
    __slots__ = ("model", "module_path", "args", "kwargs", "seed", "forward_model_version", "grad_outputs", "grad_inputs")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODULE_PATH_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    module_path: str
    args: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Value]
    kwargs: _containers.MessageMap[str, _tensor_pb2.Value]
    seed: int
    forward_model_version: int
    grad_outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Value]
    grad_inputs: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., module_path: _Optional[str] = ..., args: _Optional[_Iterable[_Union[_tensor_pb2.Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., seed: _Optional[int] = ..., forward_model_version: _Optional[int] = ..., grad_outputs: _Optional[_Iterable[_Union[_tensor_pb2.Value, _Mapping]]] = ..., grad_inputs: _Optional[_Iterable[int]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("input_grads", "model_version")
    INPUT_GRADS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    input_grads: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Value]
    model_version: int
    def __init__(self, input_grads: _Optional[_Iterable[_Union[_tensor_pb2.Value, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ZeroGradRequest(_message.Message):
    __slots__ = ("model", "module_path", "parameters", "fill_zeros")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODULE_PATH_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FILL_ZEROS_FIELD_NUMBER: _ClassVar[int]
    model: str
    module_path: str
    parameters: _containers.RepeatedScalarFieldContainer[str]
    fill_zeros: bool
    def __init__(self, model: _Optional[str] = ..., module_path: _Optional[str] = ..., parameters: _Optional[_Iterable[str]] = ..., fill_zeros: _Optional[bool] = ...) -> None: ...

class ZeroGradResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OptimizerParamGroup(_message.Message):
    __slots__ = ("parameters", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    parameters: _containers.RepeatedScalarFieldContainer[str]
    options: _containers.MessageMap[str, _tensor_pb2.Value]
    def __init__(self, parameters: _Optional[_Iterable[str]] = ..., options: _Optional[_Mapping[str, _tensor_pb2.Value]] = ...) -> None: ...

class CreateOptimizerRequest(_message.Message):
    __slots__ = ("model", "type", "param_groups", "defaults", "replace")
    class DefaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    model: str
    type: str
    param_groups: _containers.RepeatedCompositeFieldContainer[OptimizerParamGroup]
    defaults: _containers.MessageMap[str, _tensor_pb2.Value]
    replace: bool
    def __init__(self, model: _Optional[str] = ..., type: _Optional[str] = ..., param_groups: _Optional[_Iterable[_Union[OptimizerParamGroup, _Mapping]]] = ..., defaults: _Optional[_Mapping[str, _tensor_pb2.Value]] = ..., replace: _Optional[bool] = ...) -> None: ...

class OptimizerInfo(_message.Message):
    __slots__ = ("type", "param_groups", "steps", "defaults")
    class DefaultsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _tensor_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_tensor_pb2.Value, _Mapping]] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    type: str
    param_groups: _containers.RepeatedCompositeFieldContainer[OptimizerParamGroup]
    steps: int
    defaults: _containers.MessageMap[str, _tensor_pb2.Value]
    def __init__(self, type: _Optional[str] = ..., param_groups: _Optional[_Iterable[_Union[OptimizerParamGroup, _Mapping]]] = ..., steps: _Optional[int] = ..., defaults: _Optional[_Mapping[str, _tensor_pb2.Value]] = ...) -> None: ...

class CreateOptimizerResponse(_message.Message):
    __slots__ = ("optimizer", "created")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    optimizer: OptimizerInfo
    created: bool
    def __init__(self, optimizer: _Optional[_Union[OptimizerInfo, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class OptimizerStepRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class OptimizerStepResponse(_message.Message):
    __slots__ = ("model_version", "steps")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    steps: int
    def __init__(self, model_version: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class GetOptimizerStateRequest(_message.Message):
    __slots__ = ("model", "config_only")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_ONLY_FIELD_NUMBER: _ClassVar[int]
    model: str
    config_only: bool
    def __init__(self, model: _Optional[str] = ..., config_only: _Optional[bool] = ...) -> None: ...

class GetOptimizerStateResponse(_message.Message):
    __slots__ = ("optimizer", "chunk")
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    optimizer: OptimizerInfo
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, optimizer: _Optional[_Union[OptimizerInfo, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("mode", "sync_workers", "max_staleness", "stale_policy")
    MODE_FIELD_NUMBER: _ClassVar[int]
    SYNC_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    STALE_POLICY_FIELD_NUMBER: _ClassVar[int]
    mode: TrainingMode
    sync_workers: int
    max_staleness: int
    stale_policy: StalePolicy
    def __init__(self, mode: _Optional[_Union[TrainingMode, str]] = ..., sync_workers: _Optional[int] = ..., max_staleness: _Optional[int] = ..., stale_policy: _Optional[_Union[StalePolicy, str]] = ...) -> None: ...

class ConfigureTrainingRequest(_message.Message):
    __slots__ = ("model", "config")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    model: str
    config: TrainingConfig
    def __init__(self, model: _Optional[str] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ...) -> None: ...

class ConfigureTrainingResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: TrainingConfig
    def __init__(self, config: _Optional[_Union[TrainingConfig, _Mapping]] = ...) -> None: ...

class PullModelRequest(_message.Message):
    __slots__ = ("model", "include_buffers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_BUFFERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    include_buffers: bool
    def __init__(self, model: _Optional[str] = ..., include_buffers: _Optional[bool] = ...) -> None: ...

class PullModelHeader(_message.Message):
    __slots__ = ("model_version", "num_tensors")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_TENSORS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    num_tensors: int
    def __init__(self, model_version: _Optional[int] = ..., num_tensors: _Optional[int] = ...) -> None: ...

class PullModelResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PullModelHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[PullModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class PushGradsHeader(_message.Message):
    __slots__ = ("model", "model_version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_version: int
    def __init__(self, model: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class PushGradsRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushGradsHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[PushGradsHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class PushGradsResponse(_message.Message):
    __slots__ = ("outcome", "staleness", "scale", "model_version", "steps")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    outcome: PushOutcome
    staleness: int
    scale: float
    model_version: int
    steps: int
    def __init__(self, outcome: _Optional[_Union[PushOutcome, str]] = ..., staleness: _Optional[int] = ..., scale: _Optional[float] = ..., model_version: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

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

class WatchModelRequest(_message.Message):
    __slots__ = ("name", "max_queue")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_queue: int
    def __init__(self, name: _Optional[str] = ..., max_queue: _Optional[int] = ...) -> None: ...

class TensorChange(_message.Message):
    __slots__ = ("name", "version", "region")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    region: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., region: _Optional[str] = ...) -> None: ...

class WatchModelResponse(_message.Message):
    __slots__ = ("kind", "model_version", "op", "changes", "writer", "time_unix_nanos", "request_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    kind: WatchEventKind
    model_version: int
    op: str
    changes: _containers.RepeatedCompositeFieldContainer[TensorChange]
    writer: str
    time_unix_nanos: int
    request_id: str
    def __init__(self, kind: _Optional[_Union[WatchEventKind, str]] = ..., model_version: _Optional[int] = ..., op: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[TensorChange, _Mapping]]] = ..., writer: _Optional[str] = ..., time_unix_nanos: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("name", "model_version", "created_unix_nanos", "num_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_version: int
    created_unix_nanos: int
    num_bytes: int
    def __init__(self, name: _Optional[str] = ..., model_version: _Optional[int] = ..., created_unix_nanos: _Optional[int] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class CreateCheckpointRequest(_message.Message):
    __slots__ = ("model", "checkpoint")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    checkpoint: str
    def __init__(self, model: _Optional[str] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class CreateCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: CheckpointInfo
    def __init__(self, checkpoint: _Optional[_Union[CheckpointInfo, _Mapping]] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class RestoreCheckpointRequest(_message.Message):
    __slots__ = ("model", "checkpoint", "expected_model_version", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    checkpoint: str
    expected_model_version: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., checkpoint: _Optional[str] = ..., expected_model_version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class RestoreCheckpointResponse(_message.Message):
    __slots__ = ("updated", "model_version")
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    updated: _containers.RepeatedCompositeFieldContainer[TensorVersion]
    model_version: int
    def __init__(self, updated: _Optional[_Iterable[_Union[TensorVersion, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class DeleteCheckpointRequest(_message.Message):
    __slots__ = ("model", "checkpoint")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    checkpoint: str
    def __init__(self, model: _Optional[str] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class DeleteCheckpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportCheckpointRequest(_message.Message):
    __slots__ = ("model", "checkpoint")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    model: str
    checkpoint: str
    def __init__(self, model: _Optional[str] = ..., checkpoint: _Optional[str] = ...) -> None: ...

class ExportCheckpointResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class CompactModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class CompactModelResponse(_message.Message):
    __slots__ = ("model_version", "log_bytes")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    log_bytes: int
    def __init__(self, model_version: _Optional[int] = ..., log_bytes: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("model", "names", "prefix", "glob", "parameters_only", "chunk_bytes", "shm_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    GLOB_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_ONLY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    names: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    glob: str
    parameters_only: bool
    chunk_bytes: int
    shm_token: str
    def __init__(self, model: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ..., glob: _Optional[str] = ..., parameters_only: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., shm_token: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("model", "tensors", "expected_model_version", "shm_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorHeader]
    expected_model_version: int
    shm_token: str
    def __init__(self, model: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorHeader, _Mapping]]] = ..., expected_model_version: _Optional[int] = ..., shm_token: _Optional[str] = ...) -> None: ...

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
    updated: _containers.RepeatedCompositeFieldContainer[TensorVersion]
    model_version: int
    def __init__(self, updated: _Optional[_Iterable[_Union[TensorVersion, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class GetTensorInlineRequest(_message.Message):
    __slots__ = ("name", "index", "field")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.IndexItem]
    field: TensorField
    def __init__(self, name: _Optional[str] = ..., index: _Optional[_Iterable[_Union[_tensor_pb2.IndexItem, _Mapping]]] = ..., field: _Optional[_Union[TensorField, str]] = ...) -> None: ...

class GetTensorInlineResponse(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: _tensor_pb2.TensorHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...
