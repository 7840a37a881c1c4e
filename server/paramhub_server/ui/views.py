"""What the pages show, as plain dicts and lists built from SDK answers (no web framework here).

    model_rows(ModelInfo list)             the index page's table
    tree_rows(DescribeModelResponse)       the module tree, line by line as print(net) writes it,
                                           with the parameters and buffers under their module
    stats_payload(ProbeResponse)           statistics and histogram of one probe
    region_payload(tensor, version, ...)   values of a region as rows for the heat map and table
    parse_index / default_index            the index box (torch syntax, parsed, never evaluated)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from paramhub.errors import InvalidArgumentError
from paramhub.common import pb
from paramhub.v1 import tensor_pb2 as tpb

#: Most elements a values request may read (the heat map and the table draw all of them).
MAX_REGION_ELEMENTS = 16_384
#: Histogram bins of every probe the inspector makes.
BINS = 40
KINDS = ("parameters", "buffers")


@dataclass(frozen=True)
class TensorKey:
    """One tensor a page follows: its state_dict key, whether a parameter or a buffer, and
    whether the page shows its value or its gradient."""

    name: str
    kind: str = "parameters"
    grad: bool = False

    def label(self) -> str:
        """e.g. "0.weight", "0.weight.grad", "1.running_mean (buffer)"."""
        text = self.name + (".grad" if self.grad else "")
        return text + (" (buffer)" if self.kind == "buffers" else "")


def dtype_name(value: int) -> str:
    """DTYPE_FLOAT32 -> "float32"."""
    return tpb.Dtype.Name(value).removeprefix("DTYPE_").lower()


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def model_rows(infos: list[pb.ModelInfo]) -> list[dict[str, Any]]:
    """One row per model for the index page."""
    return [{"id": m.name.removeprefix("models/"), "root": m.root_class, "device": m.device,
             "parameters": m.num_parameters, "bytes": human_bytes(m.num_bytes),
             "version": m.version} for m in infos]


# ------------------------------------------------------------------------------------ tree


def tree_rows(desc: pb.DescribeModelResponse) -> list[dict[str, Any]]:
    """The module tree in print(net)'s layout: a module with children opens a line
    `(key): Class(` and a later `)` closes it; a leaf module is one line `(key): Class(extra)`.
    Under each module, its own parameters and buffers (dtype, shape, count, version; tied ones
    name the key they share storage with). A module object reached again at another path is
    one line marked with the path it was first printed at (torch prints it in full again)."""
    modules = {m.path: m for m in desc.modules}
    own: dict[str, list[pb.TensorInfo]] = {}
    first_of_group: dict[int, str] = {}
    for t in desc.tensors:
        own.setdefault(t.name.rpartition(".")[0], []).append(t)
        first_of_group.setdefault(t.storage_group, t.name)

    def params_under(path: str) -> int:
        prefix = f"{path}." if path else ""
        seen: set[int] = set()
        total = 0
        for t in desc.tensors:
            if (t.kind == pb.TENSOR_KIND_PARAMETER and t.name.startswith(prefix)
                    and t.storage_group not in seen):
                seen.add(t.storage_group)
                total += math.prod(t.shape)
        return total

    rows: list[dict[str, Any]] = []
    printed: dict[int, str] = {}

    def tensor_row(t: pb.TensorInfo, depth: int) -> dict[str, Any]:
        first = first_of_group[t.storage_group]
        return {"type": "tensor", "depth": depth, "name": t.name,
                "short": t.name.rpartition(".")[2],
                "kind": "buffers" if t.kind == pb.TENSOR_KIND_BUFFER else "parameters",
                "dtype": dtype_name(t.dtype), "shape": list(t.shape),
                "numel": math.prod(t.shape), "version": t.version, "has_grad": t.has_grad,
                "requires_grad": t.requires_grad,
                "tied_to": first if first != t.name else None}

    def walk(path: str, key: str, depth: int, parent_training: bool | None) -> None:
        m = modules[path]
        # The training flag is shown on the root and wherever it differs from the parent's.
        row = {"type": "leaf", "depth": depth, "key": key, "path": path, "cls": m.class_name,
               "extra": m.extra_repr, "params": params_under(path), "training": m.training,
               "show_training": parent_training != m.training, "shared_with": None}
        if m.module_group in printed:
            row["shared_with"] = printed[m.module_group] or "(root)"
            rows.append(row)
            return
        printed[m.module_group] = path
        children = [c for c in m.children if (f"{path}.{c}" if path else c) in modules]
        if children:
            row["type"] = "open"
        rows.append(row)
        for t in own.get(path, []):
            rows.append(tensor_row(t, depth + 1))
        if children:
            for c in children:
                walk(f"{path}.{c}" if path else c, c, depth + 1, m.training)
            rows.append({"type": "close", "depth": depth})

    walk("", "", 0, None)
    return rows


# ------------------------------------------------------------------------------------ stats


def _finite(x: float) -> float | str:
    """JSON has no NaN/Infinity: those travel as strings."""
    return x if math.isfinite(x) else str(x)


def stats_payload(resp: pb.ProbeResponse) -> dict[str, Any]:
    """A probe's statistics and histogram, ready for JSON."""
    s = resp.stats
    return {"version": s.version, "model_version": resp.model_version,
            "dtype": dtype_name(s.dtype) if s.dtype else "", "shape": list(s.shape),
            "numel": s.numel, "min": _finite(s.min), "max": _finite(s.max),
            "mean": _finite(s.mean), "std": _finite(s.std), "norm": _finite(s.norm),
            "nan": s.nan_count, "inf": s.inf_count, "sha256": s.checksum_sha256[:16],
            "hist": {"counts": list(s.histogram_counts), "min": _finite(s.histogram_min),
                     "max": _finite(s.histogram_max)}}


