"""Resource names: "models/{model}" and "models/{model}/{parameters|buffers}/{name}"."""

from __future__ import annotations

from typing import Any

from paramhub.errors import InvalidArgumentError

__all__ = ["model_id", "model_name", "tensor_name"]


def model_name(model_id: str) -> str:
    """"mlp" -> "models/mlp"."""
    return f"models/{model_id}"


def tensor_name(model_id: str, name: str, kind: str = "parameters") -> str:
    """("mlp", "0.weight") -> "models/mlp/parameters/0.weight"."""
    return f"models/{model_id}/{kind}/{name}"


def model_id(model: Any) -> str:
    """The id of a model given by id or as a RemoteModule (anything with a served model id)."""
    if isinstance(model, str):
        return model
    found = getattr(model, "_paramhub_model_id", None)
    if found is None:
        raise InvalidArgumentError(f"{type(model).__name__} is not a served model",
                                   reason="BAD_ARGUMENT")
    return found
