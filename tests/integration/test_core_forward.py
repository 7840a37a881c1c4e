"""Forward, CheckShared and SetTrainingMode through the real SDK."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _core_helpers import bits, create, raises, read_all, snapshot, unchanged
from paramhub import _codec
from paramhub.errors import InvalidArgumentError, NotFoundError
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                         nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3))


@pytest.fixture
def mlp(client):
    m = _mlp()
    create(client, "mlp", m, upload=True)
    return m


# ------------------------------------------------------------------------------- Forward


def test_forward_whole_model_matches_local(client, mlp):
    x = torch.randn(5, 4)
    assert bits(client.forward("mlp", x)) == bits(mlp(x).detach())


def test_forward_submodule_path(client, mlp):
    x = torch.randn(2, 8)
    assert bits(client.forward("mlp", x, module_path="2")) == bits(mlp[2](x).detach())
    assert bits(client.forward("mlp", x, module_path="2.0")) == bits(mlp[2][0](x).detach())


def test_forward_reports_model_version(client, mlp):
    client.set_slice("mlp", "0.bias", 0, 1.0)
    request = pb.ForwardRequest(model="models/mlp",
                                args=[_codec.value_to_proto(torch.zeros(1, 4))])
    assert client._call(client.stub.Forward, request).model_version == 1


def test_forward_sees_writes(client, mlp):
    client.set_slice("mlp", "3.bias", None, 100.0, op="add")
    x = torch.randn(1, 4)
    with torch.no_grad():
        mlp[3].bias += 100.0
    assert bits(client.forward("mlp", x)) == bits(mlp(x))


def test_forward_lstm_tuple_outputs_and_state_inputs(client):
    torch.manual_seed(1)
    lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)
    create(client, "lstm", lstm, upload=True)
    x = torch.randn(3, 5, 4)
    out, (h, c) = client.forward("lstm", x)
    with torch.no_grad():  # the server runs without autograd, whose kernels round differently
        e_out, (e_h, e_c) = lstm(x)
    assert bits(out) == bits(e_out.detach())
    assert bits(h) == bits(e_h.detach()) and bits(c) == bits(e_c.detach())
    state = (torch.randn(2, 3, 6), torch.randn(2, 3, 6))
    out2, (h2, c2) = client.forward("lstm", x, state)
    with torch.no_grad():
        e_out2, (e_h2, e_c2) = lstm(x, state)
    assert bits(out2) == bits(e_out2.detach()) and bits(c2) == bits(e_c2.detach())


def test_forward_lstm_inside_a_module_dict(client):
    torch.manual_seed(2)
    net = nn.ModuleDict({"rnn": nn.GRU(3, 4), "head": nn.Linear(4, 1)})
    create(client, "md", net, upload=True)
    x = torch.randn(7, 2, 3)
    out, h = client.forward("md", x, module_path="rnn")
    e_out, e_h = net["rnn"](x)
    assert bits(out) == bits(e_out.detach()) and bits(h) == bits(e_h.detach())


def test_forward_keyword_inputs_and_none_output(client):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    create(client, "mha", mha, upload=True)
    q = torch.randn(2, 4, 8)
    out, weights = client.forward("mha", q, q, q, need_weights=False)
    with torch.no_grad():
        e_out, _ = mha(q, q, q, need_weights=False)
    assert weights is None
    # Attention's reductions may be split across threads differently: close, not bitwise.
    assert torch.allclose(out, e_out, atol=1e-6)
    out, weights = client.forward("mha", q, q, q, average_attn_weights=False)
    assert weights.shape == (2, 2, 4, 4)


def test_forward_transformer_layer_eval(client):
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    create(client, "tf", layer, upload=True)
    client.set_training("tf", False)
    x = torch.randn(2, 5, 8)
    assert torch.allclose(client.forward("tf", x), layer(x).detach(), atol=1e-6)


@pytest.mark.parametrize("args,kwargs", [
    ((torch.randn(2, 5),), {}),  # wrong feature size
    ((torch.randn(2, 4, dtype=torch.float64),), {}),  # wrong dtype
    ((), {}),  # missing input
    ((torch.randn(2, 4), torch.randn(2, 4)), {}),  # too many inputs
    ((torch.randn(2, 4),), {"scale": 2.0}),  # unknown keyword
    (("text",), {}),  # not a tensor
    ((torch.zeros(2, 4, dtype=torch.bool),), {}),
], ids=["shape", "dtype", "missing", "extra", "kwarg", "string", "bool"])
def test_forward_wrong_inputs(client, mlp, args, kwargs):
    with unchanged(client, "mlp"), raises(InvalidArgumentError, "BAD_INPUT") as e:
        client.forward("mlp", *args, **kwargs)
    assert "forward" in str(e.value)


def test_forward_embedding_index_out_of_range(client):
    create(client, "emb", nn.Embedding(5, 2), seed=0)
    with unchanged(client, "emb"), raises(InvalidArgumentError, "BAD_INPUT"):
        client.forward("emb", torch.tensor([1, 5]))


def test_forward_container_without_forward(client):
    create(client, "ml", nn.ModuleList([nn.Linear(2, 2)]), seed=0)
    with raises(InvalidArgumentError, "BAD_INPUT"):
        client.forward("ml", torch.zeros(1, 2))
    assert client.forward("ml", torch.zeros(1, 2), module_path="0").shape == (1, 2)


def test_forward_malformed_value(client, mlp):
    request = pb.ForwardRequest(model="models/mlp", args=[tpb.Value()])
    with raises(InvalidArgumentError, "BAD_VALUE"):
        client._call(client.stub.Forward, request)


def test_forward_not_found(client, mlp):
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.forward("ghost", torch.zeros(1, 4))
    with raises(NotFoundError, "MODULE_NOT_FOUND") as e:
        client.forward("mlp", torch.zeros(1, 4), module_path="2.5")
    assert e.value.metadata["module"] == "2.5"
    with raises(NotFoundError, "MODULE_NOT_FOUND"):
        client.forward("mlp", torch.zeros(1, 4), module_path="0.weight")


# ------------------------------------------------------------------------------- BatchNorm


def _bn_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())


def test_forward_training_mode_updates_batchnorm_buffers(client):
    local = _bn_net()
    create(client, "bn", local, upload=True)
    x = torch.randn(8, 3)
    before = snapshot(client, "bn")
    y = client.forward("bn", x)
    assert bits(y) == bits(local(x).detach())  # the local copy is in training mode too
    remote = read_all(client, "bn")
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert bits(remote[key]) == bits(local.state_dict()[key]), key
    after = snapshot(client, "bn")
    assert after.model_version == before.model_version + 1
    assert after.versions["1.running_mean"] == before.versions["1.running_mean"] + 1
    assert after.versions["0.weight"] == before.versions["0.weight"]


def test_forward_eval_mode_uses_and_keeps_running_stats(client):
    local = _bn_net()
    create(client, "bn", local, upload=True)
    client.set_slice("bn", "1.running_mean", None, torch.tensor([1.0, 2.0, 3.0, 4.0]),
                     kind="buffers")
    client.set_training("bn", False)
    with torch.no_grad():
        local[1].running_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    local.eval()
    x = torch.randn(8, 3)
    with unchanged(client, "bn"):
        assert bits(client.forward("bn", x)) == bits(local(x).detach())


def test_forward_failing_in_training_mode_leaves_buffers_alone(client):
    # BatchNorm runs (and would update its running stats) before the Linear after it fails.
    net = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(5, 2))
    create(client, "half", net, seed=0)
    with unchanged(client, "half"), raises(InvalidArgumentError, "BAD_INPUT"):
        client.forward("half", torch.randn(6, 4))


def test_set_training_mode_submodule(client):
    create(client, "bn", _bn_net(), seed=0)
    client.set_training("bn", False, module_path="1")
    modes = {m.path: m.training for m in client.describe_model("bn").modules}
    assert modes == {"": True, "0": True, "1": False, "2": True}
    x = torch.randn(8, 3)
    with unchanged(client, "bn"):  # only BatchNorm has buffers, and it is in eval mode
        client.forward("bn", x)
    client.set_training("bn", False)
    assert not any(m.training for m in client.describe_model("bn").modules)
    client.set_training("bn", True)
    assert all(m.training for m in client.describe_model("bn").modules)


def test_set_training_mode_not_found(client):
    create(client, "bn", _bn_net(), seed=0)
    with unchanged(client, "bn"), raises(NotFoundError, "MODULE_NOT_FOUND"):
        client.set_training("bn", False, module_path="7")
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.set_training("ghost", False)


# ------------------------------------------------------------------------------- CheckShared


def _shared_net() -> nn.Module:
    torch.manual_seed(6)
    emb, head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)
    head.weight = emb.weight
    shared = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    return nn.Sequential(emb, shared, nn.ReLU(), shared, head)


def test_check_shared_tied_weights_and_shared_modules(client):
    create(client, "s", _shared_net(), seed=0)
    assert client.check_shared("s", "0.weight", "4.weight") is True
    assert client.check_shared("s", "1.0.weight", "3.0.weight") is True
    assert client.check_shared("s", "1.0.bias", "3.0.bias") is True
    assert client.check_shared("s", "0.weight", "4.weight", "1.0.weight") is False
    assert client.check_shared("s", "1.0.weight", "1.0.bias") is False
    assert client.check_shared("s", "1.1.running_mean", "3.1.running_mean") is True
    groups = client.shared_groups("s")
    assert sorted(groups) == sorted([
        ["0.weight", "4.weight"], ["1.0.weight", "3.0.weight"], ["1.0.bias", "3.0.bias"],
        ["1.1.weight", "3.1.weight"], ["1.1.bias", "3.1.bias"],
        ["1.1.running_mean", "3.1.running_mean"], ["1.1.running_var", "3.1.running_var"],
        ["1.1.num_batches_tracked", "3.1.num_batches_tracked"]])


def test_check_shared_matches_torch_identity(client):
    local = _shared_net()
    create(client, "s", local, upload=True)
    names = [n for n, _ in local.named_parameters(remove_duplicate=False)]
    for a in names:
        for b in names:
            if a < b:
                expected = local.get_parameter(a) is local.get_parameter(b)
                assert client.check_shared("s", a, b) is expected, (a, b)


def test_check_shared_nothing_shared(client):
    create(client, "n", nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), seed=0)
    assert client.check_shared("n", "0.weight", "1.weight") is False
    assert client.shared_groups("n") == []
    assert client.check_shared("n", "0.weight", "0.weight") is True  # a name with itself


def test_check_shared_errors(client):
    create(client, "s", _shared_net(), seed=0)
    with raises(InvalidArgumentError, "BAD_ARGUMENT"):
        client.check_shared("s", "0.weight")
    with raises(InvalidArgumentError, "BAD_ARGUMENT"):
        client.check_shared("s")
    with raises(NotFoundError, "TENSOR_NOT_FOUND"):
        client.check_shared("s", "0.weight", "9.weight")
    with raises(NotFoundError, "MODEL_NOT_FOUND"):
        client.check_shared("ghost", "0.weight", "4.weight")
