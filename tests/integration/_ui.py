"""Helpers of the web inspector tests: a model with every kind of row, and the inspector
served by uvicorn on 127.0.0.1 port 0 over a real SDK client of the in-process server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import paramhub
from paramhub_server.ui import UIServer, build_app


def make_model(client: paramhub.Client, model_id: str = "mlp") -> None:
    """Sequential: Linear(8, 8), ReLU, a Linear used twice (a shared module), BatchNorm1d
    (buffers) in eval mode, and a last Linear whose weight is tied to the first's."""
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), shared, nn.ReLU(), shared,
                        nn.BatchNorm1d(8), nn.Linear(8, 8))
    net[6].weight = net[0].weight
    client.create_model(model_id, net)
    client.set_training(model_id, False, module_path="5")


@contextmanager
def served_ui(client: paramhub.Client, *, allow_edits: bool = False, role: str = "admin",
              linger_s: float | None = None) -> Iterator[tuple[UIServer, str]]:
    """The inspector over `client`, on a thread; yields (server, base url)."""
    app = build_app(client, allow_edits=allow_edits, role=role,
                    allowed_hosts=["127.0.0.1", "localhost"], linger_s=linger_s)
    ui = UIServer(app, "127.0.0.1", 0)
    ui.start()
    try:
        yield ui, ui.url.rstrip("/")
    finally:
        ui.stop()


def write_headers(base: str, csrf: str) -> dict[str, str]:
    """What the page's own script sends with a write."""
    return {"origin": base, "x-csrf-token": csrf, "content-type": "application/json"}