# ------------------------------------------------------------------------------------ values


def parse_index(text: str | None) -> tuple[Any, ...] | None:
    """"0:2, :4" -> (slice(0, 2), slice(None, 4)); "" -> None (the whole tensor). Ints,
    slices with step, `...` and `None`, as in torch; nothing is evaluated.

    Raises:
        InvalidArgumentError: a part is none of those (reason BAD_INDEX).
    """
    import typer

    from paramhub_server.inspect_cli import parse_index as parse

    text = (text or "").strip()
    if not text or text in ("[]", ":", "..."):
        return None
    if len(text) > 400:
        raise InvalidArgumentError("index text longer than 400 characters", reason="BAD_INDEX")
    try:
        return parse(text)
    except typer.BadParameter as e:
        raise InvalidArgumentError(str(e.message), reason="BAD_INDEX") from None


def default_index(shape: list[int]) -> str:
    """The region a tensor page opens on: the whole tensor when it is small, else the first
    64 x 64 of its first 2-D slice (or the first 4,096 elements of a vector)."""
    if math.prod(shape) <= 4096:
        return ""
    if len(shape) == 1:
        return ":4096"
    return ", ".join(["0"] * (len(shape) - 2) + [":64", ":64"])


def region_numel(shape: list[int], index: tuple[Any, ...] | None) -> int | None:
    """Elements `tensor[index]` has, worked out on the meta device (no data); None when torch
    refuses the index there (the server then answers for it)."""
    if index is None:
        return math.prod(shape)
    try:
        return torch.empty(shape, device="meta")[index].numel()
    except (IndexError, TypeError, ValueError, RuntimeError):
        return None


def region_payload(t: torch.Tensor, version: int, index_text: str) -> dict[str, Any]:
    """Values of a read region as rows: 0-d is one cell, 1-d one row, n-d (n > 2) its leading
    dimensions folded into rows (the heat map and the table draw the same rows)."""
    shape = list(t.shape)
    rows = t.detach().reshape(1, -1) if t.dim() < 2 else t.detach().reshape(-1, shape[-1])
    if rows.is_complex():
        rows = rows.abs()
    if rows.dtype == torch.bool:
        rows = rows.to(torch.uint8)
    values = rows.to(torch.float64).tolist()
    flat = [v for r in values for v in r]
    finite = [v for v in flat if math.isfinite(v)]
    return {"version": version, "index": index_text, "shape": shape,
            "dtype": str(t.dtype).removeprefix("torch."),
            "rows": [[_finite(v) for v in r] for r in values],
            "lo": min(finite) if finite else 0.0, "hi": max(finite) if finite else 0.0}


def parse_value(text: str) -> float | int | bool | torch.Tensor:
    """The value box of an edit: a number (`0.5`, `-3`, `nan`), `true`/`false`, or a nested
    JSON list (`[[1, 2], [3, 4]]`) as a tensor (the caller casts it to the tensor's dtype),
    broadcast to the region by the server.

    Raises:
        InvalidArgumentError: anything else (reason BAD_VALUE).
    """
    import json

    text = (text or "").strip()
    if len(text) > 100_000:
        raise InvalidArgumentError("value text longer than 100,000 characters",
                                   reason="BAD_VALUE")
    if text in ("true", "false", "True", "False"):
        return text.lower() == "true"
    if text.startswith("["):
        try:
            data = json.loads(text)
            return torch.tensor(data)
        except (ValueError, TypeError, RuntimeError) as e:
            raise InvalidArgumentError(f"value is not a numeric JSON list: {e}",
                                       reason="BAD_VALUE") from None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise InvalidArgumentError(f"value {text[:40]!r} is not a number or a JSON list",
                                   reason="BAD_VALUE") from None


def parse_init_args(text: str) -> dict[str, float | str]:
    """"mean=0, std=0.02" -> {"mean": 0.0, "std": 0.02}; a non-number stays a string
    (`mode=fan_out`). The server allow-lists names and values.

    Raises:
        InvalidArgumentError: a part is not `name=value` (reason BAD_INIT_ARGS).
    """
    out: dict[str, float | str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key.isidentifier() or not val:
            raise InvalidArgumentError(f"init argument {part[:40]!r} is not name=value",
                                       reason="BAD_INIT_ARGS")
        try:
            out[key] = float(val)
        except ValueError:
            out[key] = val
    return out
