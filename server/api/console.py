"""The web console: static files that `plait serve` serves at `/` and under `/console/`.

The page (`console/index.html`, `console.js`, `console.css`; no build step, nothing fetched
from elsewhere) talks only to this server's public HTTP API, from the same origin, with the
key the user gives it: it can show and do nothing that a client of the API could not. None
of its routes is in the OpenAPI document, and `/` is the only path it takes outside
`/console/`, where no API route lives.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "console"


def install_console(app: FastAPI) -> None:
    """Serves the console's page at `/` and its files under `/console/`."""
    app.mount("/console", StaticFiles(directory=STATIC, html=True), name="console")

    @app.get("/", include_in_schema=False)
    async def console_index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
