"""Running the inspector: uvicorn on a socket bound first (so port 0 works and the address is
known before serving), in the foreground (`paramhub ui`) or on a thread (tests).

Why Starlette + uvicorn: both are mature, small and widely used (Starlette is the ASGI core
under FastAPI); Starlette has what the inspector needs and nothing more (routing, Jinja2
templates, static files, streaming responses for Server-Sent Events, a trusted-host guard),
and uvicorn serves many long-lived event streams on one event loop, so hundreds of open pages
cost file descriptors, not threads.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

import uvicorn

from paramhub.errors import PermissionDeniedError

if TYPE_CHECKING:
    import paramhub
    from starlette.applications import Starlette

#: Host names the inspector answers to besides the one it binds (DNS-rebinding guard).
LOCAL_NAMES = ("127.0.0.1", "localhost")


def detect_role(client: paramhub.Client) -> str:
    """What the client's token may do: "read", "write" or "admin".

    Asks the server with two calls that cannot change anything: a SetSlice (write role) and a
    DeleteCheckpoint (admin role) on a model id that does not exist. The server checks the role
    before it looks the model up, so PERMISSION_DENIED means the role is too low, and anything
    else (NOT_FOUND) that it is enough. A server without authentication answers "admin".

    Raises:
        AuthError: the token is not valid at all.
    """
    absent = f"paramhub-ui-role-check-{uuid.uuid4().hex[:12]}"
    try:
        client.set_slice(absent, "x", None, 0.0)
    except PermissionDeniedError:
        return "read"
    except Exception as e:  # noqa: BLE001 - NOT_FOUND and the like: past the role check
        _reraise_auth(e)
    try:
        client.delete_checkpoint(absent, "x")
    except PermissionDeniedError:
        return "write"
    except Exception as e:  # noqa: BLE001
        _reraise_auth(e)
    return "admin"


def _reraise_auth(e: Exception) -> None:
    from paramhub.errors import AuthError, UnavailableError

    if isinstance(e, (AuthError, UnavailableError)):
        raise e


def allowed_hosts(host: str) -> list[str] | None:
    """Host header values to serve: the bound address and local names; None (any) when bound
    to every interface (the name users type is then unknown)."""
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return None
    except ValueError:
        pass
    return sorted({host, *LOCAL_NAMES})


class UIServer:
    """uvicorn serving `app` on host:port (port 0 picks one; `port` tells which)."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 8080, *,
                 log_level: str = "warning") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        # Listening now: a client that connects as soon as the address is printed waits in the
        # backlog until uvicorn accepts, instead of being refused.
        self.sock.listen(2048)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.app = app
        # Open event streams would hold a graceful shutdown forever: give them 2 seconds.
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_level=log_level, timeout_graceful_shutdown=2, lifespan="on"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """e.g. http://127.0.0.1:8080/"""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def run(self) -> None:
        """Serves in this thread until SIGINT/SIGTERM."""
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 20.0) -> None:
        """Serves on a background thread; returns once it accepts connections."""
        self._thread = threading.Thread(target=self.run, daemon=True, name="paramhub-ui")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the inspector did not start")
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> None:
        """Ends every event stream, then stops serving (background thread only)."""
        self.app.state.feeds.close_threadsafe()
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.sock.close()


def main(client: paramhub.Client, *, host: str, port: int, allow_edits: bool,
         log_level: str) -> int:
    """`paramhub ui`: checks the token's role (with --allow-edits), binds, prints the address
    as the first line of stdout, then serves until SIGINT/SIGTERM. Returns the exit status."""
    import sys

    from paramhub.errors import ParamhubError
    from paramhub_server.ui.app import build_app

    role = "read"
    if allow_edits:
        try:
            role = detect_role(client)
        except ParamhubError as e:
            print(f"paramhub ui: {client.target}: {e.code} {e.reason}: {e}", file=sys.stderr)
            return 1
        if role == "read":
            print("paramhub ui: the token has the read role only: edits stay off",
                  file=sys.stderr)
    try:
        if not ipaddress.ip_address(host).is_loopback:
            print(f"paramhub ui: serving on {host}: anyone who reaches it reads the models "
                  f"with this token's rights", file=sys.stderr)
    except ValueError:
        pass
    app = build_app(client, allow_edits=allow_edits, role=role,
                    allowed_hosts=allowed_hosts(host))
    try:
        server = UIServer(app, host, port, log_level=log_level)
    except OSError as e:
        print(f"paramhub ui: cannot serve on {host}:{port}: {e}", file=sys.stderr)
        return 2
    print(server.url, flush=True)
    server.run()
    return 0
