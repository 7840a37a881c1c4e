"""ApplyInit through the real SDK: every scheme seeded against torch.nn.init, every kind of
target, all-or-nothing failures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _core_helpers import bits, create, raises, read_all, unchanged
from paramhub.errors import ConflictError, InvalidArgumentError, NotFoundError
from paramhub.common import pb


def P(name: str) -> pb.InitTarget:
    return pb.InitTarget(parameter=name)


def G(pattern: str) -> pb.InitTarget:
    return pb.InitTarget(glob=pattern)


def M(path: str = "", module_class: str = "", parameter: str = "") -> pb.InitTarget:
    return pb.InitTarget(module=pb.ModuleSelector(path=path, module_class=module_class,
                                                  parameter=parameter))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Conv1d(2, 4, 3),
                         nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)), nn.Linear(6, 2))


@pytest.fixture
def local(client):
    m = _net()
    create(client, "m", m, upload=True)
    return m


SCHEMES = {
    "uniform_": ("0.weight", {"a": -2.0, "b": 3.0}),
    "normal_": ("0.weight", {"mean": 1.0, "std": 0.5}),
    "trunc_normal_": ("0.weight", {"std": 2.0, "a": -1.0, "b": 1.0}),
    "constant_": ("0.bias", {"val": 0.25}),
    "ones_": ("0.bias", {}),
    "zeros_": ("0.weight", {}),
    "eye_": ("0.weight", {}),
    "dirac_": ("2.weight", {"groups": 2}),
    "xavier_uniform_": ("2.weight", {"gain": 1.5}),
    "xavier_normal_": ("0.weight", {}),
    "kaiming_uniform_": ("2.weight", {"a": 0.2, "mode": "fan_out", "nonlinearity": "leaky_relu"}),
    "kaiming_normal_": ("0.weight", {"nonlinearity": "relu"}),
    "orthogonal_": ("3.0.weight", {"gain": 2.0}),
    "sparse_": ("0.weight", {"sparsity": 0.5, "std": 0.1}),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_apply_init_every_scheme_matches_torch_nn_init(client, local, scheme):
    name, args = SCHEMES[scheme]
    response = client.apply_init("m", scheme, [P(name)], args, seed=77)
    assert [(u.name, u.version) for u in response.updated] == [(name, 1)]
    assert response.model_version == 1
    torch.manual_seed(77)
    expected = local.get_parameter(name).detach().clone()
    getattr(nn.init, scheme)(expected, **args)
    remote = read_all(client, "m")
    assert bits(remote[name]) == bits(expected)
    # Only the target changed.
    for key, value in local.state_dict().items():
        if key != name:
            assert bits(remote[key]) == bits(value), key


def test_apply_init_targets_in_order_draw_like_local_calls(client, local):
    targets = [P("4.weight"), G("*.bias"), M(path="3", module_class="Linear")]
    response = client.apply_init("m", "normal_", targets, {"std": 0.1}, seed=5)
    order = ["4.weight", "0.bias", "2.bias", "3.0.bias", "3.1.bias", "4.bias", "3.0.weight"]
    assert [u.name for u in response.updated] == order
    torch.manual_seed(5)
    for name in order:
        nn.init.normal_(local.get_parameter(name).detach(), std=0.1)
    remote = read_all(client, "m")
    for key, value in local.state_dict().items():
        assert bits(remote[key]) == bits(value), key


@pytest.mark.parametrize("init_target,selected", [
    (P("3.1.weight"), ["3.1.weight"]),
    (G("3.*"), ["3.0.weight", "3.0.bias", "3.1.weight", "3.1.bias"]),
    (G("*.weight"), ["0.weight", "2.weight", "3.0.weight", "3.1.weight", "4.weight"]),
    (M(), ["0.weight", "0.bias", "2.weight", "2.bias", "3.0.weight", "3.0.bias", "3.1.weight",
           "3.1.bias", "4.weight", "4.bias"]),
    (M(module_class="Linear", parameter="weight"), ["0.weight", "3.0.weight", "4.weight"]),
    (M(path="3"), ["3.0.weight", "3.0.bias", "3.1.weight", "3.1.bias"]),
    (M(path="3.0", parameter="bias"), ["3.0.bias"]),
    (M(module_class="BatchNorm1d"), ["3.1.weight", "3.1.bias"]),
], ids=["parameter", "glob_prefix", "glob_weights", "all", "linear_weights", "subtree",
        "module_param", "by_class"])
def test_apply_init_target_kinds(client, local, init_target, selected):
    response = client.apply_init("m", "constant_", [init_target], {"val": 3.0})
    assert [u.name for u in response.updated] == selected
    remote = read_all(client, "m")
    for key, value in local.state_dict().items():
        if key in selected:
            assert torch.equal(remote[key], torch.full_like(value, 3.0)), key
        else:
            assert bits(remote[key]) == bits(value), key  # buffers and the rest untouched


def test_apply_init_storage_selected_twice_is_initialized_once(client):
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    shared = nn.Linear(3, 3)
    create(client, "t", nn.Sequential(emb, head, shared, shared), seed=0)
    response = client.apply_init("t", "normal_", [G("*weight"), P("0.weight")], seed=1)
    assert [u.name for u in response.updated] == ["0.weight", "2.weight"]
    assert [u.version for u in response.updated] == [1, 1]
    torch.manual_seed(1)
    w0 = nn.init.normal_(torch.empty(5, 4))
    w2 = nn.init.normal_(torch.empty(3, 3))
    remote = read_all(client, "t")
    assert bits(remote["1.weight"]) == bits(remote["0.weight"]) == bits(w0)
    assert bits(remote["3.weight"]) == bits(remote["2.weight"]) == bits(w2)


def test_apply_init_expected_model_version(client, local):
    request = pb.ApplyInitRequest(model="models/m", scheme="zeros_", targets=[P("0.bias")],
                                  expected_model_version=0)
    assert client._call(client.stub.ApplyInit, request).model_version == 1
    with unchanged(client, "m"), raises(ConflictError, "VERSION_MISMATCH") as e:
        client._call(client.stub.ApplyInit, request)
    assert e.value.metadata["version"] == "1"


def test_apply_init_unseeded_uses_fresh_randomness(client, local):
    client.apply_init("m", "normal_", [P("0.weight")])
    a = client.get_tensor("m", "0.weight")[0]
    client.apply_init("m", "normal_", [P("0.weight")])
    b = client.get_tensor("m", "0.weight")[0]
    assert not torch.equal(a, b)


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("scheme", ["normal", "calculate_gain", "os.system", "", "Normal_"])
def test_apply_init_unknown_scheme(client, local, scheme):
    with unchanged(client, "m"), raises(InvalidArgumentError, "UNKNOWN_INIT_SCHEME"):
        client.apply_init("m", scheme, [P("0.weight")])


@pytest.mark.parametrize("scheme,args,targets", [
    ("normal_", {"sigma": 1.0}, [P("0.weight")]),
    ("constant_", {}, [P("0.weight")]),
    ("uniform_", {"a": "x"}, [P("0.weight")]),
    ("normal_", {"std": float("nan")}, [P("0.weight")]),
    ("kaiming_normal_", {"mode": "sideways"}, [P("0.weight")]),
    # Fails on the second target (a 1-d bias): the first must not be written either.
    ("xavier_uniform_", {}, [P("0.weight"), P("0.bias")]),
    ("eye_", {}, [M(module_class="Linear")]),
    ("dirac_", {}, [P("0.weight")]),
], ids=["unknown_arg", "missing_arg", "string_number", "nan", "bad_mode", "1d_second_target",
        "eye_on_bias", "dirac_on_2d"])
def test_apply_init_bad_arguments_change_nothing(client, local, scheme, args, targets):
    with unchanged(client, "m"), raises(InvalidArgumentError, "BAD_INIT_ARGS"):
        client.apply_init("m", scheme, targets, args, seed=0)


@pytest.mark.parametrize("targets,reason", [
    ([P("0.weight"), P("9.weight")], "TENSOR_NOT_FOUND"),
    ([G("nothing.*")], "TENSOR_NOT_FOUND"),
    ([G("*.running_mean")], "TENSOR_NOT_FOUND"),  # buffers are not init targets
    ([M(path="9")], "MODULE_NOT_FOUND"),
    ([M(module_class="Conv2d")], "TENSOR_NOT_FOUND"),
    ([M(path="1")], "TENSOR_NOT_FOUND"),  # ReLU has no parameters
    ([], "TENSOR_NOT_FOUND"),
], ids=["unknown_parameter", "empty_glob", "buffer_glob", "unknown_path", "absent_class",
        "parameterless", "no_targets"])
def test_apply_init_targets_not_found_change_nothing(client, local, targets, reason):
    with unchanged(client, "m"), raises(NotFoundError, reason):
        client.apply_init("m", "zeros_", targets)


def test_apply_init_target_without_selector(client, local):
    with unchanged(client, "m"), raises(InvalidArgumentError, "BAD_ARGUMENT"):
        client.apply_init("m", "zeros_", [P("0.weight"), pb.InitTarget()])


def test_apply_init_unknown_model(client):
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.apply_init("ghost", "zeros_", [P("0.weight")])
