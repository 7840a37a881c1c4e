"""torch indices on the wire (IndexItem): ints, slices with step, Ellipsis, None, bool and
integer index tensors. Applying an index to a served tensor (bounds checks, region sizes) is the
server's business: paramhub_server.core.indexing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from paramhub.common.errors import InvalidArgumentError
from paramhub.common.tensors import tensor_from_proto, tensor_to_proto
from paramhub.v1 import tensor_pb2 as pb

__all__ = ["index_to_proto", "index_from_proto"]


def index_to_proto(index: Any) -> list[pb.IndexItem]:
    """Encodes a torch index (int, slice, Ellipsis, None, tensors, lists, or a tuple of these)."""
    if not isinstance(index, tuple):
        index = (index,)
    items = []
    for it in index:
        if it is Ellipsis:
            items.append(pb.IndexItem(ellipsis=pb.Ellipsis()))
        elif it is None:
            items.append(pb.IndexItem(new_axis=pb.NewAxis()))
        elif isinstance(it, bool):
            items.append(pb.IndexItem(tensor=tensor_to_proto(torch.tensor(it))))
        elif isinstance(it, int) or (hasattr(it, "__index__") and not isinstance(it, torch.Tensor)):
            items.append(pb.IndexItem(integer=int(it.__index__())))
        elif isinstance(it, slice):
            s = pb.Slice()
            if it.start is not None:
                s.start = int(it.start)
            if it.stop is not None:
                s.stop = int(it.stop)
            if it.step is not None:
                s.step = int(it.step)
            items.append(pb.IndexItem(slice=s))
        elif isinstance(it, torch.Tensor):
            if it.dtype not in (torch.bool, torch.int64, torch.int32, torch.uint8):
                raise InvalidArgumentError(f"index tensors must be bool or integer, not {it.dtype}",
                                           reason="BAD_INDEX")
            if it.dtype is torch.uint8:
                it = it.bool()
            items.append(pb.IndexItem(tensor=tensor_to_proto(it)))
        elif isinstance(it, (list, tuple)):
            items.append(pb.IndexItem(tensor=tensor_to_proto(torch.as_tensor(it))))
        else:
            raise InvalidArgumentError(f"unsupported index element {it!r}", reason="BAD_INDEX")
    return items


def index_from_proto(items: Sequence[pb.IndexItem], *, max_elements: int | None = None
                     ) -> tuple[Any, ...]:
    """Decodes index items into a tuple usable as `tensor[...]`; validates every item."""
    out: list[Any] = []
    ellipses = 0
    for item in items:
        kind = item.WhichOneof("item")
        if kind == "integer":
            out.append(int(item.integer))
        elif kind == "slice":
            s = item.slice
            step = s.step if s.HasField("step") else None
            if step is not None and step <= 0:
                raise InvalidArgumentError(f"slice step must be positive, got {step}",
                                           reason="BAD_INDEX")
            out.append(slice(s.start if s.HasField("start") else None,
                             s.stop if s.HasField("stop") else None, step))
        elif kind == "ellipsis":
            ellipses += 1
            if ellipses > 1:
                raise InvalidArgumentError("an index can only have a single ellipsis",
                                           reason="BAD_INDEX")
            out.append(Ellipsis)
        elif kind == "new_axis":
            out.append(None)
        elif kind == "tensor":
            t = tensor_from_proto(item.tensor, max_elements=max_elements)
            if t.dtype not in (torch.bool, torch.int64, torch.int32):
                raise InvalidArgumentError(
                    f"index tensors must be bool, int32 or int64, not {t.dtype}",
                    reason="BAD_INDEX")
            out.append(t)
        else:
            raise InvalidArgumentError("index item has no value set", reason="BAD_INDEX")
    return tuple(out)

