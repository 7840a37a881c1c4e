"""`connect()` and `Client`: one method per RPC, in torch terms.

`Client` is what `paramhub.connect()` returns. Its methods speak torch tensors and Python values;
`Client.create_model` and `Client.model` return a `RemoteModule` (see module.py) that mirrors
torch.nn.Module. The machinery lives beside it: the channel, deadlines, retries, metadata and raw
call handles in _channel.py (`Client` extends its `Calls`), how bytes travel in _transfer/,
resource names in _names.py, training enums and `PushResult` in _training.py, generator states,
slice ops and checksums in _values.py.

Why more than ~500 lines: this file is the SDK's API and nothing else, one documented method per
RPC (about 40 of them, with their Args/Raises); splitting it further would scatter one class over
mixins by area without separating any concept.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import torch

from paramhub import _batch, _codec, _data, _transfer
from paramhub._channel import DEFAULT_TARGET, Calls, open_channel
from paramhub._channel import target_host as _target_host
from paramhub._names import model_id as _model_id
from paramhub._names import model_name, tensor_name
from paramhub._training import MODES as _MODES
from paramhub._training import OUTCOMES as _OUTCOMES
from paramhub._training import POLICIES as _POLICIES
from paramhub._training import PushResult
from paramhub._transfer import data as _transfer_data
from paramhub._transfer import policy as _policy
from paramhub._values import OPS as _OPS
from paramhub._values import generator_state, set_generator_state, tensor_checksum
from paramhub.errors import (InvalidArgumentError, ResourceExhaustedError,
                             UnimplementedError)
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb

if TYPE_CHECKING:
    from paramhub._batch import Batch
    from paramhub._cluster import Placement
    from paramhub._watch import Watch, WatchEvent
    from paramhub.module import RemoteModule

__all__ = ["Client", "connect", "DEFAULT_TARGET", "PushResult", "tensor_checksum"]

# The thresholds live in the transfer layer's policy (defined once; the server advertises its own).
INLINE_BYTES = _policy.INLINE_BYTES
SHM_MIN_BYTES = _policy.SHM_MIN_BYTES
INLINE_READ_BYTES = _policy.INLINE_READ_BYTES
DATA_CONNECT_TIMEOUT = _transfer_data.CONNECT_TIMEOUT
DATA_IO_TIMEOUT = _transfer_data.IO_TIMEOUT

log = logging.getLogger(__name__)
#: Whole-tensor reads and writes of at least this many bytes ask whether the model is sharded
#: (once per model) and, if so, go to and from the ranks in parallel (paramhub._cluster).
_ROUTED_MIN_BYTES = 1 << 20


def _whole(index: Any, dims: int) -> bool:
    """Whether a write's index selects the whole tensor of `dims` dims (None, `:`, `...`)."""
    if index is None:
        return True
    items = index if isinstance(index, tuple) else (index,)
    return (all(i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)
            and sum(i is Ellipsis for i in items) <= 1
            and sum(i is not Ellipsis for i in items) <= dims)


