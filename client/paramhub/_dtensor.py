"""DTensors in and out of a served model, for torch.distributed jobs (every rank of the job
calls the same function with its own `DeviceMesh`).

Out: each rank computes the region of the logical tensor its placements give it (torch's own
chunk layout) and reads only that region from the server (on a cluster's sharded model the
front door gathers just those elements from the ranks that hold them); the ranks then agree
over the job's process group that every region came from one model version, else read again.

In: the job's DTensors are assembled to full tensors with the job's own collectives, and one
rank (the mesh's first) writes them all with one `push_state` (one model version, all or
nothing); the outcome is broadcast so every rank returns or raises the same."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement

from paramhub.errors import ConflictError, InvalidArgumentError, NotFoundError, ParamhubError
from paramhub.common.errors import error_class_for_code
from paramhub.v1 import parameter_service_pb2 as pb

if TYPE_CHECKING:
    from paramhub.client import Client

#: Times a whole pull is read again when the model moved on during it.
PULL_ATTEMPTS = 5


def local_region(global_shape: Sequence[int], mesh: DeviceMesh,
                 placements: Sequence[Placement]) -> tuple[slice, ...]:
    """The slices of the logical tensor this rank holds under `placements` (torch's layout)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    for p in placements:
        if isinstance(p, Partial):
            raise InvalidArgumentError("a Partial placement has no region to read",
                                       reason="BAD_PLACEMENT")
    if len(placements) != mesh.ndim:
        raise InvalidArgumentError(f"{len(placements)} placements for a {mesh.ndim}-d mesh",
                                   reason="BAD_PLACEMENT")
    shape, offset = compute_local_shape_and_global_offset(tuple(global_shape), mesh,
                                                           list(placements))
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def _group(mesh: DeviceMesh) -> Any:
    return mesh.get_group() if mesh.ndim == 1 else None  # None: the default (world) group


def _agree(mesh: DeviceMesh, value: Any) -> list[Any]:
    """Every rank's `value`, over the mesh's group."""
    out: list[Any] = [None] * (mesh.size())
    dist.all_gather_object(out, value, group=_group(mesh))
    return out


def _flat(e: ParamhubError) -> tuple[str, str, str, dict[str, str]]:
    """An error as plain values, to travel to the job's other ranks."""
    return (e.code, e.message, e.reason, e.metadata)


def _unflat(flat: tuple[str, str, str, dict[str, str]]) -> ParamhubError:
    code, message, reason, metadata = flat
    return error_class_for_code(code)(message, reason=reason, metadata=metadata)


def _to_dtensor(local: torch.Tensor, shape: Sequence[int], mesh: DeviceMesh,
                placements: Sequence[Placement]) -> DTensor:
    return DTensor.from_local(local.contiguous(), mesh, list(placements), run_check=False,
                              shape=torch.Size(shape),
                              stride=torch.empty(tuple(shape), device="meta").stride())


def pull_dtensors(client: Client, model_id: str, mesh: DeviceMesh,
                  plan: Mapping[str, Sequence[Placement]] | Sequence[Placement], *,
                  names: Sequence[str] | None = None, timeout: float | None = None
                  ) -> tuple[dict[str, DTensor], int]:
    """Every rank's regions of the model's tensors, all from one model version.

    Returns:
        ({name: DTensor}, the model version they were read at).
    """
    for _ in range(PULL_ATTEMPTS):
        described = client.describe_model(model_id)
        before = described.model.version
        infos = {t.name: t for t in described.tensors}
        keys = list(names) if names is not None else list(infos)
        out: dict[str, DTensor] = {}
        error: tuple[str, str, str, dict[str, str]] | None = None
        try:
            for name in keys:
                if name not in infos:
                    raise NotFoundError(f"model {model_id!r} has no tensor {name!r}",
                                        reason="TENSOR_NOT_FOUND")
                info = infos[name]
                placements = (plan.get(name) if isinstance(plan, Mapping) else plan)
                if placements is None:
                    raise InvalidArgumentError(f"the plan has no placements for {name!r}",
                                               reason="BAD_PLACEMENT")
                kind = "buffers" if info.kind == pb.TENSOR_KIND_BUFFER else "parameters"
                region = local_region(info.shape, mesh, placements)
                local, _ = client.get_tensor(model_id, name, region if region else None,
                                             kind=kind, timeout=timeout)
                out[name] = _to_dtensor(local, info.shape, mesh, placements)
            after = client.model_version(model_id)
        except ParamhubError as e:
            error, after = _flat(e), -1
        # Every rank must see the same outcome, or one rank would wait in a collective alone.
        seen = _agree(mesh, (before, after, error))
        errors = [s[2] for s in seen if s[2] is not None]
        if errors:  # each rank raises the first rank's error (its own if it had one)
            raise _unflat(error if error is not None else errors[0])
        if len({s[0] for s in seen} | {s[1] for s in seen}) == 1:
            return out, before
    raise ConflictError(f"model {model_id!r} changed during every one of {PULL_ATTEMPTS} "
                        "pulls", reason="DTENSOR_PULL_TORN")


def get_dtensor(client: Client, model_id: str, name: str, mesh: DeviceMesh,
                placements: Sequence[Placement], *, timeout: float | None = None) -> DTensor:
    """One tensor as a DTensor under `placements`; each rank reads only its region."""
    out, _ = pull_dtensors(client, model_id, mesh, {name: placements}, names=[name],
                           timeout=timeout)
    return out[name]


def push_dtensors(client: Client, model_id: str, state: Mapping[str, DTensor | torch.Tensor],
                  *, expected_model_version: int | None = None,
                  timeout: float | None = None) -> dict[str, int]:
    """Writes the job's DTensors as one model version (all or nothing). Collective: every rank
    of the DTensors' mesh calls it with the same names; each returns the new versions, or each
    raises the error the write got."""
    meshes = {id(t.device_mesh): t.device_mesh for t in state.values() if isinstance(t, DTensor)}
    if len(meshes) != 1:
        raise InvalidArgumentError("push_dtensors needs DTensors over one DeviceMesh",
                                   reason="BAD_PLACEMENT")
    mesh = next(iter(meshes.values()))
    # The job's own collectives assemble each tensor (on every rank; the first one sends).
    full = {n: (t.full_tensor() if isinstance(t, DTensor) else t) for n, t in state.items()}
    leader = dist.get_global_rank(_group(mesh), 0) if mesh.ndim == 1 else 0
    result: list[Any] = [None]
    if dist.get_rank() == leader:
        try:
            result[0] = ("ok", client.push_state(model_id, full,
                                                 expected_model_version=expected_model_version,
                                                 timeout=timeout))
        except ParamhubError as e:
            result[0] = ("error", _flat(e))
    dist.broadcast_object_list(result, src=leader, group=_group(mesh))
    status, value = result[0]
    if status == "error":
        raise _unflat(value)
    return dict(value)
