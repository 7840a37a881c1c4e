"""Loading exported programs (see paramhub._program) without unpickling anything.

torch.export.load reads an archive whose state dict, constants and example inputs are pickles
(torch.load, falling back to weights_only=False); here the program's JSON is deserialized with
tensors that arrived through the codec instead, so the only client data interpreted is the graph
(operators resolved by name among those torch registers) and raw tensor bytes.
"""

from __future__ import annotations

import json
import torch
from torch import nn

from paramhub.common.errors import InvalidArgumentError


def load_program(program: bytes, state: dict[str, torch.Tensor],
                 constants: dict[str, torch.Tensor]) -> nn.Module:
    """The module tree of an exported program (torch.export.unflatten), its parameters and
    buffers being `state`'s tensors (tied names: one object). Raises InvalidArgumentError
    (BAD_PROGRAM) for anything torch does not accept."""
    from torch._export.serde import serialize as serde

    try:
        serialized = serde._dict_to_dataclass(serde.ExportedProgram, json.loads(program))
        params = {spec.parameter.parameter_name
                  for spec in serialized.graph_module.signature.input_specs
                  if spec.type == "parameter"}
        made: dict[int, torch.Tensor] = {}  # tied names: one Parameter
        for name, t in state.items():
            if name in params and not isinstance(t, nn.Parameter):
                state[name] = made.setdefault(id(t), nn.Parameter(t))
        # Dicts, not bytes: deserialize_torch_artifact would torch.load() bytes.
        ep = serde.ExportedProgramDeserializer().deserialize(serialized, state, constants, None)
        return torch.export.unflatten(ep)
    except Exception as e:  # noqa: BLE001 - every failure is the client's program
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InvalidArgumentError(f"cannot load the exported program: {type(e).__name__}: "
                                   f"{text[:300]}", reason="BAD_PROGRAM") from None

