"""Build and run the paramhub image with whichever container engine works on this machine.

    python docker/engine.py which            # "docker" or "podman"; exit 1 when neither runs
    python docker/engine.py build [--tag T]  # the server image from docker/Dockerfile
    python docker/engine.py ARGS...          # the engine with this machine's flags: run, stop, ...

`docker` is used when its daemon answers ($PARAMHUB_ENGINE=podman forces podman). Otherwise Debian's `podman` (4.3) with `runc`, the
`vfs` storage driver, host networking for builds, and docker/podman-containers.conf (no default
ulimits, the cgroupfs manager): crun, the rlimits it sets and systemd cgroups fail on
machines like the CI's. Nothing here is in the Dockerfile, which builds anywhere as it is.

No image registry may be reachable, so with podman the Dockerfile's base (BASE_IMAGE,
python:3.11-slim) is replaced by a local one, made once with debootstrap (Debian's python3.11,
its venv module and CA certificates) and kept under the tag BASE_TAG.

Where pip finds a torch wheel of the pinned version in a local directory ($PIP_FIND_LINKS, as on
the CI's machines), the build is offline: that wheel and the wheels of every other dependency
(downloaded on the host, with the host's pip settings) go to docker/wheels/, and the image
installs from there alone (OFFLINE=1). Elsewhere torch comes from TORCH_INDEX_URL as usual.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
WHEELS = ROOT / "docker" / "wheels"
CONTAINERS_CONF = ROOT / "docker" / "podman-containers.conf"
#: The image `make image` builds; compose.yaml's `paramhub` service names the same one.
DEFAULT_TAG = "paramhub:cpu"
#: The local stand-in for python:3.11-slim: Debian 12 with its python3.11.
BASE_TAG = "localhost/paramhub-base:3.11-bookworm"
# python3-distutils provides the python3.11-distutils that python3.11-venv needs (debootstrap
# resolves no virtual packages).
BASE_PACKAGES = ["python3.11", "python3.11-venv", "python3-distutils", "ca-certificates"]
PODMAN_FLAGS = ["--runtime", "runc", "--storage-driver", "vfs"]
#: The Dockerfile's TORCH_VERSION default (tests/integration/test_cli_docker.py checks).
TORCH_VERSION = "2.13.0"


def _ok(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=60, env=env).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def environ() -> dict[str, str]:
    """The environment the engine runs in (podman reads its containers.conf from it)."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def which() -> str | None:
    """The engine to use: $PARAMHUB_ENGINE if set, else docker when its daemon answers, else
    podman when it runs with the flags above; None when neither does."""
    forced = os.environ.get("PARAMHUB_ENGINE")
    if forced:
        return forced
    if shutil.which("docker") and _ok(["docker", "info"]):
        return "docker"
    if shutil.which("podman") and _ok(["podman", *PODMAN_FLAGS, "info"], environ()):
        return "podman"
    return None


def command(engine: str, *args: str) -> list[str]:
    """The argv that runs `engine args...` with this machine's flags."""
    return [engine, *(PODMAN_FLAGS if engine == "podman" else []), *args]


def _run(engine: str, *args: str, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(command(engine, *args)), file=sys.stderr, flush=True)
    return subprocess.run(command(engine, *args), env=environ(), check=True, **kw)


def _image_exists(engine: str, tag: str) -> bool:
    return _ok(command(engine, "image", "inspect", tag), environ())


def ensure_base(engine: str) -> str:
    """BASE_TAG, built once: debootstrap a Debian 12 root with python3.11 and import it."""
    if _image_exists(engine, BASE_TAG):
        return BASE_TAG
    if not shutil.which("debootstrap"):
        raise SystemExit("engine.py: no registry to pull the base image from, and no debootstrap "
                         "to make one (apt-get install debootstrap)")
    mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
    with tempfile.TemporaryDirectory(prefix="paramhub-base-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                        "bookworm", str(rootfs), mirror], check=True, stdout=subprocess.DEVNULL)
        # What debootstrap downloaded is not part of the image.
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / cache).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tar), "."], check=True)
        _run(engine, "import", "--change", 'CMD ["python3"]', "--change",
             "ENV LANG=C.UTF-8", str(tar), BASE_TAG, stdout=subprocess.DEVNULL)
    return BASE_TAG


def _local_torch_wheel() -> Path | None:
    for d in os.environ.get("PIP_FIND_LINKS", "").split():
        for wheel in sorted(Path(d).glob(f"torch-{TORCH_VERSION}*-cp311-*.whl")):
            return wheel
    return None


def _requirements() -> list[str]:
    import tomllib  # 3.11+: only the build needs it

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [*project["build-system"]["requires"], *project["project"]["dependencies"],
            *project["project"]["optional-dependencies"]["server"]]


def prepare_wheels(python: str) -> bool:
    """Fill docker/wheels for an offline build; False (and an empty folder) when there is no
    local torch wheel, so the Dockerfile's indexes are used."""
    for f in WHEELS.glob("*.whl"):
        f.unlink()
    torch = _local_torch_wheel()
    if torch is None:
        return False
    target = WHEELS / torch.name
    try:
        os.link(torch, target)
    except OSError:
        shutil.copy2(torch, target)
    subprocess.run([python, "-m", "pip", "download", "-q", "--only-binary", ":all:", "-d",
                    str(WHEELS), str(target), *_requirements()], check=True)
    return True


def build(tag: str, python: str) -> None:
    """Build the image `tag` from docker/Dockerfile (offline where a local torch wheel is)."""
    engine = which()
    if engine is None:
        raise SystemExit("engine.py: neither docker nor podman can run here")
    args = ["build", "-f", str(DOCKERFILE), "-t", tag]
    if engine == "podman":
        # docker format: OCI images drop HEALTHCHECK.
        args += ["--format", "docker", "--network", "host",
                 "--build-arg", f"BASE_IMAGE={ensure_base(engine)}"]
    try:
        if prepare_wheels(python):
            args += ["--build-arg", "OFFLINE=1"]
        _run(engine, *args, str(ROOT))
    finally:
        for f in WHEELS.glob("*.whl"):
            f.unlink()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["which"]:
        engine = which()
        print(engine or "none")
        if engine is None and shutil.which("podman"):  # say why podman does not run
            info = subprocess.run(command("podman", "info"), env=environ(), text=True,
                                  capture_output=True, timeout=60)
            print(info.stderr.strip()[-2000:], file=sys.stderr)
        return 0 if engine else 1
    if argv[:1] == ["build"]:
        p = argparse.ArgumentParser(prog="engine.py build")
        p.add_argument("--tag", default=DEFAULT_TAG)
        p.add_argument("--python", default=sys.executable,
                       help="the pip that downloads wheels for an offline build")
        a = p.parse_args(argv[1:])
        build(a.tag, a.python)
        return 0
    engine = which()
    if engine is None:
        print("engine.py: neither docker nor podman can run here", file=sys.stderr)
        return 1
    return subprocess.run(command(engine, *argv), env=environ()).returncode


if __name__ == "__main__":
    sys.exit(main())
