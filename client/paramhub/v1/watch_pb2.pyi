from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WATCH_EVENT_KIND_UNSPECIFIED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_STARTED: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_WRITE: _ClassVar[WatchEventKind]
    WATCH_EVENT_KIND_RESYNC: _ClassVar[WatchEventKind]
WATCH_EVENT_KIND_UNSPECIFIED: WatchEventKind
WATCH_EVENT_KIND_STARTED: WatchEventKind
WATCH_EVENT_KIND_WRITE: WatchEventKind
WATCH_EVENT_KIND_RESYNC: WatchEventKind

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
