"""Init schemes (paramhub_server.core.inits) against torch.nn.init under the same seed. No sockets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from paramhub.errors import InvalidArgumentError
from paramhub_server.core import inits, rng

# scheme -> (shape, arguments): every scheme of the issue, with non-default arguments.
CASES = {
    "uniform_": ((5, 7), {"a": -0.5, "b": 2.0}),
    "normal_": ((5, 7), {"mean": 1.0, "std": 0.1}),
    "trunc_normal_": ((5, 7), {"mean": 0.5, "std": 2.0, "a": -1.0, "b": 1.5}),
    "constant_": ((5, 7), {"val": 0.3}),
    "ones_": ((5, 7), {}),
    "zeros_": ((5, 7), {}),
    "eye_": ((4, 6), {}),
    "dirac_": ((6, 3, 3, 3), {"groups": 2}),
    "xavier_uniform_": ((5, 7), {"gain": 2.0}),
    "xavier_normal_": ((8, 4, 3), {"gain": 0.5}),
    "kaiming_uniform_": ((5, 7), {"a": 0.1, "mode": "fan_out", "nonlinearity": "leaky_relu"}),
    "kaiming_normal_": ((6, 3, 2, 2), {"mode": "fan_in", "nonlinearity": "relu"}),
    "orthogonal_": ((4, 6), {"gain": 1.5}),
    "sparse_": ((10, 5), {"sparsity": 0.3, "std": 0.02}),
}

# Schemes called with only the arguments they require.
DEFAULTS = {"constant_": {"val": -2}, "sparse_": {"sparsity": 0.5}}


def test_cases_cover_every_scheme():
    assert set(CASES) == set(inits.SCHEMES)
    assert len(inits.SCHEMES) == 14


def _local(name: str, shape, dtype, args, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    t = torch.empty(shape, dtype=dtype)
    getattr(nn.init, name)(t, **args)
    return t


def _served(name: str, shape, dtype, args, seed: int) -> torch.Tensor:
    scheme = inits.get_scheme(name)
    target = torch.full(shape, float("nan"), dtype=dtype)  # values never read
    with rng.seeded(seed):
        return scheme.run(target, scheme.check_args(args))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("seed", [0, 1234, 2 ** 40 + 7])
@pytest.mark.parametrize("name", list(CASES))
def test_scheme_is_bit_identical_to_torch_nn_init(name, seed):
    shape, args = CASES[name]
    expected = _local(name, shape, torch.float32, args, seed)
    got = _served(name, shape, torch.float32, args, seed)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("name", list(CASES))
def test_scheme_with_defaults_is_bit_identical(name):
    shape, _ = CASES[name]
    args = DEFAULTS.get(name, {})
    assert torch.equal(_bits(_served(name, shape, torch.float32, args, 99)),
                       _bits(_local(name, shape, torch.float32, args, 99)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["uniform_", "normal_", "kaiming_uniform_", "orthogonal_"])
def test_scheme_keeps_target_dtype(name, dtype):
    shape, args = CASES[name]
    if name == "orthogonal_" and dtype is not torch.float64:
        # torch's CPU QR has no half-precision kernel: a clean INVALID_ARGUMENT, not a crash.
        with pytest.raises(InvalidArgumentError) as e:
            _served(name, shape, dtype, args, 3)
        assert e.value.reason == "BAD_INIT_ARGS"
        return
    got = _served(name, shape, dtype, args, 3)
    assert got.dtype is dtype
    assert torch.equal(_bits(got), _bits(_local(name, shape, dtype, args, 3)))


def test_seeded_scope_restores_the_global_generator():
    torch.manual_seed(42)
    state = torch.random.get_rng_state()
    _served("normal_", (100,), torch.float32, {}, 7)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_unseeded_run_draws_from_the_global_generator():
    torch.manual_seed(8)
    with rng.seeded(None):
        got = inits.get_scheme("uniform_").run(torch.empty(10), {})
    torch.manual_seed(8)
    assert torch.equal(got, torch.empty(10).uniform_())


def test_run_returns_new_tensor_and_leaves_target_alone():
    target = torch.full((3, 3), 7.0)
    with rng.seeded(0):
        out = inits.get_scheme("zeros_").run(target, {})
    assert torch.equal(out, torch.zeros(3, 3))
    assert torch.equal(target, torch.full((3, 3), 7.0))


# ------------------------------------------------------------------------------- rejects


@pytest.mark.parametrize("name", ["kaiming_normal", "calculate_gain", "_no_grad_uniform_",
                                  "uniform", "", "normal_ ", "os.system", "__class__"])
def test_unknown_scheme(name):
    with pytest.raises(InvalidArgumentError) as e:
        inits.get_scheme(name)
    assert e.value.reason == "UNKNOWN_INIT_SCHEME"


@pytest.mark.parametrize("name,args", [
    ("normal_", {"sigma": 1.0}),
    ("normal_", {"generator": 1}),
    ("normal_", {"tensor": 1}),
    ("constant_", {}),
    ("sparse_", {"std": 0.1}),
    ("uniform_", {"a": "0"}),
    ("uniform_", {"a": True}),
    ("uniform_", {"a": None}),
    ("uniform_", {"b": float("inf")}),
    ("normal_", {"std": float("nan")}),
    ("kaiming_uniform_", {"mode": "fan_avg"}),
    ("kaiming_uniform_", {"nonlinearity": "os.system"}),
    ("dirac_", {"groups": 0}),
    ("dirac_", {"groups": 1.0}),
    ("dirac_", {"groups": True}),
    ("constant_", {"val": [1]}),
], ids=lambda x: repr(x))
def test_bad_arguments(name, args):
    with pytest.raises(InvalidArgumentError) as e:
        inits.get_scheme(name).check_args(args)
    assert e.value.reason == "BAD_INIT_ARGS"


@pytest.mark.parametrize("name,shape,args", [
    ("eye_", (2, 3, 4), {}),
    ("dirac_", (3, 3), {}),
    ("dirac_", (5, 3, 3), {"groups": 2}),
    ("xavier_uniform_", (5,), {}),
    ("kaiming_normal_", (), {}),
    ("orthogonal_", (5,), {}),
    ("sparse_", (2, 3, 4), {"sparsity": 0.1}),
    ("trunc_normal_", (4,), {"a": 2.0, "b": 1.0}),
], ids=lambda x: repr(x))
def test_scheme_errors_on_shape_become_invalid_argument(name, shape, args):
    scheme = inits.get_scheme(name)
    with rng.seeded(0), pytest.raises(InvalidArgumentError) as e:
        scheme.run(torch.empty(shape), scheme.check_args(args))
    assert e.value.reason == "BAD_INIT_ARGS"


def test_int_args_accepted_as_numbers():
    args = inits.get_scheme("uniform_").check_args({"a": -1, "b": 1})
    assert args == {"a": -1, "b": 1}
    assert math.isfinite(args["a"])
