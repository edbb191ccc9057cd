"""The server: one NF4 base model, many LoRA adapters, an OpenAI-compatible HTTP API.

Sub-layers, imports pointing down only (tests/test_layers.py checks them):

- `api/`: the HTTP routes and what they share (`context.ServerContext`); the only place that
  knows both the engine and the stores. It uses the engine through the names
  `plait.server.engine` exports, never its submodules.
- `engine/`: continuous batching, the paged KV cache, the LoRA layers and adapter slots. It
  is handed adapters as keys plus loader functions and routers as objects; it builds neither.
- `adapters/`: the PEFT format, the adapter store, fusion records, TIES/DARE merging and the
  routers built from fusions. `fine_tuning/`: files, jobs and the contract with the trainer.
- `storage/`: what replicas share, below both: objects (a folder or an S3 bucket, with
  conditional writes) and the database (SQLite or PostgreSQL).
- Leaves any layer may import: `errors` (the one client-error type), `metrics`.
  `base_model` loads the NF4 model (the trainer uses it too); `serve` wires it all together.

Threads, and how they talk:

- **Main thread: the engine loop** (`Engine.run`). It alone touches the scheduler, the KV
  cache, the LoRA slots and each request's state. Others reach it only through its inbox, a
  thread-safe queue of typed messages (add, abort, forget an adapter, wake), and hear back
  through each request's asyncio queue (`call_soon_threadsafe`). The count of unfinished
  requests has a lock; the accepting/stopping flags are single writes read by the loop.
- **plait-http: uvicorn's event loop**, running every route. Anything that blocks (reading
  stores, building a router, tokenizing, merging uploads) goes to its worker threads
  (`asyncio.to_thread`, or plain `def` routes, which FastAPI runs there).
- **Worker threads** call into the stores and the router cache, each of which guards itself:
  `AdapterStore` (a lock over what it knows and holds; another for fetching), `FusionStore`
  (a lock over what it knows), `RouterCache` (a lock over its dict; routers are built outside
  it), fine-tuning `Records` (the database: a lock over the one SQLite connection, or a
  PostgreSQL connection pool). Replicas agree through the store's conditional writes and the
  database's transactions, not through locks. `ServerContext`'s token-text cache is used on
  the event loop only.
- **plait-store-poll**, started by the app: every `--store-poll-seconds` it catches the
  stores up with changes other replicas made, which frees replaced adapters' slots through
  the engine's inbox.
- **plait-adapter-read: the adapter reader**, one thread owned by `AdapterSlots`. It runs
  the loader and merge functions it is given and nothing else; results come back as futures
  the engine thread collects after the reader wakes it through the inbox.
- **plait-fine-tuning: the job supervisor**, started by the app on `--train` replicas. It
  claims jobs from the shared queue, starts and watches one trainer process at a time, renews
  the job's lease and writes job records; API threads that create or cancel jobs take
  `JobRunner`'s lock, which orders status changes and the killing of the trainer. It
  publishes adapters through `ServerContext.put_adapter_folder`, like any upload.
"""
