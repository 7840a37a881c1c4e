from paramhub.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
