"""The layering (STYLE.md section 1) as facts about a fresh interpreter: importing the server's
core, or the shared kernel, loads no grpc and (for the core) no protobuf. import-linter checks
the same statically in `make test`; this checks what really gets loaded, chains included."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted(f"paramhub_server.core.{m.name}" for m in
              pkgutil.iter_modules([str(ROOT / "server" / "paramhub_server" / "core")]))
# The kernel modules meant for the core (the protobuf-free ones) and the rest of the kernel.
KERNEL_NO_PROTOBUF = ["paramhub.common.errors", "paramhub.common.dtypes",
                      "paramhub.common.buffers", "paramhub.common.state"]
KERNEL = KERNEL_NO_PROTOBUF + ["paramhub.common.tensors", "paramhub.common.frames",
                               "paramhub.common.index", "paramhub.errors", "paramhub"]


def _run_json(code: str) -> dict[str, set[str]]:
    """Runs `code` in a fresh interpreter; its stdout is a JSON {name: [names]}."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return {k: set(v) for k, v in json.loads(out).items()}


def _loaded_after_import(modules: list[str]) -> set[str]:
    """sys.modules of a fresh interpreter after importing `modules`."""
    return set().union(*_loaded_by_each(modules).values())


def _loaded_by_each(modules: list[str]) -> dict[str, set[str]]:
    """For each of `modules`, imported in turn in one fresh interpreter: the modules its import
    added to sys.modules (so an offender is charged to the first module that loads it)."""
    code = ("import json, sys\n"
            "out = {}\n"
            f"for name in {modules!r}:\n"
            "    before = set(sys.modules)\n"
            "    __import__(name)\n"
            "    out[name] = sorted(set(sys.modules) - before)\n"
            "print(json.dumps(out))\n")
    return _run_json(code)


def _offenders(loaded: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if m.split(".")[0] in banned or m.startswith(banned))


def test_core_modules_are_found():
    assert {"paramhub_server.core.model", "paramhub_server.core.registry",
            "paramhub_server.core.store"} <= set(CORE)


#: Core modules still allowed to load protobuf, each with the reason (none today: the log has its
#: own record format in core/wal_format.py, where only replaying a format-1 log imports protobuf,
#: inside the function that decodes it; checkpoints are listed as core dataclasses). An entry
#: must be needed: test_allowance_is_still_needed fails for one that is not.
ALLOWED: dict[str, str] = {}
_BANNED = ("grpc", "google", "paramhub.v1", "paramhub.client", "paramhub_server.api")


def _import_graph(modules: list[str]) -> dict[str, set[str]]:
    """Importing `modules` in a fresh interpreter: every import statement executed, as edges
    importer -> imported module (recorded by a builtins.__import__ wrapper, so an import of a
    module loaded earlier by another counts too)."""
    code = ("import builtins, json, sys\n"
            "edges = {}\n"
            "real = builtins.__import__\n"
            "def spy(name, globals=None, locals=None, fromlist=(), level=0):\n"
            "    mod = real(name, globals, locals, fromlist, level)\n"
            "    importer = (globals or {}).get('__name__', '?')\n"
            "    if importer.startswith('importlib'):\n"  # the machinery, on behalf of others
            "        return mod\n"
            "    target = mod.__name__ if level else name\n"
            "    out = edges.setdefault(importer, set())\n"
            "    out.add(target)\n"
            "    for f in fromlist or ():\n"
            "        if f'{target}.{f}' in sys.modules:\n"
            "            out.add(f'{target}.{f}')\n"
            "    return mod\n"
            "builtins.__import__ = spy\n"
            f"for name in {modules!r}:\n"
            "    __import__(name)\n"
            "builtins.__import__ = real\n"
            "print(json.dumps({k: sorted(v) for k, v in edges.items()}))\n")
    return _run_json(code)


def _reaches(graph: dict[str, set[str]], start: str, skip: set[str]) -> set[str]:
    """Every module reachable from `start` by import edges, not passing through `skip`."""
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            parts = nxt.split(".")
            # importing a.b.c runs a and a.b too
            for k in range(1, len(parts) + 1):
                name = ".".join(parts[:k])
                if name not in seen and name not in skip:
                    seen.add(name)
                    todo.append(name)
    return seen


def test_core_imports_no_grpc_and_no_protobuf():
    # Every core module, in a fresh interpreter: every module it reaches by import statements
    # (a core module importing protobuf that another module loaded first counts too).
    graph = _import_graph(CORE)
    bad = {m: _offenders(_reaches(graph, m, set(ALLOWED)), _BANNED)[:3]
           for m in CORE if m not in ALLOWED}
    assert not {m: o for m, o in bad.items() if o}
    # Nothing in the core reaches grpc or the SDK client, the allowed modules included.
    everything = set().union(*(_reaches(graph, m, set()) for m in CORE))
    assert not _offenders(everything, ("grpc", "paramhub.client", "paramhub_server.api"))


def test_allowance_is_still_needed():
    graph = _import_graph(sorted(ALLOWED))
    assert all(_offenders(_reaches(graph, m, set()), _BANNED) for m in ALLOWED), \
        "a module of ALLOWED no longer loads protobuf: remove it from ALLOWED"


def test_kernel_imports_no_grpc():
    loaded = _loaded_after_import(KERNEL)
    assert not _offenders(loaded, ("grpc", "paramhub_server", "paramhub.client"))


def test_kernel_core_modules_import_no_protobuf():
    loaded = _loaded_after_import(KERNEL_NO_PROTOBUF)
    assert not _offenders(loaded, ("grpc", "google.protobuf", "paramhub.v1"))


def test_lazy_package_still_exports_its_names():
    # `import paramhub` loads nothing, yet every name of __all__ resolves (and loads grpc then).
    code = ("import sys, paramhub\n"
            "assert 'grpc' not in sys.modules and 'paramhub.client' not in sys.modules\n"
            "missing = [n for n in paramhub.__all__ if getattr(paramhub, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert 'grpc' in sys.modules\n"
            "from paramhub import connect, optim, NotFoundError, RemoteParameter\n"
            "import paramhub.errors as e; assert e.NotFoundError is NotFoundError\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
