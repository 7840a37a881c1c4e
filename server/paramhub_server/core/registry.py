"""The set of models a server holds: creation (validated completely before anything is
registered), lookup, deletion."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

import torch

from paramhub import _spec
from paramhub.errors import (AlreadyExistsError, InvalidArgumentError, NotFoundError,
                             ResourceExhaustedError)
from paramhub.v1 import parameter_service_pb2 as pb
from paramhub_server.core import rng
from paramhub_server.core.model import ServedModel

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_model_id(model_id: str) -> str:
    """Validates a client-chosen model id."""
    if not _MODEL_ID.fullmatch(model_id):
        raise InvalidArgumentError(
            f"model id {model_id[:200]!r} must be 1-128 characters of [A-Za-z0-9_.-] starting "
            "with a letter or digit", reason="BAD_MODEL_ID")
    return model_id


def parse_device(text: str, default: torch.device) -> torch.device:
    """"cpu", "cuda" or "cuda:N" (empty = default); InvalidArgumentError if unusable here."""
    if not text:
        return default
    if not re.fullmatch(r"cpu|cuda(:\d{1,3})?", text):
        raise InvalidArgumentError(f"device {text[:50]!r} must be cpu, cuda or cuda:N",
                                   reason="BAD_DEVICE")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgumentError("this server has no CUDA device", reason="BAD_DEVICE")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise InvalidArgumentError(f"this server has no device {text}", reason="BAD_DEVICE")
        device = torch.device("cuda", index)
    return device


class Registry:
    """Models by id. Thread-safe."""

    def __init__(self, default_device: torch.device, *, max_model_bytes: int | None = None,
                 max_total_bytes: int | None = None, max_spec_nodes: int = _spec.MAX_SPEC_NODES,
                 max_spec_depth: int = _spec.MAX_SPEC_DEPTH) -> None:
        self.default_device = default_device
        self.max_model_bytes = max_model_bytes
        #: Memory budget over all models (bytes of parameters and buffers); None = unlimited.
        self.max_total_bytes = max_total_bytes
        self.max_spec_nodes = max_spec_nodes
        self.max_spec_depth = max_spec_depth
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()
        self._creating: set[str] = set()
        # Bytes promised to creations in progress, so two concurrent creates cannot both fit
        # into the same remaining budget.
        self._reserved: dict[str, int] = {}

    def get(self, model_id: str) -> ServedModel:
        """The model; NotFoundError (MODEL_NOT_FOUND) if absent."""
        m = self._models.get(model_id)
        if m is None:
            raise NotFoundError(f"model {model_id[:200]!r} does not exist",
                                reason="MODEL_NOT_FOUND", metadata={"model": model_id[:200]})
        return m

    def list(self) -> list[ServedModel]:
        """Every model, sorted by id."""
        with self._lock:
            return [self._models[k] for k in sorted(self._models)]

    def delete(self, model_id: str) -> None:
        """Removes a model; NotFoundError if absent."""
        with self._lock:
            if model_id not in self._models:
                self.get(model_id)
            del self._models[model_id]

    def create(self, model_id: str, spec: pb.ModelSpec, *, seed: int | None, device: str,
               values: Iterable[tuple[str, torch.Tensor]] = ()) -> ServedModel:
        """Builds and registers a model; nothing is registered unless every step succeeds.

        The tree is first built on the meta device (validates the spec and sizes it without
        memory), then for real: on CPU under `rng.seeded(seed)` and moved to the device, so a
        seed reproduces local CPU construction bit for bit.
        """
        check_model_id(model_id)
        dev = parse_device(device, self.default_device)
        with self._lock:
            if model_id in self._models or model_id in self._creating:
                raise AlreadyExistsError(f"model {model_id!r} already exists",
                                         reason="MODEL_EXISTS", metadata={"model": model_id})
            self._creating.add(model_id)
        try:
            _spec.check_spec_limits(spec, max_nodes=self.max_spec_nodes,
                                    max_depth=self.max_spec_depth)
            with torch.device("meta"):
                skeleton = _spec.build_module(spec)
            size = _unique_bytes(skeleton)
            if self.max_model_bytes is not None and size > self.max_model_bytes:
                raise ResourceExhaustedError(
                    f"model {model_id!r} needs {size} bytes, more than --max-model-bytes "
                    f"{self.max_model_bytes}", reason="MODEL_TOO_LARGE",
                    metadata={"limit": "max_model_bytes", "asked": str(size),
                              "limit_value": str(self.max_model_bytes)})
            self._reserve(model_id, size)
            values = dict(values)
            names = set(skeleton.state_dict(keep_vars=True))
            if seed is None and names and names <= set(values):
                # Every value is uploaded: allocate without initializing (no wasted init, no
                # random numbers drawn); to_empty keeps tied parameters tied.
                module = skeleton.to_empty(device=dev)
            else:
                with rng.seeded(seed):
                    module = _spec.build_module(spec)
                module = module.to(dev)
            _spec.apply_ties(module, spec)  # .to(cuda) unties (see apply_ties)
            model = ServedModel(model_id, module, spec, dev)
            model.load_tensors(values)
            with self._lock:
                self._models[model_id] = model
            return model
        finally:
            with self._lock:
                self._creating.discard(model_id)
                self._reserved.pop(model_id, None)

    def total_bytes(self) -> int:
        """Bytes held by every model plus those reserved by creations in progress."""
        with self._lock:
            return self._total_locked()

    def _total_locked(self) -> int:
        return sum(m.stats()[1] for m in self._models.values()) + sum(self._reserved.values())

    def _reserve(self, model_id: str, size: int) -> None:
        with self._lock:
            if self.max_total_bytes is not None:
                held = self._total_locked()
                if held + size > self.max_total_bytes:
                    raise ResourceExhaustedError(
                        f"model {model_id!r} needs {size} bytes; {held} of --max-total-bytes "
                        f"{self.max_total_bytes} are in use", reason="TOTAL_BYTES_EXCEEDED",
                        metadata={"limit": "max_total_bytes", "asked": str(size),
                                  "in_use": str(held), "limit_value": str(self.max_total_bytes)})
            self._reserved[model_id] = size


def _unique_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
