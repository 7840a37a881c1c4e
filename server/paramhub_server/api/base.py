"""What every handler module shares: the registry, the transport, the limits, and the lookups
from resource names to served models."""

from __future__ import annotations

from typing import Any

import torch

from paramhub import _codec
from paramhub.common.dtypes import numel
from paramhub.common.errors import InvalidArgumentError, ResourceExhaustedError
from paramhub_server.api.serde import model_id_of, tensor_name_of
from paramhub_server.core.model import ServedModel, SliceWrite
from paramhub_server.core.registry import Registry
from paramhub_server.transport import Transport


class Handlers:
    """State of the API layer; each area's handler class (models, tensors, ...) derives from it
    and ParameterService combines them."""

    def __init__(self, registry: Registry, *, max_tensor_elements: int | None = None,
                 transport: Transport | None = None) -> None:
        self.registry = registry
        #: Cap on the elements of any tensor a request carries or announces (--max-tensor-elements).
        self.max_tensor_elements = max_tensor_elements
        self.transport = transport or Transport(max_message_bytes=64 << 20, shm=False)

    def _model(self, name: str) -> ServedModel:
        """The served model of "models/{id}"."""
        return self.registry.get(model_id_of(name))

    def _values(self, msgs: Any) -> list[Any]:
        """Decoded Values, within the tensor size limit."""
        return [_codec.value_from_proto(v, max_elements=self.max_tensor_elements) for v in msgs]

    def _options(self, options: Any) -> dict[str, Any]:
        """A decoded map<string, Value>."""
        return {k: _codec.value_from_proto(v, max_elements=self.max_tensor_elements)
                for k, v in options.items()}

    def _tensor(self, name: str) -> tuple[ServedModel, str, str]:
        """(model, kind, tensor name) of "models/{id}/parameters|buffers/{name}"."""
        model_id, kind, tname = tensor_name_of(name)
        return self.registry.get(model_id), kind, tname

    def _check_index(self, m: ServedModel, name: str, kind: str | None, index: Any, *,
                     inline_bytes: int | None = None) -> tuple[int, ...] | None:
        """Refuses, before anything is built, an index whose region would hold more than
        --max-tensor-elements elements (or, for an inline answer, more than `inline_bytes`):
        index tensors can select far more than the tensor holds ((N,1) and (1,N): N x N).
        Returns the region's shape when it was computed."""
        if not any(isinstance(i, torch.Tensor) for i in index):
            return None  # ints, slices, None and ... never select more than the tensor holds
        shape = m.region_shape(name, index, kind=kind)
        if shape is None:
            return None  # an invalid index: the indexing itself reports it
        count = numel(shape)
        limit = self.max_tensor_elements
        if limit is not None and count > limit:
            raise ResourceExhaustedError(
                f"the index selects {count} elements of {name!r}, more than "
                f"--max-tensor-elements {limit}", reason="TENSOR_TOO_LARGE",
                metadata={"limit": "max_tensor_elements", "limit_value": str(limit),
                          "asked": str(count)})
        if inline_bytes is not None:
            nbytes = count * m.ref(name, kind).get().element_size()
            if nbytes > inline_bytes:
                raise ResourceExhaustedError(
                    f"{name!r}[...] has {nbytes} bytes, more than GetTensorInline's "
                    f"{inline_bytes}; use GetTensor", reason="MESSAGE_TOO_LARGE",
                    metadata={"limit": "inline_bytes", "limit_bytes": str(inline_bytes),
                              "asked": str(nbytes)})
        return shape

    def _check_upload(self, m: ServedModel, w: SliceWrite, shape: tuple[int, ...]) -> None:
        """Refuses an announced value larger than the region it is written to, before its
        memory is allocated (a value broadcasts to the region, so it never holds more
        elements than the region)."""
        region = self._check_index(m, w.name, w.kind, w.index)
        if region is None:
            region = m.region_shape(w.name, w.index, kind=w.kind)
        if region is None:
            return  # an invalid index: the write reports it
        if numel(shape) > max(numel(region), 1):
            raise InvalidArgumentError(
                f"a value of shape {list(shape)} cannot be written to a region of shape "
                f"{list(region)} of {w.name!r}", reason="BAD_SHAPE",
                metadata={"tensor": w.name, "asked": str(numel(shape))})
