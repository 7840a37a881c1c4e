"""Model specs: a declarative module tree over an allow-list of torch.nn classes, as plain
dataclasses (no protobuf: the server's core holds and persists them; paramhub._spec converts
to and from the ModelSpec message, paramhub_server.api.serde too).

Used by both sides: the server builds real modules from a spec; the SDK turns a local module
into a spec (`spec_from_module`) and builds the meta-device skeleton of a remote model from the
spec the server describes (`build_module`). Nothing here imports, unpickles or executes anything
named by the client: class names are looked up in `ALLOWED_MODULES`, arguments are plain values.

Why ~600 lines: one concept in both directions (module -> spec -> module) and its JSON form:
the constructor-argument readers of `spec_from_module` must agree with `build_module`, and the
JSON codec with both.
"""

from __future__ import annotations

import base64
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import modules as _m

from paramhub.common.dtypes import DTYPES, dtype_from_proto
from paramhub.common.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError

__all__ = ["ModelSpec", "ModuleNode", "ModuleChild", "ParameterTie", "ALLOWED_MODULES",
           "CONTAINERS", "build_module", "spec_from_module", "validate_spec", "check_spec_limits",
           "apply_ties", "get_submodule", "spec_to_json", "spec_from_json", "MAX_SPEC_NODES",
           "MAX_SPEC_DEPTH"]


@dataclass
class ModuleChild:
    """A child module: its attribute name and its node's index."""

    name: str
    node: int


@dataclass
class ParameterTie:
    """`parameter` is the same Parameter object as `source` (state_dict names)."""

    parameter: str
    source: str


@dataclass
class ModuleNode:
    """One module: its torch.nn class name, constructor arguments (plain Python values: None,
    bool, int, float, str, torch.dtype, tensors, lists and tuples of them) and children."""

    type: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    children: list[ModuleChild] = field(default_factory=list)


@dataclass
class ModelSpec:
    """A module tree: nodes (shared modules are one node reached from several parents), the
    root's index, and tied parameters. Empty for models not built from a spec."""

    nodes: list[ModuleNode] = field(default_factory=list)
    root: int = 0
    ties: list[ParameterTie] = field(default_factory=list)

#: Containers: built empty, their children come from the spec.
CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")

# Module families allowed wholesale, minus classes that cannot be described by plain values
# (SyncBatchNorm needs a process group; TransformerEncoder/Decoder take a module instance as a
# constructor argument; bases and parameter containers). Lazy modules (LazyLinear, LazyConv2d,
# LazyBatchNorm1d, ...) are served as in torch: their first Forward materializes them.
_FAMILIES = (_m.activation, _m.pooling, _m.dropout, _m.conv, _m.batchnorm, _m.normalization,
             _m.linear, _m.sparse, _m.rnn, _m.flatten, _m.container, _m.transformer, _m.padding,
             _m.instancenorm, _m.pixelshuffle, _m.upsampling, _m.channelshuffle, _m.distance,
             _m.fold)
_EXCLUDED = {"SyncBatchNorm", "TransformerEncoder", "TransformerDecoder", "Container",
             "RNNBase", "RNNCellBase", "ParameterList", "ParameterDict"}

#: class name -> class, the only classes a spec may name.
ALLOWED_MODULES: dict[str, type[nn.Module]] = {
    name: getattr(nn, name)
    for fam in _FAMILIES for name in fam.__all__
    if name not in _EXCLUDED
}

MAX_SPEC_NODES = 100_000
MAX_SPEC_DEPTH = 64


# ---------------------------------------------------------------------------------------------
# Building


