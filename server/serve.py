"""`plait serve`: load the base model, start the engine, serve the API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

import torch

from plait.server.adapters.base_identity import served_identities
from plait.server.adapters.format import base_lora_targets, read_adapter
from plait.server.adapters.fusions import FusionStore, migrate_fusion_layout
from plait.server.adapters.merge import merge_adapters
from plait.server.adapters.routers import RouterCache
from plait.server.adapters.store import AdapterStore, migrate_folder_layout, validate_adapter_id
from plait.server.base_model import (
    CPU_WEIGHTS,
    ModelLoadError,
    default_data_dir,
    default_device,
    fastest_dtype,
    load_nf4_model,
    load_tokenizer,
    prepare_cpu_weights,
    resolve_model,
)
from plait.server.engine import ATTENTION_NAME, Engine, EngineConfig, LoRAConfig
from plait.server.fine_tuning.jobs import DEFAULT_LEASE_SECONDS, TrainerSetup
from plait.server.fine_tuning.records import DATABASE_FILE, Records, SchemaTooNew
from plait.server.fine_tuning.service import FineTuning
from plait.server.metrics import Metrics
from plait.server.storage.database import DatabaseUnavailable
from plait.server.storage.objects import FolderObjects, ObjectStore, ObjectStoreUnavailable, open_object_store

log = logging.getLogger("plait.serve")

DRAIN_SECONDS = 30.0  # how long in-flight requests may take to finish on shutdown

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    p.add_argument(
        "--model", help="local Hugging Face model folder (see the README's Base models); default: embedded SmolLM2-135M"
    )
    p.add_argument("--served-model-name", help="the id clients use for the base model (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(_DTYPES)],
        default="auto",
        help="compute dtype of the NF4 layers (auto: bfloat16 or float32, whichever this hardware runs faster)",
    )
    p.add_argument(
        "--cpu-weights",
        choices=CPU_WEIGHTS,
        default="auto",
        help="on the CPU: keep NF4 weights dequantized in the compute dtype too, for speed (auto: when memory "
        "allows, using bitsandbytes' own kernel for steps of a few tokens where it has a fast one)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("PLAIT_API_KEY"),
        help="key required for inference (or PLAIT_API_KEY); none: open",
    )
    p.add_argument(
        "--admin-key",
        default=os.environ.get("PLAIT_ADMIN_KEY"),
        help="key required to change adapters (or PLAIT_ADMIN_KEY); default: the API key",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("PLAIT_DATA_DIR") or str(default_data_dir()),
        help="this replica's folder: the default store and database, local copies, job folders (or PLAIT_DATA_DIR)",
    )
    shared = p.add_argument_group("shared state (see the README's Many replicas)")
    shared.add_argument(
        "--store",
        default=os.environ.get("PLAIT_STORE"),
        help="where adapters, fusions and fine-tuning files live: file:///path or s3://bucket/prefix "
        "(or PLAIT_STORE; default: the data dir)",
    )
    shared.add_argument(
        "--s3-endpoint-url",
        default=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        help="an S3-compatible server other than AWS, e.g. MinIO's http://minio:9000",
    )
    shared.add_argument(
        "--store-poll-seconds",
        type=float,
        default=5.0,
        help="how often to look for adapters and fusions changed by other replicas",
    )
    shared.add_argument(
        "--database",
        default=os.environ.get("PLAIT_DATABASE"),
        help="where files, jobs and their events are recorded: sqlite:///path or postgresql://... "
        "(or PLAIT_DATABASE; default: SQLite in the data dir)",
    )
    shared.add_argument(
        "--train",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run queued fine-tuning jobs on this replica (--no-train: serve only; jobs run elsewhere)",
    )
    shared.add_argument(
        "--job-lease-seconds",
        type=float,
        default=DEFAULT_LEASE_SECONDS,
        help="a running job's lease: how long after its replica dies another takes it over",
    )
    p.add_argument("--max-gpu-adapters", type=int, default=8, help="adapters resident on the device at once (slots)")
    p.add_argument("--max-cpu-adapters", type=int, default=32, help="adapters kept parsed in CPU memory")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted")
    p.add_argument("--max-adapter-mb", type=int, default=512, help="largest adapter upload, in MiB")
    p.add_argument("--max-file-mb", type=int, default=512, help="largest fine-tuning file upload (/v1/files), in MiB")
    p.add_argument(
        "--train-dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="compute dtype of fine-tuning jobs (plait train --dtype)",
    )
    p.add_argument(
        "--train-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="CPU threads of a fine-tuning job's trainer (default: half the cores)",
    )
    p.add_argument("--kv-cache-tokens", type=int, default=defaults.kv_cache_tokens, help="size of the KV pool")
    p.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV block")
    p.add_argument("--max-running", type=int, default=defaults.max_running, help="sequences decoding at once")
    p.add_argument(
        "--max-waiting", type=int, default=defaults.max_waiting, help="requests queued before new ones get 429"
    )
    p.add_argument(
        "--max-batched-tokens",
        type=int,
        default=defaults.max_batched_tokens,
        help="tokens in one forward pass (prompts are read in chunks of this)",
    )
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's, capped by the KV pool)")
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="do not reuse the keys and values of prompts that start alike",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture decode steps as CUDA graphs and replay them (CUDA only; see --cuda-graph-max-batch)",
    )
    p.add_argument(
        "--cuda-graph-max-batch",
        type=int,
        default=64,
        help="with --cuda-graphs: the largest decode batch captured (capped by --max-running); "
        "larger ones run uncaptured",
    )
    p.add_argument("--default-max-tokens", type=int, default=1024, help="max_tokens when a request gives none")
    p.add_argument("--max-n", type=int, default=8, help="choices one request may ask for (n)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice, one per core)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


class StartError(Exception):
    """Why a server cannot start, in one line."""


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        context = build(args)
    except StartError as exc:
        return _fail(str(exc))
    from plait.server.api.app import create_app

    log.info(
        "serving %s on http://%s:%d (context %d tokens, KV pool %d tokens)",
        context.model_name,
        args.host,
        args.port,
        context.engine.max_model_len,
        context.engine.kv_cache.capacity_tokens,
    )
    try:
        return serve_http(create_app(context, DRAIN_SECONDS), context.engine, args)
    finally:
        context.fine_tuning.stop()  # no trainer outlives the server (a no-op when the app already stopped it)


def build(args: argparse.Namespace):
    """Everything a server runs, from its flags: the model loaded, the engine made (not yet running),
    the stores and records opened, as one `ServerContext`. StartError says why it cannot be."""
    for name, value in (
        ("--max-gpu-adapters", args.max_gpu_adapters),
        ("--max-cpu-adapters", args.max_cpu_adapters),
        ("--max-lora-rank", args.max_lora_rank),
        ("--max-adapter-mb", args.max_adapter_mb),
        ("--max-file-mb", args.max_file_mb),
        ("--train-threads", args.train_threads),
        ("--kv-cache-tokens", args.kv_cache_tokens),
        ("--block-size", args.block_size),
        ("--max-running", args.max_running),
        ("--max-batched-tokens", args.max_batched_tokens),
        ("--max-n", args.max_n),
        ("--cuda-graph-max-batch", args.cuda_graph_max_batch),
    ):
        if value < 1:
            raise StartError(f"{name} must be at least 1")
    for name, seconds in (
        ("--store-poll-seconds", args.store_poll_seconds),
        ("--job-lease-seconds", args.job_lease_seconds),
    ):
        if not seconds > 0:
            raise StartError(f"{name} must be more than 0")
    try:
        objects, records = open_shared_state(args)
    except (ValueError, OSError, ObjectStoreUnavailable, DatabaseUnavailable, SchemaTooNew) as exc:
        raise StartError(str(exc).splitlines()[0]) from None
    try:
        device = torch.device(args.device) if args.device else default_device()
        spec = resolve_model(args.model)
        if args.cuda_graphs and device.type != "cuda":
            raise StartError(f"--cuda-graphs needs a CUDA device, and this server runs on {device}")
        if args.threads:
            torch.set_num_threads(args.threads)
        dtype = fastest_dtype(device) if args.dtype == "auto" else _DTYPES[args.dtype]
        log.info("loading %s from %s on %s (NF4, %s compute)", spec.name, spec.path, device, dtype)
        tokenizer = load_tokenizer(spec)
        model = load_nf4_model(spec, device, dtype, attn_implementation=ATTENTION_NAME)
        weights = prepare_cpu_weights(model, args.cpu_weights)
        log.info(
            "CPU weights: %s", {"nf4": "NF4", "dequantized": "dequantized", "both": "NF4 and dequantized"}[weights]
        )
    except (ModelLoadError, RuntimeError) as exc:
        raise StartError(str(exc).splitlines()[0]) from None

    from plait.server.api.context import ServerContext

    config = EngineConfig(
        block_size=args.block_size,
        kv_cache_tokens=args.kv_cache_tokens,
        max_batched_tokens=args.max_batched_tokens,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        max_model_len=args.max_model_len,
        prefix_caching=args.prefix_caching,
        cuda_graph_batch=args.cuda_graph_max_batch if args.cuda_graphs else 0,
    )
    metrics = Metrics(args.served_model_name or spec.name)
    targets = base_lora_targets(model)  # before the engine wraps those layers
    try:
        store = AdapterStore(objects, Path(args.data_dir) / "cache" / "adapters", max_bytes=args.max_adapter_mb << 20)
        fusions = FusionStore(objects)
    except OSError as exc:
        raise StartError(f"cannot use --data-dir {args.data_dir}: {exc}") from None

    def read_version(adapter_id: str, version: int):
        return read_adapter(store.version_path(adapter_id, version), targets, args.max_lora_rank)

    lora = LoRAConfig(
        targets=targets,
        load=lambda key: read_version(key.adapter_id, key.version),
        merge=lambda members, spec: merge_adapters(members, spec, targets),
        max_device_adapters=args.max_gpu_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        max_rank=args.max_lora_rank,
    )
    engine = Engine(model, tokenizer, config, device, metrics, lora)
    context = ServerContext(
        engine=engine,
        tokenizer=tokenizer,
        model_name=args.served_model_name or spec.name,
        metrics=metrics,
        store=store,
        fusions=fusions,
        routers=RouterCache(read_version, fusions.router_weights, device),
        lora_targets=targets,
        max_lora_rank=args.max_lora_rank,
        api_key=args.api_key,
        admin_key=args.admin_key,
        default_max_tokens=args.default_max_tokens,
        max_n=args.max_n,
        model_type=getattr(model.config, "model_type", None),
        base_identities=served_identities((spec.name, getattr(model.config, "_name_or_path", None))),
    )

    try:
        setup = TrainerSetup(
            base_model=context.model_name,
            model_path=spec.path,
            device=str(device),
            dtype=args.train_dtype,
            threads=args.train_threads,
            max_lora_rank=args.max_lora_rank,
        )
        context.fine_tuning = FineTuning.open(
            records,
            objects,
            Path(args.data_dir),
            setup,
            context.put_adapter_folder,
            validate_adapter_id,
            args.max_file_mb << 20,
            training=_share_cores(engine, device, args.train_threads),
            copy_adapter=context.copy_adapter,
            train=args.train,
            lease_seconds=args.job_lease_seconds,
        )
    except OSError as exc:
        raise StartError(f"cannot keep fine-tuning work in --data-dir {args.data_dir}: {exc}") from None
    context.poll_seconds = args.store_poll_seconds
    return context


def open_shared_state(args: argparse.Namespace) -> tuple[ObjectStore, Records]:
    """The object store and the records this replica shares with the others (by default, both
    in the data dir), with what an older Plait left in the data dir moved into today's layout."""
    data_dir = Path(args.data_dir).absolute()
    objects = open_object_store(args.store or f"file://{data_dir}", s3_endpoint_url=args.s3_endpoint_url)
    if isinstance(objects, FolderObjects):
        migrate_folder_layout(objects.root)
    migrate_fusion_layout(objects)
    records = Records.open(args.database or f"sqlite:///{data_dir / DATABASE_FILE}")
    log.info("shared state: objects in %s, records in %s", objects.url, records.database.safe_url)
    return objects, records


def _share_cores(engine: Engine, device: torch.device, train_threads: int):
    """While a trainer runs on the CPU, serving computes with the threads it leaves free.

    Two processes whose threads outnumber the cores wreck each other: torch's threads wait for
    one another at every operation, spinning, and a descheduled one holds all back (measured on
    2 cores, 2 serving threads beside a 1-thread trainer: 40x the time per output token)."""
    serving = torch.get_num_threads()
    if device.type != "cpu":
        return lambda running: None
    return lambda running: engine.set_threads(max(1, serving - train_threads) if running else serving)


def serve_http(app, engine: Engine, args: argparse.Namespace) -> int:
    """uvicorn on a thread of its own, the engine on the main thread (see `Engine`).

    SIGTERM drains before uvicorn stops listening, so a load balancer sees 503s, which it retries
    elsewhere, rather than connections refused mid-request. If the engine fails, the HTTP side
    stops too and the process exits with status 1, so a supervisor (systemd, Kubernetes)
    restarts it; `/health` answers 503 meanwhile.
    """
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=DRAIN_SECONDS
        )
    )

    def run_http() -> None:
        try:
            server.run()
        finally:  # also when the port cannot be bound: the engine must not outlive the server
            engine.shutdown(drain_seconds=0)

    draining = threading.Event()

    def drain(sig, frame) -> None:
        """The first SIGTERM or Ctrl-C drains: requests in flight finish (up to DRAIN_SECONDS) while new
        ones and `/health` get 503, then the server stops; a second one stops it at once."""
        if draining.is_set():
            server.handle_exit(sig, frame)
            return
        draining.set()
        log.info("draining: finishing the requests in flight (up to %.0f s); new ones get 503", DRAIN_SECONDS)

        def finish() -> None:
            engine.shutdown(drain_seconds=DRAIN_SECONDS)
            server.should_exit = True

        threading.Thread(target=finish, name="plait-drain", daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, drain)
    http = threading.Thread(target=run_http, name="plait-http")
    http.start()
    try:
        engine.run()
    except Exception:
        server.should_exit = True
        http.join()
        return _fail(f"the engine failed ({engine.failure}); exiting so that a supervisor restarts the server", 1)
    http.join()
    if not server.started:
        return _fail(f"could not listen on {args.host}:{args.port}")
    return 0


def _fail(message: str, status: int = 2) -> int:
    print(f"plait serve: error: {message}", flush=True)
    return status
