from paramhub.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