def validate_spec(spec: ModelSpec) -> None:
    """Checks the spec's graph without building anything: node count, indices, cycles, depth,
    and that every class is allow-listed. Raises InvalidArgumentError."""
    n = len(spec.nodes)
    if n == 0:
        raise InvalidArgumentError("the spec has no modules", reason="BAD_SPEC")
    if n > MAX_SPEC_NODES:
        raise InvalidArgumentError(f"the spec has {n} modules, more than {MAX_SPEC_NODES}",
                                   reason="BAD_SPEC")
    if not 0 <= spec.root < n:
        raise InvalidArgumentError(f"spec root {spec.root} is not a node index", reason="BAD_SPEC")
    for i, node in enumerate(spec.nodes):
        if node.type not in ALLOWED_MODULES:
            raise InvalidArgumentError(
                f"module class {node.type!r} is not allow-listed (node {i})",
                reason="MODULE_NOT_ALLOWED", metadata={"class": node.type[:200]})
        if "device" in node.kwargs:
            raise InvalidArgumentError(f"{node.type}: the 'device' argument is chosen by the "
                                       "server, not the spec", reason="BAD_SPEC")
        for child in node.children:
            if not 0 <= child.node < n:
                raise InvalidArgumentError(f"{node.type} child {child.name!r} points to node "
                                           f"{child.node}, which does not exist",
                                           reason="BAD_SPEC")
    # Depth-first walk from the root with an explicit stack: detects cycles and measures depth.
    state = [0] * n  # 0 unseen, 1 on the current path, 2 done
    stack: list[tuple[int, int, int]] = [(spec.root, 0, 1)]
    state[spec.root] = 1
    while stack:
        node_i, child_pos, depth = stack.pop()
        children = spec.nodes[node_i].children
        if child_pos < len(children):
            stack.append((node_i, child_pos + 1, depth))
            nxt = children[child_pos].node
            if state[nxt] == 1:
                raise InvalidArgumentError("the spec's module graph has a cycle",
                                           reason="BAD_SPEC")
            if state[nxt] == 0:
                if depth + 1 > MAX_SPEC_DEPTH:
                    raise InvalidArgumentError(f"the spec is nested deeper than {MAX_SPEC_DEPTH}",
                                               reason="BAD_SPEC")
                state[nxt] = 1
                stack.append((nxt, 0, depth + 1))
        else:
            state[node_i] = 2


def check_spec_limits(spec: ModelSpec, *, max_nodes: int = MAX_SPEC_NODES,
                      max_depth: int = MAX_SPEC_DEPTH) -> None:
    """Configurable size limits on a spec (the server's --max-spec-nodes / --max-spec-depth).

    Raises ResourceExhaustedError naming the limit and the asked amount; the spec's graph is
    otherwise checked by `validate_spec`.
    """
    n = len(spec.nodes)
    if n > max_nodes:
        raise ResourceExhaustedError(
            f"the spec has {n} modules, more than the limit max_spec_nodes={max_nodes}",
            reason="SPEC_TOO_LARGE", metadata={"limit": "max_spec_nodes", "asked": str(n),
                                               "limit_value": str(max_nodes)})
    if not 0 <= spec.root < n:
        return  # validate_spec reports it
    # Longest path from the root, ignoring bad child indices and cycles (validate_spec reports
    # those); iterative, memoized, so a deep or wide spec costs O(nodes + edges).
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[int, int]] = [(spec.root, 0)]
    while stack:
        i, pos = stack.pop()
        children = [c.node for c in spec.nodes[i].children if 0 <= c.node < n]
        if pos == 0:
            on_path.add(i)
        if pos < len(children):
            stack.append((i, pos + 1))
            c = children[pos]
            if c not in depth and c not in on_path:
                stack.append((c, 0))
            continue
        on_path.discard(i)
        depth[i] = 1 + max((depth.get(c, 0) for c in children), default=0)
    deepest = depth.get(spec.root, 1)
    if deepest > max_depth:
        raise ResourceExhaustedError(
            f"the spec is nested {deepest} modules deep, more than the limit "
            f"max_spec_depth={max_depth}", reason="SPEC_TOO_DEEP",
            metadata={"limit": "max_spec_depth", "asked": str(deepest),
                      "limit_value": str(max_depth)})


