"""Helpers shared by the core integration tests (test_core_*.py): create models through the real
SDK, snapshot every tensor and version of a model, and assert on error class, code and reason."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import paramhub
from paramhub import _codec, _spec
from paramhub.errors import ParamhubError
from paramhub.common import pb


def create(client: paramhub.Client, model_id: str, module: nn.Module, *, seed: int | None = None,
           upload: bool = False, device: str | None = None):
    """CreateModel from a local module's spec; uploads its values when `upload`."""
    spec = _spec.spec_from_module(module)
    values = dict(module.state_dict()) if upload else None
    return client.create_model_from_spec(model_id, spec, seed=seed, device=device, values=values)


def read_all(client: paramhub.Client, model_id: str) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a model, read with GetTensor."""
    out = {}
    for info in client.list_parameters(model_id, include_buffers=True):
        kind = "parameters" if info.kind == pb.TENSOR_KIND_PARAMETER else "buffers"
        out[info.name] = client.get_tensor(model_id, info.name, kind=kind)[0]
    return out


def bits(t: torch.Tensor) -> bytes:
    """A tensor's dtype, shape and raw bytes, for exact comparisons."""
    return _codec.tensor_to_proto(t).SerializeToString()


@dataclass(frozen=True)
class Snapshot:
    """Everything observable about a model's state: values, per-tensor versions, model version,
    and training flags."""

    values: dict[str, bytes]
    versions: dict[str, int]
    model_version: int
    training: tuple[tuple[str, bool], ...]


def snapshot(client: paramhub.Client, model_id: str) -> Snapshot:
    """A Snapshot of a model, through the SDK."""
    desc = client.describe_model(model_id)
    values = {n: bits(t) for n, t in read_all(client, model_id).items()}
    return Snapshot(values=values, versions={t.name: t.version for t in desc.tensors},
                    model_version=desc.model.version,
                    training=tuple((m.path, m.training) for m in desc.modules))


def model_ids(client: paramhub.Client) -> list[str]:
    """Ids of every model on the server."""
    return [m.name.split("/", 1)[1] for m in client.list_models()]


@contextlib.contextmanager
def raises(cls: type[ParamhubError], reason: str, code: str | None = None
           ) -> Iterator[pytest.ExceptionInfo]:
    """Asserts the block raises exactly `cls` with `reason` (and the class's status code)."""
    with pytest.raises(ParamhubError) as info:
        yield info
    err = info.value
    assert type(err) is cls, f"{type(err).__name__} ({err.code} {err.reason}): {err}"
    assert err.code == (code or cls.code)
    assert err.reason == reason, f"reason {err.reason!r}, message {err}"


@contextlib.contextmanager
def unchanged(client: paramhub.Client, model_id: str) -> Iterator[Snapshot]:
    """Asserts the model's values, versions and modes are the same after the block."""
    before = snapshot(client, model_id)
    yield before
    after = snapshot(client, model_id)
    assert after.model_version == before.model_version
    assert after.versions == before.versions
    assert after.training == before.training
    changed = [n for n in before.values if after.values[n] != before.values[n]]
    assert not changed, f"changed by a rejected request: {changed}"
