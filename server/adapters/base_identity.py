"""Whether an adapter was trained on the base model being served, by the model's identity.

An adapter's `base_model_name_or_path` is whatever its trainer was given: a hub id
(`meta-llama/Llama-3.1-8B-Instruct`), a pre-quantized copy of it
(`unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit`) or a local path. These name the same model,
so names are compared by identity: the last path part, lower-cased, without the suffixes
quantized and converted copies add and without Meta's `Meta-` prefix. An adapter whose base
has another identity is still served when its shapes fit, with a warning in its record.
"""

from __future__ import annotations

from collections.abc import Iterable

# What quantized and converted copies add to a model's name (Unsloth, TheBloke, mlx, ...).
COPY_SUFFIXES = (
    "-unsloth-bnb-4bit",
    "-bnb-4bit",
    "-bnb-8bit",
    "-unsloth",
    "-bnb",
    "-4bit",
    "-8bit",
    "-nf4",
    "-int4",
    "-int8",
    "-awq",
    "-gptq",
    "-gguf",
    "-fp16",
    "-bf16",
    "-hf",
)


def model_identity(name_or_path: str) -> str:
    """`unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit` and `meta-llama/Llama-3.1-8B-Instruct`
    both give `llama-3.1-8b-instruct`."""
    name = name_or_path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    while suffix := next((s for s in COPY_SUFFIXES if name.endswith(s) and len(name) > len(s)), None):
        name = name.removesuffix(suffix)
    return name.removeprefix("meta-")


def served_identities(names: Iterable[str | None]) -> frozenset[str]:
    """The identities of every name the served model goes by (its folder, its config's own)."""
    return frozenset(model_identity(n) for n in names if n)


def base_model_warning(trained_on: str | None, served: frozenset[str]) -> str | None:
    """A warning for an adapter trained on another base model than the served one, else None."""
    if not trained_on or not served or model_identity(trained_on) in served:
        return None
    return (
        f"trained on '{trained_on}', not on the served model: its shapes fit, but an adapter "
        "holds corrections to its own base's weights, and on another base its answers can be "
        "worse than either model's alone"
    )
