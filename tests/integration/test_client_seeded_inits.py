"""Client-seeded randomness: torch.nn.init.* and reset_parameters() on served parameters draw from
the caller's generator (the default one, or generator=), giving local torch's values bit for bit
and advancing the generator exactly as local torch does.

The in-process server shares this process's default generator, so the cases that could pass
without the state being sent draw from a separate generator (or move the default one away)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import init

from paramhub.errors import InvalidArgumentError


def _make() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.Conv1d(4, 4, 3))


# (function, target parameter, positional args after the tensor, keyword args)
CASES = [
    (init.uniform_, "0.weight", (-0.5, 0.5), {"a": -0.25, "b": 0.75}),
    (init.normal_, "0.weight", (0.0, 1.0), {"mean": 0.1, "std": 0.01}),
    (init.trunc_normal_, "0.weight", (0.0, 1.0, -1.5, 1.5), {"std": 0.2, "a": -0.3, "b": 0.3}),
    (init.constant_, "0.bias", (3.0,), {"val": -2.0}),
    (init.ones_, "0.bias", (), {}),
    (init.zeros_, "0.bias", (), {}),
    (init.eye_, "0.weight", (), {}),
    (init.dirac_, "1.weight", (), {"groups": 2}),
    (init.xavier_uniform_, "0.weight", (2.0,), {"gain": 0.5}),
    (init.xavier_normal_, "1.weight", (2.0,), {"gain": 0.5}),
    (init.kaiming_uniform_, "0.weight", (math.sqrt(5),),
     {"a": 0.1, "mode": "fan_out", "nonlinearity": "leaky_relu"}),
    (init.kaiming_normal_, "1.weight", (0, "fan_in", "relu"), {"nonlinearity": "relu"}),
    (init.orthogonal_, "0.weight", (1.5,), {"gain": 0.5}),
    (init.sparse_, "0.weight", (0.5, 0.02), {"sparsity": 0.4, "std": 0.1}),
]
RANDOM = {"uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_",
          "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_"}


def _param(module: nn.Module, name: str) -> torch.Tensor:
    return module.get_parameter(name)


def _run_both(client, fn, name, args, kwargs, *, generator: bool, seed: int = 7):
    """Runs fn locally and on the served copy of the same module; returns (local, served
    values, local generator state after, served generator state after)."""
    torch.manual_seed(0)
    local = _make()
    net = client.create_model("m", local)
    extra = {}
    if generator:
        g_local = torch.Generator().manual_seed(seed)
        extra = {"generator": g_local}
    torch.manual_seed(seed)
    with torch.no_grad():
        fn(_param(local, name), *args, **kwargs, **extra)
    state_local = (g_local if generator else torch.default_generator).get_state()
    if generator:
        g = torch.Generator().manual_seed(seed)
        extra = {"generator": g}
        # The default generator must not stand in for g; sparse_ draws its permutation from
        # the default generator even when given one (torch's own behaviour), so it keeps it.
        torch.manual_seed(seed if fn is init.sparse_ else seed + 1)
    else:
        torch.manual_seed(seed)
    fn(_param(net, name), *args, **kwargs, **extra)
    state = (g if generator else torch.default_generator).get_state()
    return _param(local, name).detach(), _param(net, name).fetch(), state_local, state


@pytest.mark.parametrize("fn,name,args,kwargs,style,generator", [
    pytest.param(*case, style, generator,
                 id=f"{case[0].__name__}-{style}-{'generator' if generator else 'default'}")
    for case in CASES for style in ("positional", "keyword") for generator in (False, True)
    if case[0].__name__ in RANDOM or not generator])
def test_init_on_served_parameter_equals_local_torch(client, fn, name, args, kwargs, style,
                                                     generator):
    want, got, state_local, state = _run_both(
        client, fn, name, args if style == "positional" else (),
        kwargs if style == "keyword" else {}, generator=generator)
    assert torch.equal(got, want)
    assert torch.equal(state, state_local)


def test_init_with_generator_leaves_default_generator_alone(client):
    net = client.create_model("m", _make())
    torch.manual_seed(3)
    before = torch.default_generator.get_state()
    init.normal_(net[0].weight, 0, 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.default_generator.get_state(), before)


def test_init_on_a_view_draws_like_local_torch(client):
    # Both were TypeErrors ("got multiple values for argument 'tensor'").
    torch.manual_seed(0)
    local = _make()
    net = client.create_model("m", local)
    with torch.no_grad():
        init.constant_(local[0].weight.data[0], 3.0)
        init.normal_(local[0].weight.data[1], 0, 1, generator=torch.Generator().manual_seed(2))
    init.constant_(net[0].weight.data[0], 3.0)
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(99)
    init.normal_(net[0].weight.data[1], 0, 1, generator=g)
    assert torch.equal(net[0].weight.fetch(), local[0].weight.detach())


def test_tensor_random_methods_draw_from_the_callers_generator(client):
    torch.manual_seed(0)
    local = _make()
    net = client.create_model("m", local)
    with torch.no_grad():
        local[0].weight.data.normal_(0, 0.01, generator=torch.Generator().manual_seed(4))
        local[0].bias.data.uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(50)
    net[0].weight.data.normal_(0, 0.01, generator=torch.Generator().manual_seed(4))
    net[0].bias.data.uniform_(-1, 1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(net[0].weight.fetch(), local[0].weight.detach())
    assert torch.equal(net[0].bias.fetch(), local[0].bias.detach())


def test_reset_parameters_equals_local_torch(client):
    torch.manual_seed(0)
    local = _make()
    net = client.create_model("m", local)
    torch.manual_seed(21)
    for m in local:
        m.reset_parameters()
    want = torch.default_generator.get_state()
    torch.manual_seed(21)
    for m in net:
        m.reset_parameters()
    assert torch.equal(torch.default_generator.get_state(), want)
    assert all(torch.equal(net.state_dict()[k].fetch(), v) for k, v in local.state_dict().items())


def test_init_inside_a_batch_draws_locally_and_equals_local_torch(client):
    torch.manual_seed(0)
    local = _make()
    net = client.create_model("m", local)
    torch.manual_seed(8)
    with torch.no_grad():
        init.xavier_uniform_(local[0].weight)
        init.normal_(local[1].weight)
    torch.manual_seed(8)
    version = client.model_version(net)
    with net.batch():
        init.xavier_uniform_(net[0].weight)
        init.normal_(net[1].weight)
    assert client.model_version(net) == version + 1
    assert torch.equal(net[0].weight.fetch(), local[0].weight.detach())
    assert torch.equal(net[1].weight.fetch(), local[1].weight.detach())


def test_apply_init_with_a_bad_generator_state_changes_nothing(client):
    from paramhub.common import pb

    net = client.create_model("m", _make())
    before = net[0].weight.fetch()
    request = pb.ApplyInitRequest(model="models/m", scheme="normal_",
                                  targets=[pb.InitTarget(parameter="0.weight")],
                                  generator_state=b"\x01" * 5056)
    for state in (b"\x01" * 5056, b"", b"\x00" * 5057):
        request.generator_state = state
        with pytest.raises(InvalidArgumentError) as e:
            client._call(client.stub.ApplyInit, request)
        assert e.value.reason == "BAD_GENERATOR_STATE"
    assert torch.equal(net[0].weight.fetch(), before)
