"""The inspector's Starlette app: pages, JSON, Server-Sent Events and guarded edits.

    GET  /                                        models (device, size, version), live
    GET  /models/{model}                          module tree, checkpoints, live versions
    GET  /models/{model}/{kind}/{name}[?grad=1]   one parameter or buffer (or its .grad)
    GET  /api/models/{model}/{kind}/{name}/values?index=...   a region's values (JSON)
    GET  /api/events?model=...                    SSE: the models' watch events
    GET  /api/models/{model}/events?name=&kind=&grad=   SSE: watch events + the tensor's stats
    GET  /api/status                              watches open, edits enabled, role
    POST /api/models/{model}/set_slice            {kind, name, index, value, expected_version}
    POST /api/models/{model}/apply_init           {kind, name | glob, scheme, args, seed,
                                                   expected_model_version}
    POST /api/models/{model}/checkpoints          {name}
    POST /api/models/{model}/checkpoints/restore  {name, expected_model_version}

Every SDK call that blocks runs on a worker thread. Every POST needs --allow-edits, a token
role that may make it, the same-origin Origin header and the process's CSRF secret in the
X-CSRF-Token header (the pages carry it; it is made fresh at each start). The server's token
never leaves this process.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from paramhub.errors import InvalidArgumentError, ParamhubError
from paramhub.common import pb
from paramhub_server.ui import views
from paramhub_server.ui.feeds import END, Feeds

if TYPE_CHECKING:
    import paramhub
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
ROLES = ("read", "write", "admin")
#: HTTP status for each SDK error code (the SDK's one error table, seen from a browser).
HTTP_STATUS = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400,
               "ABORTED": 409, "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 409,
               "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 502, "RESOURCE_EXHAUSTED": 429,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "UNIMPLEMENTED": 501}
MAX_BODY = 1 << 20
INIT_SCHEMES = ("normal_", "uniform_", "trunc_normal_", "constant_", "zeros_", "ones_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                "orthogonal_", "eye_")
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class _Refused(Exception):
    """A request the UI itself refuses (before any SDK call)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class _SecurityHeaders:
    """Adds CSP and friends to every response (pure ASGI: event streams pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", _CSP.encode()),
                            (b"x-content-type-options", b"nosniff"),
                            (b"x-frame-options", b"DENY"),
                            (b"referrer-policy", b"same-origin")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error_json(e: ParamhubError | _Refused) -> JSONResponse:
    if isinstance(e, _Refused):
        return JSONResponse({"ok": False, "code": "REFUSED", "reason": e.reason,
                             "message": e.message}, status_code=e.status)
    return JSONResponse({"ok": False, "code": e.code, "reason": e.reason, "message": str(e)},
                        status_code=HTTP_STATUS.get(e.code, 500))


def build_app(client: paramhub.Client, *, allow_edits: bool = False, role: str = "read",
              allowed_hosts: list[str] | None = None, linger_s: float | None = None) -> Starlette:
    """The inspector app over `client` (an SDK client the app uses and never closes).

    Args:
        allow_edits: show and accept edits (still limited by `role`).
        role: what the client's token may do: "read", "write" (values, inits) or "admin"
            (also checkpoints); see serve.detect_role.
        allowed_hosts: Host header values served (DNS-rebinding guard); None allows any.
        linger_s: seconds a model's watch stays open after its last page closed.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    feeds = Feeds(client) if linger_s is None else Feeds(client, linger_s=linger_s)
    csrf = secrets.token_urlsafe(32)
    can_write = allow_edits and role in ("write", "admin")
    can_admin = allow_edits and role == "admin"
    templates = Jinja2Templates(directory=str(_HERE / "templates"))
    value_cache: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200
             ) -> Response:
        context = {"csrf": csrf, "can_write": can_write, "can_admin": can_admin,
                   "allow_edits": allow_edits, "role": role, "target": client.target,
                   **context}
        return templates.TemplateResponse(request, name, context, status_code=status)

    def error_page(request: Request, e: ParamhubError | _Refused) -> Response:
        status = e.status if isinstance(e, _Refused) else HTTP_STATUS.get(e.code, 500)
        code = "REFUSED" if isinstance(e, _Refused) else e.code
        msg = e.message if isinstance(e, _Refused) else str(e)
        return page(request, "error.html", {"code": code, "reason": e.reason, "message": msg},
                    status)

    def tensor_key(kind: str, name: str, grad: Any) -> views.TensorKey:
        if kind not in views.KINDS:
            raise _Refused(404, "BAD_KIND", f"no such page: {kind!r}")
        if not name or len(name) > 1000:
            raise _Refused(400, "BAD_NAME", "a tensor name of 1 to 1000 characters")
        return views.TensorKey(name, kind, str(grad).lower() in ("1", "true", "yes"))

    async def sdk(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    async def tensor_info(model: str, key: views.TensorKey) -> pb.TensorInfo:
        infos = await sdk(client.list_parameters, model, prefix=key.name,
                          include_buffers=key.kind == "buffers")
        for t in infos:
            if t.name == key.name and ((t.kind == pb.TENSOR_KIND_BUFFER)
                                       == (key.kind == "buffers")):
                return t
        from paramhub.errors import NotFoundError
        raise NotFoundError(f"model {model!r} has no {key.kind[:-1]} {key.name!r}",
                            reason="TENSOR_NOT_FOUND")

    # ------------------------------------------------------------------------------ pages

    async def index(request: Request) -> Response:
        try:
            infos = await sdk(client.list_models)
        except ParamhubError as e:
            return error_page(request, e)
        return page(request, "index.html", {"models": views.model_rows(infos)})

    async def model_page(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            desc = await sdk(client.describe_model, model)
        except ParamhubError as e:
            return error_page(request, e)
        try:
            checkpoints = [{"name": c.name, "model_version": c.model_version,
                            "bytes": views.human_bytes(c.num_bytes)}
                           for c in await sdk(client.list_checkpoints, model)]
            checkpoint_error = ""
        except ParamhubError as e:
            checkpoints, checkpoint_error = [], f"{e.code} {e.reason}"
        info = desc.model
        return page(request, "model.html", {
            "model": model, "rows": views.tree_rows(desc),
            "info": {"device": info.device, "version": info.version,
                     "parameters": info.num_parameters, "bytes": views.human_bytes(
                         info.num_bytes), "root": info.root_class},
            "checkpoints": checkpoints, "checkpoint_error": checkpoint_error,
            "schemes": INIT_SCHEMES})

    async def tensor_page(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            key = tensor_key(request.path_params["kind"], request.path_params["name"],
                             request.query_params.get("grad", ""))
            t = await tensor_info(model, key)
            index_text = request.query_params.get("index")
            if index_text is None:
                index_text = views.default_index(list(t.shape))
            views.parse_index(index_text)  # a bad index answers 400 before drawing
            stats = views.stats_payload(await sdk(
                client.probe, model, key.name, kind=key.kind, grad=key.grad, bins=views.BINS))
        except (ParamhubError, _Refused) as e:
            return error_page(request, e)
        data = {"model": model, "name": key.name, "kind": key.kind, "grad": key.grad,
                "index": index_text, "version": t.version, "stats": stats,
                "model_version": stats["model_version"], "csrf": csrf,
                "can_write": can_write and not key.grad}
        return page(request, "tensor.html", {
            "model": model, "key": key, "t": t, "dtype": views.dtype_name(t.dtype),
            "shape": list(t.shape), "index": index_text, "stats": stats,
            "schemes": INIT_SCHEMES, "page_data": data,
            "can_write": can_write and not key.grad})

    # ------------------------------------------------------------------------------ JSON

    async def values(request: Request) -> Response:
        model = request.path_params["model"]
        q = request.query_params
        try:
            key = tensor_key(request.path_params["kind"], request.path_params["name"],
                             q.get("grad", ""))
            index_text = q.get("index", "")
            index = views.parse_index(index_text)
            seen = q.get("v")
            cache_key = (model, key, index_text, seen)
            if seen is not None and cache_key in value_cache:
                value_cache.move_to_end(cache_key)
                return JSONResponse(value_cache[cache_key])
            t = await tensor_info(model, key)
            numel = views.region_numel(list(t.shape), index)
            if numel is not None and numel > views.MAX_REGION_ELEMENTS:
                raise _Refused(413, "REGION_TOO_LARGE",
                               f"the region has {numel:,} elements; narrow the index to at "
                               f"most {views.MAX_REGION_ELEMENTS:,}")
            t, version = await sdk(client.get_tensor, model, key.name, index,
                                   kind=key.kind, grad=key.grad)
        except (ParamhubError, _Refused) as e:
            return _error_json(e)
        payload = views.region_payload(t, version, index_text)
        if seen is not None:
            value_cache[cache_key] = payload
            while len(value_cache) > 128:
                value_cache.popitem(last=False)
        return JSONResponse(payload)

    async def status(request: Request) -> Response:
        return JSONResponse({"watches": feeds.watch_count(), "edits": allow_edits,
                             "role": role, "can_write": can_write, "can_admin": can_admin})

    def event_stream(request: Request, models: list[str], key: views.TensorKey | None
                     ) -> Response:
        async def body() -> AsyncIterator[str]:
            # Subscribed here, not before the response: the `finally` then always runs (a
            # generator that never started would leave its subscription behind).
            sub = feeds.subscribe(models, key)
            try:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        item = await asyncio.wait_for(sub.queue.get(), 15.0)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if item is END:
                        return
                    yield f"event: {item['event']}\ndata: {json.dumps(item['data'])}\n\n"
            finally:
                feeds.unsubscribe(sub)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store",
                                          "x-accel-buffering": "no"})

    async def events(request: Request) -> Response:
        models = [m for m in request.query_params.getlist("model") if m][:1000]
        return event_stream(request, models, None)

    async def model_events(request: Request) -> Response:
        q = request.query_params
        key = None
        if q.get("name"):
            try:
                key = tensor_key(q.get("kind", "parameters"), q["name"], q.get("grad", ""))
            except _Refused as e:
                return _error_json(e)
        return event_stream(request, [request.path_params["model"]], key)

    # ------------------------------------------------------------------------------ edits

    async def guarded(request: Request, need: str) -> dict[str, Any]:
        """The checks every write passes, then its JSON body."""
        if not allow_edits:
            raise _Refused(403, "EDITS_DISABLED", "edits are off (start with --allow-edits)")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is None or origin != f"{request.url.scheme}://{host}":
            raise _Refused(403, "CSRF_ORIGIN", "cross-origin or Origin-less write refused")
        if not hmac.compare_digest(request.headers.get("x-csrf-token", ""), csrf):
            raise _Refused(403, "CSRF_TOKEN", "missing or wrong CSRF token")
        if ROLES.index(role) < ROLES.index(need):
            raise _Refused(403, "ROLE", f"the inspector's token has role {role!r}; "
                                        f"this edit needs {need!r}")
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise _Refused(415, "BAD_CONTENT_TYPE", "send application/json")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise _Refused(413, "BODY_TOO_LARGE", f"body over {MAX_BODY} bytes")
        try:
            data = json.loads(body)
        except ValueError:
            raise _Refused(400, "BAD_JSON", "the body is not JSON") from None
        if not isinstance(data, dict):
            raise _Refused(400, "BAD_JSON", "the body is not a JSON object")
        return data

    def version_field(data: dict[str, Any], field: str) -> int:
        v = data.get(field)
        if not isinstance(v, int) or isinstance(v, bool):
            raise _Refused(400, "BAD_VERSION", f"{field} (an integer) is required")
        return v

    async def set_slice(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            data = await guarded(request, "write")
            key = tensor_key(str(data.get("kind", "parameters")), str(data.get("name", "")),
                             "")
            expected = version_field(data, "expected_version")
            index = views.parse_index(str(data.get("index", "")))
            value = views.parse_value(str(data.get("value", "")))
            if isinstance(value, torch.Tensor):
                t = await tensor_info(model, key)
                value = value.to(getattr(torch, views.dtype_name(t.dtype)))
            version = await sdk(client.set_slice, model, key.name, index, value,
                                kind=key.kind, expected_version=expected)
        except (ParamhubError, _Refused) as e:
            return _error_json(e)
        log.info("set_slice %s %s[%s] -> version %s", model, key.name, data.get("index"),
                 version)
        return JSONResponse({"ok": True, "version": version})

    async def apply_init(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            data = await guarded(request, "write")
            scheme = str(data.get("scheme", ""))
            if scheme not in INIT_SCHEMES:
                raise InvalidArgumentError(f"init scheme {scheme[:40]!r} is not offered here",
                                           reason="BAD_INIT_SCHEME")
            expected = version_field(data, "expected_model_version")
            if data.get("name"):
                target = pb.InitTarget(parameter=str(data["name"]))
            elif data.get("glob"):
                target = pb.InitTarget(glob=str(data["glob"]))
            else:
                raise _Refused(400, "BAD_TARGET", "name or glob is required")
            args = views.parse_init_args(str(data.get("args", "")))
            seed = data.get("seed")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise _Refused(400, "BAD_SEED", "seed must be an integer")
            resp = await sdk(client.apply_init, model, scheme, [target], args, seed=seed,
                             expected_model_version=expected)
        except (ParamhubError, _Refused) as e:
            return _error_json(e)
        return JSONResponse({"ok": True, "model_version": resp.model_version})

    async def create_checkpoint(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            data = await guarded(request, "admin")
            info = await sdk(client.create_checkpoint, model, str(data.get("name", "")))
        except (ParamhubError, _Refused) as e:
            return _error_json(e)
        return JSONResponse({"ok": True, "name": info.name,
                             "model_version": info.model_version})

    async def restore_checkpoint(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            data = await guarded(request, "admin")
            expected = version_field(data, "expected_model_version")
            resp = await sdk(client.restore_checkpoint, model, str(data.get("name", "")),
                             expected_model_version=expected)
        except (ParamhubError, _Refused) as e:
            return _error_json(e)
        return JSONResponse({"ok": True, "model_version": resp.model_version})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        feeds.bind_loop()
        yield
        feeds.close()

    routes = [
        Route("/", index),
        Route("/models/{model}", model_page),
        Route("/models/{model}/{kind}/{name}", tensor_page),
        Route("/api/status", status),
        Route("/api/events", events),
        Route("/api/models/{model}/events", model_events),
        Route("/api/models/{model}/{kind}/{name}/values", values),
        Route("/api/models/{model}/set_slice", set_slice, methods=["POST"]),
        Route("/api/models/{model}/apply_init", apply_init, methods=["POST"]),
        Route("/api/models/{model}/checkpoints", create_checkpoint, methods=["POST"]),
        Route("/api/models/{model}/checkpoints/restore", restore_checkpoint,
              methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.feeds = feeds
    app.state.csrf = csrf
    return app
