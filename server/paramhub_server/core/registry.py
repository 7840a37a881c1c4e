"""The set of models a server holds: creation (validated completely before anything is
registered), lookup, deletion, and recovery from the data directory at start."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from paramhub.common import modcode as _code
from paramhub.common import spec as _spec
from paramhub.common.spec import ModelSpec
from paramhub.common.errors import (AlreadyExistsError, InvalidArgumentError, NotFoundError,
                             ResourceExhaustedError, UnavailableError)
from paramhub_server.core import programs, rng
from paramhub_server.core.model import Program, ServedModel
from paramhub_server.core.store import NAME_PATTERN, Store

log = logging.getLogger(__name__)

def check_model_id(model_id: str) -> str:
    """Validates a client-chosen model id."""
    if not NAME_PATTERN.fullmatch(model_id):
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


class SpecRequest(Protocol):
    """A model spec as a request carries it (the API layer's wire form): its size limits are
    checked as it came, before anything is decoded (a spec of millions of nodes is refused
    without building them), then it is decoded."""

    def check_limits(self, *, max_nodes: int, max_depth: int) -> None:
        """Raises ResourceExhaustedError (SPEC_TOO_LARGE / SPEC_TOO_DEEP) past a limit."""

    def decode(self) -> ModelSpec:
        """The spec (InvalidArgumentError for a bad graph, class or value)."""


@dataclass(frozen=True)
class ProgramRequest:
    """What an exported-program model is created from (CreateModel's header, decoded)."""

    exported_program: bytes
    #: ModuleInfo messages in their JSON form (see Program.tree)
    module_tree: list[dict[str, Any]]
    program_ties: list[tuple[str, str]]
    program_constants: list[str]
    device: str


class Registry:
    """Models by id. Thread-safe."""

    def __init__(self, default_device: torch.device, *, max_model_bytes: int | None = None,
                 max_total_bytes: int | None = None, max_spec_nodes: int = _spec.MAX_SPEC_NODES,
                 max_spec_depth: int = _spec.MAX_SPEC_DEPTH, store: Store | None = None,
                 trust_remote_code: bool = False, model_packages: tuple[str, ...] = ()) -> None:
        self.default_device = default_device
        #: Whether user-defined module classes sent by clients may be loaded (runs their code),
        #: and the packages whose classes may be named without that (see paramhub._code).
        self.trust_remote_code = trust_remote_code
        self.model_packages = model_packages
        self.max_model_bytes = max_model_bytes
        #: Memory budget over all models (bytes of parameters and buffers); None = unlimited.
        self.max_total_bytes = max_total_bytes
        self.max_spec_nodes = max_spec_nodes
        self.max_spec_depth = max_spec_depth
        #: Sync-round pushes the server can keep waiting at once (--max-round-waiters).
        self.max_round_waiters: int | None = None
        self._models: dict[str, ServedModel] = {}
        self._lock = threading.Lock()
        self._creating: set[str] = set()
        # Bytes promised to creations in progress, so two concurrent creates cannot both fit
        # into the same remaining budget.
        self._reserved: dict[str, int] = {}
        self.store = store
        # Set once recovery from the data directory is done; until then creates and deletes
        # answer UNAVAILABLE (reason STARTING) here, and the server's interceptors answer every
        # ParameterService call NOT_READY. A registry without a store is ready at once.
        self.ready = threading.Event()
        if store is None:
            self.ready.set()

    def _check_ready(self) -> None:
        if not self.ready.is_set():
            raise UnavailableError("the server is still recovering its models; retry shortly",
                                   reason="STARTING")

    def recover(self) -> list[str]:
        """Loads every stored model (newest snapshot + log replay), then marks the registry
        ready. A model that fails to load is logged and skipped (its files are kept)."""
        loaded = []
        if self.store is not None:
            for model_id in self.store.model_ids():
                try:
                    spec, device = self.store.read_meta(model_id)
                    source = self.store.read_source(model_id)
                    try:
                        dev = parse_device(device, self.default_device)
                    except InvalidArgumentError:
                        log.warning("model %s was on %s, unavailable here; loading it on %s",
                                    model_id, device, self.default_device)
                        dev = self.default_device
                    program = self.store.read_program(model_id)
                    if program is not None:
                        model = self._build_program(model_id, program[0], program[1], dev)
                    elif source:  # user-defined classes: loaded only if still allowed
                        model = self._build_code(model_id, source, dev)
                    else:
                        model = self._build(model_id, spec, None, dev, allocate_only=True)
                    self.store.open(model)
                except Exception:  # noqa: BLE001 - one bad model must not keep the rest down
                    log.exception("could not recover model %s; its files are left as they are",
                                  model_id)
                    continue
                with self._lock:
                    self._models[model_id] = model
                loaded.append(model_id)
        self.ready.set()
        return loaded

    def close_watchers(self) -> None:
        """Ends every watch stream (server shutdown)."""
        with self._lock:
            models = list(self._models.values())
        for m in models:
            m.watchers.close()

    def close_rounds(self) -> None:
        """Releases every sync-round push still waiting (server shutdown)."""
        with self._lock:
            models = list(self._models.values())
        for m in models:
            if m.train_state is not None:
                m.train_state.close()

    def close(self) -> None:
        """Ends every watch and closes every model's log (server shutdown)."""
        self.close_watchers()
        with self._lock:
            models = list(self._models.values())
        for m in models:
            with m.lock.write():
                if m.journal is not None and hasattr(m.journal, "close"):
                    m.journal.close()
                m.journal = None
        if self.store is not None:
            self.store.close()

    def get(self, model_id: str) -> ServedModel:
        """The model; NotFoundError (MODEL_NOT_FOUND) if absent."""
        m = self._models.get(model_id)
        if m is None:
            raise NotFoundError(f"model {model_id[:200]!r} does not exist",
                                reason="MODEL_NOT_FOUND", metadata={"model": model_id[:200]})
        return m

    def list(self) -> list[ServedModel]:
        """Every model, sorted by id (during recovery: those recovered so far)."""
        with self._lock:
            return [self._models[k] for k in sorted(self._models)]

    def delete(self, model_id: str) -> None:
        """Removes a model (and its files); NotFoundError if absent."""
        self._check_ready()
        with self._lock:
            if model_id not in self._models:
                self.get(model_id)
            model = self._models.pop(model_id)
        model.watchers.close()
        with model.lock.write():  # waits for in-flight writes and compactions
            if self.store is not None:
                self.store.delete(model)

    def _claim(self, model_id: str) -> None:
        """Marks `model_id` as being created (ALREADY_EXISTS if taken or in creation); every
        claim is followed by _release, whether the creation succeeded or not."""
        with self._lock:
            if model_id in self._models or model_id in self._creating:
                raise AlreadyExistsError(f"model {model_id!r} already exists",
                                         reason="MODEL_EXISTS", metadata={"model": model_id})
            self._creating.add(model_id)

    def _release(self, model_id: str) -> None:
        with self._lock:
            self._creating.discard(model_id)
            self._reserved.pop(model_id, None)

    def _reserve_model(self, model_id: str, size: int) -> None:
        """Checks a new model's bytes against --max-model-bytes, then reserves them in the
        total budget (RESOURCE_EXHAUSTED if either is exceeded)."""
        if self.max_model_bytes is not None and size > self.max_model_bytes:
            raise ResourceExhaustedError(
                f"model {model_id!r} needs {size} bytes, more than --max-model-bytes "
                f"{self.max_model_bytes}", reason="MODEL_TOO_LARGE",
                metadata={"limit": "max_model_bytes", "asked": str(size),
                          "limit_value": str(self.max_model_bytes)})
        self._reserve(model_id, size)

    def _register(self, model: ServedModel) -> ServedModel:
        """Makes a built model durable, then visible: it is acknowledged only after both."""
        if self.store is not None:
            self.store.create(model)
        with self._lock:
            self._models[model.id] = model
        return model

    def create(self, model_id: str, spec: ModelSpec | SpecRequest, *, seed: int | None, device: str,
               values: Iterable[tuple[str, torch.Tensor]] = ()) -> ServedModel:
        """Builds and registers a model; nothing is registered unless every step succeeds.

        The tree is first built on the meta device (validates the spec and sizes it without
        memory), then for real: on CPU under `rng.seeded(seed)` and moved to the device, so a
        seed reproduces local CPU construction bit for bit.
        """
        self._check_ready()
        check_model_id(model_id)
        dev = parse_device(device, self.default_device)
        self._claim(model_id)
        try:
            if isinstance(spec, ModelSpec):
                _spec.check_spec_limits(spec, max_nodes=self.max_spec_nodes,
                                        max_depth=self.max_spec_depth)
            else:  # as a request carries it: limits first, before anything is decoded
                spec.check_limits(max_nodes=self.max_spec_nodes, max_depth=self.max_spec_depth)
                spec = spec.decode()
            with torch.device("meta"):
                skeleton = _spec.build_module(spec)
            size = _unique_bytes(skeleton)
            self._reserve_model(model_id, size)
            values = dict(values)
            names = set(skeleton.state_dict(keep_vars=True))
            # Every value uploaded: allocate without initializing (no wasted init, no random
            # numbers drawn).
            model = self._build(model_id, spec, seed, dev, skeleton=skeleton,
                                allocate_only=seed is None and bool(names)
                                and names <= set(values))
            model.load_tensors(values)
            return self._register(model)
        finally:
            self._release(model_id)

    def create_code(self, model_id: str, module_pickle: bytes, *, device: str,
                    values: Iterable[tuple[str, torch.Tensor]] = ()) -> ServedModel:
        """Builds and registers a user-defined module (see paramhub._code): unpickled under the
        server's trust policy, allocated on the device, filled with the uploaded values (every
        storage needs one: the server cannot re-run the client's constructor)."""
        self._check_ready()
        check_model_id(model_id)
        dev = parse_device(device, self.default_device)
        if not self.trust_remote_code and not self.model_packages:
            raise _code.remote_code_refused()  # before anything is unpickled
        self._claim(model_id)
        try:
            values = dict(values)
            module = _code.loads(module_pickle, trust_remote_code=self.trust_remote_code,
                                 packages=self.model_packages)
            n = sum(1 for _ in module.modules())
            if n > self.max_spec_nodes:
                raise ResourceExhaustedError(
                    f"the module has {n} submodules, more than the limit "
                    f"max_spec_nodes={self.max_spec_nodes}", reason="SPEC_TOO_LARGE",
                    metadata={"limit": "max_spec_nodes", "asked": str(n),
                              "limit_value": str(self.max_spec_nodes)})
            size = _unique_bytes(module)
            self._reserve_model(model_id, size)
            model = self._build_code(model_id, module_pickle, dev, module=module)
            missing = [n for n in model.state_entries(every_name=False) if n[0] not in values]
            if missing:
                raise InvalidArgumentError(
                    f"no value was uploaded for {missing[0][0]!r}; a user-defined module is "
                    "served with its values", reason="MISSING_VALUES",
                    metadata={"tensor": missing[0][0][:200]})
            model.load_tensors(values)
            return self._register(model)
        finally:
            self._release(model_id)

    def create_program(self, model_id: str, header: ProgramRequest, *,
                       values: dict[str, torch.Tensor]) -> ServedModel:
        """Builds and registers an exported program (see paramhub._program): deserialized with
        the uploaded tensors, nothing unpickled, so no trust is needed."""
        self._check_ready()
        check_model_id(model_id)
        dev = parse_device(header.device, self.default_device)
        self._claim(model_id)
        try:
            size = sum(v.numel() * v.element_size() for v in values.values())
            self._reserve_model(model_id, size)
            program = Program(header.exported_program, list(header.module_tree),
                              list(header.program_ties),
                              {n: values.pop(n) for n in header.program_constants
                               if n in values},
                              {n: (v.dtype, tuple(v.shape)) for n, v in values.items()})
            if len(header.module_tree) > self.max_spec_nodes:
                raise ResourceExhaustedError(
                    f"the module tree has {len(header.module_tree)} modules, more than the "
                    f"limit max_spec_nodes={self.max_spec_nodes}", reason="SPEC_TOO_LARGE",
                    metadata={"limit": "max_spec_nodes", "asked": str(len(header.module_tree)),
                              "limit_value": str(self.max_spec_nodes)})
            model = self._build_program(model_id, program, values, dev)
            return self._register(model)
        finally:
            self._release(model_id)

    @staticmethod
    def _build_program(model_id: str, program: Program, state: dict[str, torch.Tensor],
                       dev: torch.device) -> ServedModel:
        state = dict(state)
        for name, source in program.ties:
            if source not in state:
                raise InvalidArgumentError(f"tie {name!r} -> {source!r}: no such tensor",
                                           reason="BAD_PROGRAM")
            state[name] = state[source]
        module = programs.load_program(program.program, state,
                                       {k: v.clone() for k, v in program.constants.items()})
        module = module.to(dev)
        model = ServedModel(model_id, module, ModelSpec(), dev)
        model.program = program
        return model

    def _build_code(self, model_id: str, module_pickle: bytes, dev: torch.device, *,
                    module: torch.nn.Module | None = None) -> ServedModel:
        if module is None:
            module = _code.loads(module_pickle, trust_remote_code=self.trust_remote_code,
                                 packages=self.model_packages)
        _code.allocate(module, dev)
        model = ServedModel(model_id, module, ModelSpec(), dev)
        model.source = module_pickle
        return model

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


    @staticmethod
    def _build(model_id: str, spec: ModelSpec, seed: int | None, dev: torch.device, *,
               skeleton: torch.nn.Module | None = None, allocate_only: bool = False
               ) -> ServedModel:
        """Builds the module on `dev`: initialized (under `seed`), or only allocated when every
        value is about to be loaded (an upload, or recovery from a snapshot)."""
        if allocate_only and skeleton is None:
            with torch.device("meta"):
                skeleton = _spec.build_module(spec)
        if allocate_only and not any(isinstance(t, torch.nn.parameter.UninitializedTensorMixin)
                                     for t in _tensors(skeleton)):
            module = skeleton.to_empty(device=dev)  # to_empty unties; apply_ties below reties
        else:  # (lazy modules' uninitialized tensors cannot be allocated empty: build them)
            with rng.seeded(seed):
                module = _spec.build_module(spec)
            module = module.to(dev)
        _spec.apply_ties(module, spec)  # .to(cuda) unties (see apply_ties)
        return ServedModel(model_id, module, spec, dev)

    def adopt(self, model_id: str, module: torch.nn.Module,
              spec: ModelSpec | None = None) -> ServedModel:
        """Registers an already built module as it is (restores, embedding servers, tests).

        Unlike `create`, no spec is validated: the caller built the module in-process.
        """
        check_model_id(model_id)
        model = ServedModel(model_id, module, spec or ModelSpec(),
                            next(iter(module.parameters()), torch.empty(0)).device)
        with self._lock:
            if model_id in self._models or model_id in self._creating:
                raise AlreadyExistsError(f"model {model_id!r} already exists",
                                         reason="MODEL_EXISTS", metadata={"model": model_id})
            self._models[model_id] = model
        return model


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def _unique_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in _tensors(module):
        # A lazy module's uninitialized tensors have no size until their first Forward.
        if id(t) not in seen and not isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
