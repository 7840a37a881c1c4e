from paramhub.v1 import spec_pb2 as _spec_pb2
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
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_PARAMETER: TensorKind
TENSOR_KIND_BUFFER: TensorKind

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
    spec: _spec_pb2.ModelSpec
    seed: int
    device: str
    module_pickle: bytes
    exported_program: bytes
    module_tree: _containers.RepeatedCompositeFieldContainer[ModuleInfo]
    program_ties: _containers.RepeatedCompositeFieldContainer[_spec_pb2.ParameterTie]
    program_constants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., spec: _Optional[_Union[_spec_pb2.ModelSpec, _Mapping]] = ..., seed: _Optional[int] = ..., device: _Optional[str] = ..., module_pickle: _Optional[bytes] = ..., exported_program: _Optional[bytes] = ..., module_tree: _Optional[_Iterable[_Union[ModuleInfo, _Mapping]]] = ..., program_ties: _Optional[_Iterable[_Union[_spec_pb2.ParameterTie, _Mapping]]] = ..., program_constants: _Optional[_Iterable[str]] = ...) -> None: ...

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
    spec: _spec_pb2.ModelSpec
    modules: _containers.RepeatedCompositeFieldContainer[ModuleInfo]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    uninitialized_parameters: _containers.RepeatedScalarFieldContainer[str]
    uninitialized_buffers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., spec: _Optional[_Union[_spec_pb2.ModelSpec, _Mapping]] = ..., modules: _Optional[_Iterable[_Union[ModuleInfo, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., uninitialized_parameters: _Optional[_Iterable[str]] = ..., uninitialized_buffers: _Optional[_Iterable[str]] = ...) -> None: ...

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
