"""paramhub._code: module pickles without tensors, the unpickling policy, and mirrors rebuilt
from a description (no sockets)."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

from paramhub import _code
from paramhub.errors import FailedPreconditionError, InvalidArgumentError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.scale = 2.0

    def forward(self, x):
        return self.lin(x) * self.scale

    def extra_repr(self):
        return f"scale={self.scale}"


def test_dumps_replaces_tensors_and_loads_keeps_ties():
    m = nn.Sequential(nn.Embedding(500, 3), Block(), nn.Linear(3, 500, bias=False))
    m[2].weight = m[0].weight
    data, values = _code.dumps(m)
    assert list(values) == ["0.weight", "1.lin.weight", "1.lin.bias"]
    assert len(data) < 500 * 3 * 4  # the values travel apart
    assert all(torch.equal(values[k], v) for k, v in m.state_dict().items() if k in values)
    loaded = _code.loads(data, trust_remote_code=True, packages=())
    assert repr(loaded) == repr(m)
    assert loaded[2].weight is loaded[0].weight and loaded[0].weight.is_meta
    _code.allocate(loaded, torch.device("cpu"))
    assert loaded[2].weight is loaded[0].weight and not loaded[0].weight.is_meta


def test_nothing_is_unpickled_without_trust_or_packages():
    data, _ = _code.dumps(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(FailedPreconditionError) as e:
        _code.loads(data, trust_remote_code=False, packages=())
    assert e.value.reason == "REMOTE_CODE_DISABLED"


class _Exploit:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload", [
    pickle.dumps(_Exploit()),
    pickle.dumps(Block()),  # a class outside torch.nn and the listed packages
], ids=["eval", "unlisted-class"])
def test_restricted_loading_refuses_other_globals_before_calling_them(payload):
    with pytest.raises(FailedPreconditionError) as e:
        _code.loads(payload, trust_remote_code=False, packages=("somepkg",))
    assert e.value.reason == "REMOTE_CODE_DISABLED"


def test_restricted_loading_allows_torch_nn_trees():
    data, _ = _code.dumps(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.BatchNorm1d(2)))
    loaded = _code.loads(data, trust_remote_code=False, packages=("somepkg",))
    assert repr(loaded) == repr(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.BatchNorm1d(2)))


def test_bad_pickles_are_invalid_arguments():
    for data in (b"garbage", pickle.dumps(42), pickle.dumps(("tensor",))):
        with pytest.raises(InvalidArgumentError) as e:
            _code.loads(data, trust_remote_code=True, packages=())
        assert e.value.reason == "BAD_MODULE"
    buf = io.BytesIO()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("tensor", "w", True, True, "not_a_dtype", (2,)) if obj == "x" else None

    P(buf).dump(["x"])
    with pytest.raises(InvalidArgumentError):
        _code.loads(buf.getvalue(), trust_remote_code=True, packages=())


def test_build_from_description_with_and_without_the_class():
    m = nn.Sequential(Block(), nn.Linear(3, 1, bias=False))
    infos = [_code.describe_module(p, mod, i)
             for i, (p, mod) in enumerate(m.named_modules())]
    rebuilt = _code.build_from_description(infos)
    assert type(rebuilt[0]) is Block and repr(rebuilt) == repr(m)
    assert rebuilt[1].bias is None  # registered as None, as in the original
    infos[1].class_module = "not_a_module_here"  # a process without Block: a stand-in
    stand_in = _code.build_from_description(infos)
    assert type(stand_in[0]).__name__ == "Block" and type(stand_in[0]) is not Block
    assert repr(stand_in) == repr(m)
