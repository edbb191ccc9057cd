"""LoRA adapters and what is built from them, independent of the engine and the HTTP layer.

- `format` reads a PEFT adapter folder into per-module `scale * B @ A` weights checked against
  the base model (`patterns` holds PEFT's module-name matching).
- `uploads` turns uploaded files, an archive or a local folder into the adapter's two files.
- `store` keeps adapters on disk across restarts, replaces them atomically, and keeps a
  version while a request holds it.
- `merge` is TIES/DARE on full deltas; `fusions` the fusion records; `routers` builds the
  routers fusions use (Arrow, learned) and caches them.

Every refusal is a `plait.server.errors.ClientError` naming what to fix (`errors.AdapterFormatError`
for the adapter's own files).
"""
