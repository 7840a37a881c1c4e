"""Model specs (paramhub._spec): allow-list, building, graph validation, ties, shared modules,
and spec_from_module round trips. No sockets."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import modules as _m

from paramhub import _codec, _spec
from paramhub.common import spec as plain_spec
from paramhub.errors import InvalidArgumentError, NotFoundError
from paramhub.v1 import parameter_service_pb2 as pb

# Constructor keyword arguments for every allow-listed class that needs some; classes absent
# here are built with no arguments. test_every_allowed_class_builds fails if a class is added
# to the allow-list that neither builds bare nor has an entry here.
CTOR_ARGS: dict[str, dict] = {
    **{f"AdaptiveAvgPool{d}d": {"output_size": 2} for d in (1, 2, 3)},
    **{f"AdaptiveMaxPool{d}d": {"output_size": 2} for d in (1, 2, 3)},
    **{f"AvgPool{d}d": {"kernel_size": 2} for d in (1, 2, 3)},
    **{f"MaxPool{d}d": {"kernel_size": 2} for d in (1, 2, 3)},
    **{f"MaxUnpool{d}d": {"kernel_size": 2} for d in (1, 2, 3)},
    **{f"LPPool{d}d": {"norm_type": 2.0, "kernel_size": 2} for d in (1, 2, 3)},
    "FractionalMaxPool2d": {"kernel_size": 2, "output_size": 3},
    "FractionalMaxPool3d": {"kernel_size": 2, "output_size": 3},
    **{f"BatchNorm{d}d": {"num_features": 4} for d in (1, 2, 3)},
    **{f"InstanceNorm{d}d": {"num_features": 4, "affine": True} for d in (1, 2, 3)},
    "Bilinear": {"in1_features": 3, "in2_features": 4, "out_features": 5},
    "ChannelShuffle": {"groups": 2},
    **{f"CircularPad{d}d": {"padding": 1} for d in (1, 2, 3)},
    **{f"ReflectionPad{d}d": {"padding": 1} for d in (1, 2, 3)},
    **{f"ReplicationPad{d}d": {"padding": 1} for d in (1, 2, 3)},
    **{f"ZeroPad{d}d": {"padding": 1} for d in (1, 2, 3)},
    **{f"ConstantPad{d}d": {"padding": 1, "value": 0.5} for d in (1, 2, 3)},
    **{f"Conv{d}d": {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 2}
       for d in (1, 2, 3)},
    **{f"ConvTranspose{d}d": {"in_channels": 4, "out_channels": 2, "kernel_size": 2,
                              "stride": 2} for d in (1, 2, 3)},
    "CrossMapLRN2d": {"size": 3},
    "LocalResponseNorm": {"size": 3},
    "Embedding": {"num_embeddings": 10, "embedding_dim": 3, "padding_idx": 0},
    "EmbeddingBag": {"num_embeddings": 10, "embedding_dim": 3, "mode": "sum"},
    "Fold": {"output_size": (4, 5), "kernel_size": 2},
    "Unfold": {"kernel_size": 2},
    "GroupNorm": {"num_groups": 2, "num_channels": 4},
    "LayerNorm": {"normalized_shape": (3, 4)},
    "RMSNorm": {"normalized_shape": 4},
    "Linear": {"in_features": 3, "out_features": 2},
    "MultiheadAttention": {"embed_dim": 8, "num_heads": 2, "kdim": 5, "vdim": 6},
    "PixelShuffle": {"upscale_factor": 2},
    "PixelUnshuffle": {"downscale_factor": 2},
    "RNN": {"input_size": 3, "hidden_size": 4, "num_layers": 2, "nonlinearity": "relu"},
    "LSTM": {"input_size": 3, "hidden_size": 4, "bidirectional": True, "proj_size": 2},
    "GRU": {"input_size": 3, "hidden_size": 4, "batch_first": True},
    "RNNCell": {"input_size": 3, "hidden_size": 4},
    "LSTMCell": {"input_size": 3, "hidden_size": 4},
    "GRUCell": {"input_size": 3, "hidden_size": 4},
    "Threshold": {"threshold": 0.1, "value": 20.0},
    "Transformer": {"d_model": 8, "nhead": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                    "dim_feedforward": 16},
    "TransformerEncoderLayer": {"d_model": 8, "nhead": 2, "dim_feedforward": 16},
    "TransformerDecoderLayer": {"d_model": 8, "nhead": 2, "dim_feedforward": 16,
                                "norm_first": True},
    "Unflatten": {"dim": 1, "unflattened_size": (2, 3)},
    "Upsample": {"scale_factor": 2.0},
    "PReLU": {"num_parameters": 3},
    "LazyLinear": {"out_features": 3},
    **{f"Lazy{kind}{d}d": {"out_channels": 2, "kernel_size": 3}
       for kind in ("Conv", "ConvTranspose") for d in (1, 2, 3)},
}


def node(type_: str, *args, children=(), **kwargs) -> pb.ModuleNode:
    """A ModuleNode from Python values."""
    n = pb.ModuleNode(type=type_, args=[_codec.value_to_proto(a) for a in args])
    for k, v in kwargs.items():
        n.kwargs[k].CopyFrom(_codec.value_to_proto(v))
    for name, i in children:
        n.children.add(name=name, node=i)
    return n


def spec_of(*nodes: pb.ModuleNode, root: int = 0, ties=()) -> pb.ModelSpec:
    """A ModelSpec from nodes (root defaults to node 0)."""
    return pb.ModelSpec(nodes=nodes, root=root,
                        ties=[pb.ParameterTie(parameter=p, source=s) for p, s in ties])


def state_bits(m: nn.Module) -> dict[str, bytes]:
    """state_dict as raw bytes per key (exact comparison, NaN-safe)."""
    return {k: _codec.tensor_to_proto(v).data for k, v in m.state_dict().items()
            if not isinstance(v, nn.parameter.UninitializedTensorMixin)}


def rejects(spec: pb.ModelSpec, reason: str = "BAD_SPEC") -> InvalidArgumentError:
    """Asserts build_module rejects the spec with `reason`; returns the error."""
    with pytest.raises(InvalidArgumentError) as e:
        _spec.build_module(spec)
    assert e.value.reason == reason
    assert e.value.code == "INVALID_ARGUMENT"
    return e.value


# ------------------------------------------------------------------------------- allow-list

REQUIRED = [
    "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
    "Embedding", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
    "FeatureAlphaDropout", "Flatten", "Unflatten", "Identity", "MaxPool1d", "MaxPool2d",
    "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d",
    "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d", "RNN",
    "LSTM", "GRU", "MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
    "Sequential", "ModuleList", "ModuleDict",
]


def test_allow_list_has_every_required_class():
    missing = [n for n in REQUIRED if n not in _spec.ALLOWED_MODULES]
    assert not missing


def test_allow_list_has_every_activation_and_dropout():
    for fam in (_m.activation, _m.dropout):
        for name in fam.__all__:
            assert _spec.ALLOWED_MODULES[name] is getattr(nn, name)


def test_allow_list_holds_only_torch_nn_module_classes():
    for name, cls in _spec.ALLOWED_MODULES.items():
        assert getattr(nn, name) is cls
        assert issubclass(cls, nn.Module) and cls is not nn.Module


LAZY = ["LazyLinear", "LazyConv1d", "LazyConv2d", "LazyConv3d", "LazyConvTranspose1d",
        "LazyConvTranspose2d", "LazyConvTranspose3d", "LazyBatchNorm1d", "LazyBatchNorm2d",
        "LazyBatchNorm3d", "LazyInstanceNorm1d", "LazyInstanceNorm2d", "LazyInstanceNorm3d"]


def test_allow_list_has_every_lazy_module():
    assert [n for n in LAZY if _spec.ALLOWED_MODULES.get(n) is not getattr(nn, n)] == []


@pytest.mark.parametrize("name", LAZY)
def test_lazy_module_spec_round_trip(name):
    local = _spec.ALLOWED_MODULES[name](**CTOR_ARGS.get(name, {}))
    spec = _spec.spec_from_module(local)
    with torch.device("meta"):
        built = _spec.build_module(spec)
    assert type(built) is type(local) and repr(built) == repr(local)
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in built.parameters())


@pytest.mark.parametrize("name", sorted(_spec.ALLOWED_MODULES))
def test_every_allowed_class_builds_like_local_torch(name):
    kwargs = CTOR_ARGS.get(name, {})
    cls = _spec.ALLOWED_MODULES[name]
    spec = spec_of(node(name, **kwargs)) if name not in _spec.CONTAINERS else spec_of(node(name))
    torch.manual_seed(11)
    built = _spec.build_module(spec)
    torch.manual_seed(11)
    local = cls(**kwargs)
    assert type(built) is cls
    assert repr(built) == repr(local)
    assert state_bits(built) == state_bits(local)


def test_positional_args_are_passed_in_order():
    m = _spec.build_module(spec_of(node("Conv2d", 3, 8, 5, stride=2)))
    assert (m.in_channels, m.out_channels, m.kernel_size, m.stride) == (3, 8, (5, 5), (2, 2))


def test_dtype_argument():
    m = _spec.build_module(spec_of(node("Linear", 2, 3, dtype=torch.float64)))
    assert m.weight.dtype is torch.float64


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "eval", "exec", "__import__",
                                  "torch.nn.Linear", "nn.Linear", "Module", "linear", "",
                                  "SyncBatchNorm", "TransformerEncoder",
                                  "ParameterList", "RNNBase", "Linear ", "subprocess.Popen"])
def test_unknown_class_is_rejected_by_name(name):
    err = rejects(spec_of(node("Sequential", children=[("0", 1)]), node(name)),
                  "MODULE_NOT_ALLOWED")
    assert repr(name) in err.message
    assert err.metadata["class"] == name


def test_unknown_class_is_rejected_before_anything_is_built():
    # The unknown class comes after a Linear: validation runs first, so torch draws nothing.
    spec = spec_of(node("Sequential", children=[("0", 1), ("1", 2)]), node("Linear", 2, 2),
                   node("os.system", "echo pwned"))
    state = torch.random.get_rng_state()
    rejects(spec, "MODULE_NOT_ALLOWED")
    assert torch.equal(torch.random.get_rng_state(), state)


# ------------------------------------------------------------------------------- bad specs


def test_empty_spec_is_rejected():
    rejects(pb.ModelSpec())


@pytest.mark.parametrize("root", [-1, 1, 7])
def test_bad_root_is_rejected(root):
    rejects(spec_of(node("Identity"), root=root))


@pytest.mark.parametrize("child", [-1, 2, 1000])
def test_bad_child_index_is_rejected(child):
    rejects(spec_of(node("Sequential", children=[("0", 1), ("1", child)]), node("ReLU")))


def test_self_cycle_is_rejected():
    err = rejects(spec_of(node("Sequential", children=[("0", 0)])))
    assert "cycle" in err.message


def test_long_cycle_is_rejected():
    err = rejects(spec_of(node("Sequential", children=[("a", 1)]),
                          node("Sequential", children=[("b", 2)]),
                          node("ModuleList", children=[("0", 3), ("1", 1)]),
                          node("ReLU")))
    assert "cycle" in err.message


def _chain(depth: int) -> pb.ModelSpec:
    nodes = [node("Sequential", children=[("0", i + 1)]) for i in range(depth - 1)]
    nodes.append(node("Identity"))
    return spec_of(*nodes)


def test_depth_limit():
    m = _spec.build_module(_chain(_spec.MAX_SPEC_DEPTH))
    assert len(list(m.modules())) == _spec.MAX_SPEC_DEPTH
    err = rejects(_chain(_spec.MAX_SPEC_DEPTH + 1))
    assert "deeper" in err.message


def test_node_count_limit(monkeypatch):
    monkeypatch.setattr(plain_spec, "MAX_SPEC_NODES", 3)
    _spec.build_module(spec_of(node("Sequential", children=[("0", 1), ("1", 2)]),
                               node("ReLU"), node("ReLU")))
    rejects(spec_of(node("Sequential", children=[("0", 1), ("1", 2), ("2", 3)]),
                    node("ReLU"), node("ReLU"), node("ReLU")))


def test_device_kwarg_is_rejected():
    rejects(spec_of(node("Linear", 2, 2, device="cpu")))


def test_container_args_are_rejected():
    rejects(spec_of(node("Sequential", 1)))
    rejects(spec_of(node("ModuleDict", modules=None)))


@pytest.mark.parametrize("n", [
    node("Linear", "a", 3), node("Linear", 2), node("Linear", 2, 3, bogus=1),
    node("Linear", -1, 3), node("Conv2d", 3, 4, 3, padding_mode="nope"),
    node("MultiheadAttention", 7, 2), node("Dropout", p=2.0), node("GroupNorm", 3, 4),
    node("TransformerEncoderLayer", 8, 2, activation="tanh"), node("LSTM", 3, 4, 1, True, True,
                                                                    0.0, False, 0, 9),
], ids=["str_arg", "missing_arg", "unknown_kwarg", "negative_size", "bad_padding_mode",
        "mha_indivisible", "dropout_p", "groupnorm_indivisible", "bad_activation",
        "too_many_args"])
def test_bad_constructor_arguments_are_rejected(n):
    err = rejects(spec_of(n))
    assert n.type in err.message
    assert err.metadata["class"] == n.type


@pytest.mark.parametrize("name", ["", "a.b", "weight"])
def test_bad_child_name_is_rejected(name):
    rejects(spec_of(node("Linear", 2, 2, children=[(name, 1)]), node("ReLU")))


def test_bad_value_in_args_is_rejected():
    n = node("Linear", 2, 2)
    n.args.add()  # an unset Value
    rejects(spec_of(n), "BAD_VALUE")


# ------------------------------------------------------------------------------- structure


def test_named_children_and_nesting():
    spec = spec_of(node("Sequential", children=[("block0", 1), ("block1", 3)]),
                   node("Sequential", children=[("0", 2)]), node("Linear", 4, 4),
                   node("ModuleDict", children=[("head", 4)]), node("Linear", 4, 2))
    m = _spec.build_module(spec)
    assert list(m._modules) == ["block0", "block1"]
    assert isinstance(m.block1["head"], nn.Linear)
    assert [n for n, _ in m.named_parameters()] == ["block0.0.weight", "block0.0.bias",
                                                   "block1.head.weight", "block1.head.bias"]


def test_shared_module_is_one_object():
    spec = spec_of(node("Sequential", children=[("0", 1), ("1", 2), ("2", 1)]),
                   node("Linear", 4, 4), node("ReLU"))
    m = _spec.build_module(spec)
    assert m[0] is m[2]
    assert len(list(m.parameters())) == 2


def test_root_need_not_be_first_node():
    spec = spec_of(node("Linear", 2, 3), node("Sequential", children=[("0", 0)]), root=1)
    m = _spec.build_module(spec)
    assert isinstance(m, nn.Sequential) and isinstance(m[0], nn.Linear)


def test_tie_makes_one_parameter():
    spec = spec_of(node("Sequential", children=[("0", 1), ("1", 2)]), node("Embedding", 10, 4),
                   node("Linear", 4, 10, bias=False), ties=[("1.weight", "0.weight")])
    m = _spec.build_module(spec)
    assert m[1].weight is m[0].weight
    assert len(list(m.parameters())) == 1


@pytest.mark.parametrize("tie", [("1.weight", "0.bias"), ("1.weight", "9.weight"),
                                 ("9.weight", "0.weight"), ("1.nothing", "0.weight"),
                                 ("0.running_mean", "0.weight"), ("1.weight", "")],
                         ids=["shape_mismatch", "unknown_source", "unknown_owner",
                              "unknown_parameter", "buffer_target", "empty_source"])
def test_bad_tie_is_rejected(tie):
    spec = spec_of(node("Sequential", children=[("0", 1), ("1", 2)]), node("BatchNorm1d", 4),
                   node("Linear", 4, 4), ties=[tie])
    rejects(spec)


def test_tie_dtype_mismatch_is_rejected():
    spec = spec_of(node("Sequential", children=[("0", 1), ("1", 2)]), node("Linear", 4, 4),
                   node("Linear", 4, 4, dtype=torch.float64), ties=[("1.weight", "0.weight")])
    rejects(spec)


def test_get_submodule_not_found():
    m = _spec.build_module(spec_of(node("Sequential", children=[("0", 1)]), node("ReLU")))
    assert _spec.get_submodule(m, "0") is m[0]
    assert _spec.get_submodule(m, "") is m
    with pytest.raises(NotFoundError) as e:
        _spec.get_submodule(m, "1")
    assert e.value.reason == "MODULE_NOT_FOUND"


# ------------------------------------------------------------------------------- spec_from_module


def _shared_seq():
    shared = nn.Linear(4, 4)
    return nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))


def _named_blocks():
    net = nn.Sequential()
    for i in range(3):
        block = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        net.add_module(f"block{i}", block)
    net.add_module("head", nn.Linear(4, 1))
    return net


def _tied_lm():
    emb = nn.Embedding(20, 6)
    head = nn.Linear(6, 20, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, nn.LayerNorm(6), head)


FACTORIES = {
    "Linear": lambda: nn.Linear(5, 3),
    "Linear_nobias": lambda: nn.Linear(5, 3, bias=False),
    "Linear_f64": lambda: nn.Linear(5, 3, dtype=torch.float64),
    "Conv2d": lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=1, groups=1),
    "Conv1d_grouped": lambda: nn.Conv1d(4, 8, 5, groups=4, padding_mode="reflect", padding=2),
    "ConvTranspose3d": lambda: nn.ConvTranspose3d(2, 4, 3, output_padding=1, stride=2),
    "LSTM": lambda: nn.LSTM(4, 6, num_layers=2, batch_first=True),
    "LSTM_proj_bi": lambda: nn.LSTM(4, 6, bidirectional=True, proj_size=3),
    "GRU": lambda: nn.GRU(3, 5, bias=False, dropout=0.1, num_layers=2),
    "RNN": lambda: nn.RNN(3, 5, nonlinearity="relu"),
    "BatchNorm2d": lambda: nn.BatchNorm2d(6, momentum=0.2, affine=True),
    "BatchNorm1d_noaffine": lambda: nn.BatchNorm1d(6, affine=False, track_running_stats=True),
    "LayerNorm": lambda: nn.LayerNorm([3, 4], elementwise_affine=True),
    "GroupNorm": lambda: nn.GroupNorm(2, 6),
    "MultiheadAttention": lambda: nn.MultiheadAttention(8, 2, batch_first=True),
    "MultiheadAttention_kv": lambda: nn.MultiheadAttention(8, 4, kdim=5, vdim=3,
                                                           add_bias_kv=True),
    "TransformerEncoderLayer": lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0),
    "TransformerEncoderLayer_gelu": lambda: nn.TransformerEncoderLayer(
        8, 2, 16, activation="gelu", norm_first=True, batch_first=True),
    "TransformerDecoderLayer": lambda: nn.TransformerDecoderLayer(8, 2, 16),
    "Embedding": lambda: nn.Embedding(12, 4, padding_idx=1, max_norm=2.0),
    "Bilinear": lambda: nn.Bilinear(3, 4, 2),
    "Flatten_Unflatten": lambda: nn.Sequential(nn.Flatten(1), nn.Unflatten(1, (2, 6))),
    "pooling": lambda: nn.Sequential(nn.MaxPool2d(2, stride=1), nn.AvgPool1d(3),
                                     nn.AdaptiveAvgPool2d((1, 1))),
    "activations": lambda: nn.Sequential(nn.LeakyReLU(0.2), nn.PReLU(3), nn.Softmax(dim=-1),
                                         nn.GELU("tanh"), nn.Hardtanh(-2.0, 2.0)),
    "ModuleList": lambda: nn.ModuleList([nn.Linear(2, 2), nn.Tanh()]),
    "ModuleDict": lambda: nn.ModuleDict({"enc": nn.Linear(2, 3), "dec": nn.Linear(3, 2)}),
    "named_blocks": _named_blocks,
    "shared_module": _shared_seq,
    "tied_weights": _tied_lm,
    "mlp_d2l": lambda: nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10)),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_spec_from_module_round_trip(name):
    factory = FACTORIES[name]
    torch.manual_seed(5)
    local = factory()
    spec = _spec.spec_from_module(local)
    wire = pb.ModelSpec.FromString(spec.SerializeToString())
    # Rebuilt from the spec under the same seed: same repr, names, shapes, ties, and bits.
    torch.manual_seed(5)
    rebuilt = _spec.build_module(wire)
    assert repr(rebuilt) == repr(local)
    assert state_bits(rebuilt) == state_bits(local)
    assert len(plain_spec._tensor_groups(rebuilt)) == len(plain_spec._tensor_groups(local))
    # Module sharing is kept: same paths are the same objects.
    local_groups = {}
    for path, mod in local.named_modules(remove_duplicate=False):
        local_groups.setdefault(id(mod), []).append(path)
    rebuilt_groups = {}
    for path, mod in rebuilt.named_modules(remove_duplicate=False):
        rebuilt_groups.setdefault(id(mod), []).append(path)
    assert sorted(local_groups.values()) == sorted(rebuilt_groups.values())


def test_spec_from_module_meta_device():
    with torch.device("meta"):
        local = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    spec = _spec.spec_from_module(local)
    assert [n.type for n in spec.nodes] == ["Sequential", "Linear", "BatchNorm1d"]


def test_spec_from_module_ties_and_shared_nodes():
    spec = _spec.spec_from_module(_tied_lm())
    assert [(t.parameter, t.source) for t in spec.ties] == [("2.weight", "0.weight")]
    spec = _spec.spec_from_module(_shared_seq())
    root = spec.nodes[spec.root]
    assert root.children[0].node == root.children[2].node
    assert not spec.ties  # shared modules need no tie


def test_spec_from_module_rejects_custom_class():
    class MyLinear(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

    for m in (MyLinear(2, 2), nn.Sequential(MyLinear(2, 2)), Net()):
        with pytest.raises(InvalidArgumentError) as e:
            _spec.spec_from_module(m)
        assert e.value.reason == "MODULE_NOT_ALLOWED"


def test_spec_from_module_rejects_modules_changed_after_construction():
    m = nn.Linear(3, 3)
    m.extra = nn.ReLU()  # a child torch did not put there
    spec = _spec.spec_from_module(m)  # describable: the child becomes an explicit child
    assert repr(_spec.build_module(spec)) == repr(m)
    m2 = nn.Linear(3, 3)
    m2.weight = nn.Parameter(torch.zeros(5, 3))  # shape no longer matches the arguments
    with pytest.raises(InvalidArgumentError) as e:
        _spec.spec_from_module(m2)
    assert e.value.reason == "BAD_SPEC"


def test_spec_from_module_rejects_custom_activation_callable():
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation=torch.tanh)
    with pytest.raises(InvalidArgumentError) as e:
        _spec.spec_from_module(layer)
    assert e.value.reason == "BAD_SPEC"


# The core holds specs as dataclasses and persists them as JSON; data directories written when
# the core persisted the ModelSpec message (json_format.MessageToDict) must read the same.
_ODD_VALUES = [None, True, False, 0, -3, 2**62, 0.0, -1.5, float("nan"), float("inf"),
               float("-inf"), "", "relu", torch.float64, torch.bfloat16, [], (), [1, (2.5, "x")],
               torch.arange(6, dtype=torch.int32).reshape(2, 3), torch.tensor(1.25),
               torch.zeros(0, 2), torch.tensor([True, False])]


def _same_values(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same_values(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", list(FACTORIES))
def test_spec_json_is_the_messages_json(name):
    from google.protobuf import json_format

    plain = plain_spec.spec_from_module(FACTORIES[name]())
    message = _spec.spec_to_proto(plain)
    assert plain_spec.spec_to_json(plain) == json_format.MessageToDict(message)
    assert plain_spec.spec_from_json(json_format.MessageToDict(message)) == plain
    assert _spec.spec_from_proto(message) == plain


def test_spec_json_values_of_every_kind():
    from google.protobuf import json_format

    plain = plain_spec.ModelSpec(
        nodes=[plain_spec.ModuleNode("Sequential", args=list(_ODD_VALUES),
                                     kwargs={f"k{i}": v for i, v in enumerate(_ODD_VALUES)},
                                     children=[plain_spec.ModuleChild("0", 1),
                                               plain_spec.ModuleChild("", 0)]),
               plain_spec.ModuleNode("ReLU")],
        root=1, ties=[plain_spec.ParameterTie("a", "b"), plain_spec.ParameterTie("", "c")])
    message = _spec.spec_to_proto(plain)
    as_json = json_format.MessageToDict(message)
    assert plain_spec.spec_to_json(plain) == as_json
    for back in (plain_spec.spec_from_json(as_json), _spec.spec_from_proto(message),
                 plain_spec.spec_from_json(json.loads(json.dumps(as_json)))):
        assert back.root == 1 and back.ties == plain.ties and back.nodes[1] == plain.nodes[1]
        assert back.nodes[0].children == plain.nodes[0].children
        assert all(_same_values(a, b) for a, b in zip(back.nodes[0].args, _ODD_VALUES))
        assert all(_same_values(back.nodes[0].kwargs[k], v)
                   for k, v in plain.nodes[0].kwargs.items())
