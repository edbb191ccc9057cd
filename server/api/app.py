"""The FastAPI application: OpenAI routes plus health and metrics."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from plait.server.api import adapters, files, fine_tuning, fusions, generation, models
from plait.server.api.console import install_console
from plait.server.api.context import ServerContext, get_context
from plait.server.api.errors import BodyTooLarge, error_response, install_error_handlers
from plait.server.api.schema import error_responses, install_openapi

MAX_BODY_BYTES = 8 * 1024 * 1024
MULTIPART_OVERHEAD_BYTES = 1 << 20


class BodySizeLimit:
    """Refuses a request body past its limit, counting the bytes as they are read.

    A declared `Content-Length` over the limit is refused before anything is read; a body
    sent without one (chunked) fails its route with a 413 as soon as the bytes read pass the
    limit, so it is never held whole. Plain ASGI rather than `@app.middleware("http")`: that
    wrapper hides client disconnects from the routes, and they need them to free a departed
    client's slot.
    """

    def __init__(self, app, max_bytes: int, path_limits: dict[str, int]):
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.path_limits.get(scope["path"], self.max_bytes)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await error_response(413, BodyTooLarge(limit).detail)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


def create_app(context: ServerContext, drain_seconds: float = 30.0) -> FastAPI:
    """The HTTP side; the caller runs `context.engine.run()` (see `plait.server.serve`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        context.start()
        yield
        # A running trainer is killed, not waited for; what is in flight finishes before the
        # process goes, and new requests get 503 meanwhile.
        await asyncio.to_thread(context.stop, drain_seconds)

    app = FastAPI(title="Plait", version="0.1.0", lifespan=lifespan)
    app.state.context = context
    install_error_handlers(app)
    install_openapi(app)

    # Uploads have their own limits, plus multipart framing.
    path_limits = {
        "/v1/adapters": context.store.max_bytes + MULTIPART_OVERHEAD_BYTES,
        "/v1/fusions": fusions.MAX_ROUTER_BYTES + MULTIPART_OVERHEAD_BYTES,
    }
    if context.fine_tuning is not None:
        path_limits["/v1/files"] = context.fine_tuning.files.max_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES, path_limits=path_limits)
    app.include_router(generation.router)
    app.include_router(models.router)
    app.include_router(adapters.router)
    app.include_router(files.router)
    app.include_router(fine_tuning.router)
    app.include_router(fusions.router)
    install_console(app)  # the web console at / and /console/: static files over the API above

    @app.get("/health", responses=error_responses(503))
    async def health(ctx: ServerContext = Depends(get_context)):
        if ctx.engine.failure is not None:
            return error_response(
                503, f"The engine failed ({ctx.engine.failure}); the server is exiting.", code="failed"
            )
        if not ctx.engine.accepting:
            return error_response(503, "The server is starting up or shutting down.", code="unavailable")
        return JSONResponse({"status": "ok", "model": ctx.model_name, "requests_in_flight": ctx.engine.num_unfinished})

    @app.get("/metrics")
    async def metrics(ctx: ServerContext = Depends(get_context)):
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