def _construct(i: int, node: ModuleNode) -> nn.Module:
    cls = ALLOWED_MODULES[node.type]
    if node.type in CONTAINERS:
        if node.args or node.kwargs:
            raise InvalidArgumentError(f"{node.type} takes its children from the spec, not from "
                                       "constructor arguments", reason="BAD_SPEC")
        return cls()
    args = list(node.args)
    kwargs = dict(node.kwargs)
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError,
            OverflowError, ZeroDivisionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidArgumentError(f"cannot construct {node.type} (node {i}): {first}",
                                   reason="BAD_SPEC", metadata={"class": node.type}) from None


def build_module(spec: ModelSpec) -> nn.Module:
    """Builds the module tree a spec describes, on the current default device.

    Nodes are constructed in list order (which fixes the random numbers drawn under a seed),
    then children are attached with add_module, then ties are applied. Call it inside
    `with torch.device("meta"):` for a skeleton without memory.

    Raises:
        InvalidArgumentError: unknown class, bad arguments, bad graph or bad tie.
    """
    validate_spec(spec)
    modules = [_construct(i, node) for i, node in enumerate(spec.nodes)]
    for i, node in enumerate(spec.nodes):
        parent = modules[i]
        for child in node.children:
            try:
                parent.add_module(child.name, modules[child.node])
            except (KeyError, TypeError) as e:
                raise InvalidArgumentError(f"{node.type} (node {i}) cannot take a child named "
                                           f"{child.name!r}: {e}", reason="BAD_SPEC") from None
    root = modules[spec.root]
    apply_ties(root, spec)
    return root


def apply_ties(root: nn.Module, spec: ModelSpec) -> None:
    """Makes each tied parameter the same object as its source. Needed again after moving a
    module across devices: torch's Module.to() gives each module its own new Parameter when it
    cannot swap tensors in place (CPU -> CUDA), which unties them."""
    for tie in spec.ties:
        _apply_tie(root, tie)


