"""The FastAPI application: OpenAI routes plus health and metrics."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from plait.server.api import generation
from plait.server.api.context import ServerContext, get_context, require_api_key
from plait.server.api.errors import error_response, install_error_handlers
from prometheus_client import CONTENT_TYPE_LATEST

MAX_BODY_BYTES = 8 * 1024 * 1024


def create_app(context: ServerContext, drain_seconds: float = 30.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        context.engine.start()
        yield
        # Finish what is in flight before the process goes; new requests get 503 meanwhile.
        await asyncio.to_thread(context.engine.shutdown, drain_seconds)

    app = FastAPI(title="Plait", version="0.1.0", lifespan=lifespan)
    app.state.context = context
    install_error_handlers(app)

    @app.middleware("http")
    async def limit_body(request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        return await call_next(request)

    app.include_router(generation.router)

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models(ctx: ServerContext = Depends(get_context)):
        base = {
            "id": ctx.model_name,
            "object": "model",
            "created": ctx.created,
            "owned_by": "plait",
            "root": ctx.model_name,
            "parent": None,
            "max_model_len": ctx.engine.max_model_len,
        }
        return {"object": "list", "data": [base]}

    @app.get("/health")
    async def health(ctx: ServerContext = Depends(get_context)):
        if not ctx.engine.accepting:
            return error_response(503, "The server is starting up or shutting down.", code="unavailable")
        return JSONResponse({"status": "ok", "model": ctx.model_name, "requests_in_flight": ctx.engine.num_unfinished})

    @app.get("/metrics")
    async def metrics(ctx: ServerContext = Depends(get_context)):
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
