"""Exported programs: a module as a torch.export program, sent without anything to unpickle.

The client exports the module (`torch.export.export(module, example_inputs)`) and sends the
program's JSON (torch._export.serde, the format torch.export.save writes inside its archive),
its parameters and buffers and its tensor constants through the tensor codec, and the module
tree as it describes it (for printing). `torch.export.load` would unpickle the state dict, the
constants and the example inputs (falling back to `weights_only=False`, which runs arbitrary
code): the server never receives those pickles; it deserializes the graph with the tensors it
received (core/programs.py) and serves `torch.export.unflatten` of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from paramhub import _code
from paramhub.errors import InvalidArgumentError
from paramhub.common import pb

__all__ = ["export"]


def export(module: nn.Module, example_inputs: Sequence[Any],
           example_kwargs: dict[str, Any] | None = None, dynamic_shapes: Any = None
           ) -> tuple[pb.CreateModelHeader, dict[str, torch.Tensor]]:
    """`module` as an exported program: (a CreateModelHeader without model id and device,
    {chunk name: tensor} of the values to stream after it, one per storage and constant).

    `dynamic_shapes` is torch.export's; by default the first dimension of every positional
    tensor input is `Dim.AUTO` (the batch size is not baked in unless the code needs it).

    Raises:
        InvalidArgumentError: torch.export cannot export the module (e.g. Python control flow
            that depends on tensor values: serve it as code with --trust-remote-code, or
            rewrite the branch with torch.cond).
    """
    from torch._export.serde import serialize as serde

    if any(isinstance(t, nn.parameter.UninitializedTensorMixin)
           for t in list(module.parameters()) + list(module.buffers())):
        # Lazy modules cannot be exported before they know their shapes: run the example
        # batch once, as torch's docs advise (this draws their initial values from the default
        # generator, as the module's first call would).
        with torch.no_grad():
            module(*example_inputs, **(example_kwargs or {}))
    if dynamic_shapes is None and not example_kwargs:
        auto = torch.export.Dim.AUTO
        dynamic_shapes = tuple({0: auto} if isinstance(a, torch.Tensor) and a.dim() > 0
                               else None for a in example_inputs)
    try:
        ep = torch.export.export(module, tuple(example_inputs), kwargs=example_kwargs,
                                 dynamic_shapes=dynamic_shapes)
        artifact = serde.serialize(ep)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for untraceable code
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidArgumentError(
            f"torch.export cannot export this module ({type(e).__name__}: {text}); a module "
            "whose Python control flow depends on tensor values can be served as code by a "
            "server started with --trust-remote-code", reason="NOT_EXPORTABLE") from None
    header = pb.CreateModelHeader(exported_program=artifact.exported_program)
    groups: dict[int, tuple[str, nn.Parameter | torch.Tensor]] = {}
    values: dict[str, torch.Tensor] = {}
    for name, t in ep.state_dict.items():
        first = groups.get(id(t))
        if first is not None:
            header.program_ties.add(parameter=name, source=first[0])
            continue
        groups[id(t)] = (name, t)
        values[name] = t.detach()
    for name, c in ep.constants.items():
        if not isinstance(c, torch.Tensor):
            raise InvalidArgumentError(
                f"the program holds a {type(c).__name__} constant ({name!r}); only tensor "
                "constants can be sent", reason="NOT_EXPORTABLE")
        header.program_constants.append(name)
        values[name] = c.detach()
    groups_of: dict[int, int] = {}
    for path, m in module.named_modules(remove_duplicate=False):
        header.module_tree.append(_code.describe_module(
            path, m, groups_of.setdefault(id(m), len(groups_of))))
    _code.remember_classes(module)
    return header, values