def _apply_tie(root: nn.Module, tie: ParameterTie) -> None:
    try:
        source = root.get_parameter(tie.source)
        owner_path, _, local = tie.parameter.rpartition(".")
        owner = root.get_submodule(owner_path)
    except AttributeError as e:
        raise InvalidArgumentError(f"bad tie {tie.parameter!r} -> {tie.source!r}: {e}",
                                   reason="BAD_SPEC") from None
    current = owner._parameters.get(local)
    if current is None:
        raise InvalidArgumentError(f"bad tie: {tie.parameter!r} is not a parameter",
                                   reason="BAD_SPEC")
    if current.shape != source.shape or current.dtype != source.dtype:
        raise InvalidArgumentError(
            f"bad tie: {tie.parameter!r} is {tuple(current.shape)} {current.dtype} but "
            f"{tie.source!r} is {tuple(source.shape)} {source.dtype}", reason="BAD_SPEC")
    setattr(owner, local, source)


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """root.get_submodule(path) with NotFoundError (MODULE_NOT_FOUND) for unknown paths."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise NotFoundError(f"module path {path!r} does not exist", reason="MODULE_NOT_FOUND",
                            metadata={"module": path[:200]}) from None


# ---------------------------------------------------------------------------------------------
# Describing a local module


def _first_float_dtype(m: nn.Module) -> torch.dtype | None:
    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
        if t.is_floating_point() or t.is_complex():
            return t.dtype
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point() or t.is_complex():
            return t.dtype
    return None


def _activation_name(fn: Any) -> Any:
    if fn is F.relu or isinstance(fn, nn.ReLU):
        return "relu"
    if fn is F.gelu or isinstance(fn, nn.GELU):
        return "gelu"
    raise InvalidArgumentError(f"activation {fn!r} cannot be described by a spec; use 'relu' "
                               "or 'gelu'", reason="BAD_SPEC")


def _rnn_args(m: nn.Module) -> dict[str, Any]:
    kw: dict[str, Any] = dict(input_size=m.input_size, hidden_size=m.hidden_size,
                              num_layers=m.num_layers, bias=m.bias, batch_first=m.batch_first,
                              dropout=float(m.dropout), bidirectional=m.bidirectional)
    if isinstance(m, nn.LSTM):
        kw["proj_size"] = m.proj_size
    if type(m) is nn.RNN:
        kw["nonlinearity"] = m.nonlinearity
    return kw


def _mha_args(m: nn.MultiheadAttention) -> dict[str, Any]:
    return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=float(m.dropout),
                bias=m.in_proj_bias is not None, add_bias_kv=m.bias_k is not None,
                add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
                batch_first=m.batch_first)


def _transformer_layer_args(m: nn.Module) -> dict[str, Any]:
    return dict(d_model=m.self_attn.embed_dim, nhead=m.self_attn.num_heads,
                dim_feedforward=m.linear1.out_features, dropout=float(m.dropout.p),
                activation=_activation_name(m.activation), layer_norm_eps=m.norm1.eps,
                batch_first=m.self_attn.batch_first, norm_first=m.norm_first,
                bias=m.linear1.bias is not None)


def _transformer_args(m: nn.Transformer) -> dict[str, Any]:
    layer = m.encoder.layers[0]
    kw = _transformer_layer_args(layer)
    kw.pop("bias")
    kw["bias"] = layer.linear1.bias is not None
    kw["num_encoder_layers"] = len(m.encoder.layers)
    kw["num_decoder_layers"] = len(m.decoder.layers)
    return kw


_EXTRACTORS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "RNN": _rnn_args, "LSTM": _rnn_args, "GRU": _rnn_args,
    "MultiheadAttention": _mha_args,
    "TransformerEncoderLayer": _transformer_layer_args,
    "TransformerDecoderLayer": _transformer_layer_args,
    "Transformer": _transformer_args,
}


def _encodable(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(v, (tuple, list)):
        return all(_encodable(x) for x in v)
    return False


def _ctor_kwargs(m: nn.Module) -> dict[str, Any]:
    """Recovers constructor keyword arguments from a module's attributes."""
    name = type(m).__name__
    if name in CONTAINERS:
        return {}
    if name in _EXTRACTORS:
        kwargs = _EXTRACTORS[name](m)
    else:
        kwargs = {}
        sig = inspect.signature(type(m).__init__)
        for pname, p in list(sig.parameters.items())[1:]:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or pname.startswith("_"):
                continue
            if pname in ("device", "dtype"):
                continue
            if pname not in m.__dict__ and not hasattr(m, pname):
                if p.default is p.empty:
                    raise InvalidArgumentError(
                        f"cannot recover argument {pname!r} of {name}", reason="BAD_SPEC")
                continue
            v = getattr(m, pname)
            if isinstance(v, torch.Tensor) or (v is None and pname == "bias"):
                v = v is not None  # a bias Parameter (or None) stands for the bias=True/False flag
            if isinstance(v, torch.Size):
                v = tuple(v)
            if not _encodable(v):
                if p.default is p.empty:
                    raise InvalidArgumentError(
                        f"argument {pname!r} of {name} ({v!r}) cannot be described by a spec",
                        reason="BAD_SPEC")
                continue
            kwargs[pname] = v
    dtype = _first_float_dtype(m)
    if dtype is not None and dtype != torch.get_default_dtype():
        if "dtype" in inspect.signature(type(m).__init__).parameters or name in _EXTRACTORS:
            kwargs["dtype"] = dtype
    return kwargs


def _tensor_groups(root: nn.Module) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for n, p in root.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return groups


def _shape(t: torch.Tensor) -> tuple[int, ...] | None:
    """A tensor's shape; None for a lazy module's uninitialized tensor (which has none)."""
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        return None
    return tuple(t.shape)


def _signature(root: nn.Module) -> list[tuple[str, str, tuple[int, ...] | None, torch.dtype]]:
    out = [("p", n, _shape(p), p.dtype)
           for n, p in root.named_parameters(remove_duplicate=False)]
    out += [("b", n, _shape(b), b.dtype) for n, b in root.named_buffers(remove_duplicate=False)]
    return out


def spec_from_module(root: nn.Module) -> ModelSpec:
    """Describes a local module tree (on any device, meta included) as a spec.

    Shared modules become one node reached from several parents; tied parameters become ties.
    The spec is verified by rebuilding a skeleton on the meta device and comparing repr, every
    parameter and buffer name, shape and dtype, and the tie groups.

    Raises:
        InvalidArgumentError: a class is not allow-listed (custom nn.Module subclasses are not
            accepted), or an argument cannot be recovered.
    """
    spec = ModelSpec()
    index: dict[int, int] = {}

    def visit(m: nn.Module) -> int:
        if id(m) in index:
            return index[id(m)]
        cls_name = type(m).__name__
        if ALLOWED_MODULES.get(cls_name) is not type(m):
            raise InvalidArgumentError(
                f"module class {type(m).__module__}.{type(m).__qualname__} is not allow-listed; "
                "paramhub serves trees of torch.nn built-in modules (Sequential, Linear, ...)",
                reason="MODULE_NOT_ALLOWED", metadata={"class": cls_name})
        i = len(spec.nodes)
        index[id(m)] = i
        node = ModuleNode(type=cls_name, kwargs=_ctor_kwargs(m))
        spec.nodes.append(node)
        if cls_name in CONTAINERS:
            explicit = list(m._modules.items())
        else:
            with torch.device("meta"):
                fresh = _construct(i, node)
            explicit = [(n, c) for n, c in m._modules.items()
                        if c is not None and (n not in fresh._modules or fresh._modules[n] is None
                                              or type(fresh._modules[n]) is not type(c)
                                              or repr(fresh._modules[n]) != repr(c))]
        for child_name, child in explicit:
            if child is None:
                continue
            j = visit(child)
            spec.nodes[i].children.append(ModuleChild(name=child_name, node=j))
        return i

    spec.root = visit(root)
    with torch.device("meta"):
        skeleton = build_module(spec)
    # Tied parameters: every local group of names over one Parameter must be one in the skeleton.
    built = _tensor_groups(skeleton)
    where = {n: g for g, names in built.items() for n in names}
    for names in _tensor_groups(root).values():
        for other in names[1:]:
            if where[other] != where[names[0]]:
                spec.ties.append(ParameterTie(parameter=other, source=names[0]))
    if spec.ties:
        with torch.device("meta"):
            skeleton = build_module(spec)
    if repr(skeleton) != repr(root) or _signature(skeleton) != _signature(root):
        raise InvalidArgumentError(
            "the module could not be described exactly by a spec (its rebuilt copy differs); "
            "this happens with modules changed after construction", reason="BAD_SPEC")
    return spec


# ---------------------------------------------------------------------------------------------
# JSON: exactly the form google.protobuf.json_format.MessageToDict gives the ModelSpec message
# (data directories written before specs were dataclasses hold that form; both read the same).

_DTYPE_NAMES = {v: "DTYPE_" + str(d).removeprefix("torch.").upper() for d, v in DTYPES.items()}
_DTYPE_VALUES = {name: v for v, name in _DTYPE_NAMES.items()}