class Client(Calls):
    """A connection to a paramhub server. Use `paramhub.connect()` to make one.

    Every call has a deadline (`timeout` seconds, per client, overridable per call) and raises
    the exceptions of `paramhub.errors` instead of grpc.RpcError.
    """

    def __init__(self, channel: grpc.Channel, *, timeout: float | None = 30.0,
                 token: str | None = None, target: str = "", shm: bool = True,
                 progress: bool | None = None, data_channel: bool = True,
                 tls: _data.TlsConfig | None = None) -> None:
        super().__init__(channel, timeout=timeout, token=token, target=target)
        self.progress = progress
        #: Cluster state (paramhub._cluster), made on first use.
        self._cluster_state: Any = None
        # Whole-tensor sizes in bytes, learnt from reads and descriptions: the transfer policy
        # picks a transport from them (small tensors: one unary call instead of a stream).
        self._sizes: dict[tuple[str, str, str], int] = {}
        # How bytes travel (inline, streams, shm, data channel): the transfer layer.
        # The data channel needs a TCP host; under TLS it is wrapped in TLS (`tls`).
        self._transfers = _transfer.Transfers(self, shm=shm,
                                              data_host=(_target_host(target) if data_channel
                                                         else None), tls=tls)
        self._transport_info: pb.GetTransportInfoResponse | None = None
        self._transport_lock = threading.Lock()

    # ---------------------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Closes the channel (and the transfer layer's links and buffers)."""
        self._transfers.close()
        if self._cluster_state is not None:
            self._cluster_state.close()
        self.channel.close()

    # ---------------------------------------------------------------------------- transport

    def transport_info(self) -> pb.GetTransportInfoResponse:
        """The server's message limit, transfer thresholds and side-link addresses (asked
        once, then cached)."""
        with self._transport_lock:
            if self._transport_info is None:
                try:
                    self._transport_info = self._call(self.stub.GetTransportInfo,
                                                      pb.GetTransportInfoRequest())
                except UnimplementedError:  # an older server: no limits known, no side links
                    self._transport_info = pb.GetTransportInfoResponse()
            return self._transport_info

    @property
    def uses_data_channel(self) -> bool:
        """Whether big transfers that cannot use shared memory go over the data channel."""
        return self._transfers.uses("data")

    @property
    def uses_shm(self) -> bool:
        """Whether big transfers go through shared memory (negotiated on first use)."""
        return self._transfers.uses("shm")

    @property
    def transfers(self) -> Counter[str]:
        """Completed transfers by "operation:transport", e.g. {"get:shm": 1, "set:inline": 3}
        (operations get, set, pull, push; transports inline, stream, shm, data)."""
        return self._transfers.counts

    def _note_size(self, full_name: str, field: int, nbytes: int) -> None:
        kind = "grad" if field == pb.TENSOR_FIELD_GRAD else "value"
        self._sizes[(full_name, kind, "")] = nbytes

    def _note_infos(self, model_id: str, infos: Sequence[pb.TensorInfo]) -> None:
        for info in infos:
            try:
                dtype = _codec.dtype_from_proto(info.dtype)
            except InvalidArgumentError:
                continue
            kind = "parameters" if info.kind == pb.TENSOR_KIND_PARAMETER else "buffers"
            self._sizes[(tensor_name(model_id, info.name, kind), "value", "")] = (
                math.prod(info.shape) * dtype.itemsize)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"paramhub.Client({self.target!r})"


    # ---------------------------------------------------------------------------- models

    def create_model(self, model_id: str, module: torch.nn.Module, seed: int | None = None,
                     device: str | None = None, *, example_inputs: Sequence[Any] | None = None,
                     example_kwargs: Mapping[str, Any] | None = None,
                     timeout: float | None = None,
                     shard: str | Mapping[str, str] | None = None) -> RemoteModule:
        """Serves a copy of a local module and returns its remote mirror.

        If `module` holds values, the remote model starts as a copy of them (structure, values,
        shared modules, tied weights). If it lives on the meta device, the server initializes
        it: with `seed`, bit-identically to `torch.manual_seed(seed)` then local construction
        in tree order (each module built where it first appears, depth first). A module built
        out of that order locally (e.g. a shared layer created before the layers ahead of it)
        draws other numbers: serve a copy with values instead.

        Three ways in: a tree of built-in torch.nn layers (lazy ones included) is sent as a
        spec; with `example_inputs` the module is exported with torch.export and sent as a
        program (any module torch.export can trace, no trust needed); any other module (a
        user-defined class) is sent as code, which only a server started with
        --trust-remote-code runs (see `create_model_from_code`).

        With `shard="fsdp"` (a cluster started by torchrun, see README "Past one machine"),
        every parameter and buffer is a DTensor sharded on dim 0 over all ranks (replicated
        when it has fewer rows than ranks); only spec modules can be sharded. With a
        tensor-parallel plan, `shard={"0": "colwise", "2": "rowwise"}` (module path -> style;
        fnmatch wildcards per dotted atom, "layers.*.w1"), the named modules' tensors are
        placed as torch's ColwiseParallel / RowwiseParallel place them (nn.Linear colwise:
        weight and bias Shard(0); rowwise: weight Shard(1), bias replicated; nn.Embedding
        colwise: weight Shard(1); rowwise: Shard(0)), every other tensor replicated, and a
        dim with fewer indices than ranks replicated. The plan travels as JSON in the call
        metadata `x-paramhub-shard` (at most 7000 bytes).

        Raises:
            AlreadyExistsError: the id is taken.
            InvalidArgumentError: bad values, or a module torch.export cannot export
                (NOT_EXPORTABLE), or a plan that does not fit the model (BAD_SHARD: a path it
                does not have, a module type the style does not apply to, tied tensors
                placed two ways).
            FailedPreconditionError: a user-defined module, and the server does not run client
                code (REMOTE_CODE_DISABLED).
        """
        from paramhub import _spec

        if shard is not None:
            return self._create_sharded(model_id, module, shard, seed, timeout)
        if example_inputs is not None:
            self.create_model_from_program(model_id, module, example_inputs, example_kwargs,
                                           device=device, timeout=timeout)
            return self.model(model_id)

        try:
            spec = _spec.spec_from_module(module)
        except InvalidArgumentError as e:
            if e.reason != "MODULE_NOT_ALLOWED":
                raise
            # User-defined classes: served as code, if the server allows it.
            self.create_model_from_code(model_id, module, device=device, timeout=timeout)
            return self.model(model_id)
        values: dict[str, torch.Tensor] = {}
        # A lazy module's uninitialized tensors have no values yet: the server materializes
        # them at the first Forward, as torch would.
        lazy = torch.nn.parameter.UninitializedTensorMixin
        tensors = [t for t in list(module.parameters()) + list(module.buffers())
                   if not isinstance(t, lazy)]
        if not any(t.is_meta for t in tensors):
            values = {k: v for k, v in module.state_dict().items() if not isinstance(v, lazy)}
        self.create_model_from_spec(model_id, spec, seed=seed, device=device, values=values,
                                    timeout=timeout)
        return self.model(model_id)

    def _create_sharded(self, model_id: str, module: torch.nn.Module,
                        shard: str | Mapping[str, str], seed: int | None,
                        timeout: float | None) -> RemoteModule:
        from paramhub import _spec

        spec = _spec.spec_from_module(module)
        lazy = torch.nn.parameter.UninitializedTensorMixin
        tensors = [t for t in list(module.parameters()) + list(module.buffers())
                   if not isinstance(t, lazy)]
        values = {}
        if not any(t.is_meta for t in tensors):  # (the server refuses lazy modules)
            values = {k: v for k, v in module.state_dict().items() if not isinstance(v, lazy)}
        self._cluster().create(model_id, spec, shard, seed=seed, values=values,
                               timeout=timeout)
        return self.model(model_id)

    def _cluster(self) -> Any:
        from paramhub import _cluster

        if self._cluster_state is None:
            self._cluster_state = _cluster.Cluster(self)
        return self._cluster_state

    def cluster_info(self) -> list[Any]:
        """The ranks of the server's cluster, rank 0 (the front door) first: each one's
        address, device and held bytes (`paramhub._cluster.RankInfo`). A plain `paramhub
        serve` is a cluster of one rank.

        Raises:
            UnavailableError: a rank is down (reason RANK_DOWN, metadata "rank").
        """
        return self._cluster().info()

    def describe_placement(self, model_id: str) -> dict[str, Placement]:
        """How each tensor of a model is placed: {name: (placement, bounds)}, where placement
        is "shard(d)" (bounds: the first index along dim d of each rank, then the size of dim
        d), "replicate", or "local" (a model that is not sharded). Each value is a
        `paramhub._cluster.Placement`, a 2-tuple with `.note` too: why a tensor the plan would
        shard is replicated ("dim 1 has 1 < 2 ranks: replicated"), else "".

        Raises:
            NotFoundError: no such model.
        """
        return self._cluster().placement(model_id)

    def create_model_from_code(self, model_id: str, module: torch.nn.Module, *,
                               device: str | None = None, timeout: float | None = None
                               ) -> pb.ModelInfo:
        """Serves a user-defined module (any nn.Module subclass, including classes defined in
        __main__ or a notebook) as code: its structure pickled with cloudpickle, its values
        streamed. `create_model` does this for modules outside the torch.nn allow-list.

        The server runs the module's Python code (its forward), so it accepts this only when
        started with --trust-remote-code (or, for classes of a package it lists with
        --model-package, without), and only from admin callers.

        Raises:
            FailedPreconditionError: the server does not run client code (reason
                REMOTE_CODE_DISABLED).
            PermissionDeniedError: the caller is not an admin (ROLE_TOO_LOW).
            InvalidArgumentError: the module cannot be pickled.
        """
        from paramhub import _code

        data, values = _code.dumps(module)
        _code.remember_classes(module)
        header = pb.CreateModelHeader(model_id=model_id, module_pickle=data,
                                      device=device or "")

        def requests() -> Iterator[pb.CreateModelRequest]:
            yield pb.CreateModelRequest(header=header)
            for name, t in values.items():
                for chunk in _codec.iter_tensor_chunks(t, name=name):
                    yield pb.CreateModelRequest(chunk=chunk)

        return self._call(self.stub.CreateModel, requests(), timeout).model

    def create_model_from_program(self, model_id: str, module: torch.nn.Module,
                                  example_inputs: Sequence[Any],
                                  example_kwargs: Mapping[str, Any] | None = None, *,
                                  dynamic_shapes: Any = None, device: str | None = None,
                                  timeout: float | None = None) -> pb.ModelInfo:
        """Serves `module` as a torch.export program traced on `example_inputs`: the graph as
        JSON and the tensors through the codec, so the server unpickles nothing and runs no
        client code. The program computes what the module computed when it was exported (its
        training mode, and the branch its Python control flow took for those inputs). The
        first dimension of each tensor input stays dynamic (torch.export's `Dim.AUTO`) unless
        `dynamic_shapes` (torch.export's argument) says otherwise. Lazy modules are
        materialized first by one local call on the example inputs.

        Raises:
            InvalidArgumentError: torch.export cannot export the module (NOT_EXPORTABLE).
        """
        from paramhub import _program

        header, values = _program.export(module, example_inputs,
                                         dict(example_kwargs) if example_kwargs else None,
                                         dynamic_shapes)
        header.model_id, header.device = model_id, device or ""

        def requests() -> Iterator[pb.CreateModelRequest]:
            yield pb.CreateModelRequest(header=header)
            for name, t in values.items():
                for chunk in _codec.iter_tensor_chunks(t, name=name):
                    yield pb.CreateModelRequest(chunk=chunk)

        return self._call(self.stub.CreateModel, requests(), timeout).model

    def create_model_from_spec(self, model_id: str, spec: pb.ModelSpec, *,
                               seed: int | None = None, device: str | None = None,
                               values: Mapping[str, torch.Tensor] | None = None,
                               timeout: float | None = None) -> pb.ModelInfo:
        """CreateModel with an explicit spec and optional initial values (streamed)."""
        header = pb.CreateModelHeader(model_id=model_id, spec=spec, device=device or "")
        if seed is not None:
            header.seed = seed

        def requests() -> Iterator[pb.CreateModelRequest]:
            yield pb.CreateModelRequest(header=header)
            for name, t in (values or {}).items():
                for chunk in _codec.iter_tensor_chunks(t, name=name):
                    yield pb.CreateModelRequest(chunk=chunk)

        return self._call(self.stub.CreateModel, requests(), timeout).model

    def model(self, model_id: str) -> RemoteModule:
        """Attaches to an existing model (from any process) and returns its mirror.

        Raises:
            NotFoundError: no such model.
        """
        from paramhub.module import attach

        return attach(self, model_id)

    def list_models(self) -> list[pb.ModelInfo]:
        """Every model on the server."""
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest()).models)

    def delete_model(self, model_id: str) -> None:
        """Deletes a model. Raises NotFoundError if there is none."""
        self._call(self.stub.DeleteModel, pb.DeleteModelRequest(name=model_name(model_id)))

    def describe_model(self, model_id: str) -> pb.DescribeModelResponse:
        """The model's spec, module tree and tensors."""
        response = self._call(self.stub.DescribeModel, pb.DescribeModelRequest(
            name=model_name(model_id)))
        self._note_infos(model_id, response.tensors)
        return response

    def list_parameters(self, model_id: str, *, prefix: str = "", glob: str = "",
                        include_buffers: bool = False) -> list[pb.TensorInfo]:
        """Parameter (and optionally buffer) metadata, filtered by prefix and glob."""
        infos = list(self._call(self.stub.ListParameters, pb.ListParametersRequest(
            model=model_name(model_id), prefix=prefix, glob=glob,
            include_buffers=include_buffers)).tensors)
        self._note_infos(model_id, infos)
        return infos

    # ---------------------------------------------------------------------------- tensors

    def get_tensor(self, model_id: str, name: str, index: Any = None, *,
                   kind: str = "parameters", grad: bool = False, out: torch.Tensor | None = None,
                   timeout: float | None = None) -> tuple[torch.Tensor, int]:
        """Reads `tensor[index]` (or its gradient): returns (local CPU tensor, version).

        Big reads from a server on this host arrive through shared memory: the returned tensor
        then lives in that (private, anonymous) segment, without any further copy.

        Args:
            out: a contiguous CPU tensor of the result's dtype and shape to receive into
                (reusing one buffer saves the page faults of a fresh allocation); it is returned.

        Raises:
            NotFoundError: unknown model or tensor, or no gradient (reason GRAD_NOT_SET).
            InvalidArgumentError: bad index, or `out` does not match the result.
            OutOfRangeError: index out of bounds.
        """
        if out is not None and (out.device.type != "cpu" or not out.is_contiguous()):
            raise InvalidArgumentError("out must be a contiguous CPU tensor", reason="BAD_OUT")
        full_name = tensor_name(model_id, name, kind)
        items = _codec.index_to_proto(index) if index is not None else []
        field = pb.TENSOR_FIELD_GRAD if grad else pb.TENSOR_FIELD_VALUE
        known = self._sizes.get((full_name, "grad" if grad else "value", ""))
        if (not items and not grad and out is None and known is not None
                and known >= _ROUTED_MIN_BYTES):
            # A big whole-tensor read of a sharded model comes straight from the ranks.
            routed = self._cluster().read_if_sharded(model_id, name, full_name, timeout)
            if routed is not None:
                return routed
        request = pb.GetTensorRequest(name=full_name, index=items, field=field)
        return self._transfers.get(request, timeout, out=out, whole=known)

    def set_slice(self, model_id: str, name: str, index: Any, value: Any, op: str = "assign",
                  *, kind: str = "parameters", expected_version: int | None = None,
                  request_id: str | None = None, timeout: float | None = None) -> int | None:
        """`tensor[index] (op)= value` on the server, atomically; returns the new version.

        `value` is a tensor or a Python number; large values are streamed. `index` None is the
        whole tensor. Every write carries a request id (a fresh one unless given): the server
        applies an id once, so a retry after a lost response returns the original version.

        Inside `with client.batch(model_id):` on this thread the write joins the batch and
        None is returned (the versions are on the batch after the block).

        Raises:
            ConflictError: `expected_version` is not the tensor's version (reason
                VERSION_MISMATCH); nothing was written.
            NotFoundError, OutOfRangeError, InvalidArgumentError: bad name, index or value.
        """
        batch = self._active_batch(model_id)
        if batch is not None:
            batch.set_slice(name, index, value, op, kind=kind, expected_version=expected_version)
            return None
        if op not in _OPS:
            raise InvalidArgumentError(f"unknown op {op!r}; one of {sorted(_OPS)}",
                                       reason="BAD_OP")
        if (op == "assign" and isinstance(value, torch.Tensor) and _whole(index, value.dim())
                and value.numel() * value.element_size() >= _ROUTED_MIN_BYTES):
            # A big whole-tensor write of a sharded model goes straight to the owners.
            routed = self._cluster().write_if_sharded(
                model_id, name, tensor_name(model_id, name, kind), value, expected_version,
                timeout)
            if routed is not None:
                return routed
        scalar = None if isinstance(value, torch.Tensor) else _codec.scalar_to_proto(value)
        request = pb.SetSliceRequest(
            name=tensor_name(model_id, name, kind),
            index=_codec.index_to_proto(index) if index is not None else None, op=_OPS[op],
            request_id=request_id or os.urandom(16).hex(), value=scalar,
            expected_version=expected_version)
        if scalar is not None:  # a Python number: no torch round trip
            return self._transfers.set(request, None, timeout)
        return self._transfers.set(
            request, value if isinstance(value, torch.Tensor) else torch.tensor(value), timeout)

    # ---------------------------------------------------------------------------- bulk

    def pull_state(self, model_id: str, names: Sequence[str] | None = None, *, prefix: str = "",
                   glob: str = "", parameters_only: bool = False,
                   timeout: float | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Reads many tensors of a model in one call, from one consistent snapshot.

        Args:
            names: state_dict keys (in this order); None means every key passing prefix/glob.
            prefix, glob: filters over state_dict keys when names is None.
            parameters_only: leave buffers out.

        Returns:
            ({name: CPU tensor}, {name: version}). The tensors are views of one buffer.

        Raises:
            NotFoundError: unknown model or name.
            InvalidArgumentError: a name is repeated.
        """
        # A sharded model's state comes straight from the ranks that hold it.
        routed = self._cluster().pull_if_sharded(model_id, list(names or ()), prefix, glob,
                                                 parameters_only, timeout)
        if routed is not None:
            return routed
        request = pb.PullStateRequest(model=model_name(model_id), names=list(names or ()),
                                      prefix=prefix, glob=glob, parameters_only=parameters_only)
        return self._transfers.pull(request, timeout)

    def push_state(self, model_id: str, state_dict: Mapping[str, torch.Tensor], *,
                   expected_model_version: int | None = None,
                   timeout: float | None = None) -> dict[str, int]:
        """Writes many tensors of a model in one call, all or nothing (as load_state_dict with
        strict=False: the keys given are written, cast to each tensor's dtype).

        Returns:
            {first state_dict name of each written storage: its new version}.

        Raises:
            NotFoundError: unknown model or name.
            InvalidArgumentError: a shape differs from the model's, or a value cannot be cast.
            ConflictError: expected_model_version is set and the model moved on.
        """
        names = list(state_dict)
        tensors = [state_dict[n] if isinstance(state_dict[n], torch.Tensor)
                   else torch.as_tensor(state_dict[n]) for n in names]
        if sum(t.numel() * t.element_size() for t in tensors) >= _ROUTED_MIN_BYTES:
            # A big push into a sharded model goes straight to the owners.
            routed = self._cluster().push_if_sharded(model_id, names, tensors,
                                                     expected_model_version, timeout)
            if routed is not None:
                return routed
        headers = [tpb.TensorHeader(name=n, dtype=_codec.dtype_to_proto(t.dtype),
                                    shape=list(t.shape)) for n, t in zip(names, tensors)]
        header = pb.PushStateHeader(model=model_name(model_id), tensors=headers)
        if expected_model_version is not None:
            header.expected_model_version = expected_model_version
        return self._transfers.push(header, tensors, timeout)

    # ---------------------------------------------------------------------------- DTensors

    def get_dtensor(self, model: Any, name: str, device_mesh: Any, placements: Any, *,
                    timeout: float | None = None) -> Any:
        """Collective over `device_mesh`: a DTensor of the tensor under `placements` (Shard,
        Replicate), each rank reading only its own region (see paramhub._dtensor)."""
        from paramhub import _dtensor
        return _dtensor.get_dtensor(self, _model_id(model), name, device_mesh, placements,
                                    timeout=timeout)

    def pull_dtensors(self, model: Any, device_mesh: Any, plan: Any, *,
                      names: Sequence[str] | None = None, timeout: float | None = None
                      ) -> tuple[dict[str, Any], int]:
        """Collective: ({name: DTensor}, model version), every region from that one version.
        `plan` is {name: placements} or one placements list for every tensor."""
        from paramhub import _dtensor
        return _dtensor.pull_dtensors(self, _model_id(model), device_mesh, plan, names=names,
                                      timeout=timeout)

    def push_dtensors(self, model: Any, state_dict: Mapping[str, Any], *,
                      expected_model_version: int | None = None,
                      timeout: float | None = None) -> dict[str, int]:
        """Collective: writes the DTensors as one model version, all or nothing."""
        from paramhub import _dtensor
        return _dtensor.push_dtensors(self, _model_id(model), state_dict,
                                      expected_model_version=expected_model_version,
                                      timeout=timeout)

    def apply_init(self, model_id: str, scheme: str, targets: Sequence[pb.InitTarget],
                   args: Mapping[str, Any] | None = None, *, seed: int | None = None,
                   expected_model_version: int | None = None, request_id: str | None = None,
                   generator: torch.Generator | None = None,
                   timeout: float | None = None) -> pb.ApplyInitResponse | None:
        """Runs a torch.nn.init scheme (e.g. "normal_") on the server over `targets`.

        Returns the new versions (None inside `with client.batch(model_id):` on this thread,
        where the init joins the batch). Carries a request id like `set_slice`.

        The draws come from: a generator seeded with `seed`; else, with `generator` (a CPU
        torch.Generator, e.g. torch.default_generator), from that generator's state, which is
        then advanced as the same local calls would advance it (the values equal local
        torch's, bit for bit, whatever device the model is on); else from the server's own.

        Raises:
            ConflictError: `expected_model_version` is not the model's version.
            InvalidArgumentError: unknown scheme or bad arguments; NotFoundError: no target.
        """
        batch = self._active_batch(model_id)
        if batch is not None:
            if generator is not None:
                raise InvalidArgumentError(
                    "an init drawing from a client generator cannot join a batch (its state "
                    "comes back only after the batch); draw locally and set the values",
                    reason="BAD_ARGUMENT")
            batch.apply_init(scheme, targets, args, seed=seed,
                             expected_model_version=expected_model_version)
            return None
        request = pb.ApplyInitRequest(model=model_name(model_id), scheme=scheme, targets=targets,
                                      request_id=request_id or uuid.uuid4().hex)
        for k, v in (args or {}).items():
            request.args[k].CopyFrom(_codec.value_to_proto(v))
        if seed is not None:
            request.seed = seed
        if expected_model_version is not None:
            request.expected_model_version = expected_model_version
        if generator is not None and seed is None:
            request.generator_state = generator_state(generator)
        response = self._call(self.stub.ApplyInit, request, timeout)
        if request.HasField("generator_state"):
            set_generator_state(generator, response.generator_state)
        return response

    def forward(self, model_id: str, *args: Any, module_path: str = "",
                timeout: float | None = None, **kwargs: Any) -> Any:
        """Runs the model (or the submodule at `module_path`) on the server; returns local
        tensors (or tuples of them, as the module returns)."""
        request = pb.ForwardRequest(model=model_name(model_id), module_path=module_path,
                                    args=[_codec.value_to_proto(a) for a in args])
        for k, v in kwargs.items():
            request.kwargs[k].CopyFrom(_codec.value_to_proto(v))
        size = request.ByteSize()
        if size > INLINE_BYTES:
            limit = self.transport_info().max_message_bytes
            if limit and size > limit:
                raise ResourceExhaustedError(
                    f"the forward inputs need {size} bytes in one message, more than the "
                    f"server's max_message_bytes {limit} (paramhub serve --max-message-bytes)",
                    reason="MESSAGE_TOO_LARGE",
                    metadata={"limit": "max_message_bytes", "limit_bytes": str(limit),
                              "asked": str(size)})
        response = self._call(self.stub.Forward, request, timeout)
        return _codec.value_from_proto(response.output)

    def forward_materializing(self, model_id: str, args: Sequence[Any],
                              kwargs: Mapping[str, Any], *, module_path: str = "",
                              generator: torch.Generator | None = None,
                              timeout: float | None = None) -> tuple[Any, bool]:
        """Forward of a model with lazy modules not yet materialized: returns (output, whether
        the pass materialized some, so the model's structure changed). Their parameters are
        initialized from `generator`'s state (default: torch.default_generator), which is
        advanced as a local pass would advance it."""
        gen = generator if generator is not None else torch.default_generator
        request = pb.ForwardRequest(model=model_name(model_id), module_path=module_path,
                                    args=[_codec.value_to_proto(a) for a in args],
                                    generator_state=generator_state(gen))
        for k, v in kwargs.items():
            request.kwargs[k].CopyFrom(_codec.value_to_proto(v))
        response = self._call(self.stub.Forward, request, timeout)
        if response.generator_state:
            set_generator_state(gen, response.generator_state)
        return _codec.value_from_proto(response.output), response.materialized

    def forward_versioned(self, model_id: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                          *, module_path: str = "", seed: int | None = None,
                          timeout: float | None = None) -> tuple[Any, int]:
        """Forward returning (output, model version the pass ran on); with `seed`, random
        modules draw from a generator seeded with it (so `backward` can replay the pass)."""
        request = pb.ForwardRequest(model=model_name(model_id), module_path=module_path,
                                    args=[_codec.value_to_proto(a) for a in args])
        for k, v in kwargs.items():
            request.kwargs[k].CopyFrom(_codec.value_to_proto(v))
        if seed is not None:
            request.seed = seed
        response = self._call(self.stub.Forward, request, timeout)
        return _codec.value_from_proto(response.output), response.model_version

    def backward(self, model_id: str, args: Sequence[Any], kwargs: Mapping[str, Any], *,
                 grad_outputs: Sequence[torch.Tensor | None], grad_inputs: Sequence[int],
                 forward_model_version: int, module_path: str = "", seed: int | None = None,
                 timeout: float | None = None) -> list[torch.Tensor | None]:
        """Backward: replays a Forward with autograd, accumulates the parameters' .grad on the
        server, and returns the gradients of the inputs at positions `grad_inputs`.

        Raises:
            ConflictError: a parameter was written after the Forward (reason
                PARAMETERS_CHANGED); run the forward pass again.
            InvalidArgumentError: gradients that do not match the outputs.
        """
        request = pb.BackwardRequest(
            model=model_name(model_id), module_path=module_path,
            args=[_codec.value_to_proto(a) for a in args],
            forward_model_version=forward_model_version,
            grad_outputs=[_codec.value_to_proto(g) for g in grad_outputs],
            grad_inputs=list(grad_inputs))
        for k, v in kwargs.items():
            request.kwargs[k].CopyFrom(_codec.value_to_proto(v))
        if seed is not None:
            request.seed = seed
        response = self._call(self.stub.Backward, request, timeout)
        return [_codec.value_from_proto(g) for g in response.input_grads]

    def zero_grad(self, model_id: str, *, module_path: str = "", parameters: Sequence[str] = (),
                  set_to_none: bool = True, timeout: float | None = None) -> None:
        """Clears gradients on the server (of `parameters`, else of the module at
        `module_path`): None when `set_to_none`, else zeros, as torch's zero_grad."""
        self._call(self.stub.ZeroGrad, pb.ZeroGradRequest(
            model=model_name(model_id), module_path=module_path, parameters=list(parameters),
            fill_zeros=not set_to_none), timeout)

    def create_optimizer(self, model_id: str, type_name: str,
                         param_groups: Sequence[tuple[Sequence[str], Mapping[str, Any]]],
                         defaults: Mapping[str, Any], *, replace: bool = False,
                         timeout: float | None = None) -> pb.CreateOptimizerResponse:
        """CreateOptimizer: a torch.optim `type_name` on the server over named parameters.

        Raises:
            InvalidArgumentError: unknown optimizer or argument (reasons BAD_OPTIMIZER,
                BAD_OPTIMIZER_ARGUMENT, DUPLICATE_PARAMETER).
            AlreadyExistsError: another optimizer exists and `replace` is False.
        """
        request = pb.CreateOptimizerRequest(model=model_name(model_id), type=type_name,
                                            replace=replace)
        for k, v in defaults.items():
            request.defaults[k].CopyFrom(_codec.value_to_proto(v))
        for names, options in param_groups:
            group = request.param_groups.add(parameters=list(names))
            for k, v in options.items():
                group.options[k].CopyFrom(_codec.value_to_proto(v))
        return self._call(self.stub.CreateOptimizer, request, timeout)

    def optimizer_step(self, model_id: str, *, timeout: float | None = None
                       ) -> pb.OptimizerStepResponse:
        """OptimizerStep. Raises NotFoundError (OPTIMIZER_NOT_FOUND) without an optimizer."""
        return self._call(self.stub.OptimizerStep,
                          pb.OptimizerStepRequest(model=model_name(model_id)), timeout)

    def get_optimizer_state(self, model_id: str, *, config_only: bool = False,
                            timeout: float | None = None
                            ) -> tuple[pb.OptimizerInfo, dict[str, torch.Tensor]]:
        """(configuration, {"{parameter}/{key}": tensor}) of the model's optimizer."""
        info: pb.OptimizerInfo | None = None

        def chunks() -> Iterator[tpb.TensorChunk]:
            nonlocal info
            for msg in self._stream(self.stub.GetOptimizerState, pb.GetOptimizerStateRequest(
                    model=model_name(model_id), config_only=config_only), timeout):
                if msg.WhichOneof("part") == "optimizer":
                    info = msg.optimizer
                else:
                    yield msg.chunk

        tensors = {a.name: a.finish() for a in _codec.assemble_tensors(chunks())}
        if info is None:
            raise InvalidArgumentError("the server sent no optimizer", reason="BAD_STREAM")
        return info, tensors

    def configure_training(self, model_id: str, mode: str = "async", *, sync_workers: int = 1,
                           max_staleness: int = 0, stale_policy: str = "reject",
                           timeout: float | None = None) -> pb.TrainingConfig:
        """ConfigureTraining: how PushGrads applies gradients.

        Args:
            mode: "async", "sync" (average `sync_workers` pushes per step) or
                "bounded_staleness" (reject or scale pushes more than `max_staleness` steps old).
            stale_policy: "reject" or "scale" (bounded staleness).

        Raises:
            InvalidArgumentError: unknown mode or policy, bad worker count or staleness.
        """
        if mode not in _MODES or stale_policy not in _POLICIES:
            raise InvalidArgumentError(f"mode must be one of {sorted(_MODES)} and stale_policy "
                                       f"one of {sorted(_POLICIES)}", reason="BAD_TRAINING_MODE")
        config = pb.TrainingConfig(mode=_MODES[mode], sync_workers=sync_workers,
                                   max_staleness=max_staleness,
                                   stale_policy=_POLICIES[stale_policy])
        return self._call(self.stub.ConfigureTraining, pb.ConfigureTrainingRequest(
            model=model_name(model_id), config=config), timeout).config

    def pull_model(self, model_id: str, *, include_buffers: bool = True,
                   timeout: float | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """PullModel: ({first name of each storage: tensor}, model version), all read on one
        consistent version. (`pull_state` is the bulk read by names/prefix/glob with each
        tensor's version.)"""
        version = -1

        def chunks() -> Iterator[tpb.TensorChunk]:
            nonlocal version
            for msg in self._stream(self.stub.PullModel, pb.PullModelRequest(
                    model=model_name(model_id), include_buffers=include_buffers), timeout):
                if msg.WhichOneof("part") == "header":
                    version = msg.header.model_version
                else:
                    yield msg.chunk

        tensors = {a.name: a.finish() for a in _codec.assemble_tensors(chunks())}
        return tensors, version

    def push_grads(self, model_id: str, grads: Mapping[str, torch.Tensor], version: int, *,
                   timeout: float | None = None) -> PushResult:
        """PushGrads: gradients computed at model `version`, by parameter name.

        In sync mode the call returns when its round's step is taken (or its deadline comes:
        outcome "queued").

        Raises:
            NotFoundError: no optimizer (OPTIMIZER_NOT_FOUND) or unknown parameter.
            InvalidArgumentError: wrong shapes/dtypes, a parameter outside the optimizer, or a
                version the model never had.
        """
        def requests() -> Iterator[pb.PushGradsRequest]:
            yield pb.PushGradsRequest(header=pb.PushGradsHeader(model=model_name(model_id),
                                                                model_version=version))
            for name, t in grads.items():
                for chunk in _codec.iter_tensor_chunks(t.detach(), name=name):
                    yield pb.PushGradsRequest(chunk=chunk)

        r = self._call(self.stub.PushGrads, requests(), timeout)
        return PushResult(_OUTCOMES.get(r.outcome, "unspecified"), r.staleness, r.scale,
                          r.model_version, r.steps)

    def set_training(self, model_id: str, training: bool, module_path: str = "") -> None:
        """Module.train(training) on the server."""
        self._call(self.stub.SetTrainingMode, pb.SetTrainingModeRequest(
            model=model_name(model_id), module_path=module_path, training=training))

    def check_shared(self, model: Any, *names: str) -> bool:
        """Whether the named parameters share one storage on the server.

        `model` is a RemoteModule or a model id; names are state_dict keys ("2.weight").
        """
        request = pb.CheckSharedRequest(model=model_name(_model_id(model)), names=names)
        return self._call(self.stub.CheckShared, request).shared

    def shared_groups(self, model: Any) -> list[list[str]]:
        """Every group of names that share one storage on the server (tied weights, shared
        modules)."""
        # CheckShared needs two names; any two names of the model give the full group list.
        names = [t.name for t in self.list_parameters(_model_id(model), include_buffers=True)]
        if len(names) < 2:
            return []
        request = pb.CheckSharedRequest(model=model_name(_model_id(model)), names=names[:2])
        return [list(g.names) for g in self._call(self.stub.CheckShared, request).groups]

    # ---------------------------------------------------------------------------- versions

    def tensor_version(self, model: Any, name: str, *, kind: str = "parameters") -> int:
        """The current version of a parameter's (or buffer's) storage.

        Raises:
            NotFoundError: no such model or tensor.
        """
        model_id = _model_id(model)
        for t in self.list_parameters(model_id, prefix=name,
                                      include_buffers=kind == "buffers"):
            if t.name == name and (t.kind == pb.TENSOR_KIND_BUFFER) == (kind == "buffers"):
                return t.version
        from paramhub.errors import NotFoundError
        raise NotFoundError(f"model {model_id!r} has no {kind[:-1]} {name!r}",
                            reason="TENSOR_NOT_FOUND")

    def model_version(self, model: Any) -> int:
        """The model's current version (grows by one with every committed write)."""
        return self.describe_model(_model_id(model)).model.version

    # ---------------------------------------------------------------------------- batches

    def batch(self, model: Any, *, expected_model_version: int | None = None,
              request_id: str | None = None, timeout: float | None = None) -> Batch:
        """A context manager collecting writes to `model`, applied atomically at its end.

            with client.batch("mlp") as b:
                client.set_slice("mlp", "0.weight", None, w)   # joins the batch
                b.apply_init("zeros_", [paramhub.init_target(glob="*.bias")])
            print(b.model_version)

        The server applies all the writes or none, as one model version, and readers see all
        or none. Nothing is sent if the block raises. See paramhub._batch.

        Raises (at the end of the block):
            ConflictError, InvalidArgumentError, NotFoundError, OutOfRangeError: nothing applied.
        """
        from paramhub._batch import Batch

        return Batch(self, _model_id(model), expected_model_version=expected_model_version,
                     request_id=request_id, timeout=timeout)

    def _active_batch(self, model_id: str) -> Batch | None:
        """The batch this thread has open for `model_id` on this client, or None.

        For SDK layers (the module mirror): route a write into it with
        `batch.set_slice(name, index, value, op, kind=..., expected_version=...)` or
        `batch.apply_init(scheme, targets, args, seed=...)` instead of sending it. Client's own
        `set_slice` / `apply_init` already do this.
        """
        return _batch.active(self, model_id)

    # ---------------------------------------------------------------------------- watch

    def watch(self, model: Any, callback: Callable[[WatchEvent], Any] | None = None, *,
              max_queue: int = 0, timeout: float | None = None) -> Watch:
        """Watches a model's committed writes.

        Iterate the returned Watch (`for event in client.watch("mlp"): ...`), or pass
        `callback` to have a background thread call it with each event. The first event is
        "started"; then one "write" per commit in commit order; "resync" if this watcher fell
        more than `max_queue` events (server default 1024) behind and events were dropped.
        The stream has no deadline unless `timeout` is given; `close()` ends it.
        """
        from paramhub._watch import Watch

        return Watch(self, _model_id(model), max_queue=max_queue, timeout=timeout,
                     callback=callback)

    # ---------------------------------------------------------------------------- durability

    def create_checkpoint(self, model: Any, name: str) -> pb.CheckpointInfo:
        """Saves the model's current values (one consistent version) as checkpoint `name`.

        Raises:
            AlreadyExistsError: the name is taken. FailedPreconditionError: the server has no
            data directory (reason NO_DATA_DIR). InvalidArgumentError: bad name.
        """
        return self._call(self.stub.CreateCheckpoint, pb.CreateCheckpointRequest(
            model=model_name(_model_id(model)), checkpoint=name)).checkpoint

    def list_checkpoints(self, model: Any) -> list[pb.CheckpointInfo]:
        """The model's checkpoints, oldest first."""
        return list(self._call(self.stub.ListCheckpoints, pb.ListCheckpointsRequest(
            model=model_name(_model_id(model)))).checkpoints)

    def restore_checkpoint(self, model: Any, name: str, *,
                           expected_model_version: int | None = None,
                           request_id: str | None = None, timeout: float | None = None
                           ) -> pb.RestoreCheckpointResponse:
        """Rolls the model back to checkpoint `name`: one write, versions keep growing.

        Raises:
            NotFoundError: no such checkpoint (reason CHECKPOINT_NOT_FOUND).
            ConflictError: `expected_model_version` is not the model's version.
        """
        request = pb.RestoreCheckpointRequest(model=model_name(_model_id(model)),
                                              checkpoint=name,
                                              request_id=request_id or uuid.uuid4().hex)
        if expected_model_version is not None:
            request.expected_model_version = expected_model_version
        return self._call(self.stub.RestoreCheckpoint, request, timeout)

    def delete_checkpoint(self, model: Any, name: str) -> None:
        """Deletes checkpoint `name`. Raises NotFoundError if there is none."""
        self._call(self.stub.DeleteCheckpoint, pb.DeleteCheckpointRequest(
            model=model_name(_model_id(model)), checkpoint=name))

    def export_checkpoint(self, model: Any, path: str | os.PathLike[str], name: str = "", *,
                          timeout: float | None = None) -> str:
        """Downloads checkpoint `name` (or, with no name, the current values) to `path` as a
        plain safetensors state_dict: `safetensors.torch.load_file(path)` then
        `module.load_state_dict(...)` work without paramhub. Returns the path.

        complex128 tensors (no safetensors dtype) are stored as float64 with a trailing
        dimension of 2, as torch.view_as_real.
        """
        request = pb.ExportCheckpointRequest(model=model_name(_model_id(model)), checkpoint=name)
        target = os.fspath(path)
        tmp = f"{target}.part"
        with open(tmp, "wb") as f:
            for piece in self._stream(self.stub.ExportCheckpoint, request, timeout):
                f.write(piece.data)
        os.replace(tmp, target)
        return target

    def compact(self, model: Any) -> pb.CompactModelResponse:
        """Folds the model's write-ahead log into a new snapshot now."""
        return self._call(self.stub.CompactModel, pb.CompactModelRequest(
            model=model_name(_model_id(model))))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until the server's health check says SERVING (e.g. after a restart, while it
        replays its log).

        Raises:
            UnavailableError: not serving within `timeout` seconds.
        """
        from paramhub.errors import UnavailableError

        # grpc.health.v1.Health/Check with an empty request (service ""); the response's field
        # 1 is the status enum, SERVING = 1. Raw bytes: no dependency on the health package.
        check = self.channel.unary_unary("/grpc.health.v1.Health/Check")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check(b"", timeout=min(5.0, max(0.1, deadline - time.monotonic())),
                         metadata=self._read_metadata) == b"\x08\x01":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise UnavailableError(f"{self.target} is not serving after {timeout}s",
                                       reason="NOT_SERVING")
            time.sleep(0.05)

    def probe(self, model: Any, name: str | None = None, index: Any = None, *, bins: int = 0,
              hist_range: tuple[float, float] | None = None, kind: str = "parameters",
              grad: bool = False, include_buffers: bool = False, per_tensor: bool = False,
              timeout: float | None = None) -> pb.ProbeResponse:
        """Statistics computed on the server, without moving the tensor: min, max, mean, std,
        norm, NaN/Inf counts, a `bins`-bin histogram (over `hist_range`, default the finite
        min..max) and a SHA-256 checksum of the raw bytes.

        `name` None probes the whole model (every parameter, ties once; `include_buffers` adds
        buffers; `per_tensor` also returns each storage's statistics). Otherwise `name` is a
        state_dict key and `index` an optional torch index into it.

        Raises:
            NotFoundError: unknown model or tensor (GRAD_NOT_SET without a gradient).
            InvalidArgumentError: bad index or histogram arguments.
            OutOfRangeError: index out of bounds.
        """
        model_id = _model_id(model)
        request = pb.ProbeRequest(
            name=model_name(model_id) if name is None else tensor_name(model_id, name, kind),
            histogram_bins=bins, include_buffers=include_buffers, per_tensor=per_tensor,
            field=pb.TENSOR_FIELD_GRAD if grad else pb.TENSOR_FIELD_VALUE)
        if index is not None:
            request.index.extend(_codec.index_to_proto(index))
        if hist_range is not None:
            request.histogram_min, request.histogram_max = (float(hist_range[0]),
                                                            float(hist_range[1]))
        return self._call(self.stub.Probe, request, timeout)



def connect(target: str | None = None, token: str | None = None, timeout: float | None = 30.0,
            *, tls: bool = False, root_certificates: bytes | None = None,
            client_cert: bytes | None = None, client_key: bytes | None = None,
            options: Sequence[tuple[str, Any]] = (), shm: bool = True,
            progress: bool | None = None, data_channel: bool = True) -> Client:
    """Connects to a paramhub server.

    Args:
        target: "host:port"; defaults to $PARAMHUB_TARGET or 127.0.0.1:50051.
        token: bearer token; defaults to $PARAMHUB_TOKEN.
        timeout: default deadline of every call, in seconds (None = no deadline).
        tls: use TLS; `root_certificates` (PEM) verifies the server, `client_cert` and
            `client_key` (PEM) authenticate this client (mTLS).
        options: extra grpc channel options.
        shm: move big tensors through shared memory when the server is on this host
            (negotiated on first use; falls back to gRPC). False always uses gRPC.
        progress: progress bars for transfers over 64 MiB: None shows them when stderr is a
            terminal, True always, False never.
        data_channel: move tensors of 16 MiB or more over the server's data port (raw bytes
            over TCP, in TLS with the same certificates when the channel uses TLS) when shared
            memory does not apply; falls back to gRPC streams. False always uses gRPC.
    """
    target = target or os.environ.get("PARAMHUB_TARGET") or DEFAULT_TARGET
    token = token if token is not None else os.environ.get("PARAMHUB_TOKEN") or None
    channel, tls_config = open_channel(target, tls=tls, root_certificates=root_certificates,
                                       client_cert=client_cert, client_key=client_key,
                                       options=options)
    return Client(channel, timeout=timeout, token=token, target=target, shm=shm,
                  progress=progress, data_channel=data_channel, tls=tls_config)
