from paramhub.v1 import checkpoints_pb2 as _checkpoints_pb2
from paramhub.v1 import compute_pb2 as _compute_pb2
from paramhub.v1 import models_pb2 as _models_pb2
from paramhub.v1 import options_pb2 as _options_pb2
from paramhub.v1 import tensors_pb2 as _tensors_pb2
from paramhub.v1 import training_pb2 as _training_pb2
from paramhub.v1 import transport_pb2 as _transport_pb2
from paramhub.v1 import watch_pb2 as _watch_pb2
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor
