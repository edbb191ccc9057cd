"""Plait on Ray Serve: replicas that each run a whole Plait server in-process, routed by adapter.

    serve run deploy/ray/config.yaml          # from the repository root

Two deployments:

- `PlaitReplica` builds a server exactly as `plait serve` does (`plait.server.serve.build`, the
  same flags) and answers requests with the server's own FastAPI app, called in-process: every
  route, every check and every error of `plait serve`, nothing forked. Its adapter id is Ray's
  multiplexed model id (`@serve.multiplexed`), so Ray sends each adapter's requests to the
  replicas that already serve it, where its weights sit in a device slot.
- `Ingress` is the HTTP entry: it reads the request's `model` (JSON bodies; uploads and other
  routes have none) and hands the request to a replica with that id, streaming the answer back.

Replicas share adapters, fusions, files and fine-tuning jobs through the store and database
flags (by default a folder and a SQLite file under `state_dir`, which suits one machine; on a
cluster, S3 and PostgreSQL: see the README's "Many replicas"); each has its own data dir for
its local copies and job folders. Every answer carries `x-plait-replica` (which replica served
it) and `x-plait-adapter-loads` (how many adapters that replica has copied into a device slot
so far), so a client can see the routing at work.
"""

# No `from __future__ import annotations`: Ray's class-based ingress reads the route's parameter
# types at run time, and strings there would make FastAPI take `request` for a query parameter.
import argparse
import asyncio
import json
import logging
import os
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve

# Adapters one replica keeps as Ray's multiplexed models; the engine's device slots
# (--max-gpu-adapters) should hold at least as many.
ADAPTERS_PER_REPLICA = int(os.environ.get("PLAIT_RAY_ADAPTERS_PER_REPLICA", "8"))
DRAIN_SECONDS = 30.0
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@serve.deployment(graceful_shutdown_timeout_s=DRAIN_SECONDS + 5)
class PlaitReplica:
    def __init__(self, serve_flags: list[str], data_root: str):
        from plait.server.api.app import create_app
        from plait.server.serve import StartError, add_arguments, build

        logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.replica = serve.get_replica_context().replica_id.unique_id
        parser = argparse.ArgumentParser(prog="plait serve")
        add_arguments(parser)
        args = parser.parse_args([*serve_flags, "--data-dir", str(Path(data_root) / self.replica)])
        try:
            self.context = build(args)
        except StartError as exc:
            raise RuntimeError(f"plait serve: error: {exc}") from None
        self.app = create_app(self.context, DRAIN_SECONDS)
        threading.Thread(target=self._run_engine, name="plait-engine", daemon=True).start()
        self.context.start()

    def _run_engine(self) -> None:
        try:
            self.context.engine.run()
        except Exception:  # the replica's health check reports it, and Ray replaces the replica
            logging.getLogger("plait.ray").exception("the engine failed")

    def check_health(self) -> None:
        if self.context.engine.failure is not None:
            raise RuntimeError(f"the engine failed ({self.context.engine.failure})")

    @serve.multiplexed(max_num_models_per_replica=ADAPTERS_PER_REPLICA)
    async def serve_adapter(self, adapter_id: str) -> str:
        """Ray's record that this replica serves `adapter_id`; the engine loads it on first use."""
        return adapter_id

    async def handle(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes):
        """The server's app answering one request: first (status, headers), then the body's chunks."""
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self.serve_adapter(adapter_id)
        loads = int(sum(m.value for m in _samples(self.context.metrics.adapter_loads)))
        extra = [("x-plait-replica", self.replica), ("x-plait-adapter-loads", str(loads))]
        async for message in call_asgi(self.app, method, path, query, headers, body):
            if isinstance(message, tuple):
                status, response_headers = message
                yield status, [*response_headers, *extra]
            else:
                yield message

    def __del__(self) -> None:
        context = getattr(self, "context", None)
        if context is not None:
            context.stop(DRAIN_SECONDS)


def _samples(counter) -> list:
    return [s for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")]


async def call_asgi(app, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes):
    """Run one HTTP request through an ASGI app in this process, yielding (status, headers) and then
    each chunk of the body as the app sends it (so streamed answers stream)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("plait", 80),
    }
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    break
    finally:
        disconnected.set()  # a client gone mid-stream: the route sees the disconnect and frees its slot
        await task


ingress = FastAPI(title="Plait on Ray Serve")


@serve.deployment(ray_actor_options={"num_cpus": 0})  # it only forwards: the replicas' cores stay theirs
@serve.ingress(ingress)
class Ingress:
    def __init__(self, replicas):
        self.replicas = replicas

    # The route's helpers are methods: Ray ships this class to its replica by value, and module-level
    # names it does not reference directly would not come along.
    @ingress.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, path: str, request: Request):
        body = await request.body()
        handle = self.replicas.options(stream=True, multiplexed_model_id=self.adapter_of(body, request))
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        chunks = handle.handle.remote(request.method, f"/{path}", request.url.query, headers, body)
        status, response_headers = await chunks.__anext__()
        kept = {k: v for k, v in response_headers if k.lower() not in ("content-length", "transfer-encoding")}
        return StreamingResponse(self.rest(chunks), status_code=status, headers=kept)

    @staticmethod
    async def rest(chunks):
        async for chunk in chunks:
            yield chunk

    @staticmethod
    def adapter_of(body: bytes, request: Request) -> str:
        """The request's `model`, when it names one in a JSON body (anything else routes freely)."""
        if "json" not in request.headers.get("content-type", ""):
            return ""
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return ""  # the replica's app answers the malformed body with its own 400
        return model if isinstance(model, str) else ""


def app(args: dict):
    """The application `serve run` builds: `args` holds `replicas` (default 1), `serve_flags` (a
    list of `plait serve` flags, without --host/--port/--data-dir), `state_dir` (the shared store
    and database when the flags name none) and `data_root` (each replica's data dir goes under it)."""
    state = Path(args.get("state_dir", "/tmp/plait-ray")).absolute()
    flags = [str(flag) for flag in args.get("serve_flags", [])]
    if "--store" not in flags:
        flags += ["--store", f"file://{state / 'store'}"]
    if "--database" not in flags:
        flags += ["--database", f"sqlite:///{state / 'records.sqlite3'}"]
    data_root = str(Path(args.get("data_root", state / "replicas")).absolute())
    replicas = PlaitReplica.options(num_replicas=int(args.get("replicas", 1)))
    return Ingress.bind(replicas.bind(flags, data_root))