def _float_to_json(x: float) -> Any:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _value_to_json(v: Any) -> dict[str, Any]:
    if isinstance(v, torch.Tensor):
        from paramhub.common.buffers import tensor_bytes
        from paramhub.common.dtypes import dtype_to_proto

        t: dict[str, Any] = {"dtype": _DTYPE_NAMES[dtype_to_proto(v.dtype)]}
        if v.dim():
            t["shape"] = [str(s) for s in v.shape]
        data = tensor_bytes(v)
        if data:
            t["data"] = base64.b64encode(data).decode("ascii")
        return {"tensorValue": t}
    if v is None:
        return {"nullValue": "NULL_VALUE_UNSPECIFIED"}
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"floatValue": _float_to_json(v)}
    if isinstance(v, str):
        return {"stringValue": v}
    if isinstance(v, torch.dtype):
        from paramhub.common.dtypes import dtype_to_proto

        return {"dtypeValue": _DTYPE_NAMES[dtype_to_proto(v)]}
    if isinstance(v, (tuple, list)):
        items = [_value_to_json(x) for x in v]
        return {"tupleValue" if isinstance(v, tuple) else "listValue":
                {"values": items} if items else {}}
    raise InvalidArgumentError(f"cannot encode a value of type {type(v).__name__}",
                               reason="BAD_VALUE")


def _value_from_json(d: dict[str, Any]) -> Any:
    if not isinstance(d, dict) or len(d) != 1:
        raise InvalidArgumentError("a spec value must have exactly one kind", reason="BAD_SPEC")
    ((kind, x),) = d.items()
    if kind == "nullValue":
        return None
    if kind == "boolValue":
        return bool(x)
    if kind == "intValue":
        return int(x)
    if kind == "floatValue":
        return float(x)
    if kind == "stringValue":
        return str(x)
    if kind == "dtypeValue":
        return dtype_from_proto(_DTYPE_VALUES.get(x, x) if isinstance(x, str) else int(x))
    if kind in ("listValue", "tupleValue"):
        items = [_value_from_json(i) for i in x.get("values", [])]
        return items if kind == "listValue" else tuple(items)
    if kind == "tensorValue":
        from paramhub.common.buffers import copy_into
        from paramhub.common.dtypes import check_shape

        dtype = dtype_from_proto(_DTYPE_VALUES.get(x.get("dtype"), 0))
        shape = check_shape([int(s) for s in x.get("shape", [])])
        data = base64.b64decode(x.get("data", ""))
        out = torch.empty(shape, dtype=dtype)
        if len(data) != out.numel() * out.element_size():
            raise InvalidArgumentError("a spec tensor's bytes do not match its shape",
                                       reason="BAD_SPEC")
        copy_into(out.data_ptr(), data)
        return out
    raise InvalidArgumentError(f"unknown spec value kind {kind!r}", reason="BAD_SPEC")


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    """The spec as a JSON-able dict, in MessageToDict's form of the ModelSpec message."""
    out: dict[str, Any] = {}
    nodes = []
    for n in spec.nodes:
        node: dict[str, Any] = {}
        if n.type:
            node["type"] = n.type
        if n.args:
            node["args"] = [_value_to_json(a) for a in n.args]
        if n.kwargs:
            node["kwargs"] = {k: _value_to_json(v) for k, v in n.kwargs.items()}
        if n.children:
            node["children"] = [{"name": c.name, "node": c.node} if c.node else
                                {"name": c.name} if c.name else {} for c in n.children]
        nodes.append(node)
    if nodes:
        out["nodes"] = nodes
    if spec.root:
        out["root"] = spec.root
    if spec.ties:
        out["ties"] = [{k: v for k, v in (("parameter", t.parameter), ("source", t.source)) if v}
                       for t in spec.ties]
    return out


def spec_from_json(d: dict[str, Any]) -> ModelSpec:
    """The spec of `spec_to_json`'s (or MessageToDict's) dict."""
    return ModelSpec(
        nodes=[ModuleNode(type=n.get("type", ""),
                          args=[_value_from_json(a) for a in n.get("args", [])],
                          kwargs={k: _value_from_json(v) for k, v in n.get("kwargs", {}).items()},
                          children=[ModuleChild(c.get("name", ""), int(c.get("node", 0)))
                                    for c in n.get("children", [])])
               for n in d.get("nodes", [])],
        root=int(d.get("root", 0)),
        ties=[ParameterTie(t.get("parameter", ""), t.get("source", "")) for t in d.get("ties", [])])
