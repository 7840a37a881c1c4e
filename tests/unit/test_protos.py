"""The protocol's source of truth: protos/ lints clean under buf STANDARD, and the committed
generated code in client/paramhub/v1 is exactly what the pinned generator makes from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = sorted((ROOT / "protos" / "paramhub" / "v1").glob("*.proto"))
GENERATED = ROOT / "client" / "paramhub" / "v1"


def test_committed_generated_code_equals_a_fresh_generation(tmp_path):
    # The same command as `make protos`, into a scratch directory.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         *map(str, PROTOS)], check=True, capture_output=True, timeout=120)
    fresh_dir = tmp_path / "paramhub" / "v1"
    fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir()
                 if p.is_file() and p.name != "__init__.py"}
    assert sorted(fresh) == sorted(committed), "run `make protos` and commit the result"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make protos` and commit the result"
    assert len(fresh) == 3 * len(PROTOS)


def _buf(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    buf = Path(sys.executable).parent / "buf"  # from the buf-bin dev dependency
    env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path / "buf-cache")}
    return subprocess.run([str(buf), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_protos_pass_buf_lint_standard(tmp_path):
    config = (ROOT / "buf.yaml").read_text()
    assert "STANDARD" in config and "except" not in config and "ignore" not in config
    result = _buf("lint", tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_protos_are_buf_formatted(tmp_path):
    result = _buf("format", "--diff", "--exit-code", tmp_path=tmp_path)
    assert result.returncode == 0, "run `buf format -w`:\n" + result.stdout + result.stderr
