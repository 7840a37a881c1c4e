"""The web inspector's input parsing and region shaping (no sockets)."""

from __future__ import annotations

import math

import pytest
import torch

from paramhub.errors import InvalidArgumentError
from paramhub_server.ui import views


@pytest.mark.parametrize("text,expected", [
    ("", None), (":", None), ("...", None), ("[]", None),
    ("0:2, :4", (slice(0, 2), slice(None, 4))),
    ("[1, ::2]", (1, slice(None, None, 2))),
    ("0, ..., None, -1", (0, Ellipsis, None, -1)),
])
def test_ui_parse_index_torch_syntax(text, expected):
    assert views.parse_index(text) == expected


@pytest.mark.parametrize("text", ["a", "0;1", "__import__('os')", "1:2:3:4", "0" * 401])
def test_ui_parse_index_bad_input_refused(text):
    with pytest.raises(InvalidArgumentError) as e:
        views.parse_index(text)
    assert e.value.reason == "BAD_INDEX"


@pytest.mark.parametrize("text,expected", [
    ("0.5", 0.5), ("-3", -3), ("true", True), ("nan", "nan"), ("[[1, 2], [3, 4]]", "t"),
])
def test_ui_parse_value(text, expected):
    v = views.parse_value(text)
    if expected == "nan":
        assert math.isnan(v)
    elif expected == "t":
        assert torch.equal(v, torch.tensor([[1, 2], [3, 4]]))
    else:
        assert v == expected and type(v) is type(expected)


@pytest.mark.parametrize("text", ["", "abc", "[1, 'a']", "[[1, 2], [3]]", "{}", "1e"])
def test_ui_parse_value_bad_input_refused(text):
    with pytest.raises(InvalidArgumentError) as e:
        views.parse_value(text)
    assert e.value.reason == "BAD_VALUE"


def test_ui_parse_init_args():
    assert views.parse_init_args("mean=0, std=0.02") == {"mean": 0.0, "std": 0.02}
    assert views.parse_init_args(" mode=fan_out ") == {"mode": "fan_out"}
    assert views.parse_init_args("") == {}
    for bad in ("std", "=1", "a b=1", "x="):
        with pytest.raises(InvalidArgumentError) as e:
            views.parse_init_args(bad)
        assert e.value.reason == "BAD_INIT_ARGS"


def test_ui_default_index_and_region_numel():
    assert views.default_index([8, 8]) == ""
    assert views.default_index([128, 256]) == ":64, :64"
    assert views.default_index([4, 3, 64, 64]) == "0, 0, :64, :64"
    assert views.default_index([10_000]) == ":4096"
    assert views.region_numel([128, 256], None) == 128 * 256
    assert views.region_numel([128, 256], views.parse_index(":64, :64")) == 4096
    assert views.region_numel([4, 3, 64, 64], views.parse_index("0, ..., 1")) == 3 * 64
    assert views.region_numel([4], (7,)) is None  # out of range: the server answers


def test_ui_region_payload_rows_and_non_finite_values():
    t = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    p = views.region_payload(t, 3, ":")
    assert p["rows"] == [[1.0, "nan"], ["inf", -2.0]]
    assert (p["lo"], p["hi"], p["version"], p["shape"]) == (-2.0, 1.0, 3, [2, 2])
    assert views.region_payload(torch.tensor(5), 0, "")["rows"] == [[5.0]]
    assert views.region_payload(torch.zeros(2, 3, 4), 0, "")["shape"] == [2, 3, 4]
    assert len(views.region_payload(torch.zeros(2, 3, 4), 0, "")["rows"]) == 6
    assert views.region_payload(torch.tensor([True, False]), 0, "")["rows"] == [[1.0, 0.0]]


def test_ui_is_only_a_client_of_the_sdk():
    """The inspector imports the SDK (paramhub) and its own modules; never the server's
    internals, never grpc (it talks to the server only through paramhub.Client)."""
    import ast
    from pathlib import Path

    allowed_server = ("paramhub_server.ui", "paramhub_server.inspect_cli")
    root = Path(views.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("grpc"), (path.name, name)
                if name.startswith("paramhub_server"):
                    assert name.startswith(allowed_server), (path.name, name)
