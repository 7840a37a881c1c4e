"""The core's plain types: what a write, a read, a snapshot and a journal entry are. No torch
module logic here (see model.py, writes.py, compute.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

from paramhub.common.errors import InvalidArgumentError
from paramhub_server.core import rng

if TYPE_CHECKING:
    from paramhub_server.core.model import ServedModel

log = logging.getLogger(__name__)

PARAMETER = "parameter"
BUFFER = "buffer"

SLICE_OPS = ("assign", "add", "sub", "mul", "div")

#: Request ids remembered per model for idempotent retries (least recently used dropped first).
MAX_RECENT_REQUESTS = 4096
#: Longest accepted request id.
MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class WriteContext:
    """Who asked for a write: the client's request id (for retries) and writer id (for watch)."""

    request_id: str = ""
    writer: str = ""

    def __post_init__(self) -> None:
        if len(self.request_id) > MAX_REQUEST_ID:
            raise InvalidArgumentError(f"request id longer than {MAX_REQUEST_ID} characters",
                                       reason="BAD_REQUEST_ID")


NO_CONTEXT = WriteContext()


@dataclass
class SliceWrite:
    """`tensor[index] (op)= value` as one write of a batch."""

    name: str
    index: tuple[Any, ...]
    op: str
    value: torch.Tensor
    expected_version: int | None = None
    kind: str | None = None


@dataclass
class InitWrite:
    """An init scheme over targets as one write of a batch."""

    targets: list[tuple[str, Any]]
    scheme: str
    args: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    expected_model_version: int | None = None
    #: The client's generator to draw from (when no seed is given); advanced by the draws.
    generator: rng.GeneratorState | None = None


@dataclass(frozen=True)
class Change:
    """A planned (or logged) change: `ref's tensor[index] = value`; () is the whole tensor."""

    ref: TensorRef
    index: tuple[Any, ...]
    value: torch.Tensor


@dataclass
class Program:
    """What an exported program model was built from (kept to persist and rebuild it)."""

    program: bytes  # torch._export.serde JSON
    #: the module tree as the client described it: ModuleInfo messages in their JSON form
    #: (json_format.MessageToDict; the API layer converts)
    tree: list[dict[str, Any]]
    ties: list[tuple[str, str]]  # (state name, the earlier name it is the same tensor as)
    constants: dict[str, torch.Tensor]
    #: state name -> (dtype, shape) of each tensor the program was built with (untied names).
    state: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteResult:
    """What a committed write answered: the RPC kind it came from, [(first name of each
    changed storage, its new version)] in the order the write first touched them, and the new
    model version."""

    rpc: str
    updated: list[tuple[str, int]]
    model_version: int


#: State that is not a tensor of the model but changes with a write and must be logged in the
#: same record (an optimizer step's new optimizer state): (JSON-able header, [(key, tensor)]).
Extra = tuple[dict[str, Any], Sequence[tuple[str, torch.Tensor]]]


class Journal(Protocol):
    """Durability hooks (implemented by store.ModelStore). Called under the model's locks."""

    def log_write(self, model: ServedModel, op: str, rpc: str, changes: Sequence[Change],
                  result: WriteResult, ctx: WriteContext, time_ns: int,
                  extra: Extra | None = None) -> None: ...

    def log_training(self, model: ServedModel, path: str, training: bool) -> None: ...

    def prewrite(self, ref: TensorRef, index: tuple[Any, ...], op: str,
                 value: torch.Tensor, *, volatile: bool = False) -> torch.Tensor | None: ...

    def reserve(self, nbytes: int) -> None: ...

    def log_record(self, model: ServedModel, header: dict[str, Any],
                   tensors: Sequence[tuple[str, torch.Tensor]] = ()) -> None: ...

    def after_commit(self, model: ServedModel) -> None: ...

    def snapshot(self, model: ServedModel) -> int: ...

    def prepare_snapshot(self, model: ServedModel, override: SnapshotState | None = None
                         ) -> Any: ...

    def commit_snapshot(self, prepared: Any) -> int: ...


@dataclass(frozen=True)
class SnapshotState:
    """The state a snapshot records instead of the model's current one (a checkpoint restore
    is made durable before it is applied): values by first name, the write's result (new
    versions and model version) and its request id."""

    values: dict[str, torch.Tensor]
    result: WriteResult
    request_id: str


class StateHeader(NamedTuple):
    """One tensor of a state snapshot: its name, wire dtype (DType value) and shape."""

    name: str
    dtype: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class StateManifest:
    """What a state snapshot holds: headers (one object per selection while cached), each
    tensor's version, and the model version; the API layer builds the PullState manifest."""

    headers: tuple[StateHeader, ...]
    versions: list[int]
    model_version: int


@dataclass(frozen=True)
class TensorRef:
    """One state_dict name of a model. Tied names share `group` (one storage)."""

    name: str
    kind: str  # PARAMETER or BUFFER
    owner: nn.Module
    local: str
    group: int

    def get(self) -> torch.Tensor:
        """The live tensor object (the Parameter itself for parameters)."""
        table = self.owner._parameters if self.kind == PARAMETER else self.owner._buffers
        t = table[self.local]
        assert t is not None
        return t


@dataclass(frozen=True)
class ReadResult:
    """A copy of (a region of) a tensor and the version it was read at."""

    tensor: torch.Tensor
    version: int
