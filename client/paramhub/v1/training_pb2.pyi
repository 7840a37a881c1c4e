from paramhub.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
