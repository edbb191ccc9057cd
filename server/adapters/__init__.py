"""LoRA adapters: the PEFT file format, uploads, and the on-disk store.

`format` reads a PEFT adapter folder into per-module `scale * B @ A` weights checked against
the base model (`patterns` holds PEFT's module-name matching); `uploads` turns uploaded files or
an archive into the adapter's two files; `store` keeps adapters on disk across restarts and
replaces them atomically. Every refusal is an `errors.AdapterFormatError` naming what to fix.
"""
