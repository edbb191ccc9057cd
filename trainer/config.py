"""Every setting of `plait train`, from defaults, a config file (TOML or YAML) and flags, in that order.

The config file uses the long flags' names as keys, with dashes or underscores; a key that
names no flag is an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("sft", "dpo")
MAX_BETA = 2.0  # OpenAI's bound on DPO's beta
# Flag spellings that name the same setting (OpenAI and others call it a validation file).
ALIASES = {"validation_file": "eval_file"}


class ConfigError(Exception):
    """A setting that cannot be used; the message is one line."""


@dataclass(frozen=True)
class TrainConfig:
    data: str | None = None
    output: str | None = None
    model: str | None = None
    eval_file: str | None = None
    # what is learnt: supervised fine-tuning, or preference tuning (DPO) with its beta
    method: str = "sft"
    beta: float = 0.1
    init_adapter: str | None = None  # a PEFT adapter to start from (and, for DPO, the reference)
    # optimization
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 1024
    seed: int = 42
    # LoRA
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    use_rslora: bool = False
    # runtime
    device: str | None = None
    dtype: str = "auto"
    cpu_weights: str = "auto"  # on the CPU, NF4 weights also kept dequantized (plait.server.base_model)
    gradient_checkpointing: bool = True
    threads: int | None = None
    eval_every: int | None = None
    save_every: int = 100
    resume: bool = False
    events: str | None = None  # JSONL file getting one line per step, evaluation and checkpoint
    # publishing
    publish: str | None = None
    adapter_id: str | None = None
    admin_key: str | None = field(default=None, repr=False)

    def training_settings(self) -> dict:
        """The settings that decide the numbers a run produces: a resumed run must match them."""
        runtime = {
            "device",
            "cpu_weights",
            "threads",
            "eval_every",
            "save_every",
            "resume",
            "events",
            "publish",
            "adapter_id",
            "admin_key",
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in runtime | {"output"}}

    def public(self) -> dict:
        """The settings as written to the report: everything but the admin key."""
        settings = dataclasses.asdict(self)
        settings.pop("admin_key")
        return settings


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def load_config_file(path: str | Path) -> dict:
    """The file's settings, keys normalised to field names; ConfigError names unknown keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {_first_line(exc)}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_first_line(exc)}") from None
    else:
        raise ConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    settings = {}
    unknown = []
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in FIELDS:
            unknown.append(str(key))
            continue
        settings[name] = _coerce(name, value, f"config file {path}")
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting {', '.join(unknown)}")
    return settings


def build_config(file_settings: dict, flag_settings: dict) -> TrainConfig:
    """Defaults, overridden by the config file, overridden by the flags given (those not None)."""
    merged = {**file_settings, **{k: v for k, v in flag_settings.items() if v is not None}}
    return TrainConfig(**merged)


def _coerce(name: str, value: object, where: str) -> object:
    """A config-file value checked against the field's type (flags are already typed by argparse)."""
    expected = _TYPES[name]
    allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    if value is None and type(None) in allowed:
        return None
    kind = next(t for t in allowed if t is not type(None))
    if kind == tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list) and items and all(isinstance(i, str) and i.strip() for i in items):
            return tuple(i.strip() for i in items)
    elif isinstance(value, bool):
        if kind is bool:
            return value
    elif kind is float and isinstance(value, int | float):
        return float(value)
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{where}: {name.replace('_', '-')} must be {_describe(kind)}, got {value!r}")


def _describe(kind: object) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(kind, "a list of module names")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
