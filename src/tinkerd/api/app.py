"""The FastAPI application: authentication, error shapes, and the two front doors."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tinkerd.api.auth import Admission, api_key_of
from tinkerd.api.bodies import SIGNED_UPLOAD_PATH, BodySizeLimit
from tinkerd.api.console_routes import is_console_path, mount_console
from tinkerd.api.metrics_routes import METRICS_PATH, build_metrics
from tinkerd.api.openai_routes import build_openai_routers
from tinkerd.api.rest_routes import SIGNED_ARCHIVE_PATH, SIGNED_DOWNLOAD_PATH, SIGNED_TRACE_PATH, build_rest_router
from tinkerd.api.tinker_routes import build_router
from tinkerd.core.identity_tokens import IdentityTokens, looks_like_token
from tinkerd.core.keys import ApiKeys
from tinkerd.core.service import Service
from tinkerd.core.work_cap import QueueFull
from tinkerd.types import UserError

log = logging.getLogger(__name__)

OPEN_PATHS = {"/api/v1/healthz", "/healthz", "/", SIGNED_DOWNLOAD_PATH, SIGNED_ARCHIVE_PATH, SIGNED_TRACE_PATH, SIGNED_UPLOAD_PATH,
              METRICS_PATH}


def create_app(service: Service, hold_seconds: float = 25.0, api_keys: set[str] | None = None,
               custom_loss_server_side: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start(asyncio.get_running_loop())
        yield
        await service.stop()

    app = FastAPI(title="tinkerd", lifespan=lifespan)
    app.state.service = service
    admission = app.state.admission = Admission(ApiKeys(service.db), api_keys,  # also for weights_access_token
                                                IdentityTokens(service.data_dir))

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path not in OPEN_PATHS and not is_console_path(request.url.path):
            key = api_key_of(request)
            if not key:
                return _error(401, "missing API key: send X-API-Key (or Authorization: Bearer) with a tml- key", request)
            user = admission.user_for(key)
            if user is None:
                if looks_like_token(key):  # expired, or its key revoked: the SDK exchanges its key again
                    response = _error(401, "invalid or expired identity token", request)
                    response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
                    return response
                return _error(401, admission.refusal(), request)
            request.state.user = user
            # Whose work this is, for the engine's fair sharing: a digest, so no key sits in the queue.
            # An identity token counts as the key it was issued for (tokens change at each refresh).
            key_hash = admission.tokens.key_hash_of(key) if looks_like_token(key) else None
            request.state.tenant = (key_hash or hashlib.sha256(key.encode()).hexdigest())[:16]
        return await call_next(request)

    # Added after `authenticate`, so it runs around it and counts refused requests too.
    metrics_router, count_requests = build_metrics(service)
    app.middleware("http")(count_requests)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):
        response = _error(exc.status, str(exc), request, exc.field)
        if isinstance(exc, QueueFull):  # both SDKs wait this long before they send it again
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        return _error(422, f"invalid request: {problems}", request)

    app.include_router(build_router(service, hold_seconds, custom_loss_server_side))
    app.include_router(build_rest_router(service))
    app.include_router(metrics_router)
    for router in build_openai_routers(service):
        app.include_router(router)
    mount_console(app, service)
    # A body past its limit is refused before anything reads it.
    app.add_middleware(BodySizeLimit, render=_error)
    # Outermost: whatever fails inside, the client gets a JSON answer on a connection that stays open.
    app.add_middleware(InternalErrors, render=_error)
    return app


class InternalErrors:
    """ASGI middleware: an unexpected exception answers a JSON 500 in the door's error shape,
    and the connection stays open.

    Starlette's last resort (ServerErrorMiddleware) answers a plain-text 500 and re-raises, and
    uvicorn then closes the connection: a client's other requests on its pooled connection fail
    with it. Once a response has started (a stream), no status can be answered any more; that
    exception goes on to the server, which ends the connection.
    """

    def __init__(self, app: ASGIApp, render: Callable[[int, str, Request], Response]):
        self.app = app
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:
                raise
            log.exception("internal error answering %s %s", scope["method"], scope["path"])
            # The exception's text stays in the log: it can name files and internals.
            message = f"internal server error ({type(exc).__name__}); the server's log has the details"
            await self.render(500, message, Request(scope))(scope, receive, send)


def _error(status: int, message: str, request: Request, param: str | None = None) -> JSONResponse:
    """The one error shape of each door: OpenAI's under /oai/ and /v1/, FastAPI's elsewhere."""
    if request.url.path.startswith(("/oai/", "/v1/")):
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)
    return JSONResponse({"detail": message}, status_code=status)
