"""Shared fixtures: the real server in-process on 127.0.0.1 port 0, and real SDK clients."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest
import torch

import paramhub
from paramhub_server.app import Server, build_server
from paramhub_server.settings import Settings


def has_cuda() -> bool:
    """Whether CUDA tests can run here."""
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not has_cuda():
            item.add_marker(skip_cuda)


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings for an in-process test server (tests may replace fields with dataclasses.replace)."""
    # PARAMHUB_TEST_DEVICE=cuda runs the in-process server's models on the GPU (a GPU machine
    # runs the integration suite that way); the default is the CPU.
    return Settings(host="127.0.0.1", port=0,
                    device=os.environ.get("PARAMHUB_TEST_DEVICE", "cpu"),
                    data_dir=tmp_path / "data", max_workers=16)


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    """A running server, stopped after the test."""
    srv = build_server(settings)
    try:
        yield srv
    finally:
        srv.stop(grace=None)


@pytest.fixture
def target(server: Server) -> str:
    """host:port of the running server."""
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(target: str) -> Iterator[paramhub.Client]:
    """An SDK client connected to the running server."""
    with paramhub.connect(target, timeout=60) as c:
        yield c


@pytest.fixture
def cuda_client(settings: Settings) -> Iterator[paramhub.Client]:
    """An SDK client of a server whose models live on the GPU (tests marked `cuda`)."""
    srv = build_server(dataclasses.replace(settings, device="cuda"))
    try:
        with paramhub.connect(f"127.0.0.1:{srv.port}", timeout=120) as c:
            yield c
    finally:
        srv.stop(grace=None)


#: Lines that tests (the fuzz suite) want printed at the end of the run.
SUMMARY_KEY = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for line in config.stash.get(SUMMARY_KEY, []):
        terminalreporter.write_line(line)
