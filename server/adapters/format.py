"""Reading a PEFT LoRA adapter folder and checking it against the base model it will run on.

A PEFT adapter is `adapter_config.json` plus `adapter_model.safetensors`, whose keys look like
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (A is `[r, in]`, B is
`[out, r]`). Everything that changes what the adapter computes is read and checked here, so the
engine only ever sees `scale * B @ A` per module. What a plain LoRA delta cannot express is
refused with a message naming the field or tensor, never skipped: vLLM and LoRAX users report
adapters silently half-applied, or crashing the server once loaded. Config keys that do not
change the math are ignored, so a config written by a newer PEFT still loads.

`fan_in_fan_out` is accepted and ignored, as PEFT does for these layers: PEFT keeps `lora_A` and
`lora_B` as `nn.Linear` weights whatever the flag, uses it only to transpose the merged delta
for GPT-2's `Conv1D`, and resets it to False when the base layer is an `nn.Linear` (every layer
`base_lora_targets` returns is one).

Weights are only ever read from safetensors; a pickled `adapter_model.bin` is never opened.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
from safetensors import SafetensorError

from plait.server.adapters.errors import AdapterFormatError
from plait.server.adapters.patterns import ALL_LINEAR, check_pattern, is_targeted, pattern_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

# PeftModel saves the wrapped model's state dict, so every key starts with this.
_KEY_PREFIX = "base_model.model."
# PEFT drops the adapter's name when saving; `.default.` appears in state dicts saved by hand.
_KEY_SUFFIX = re.compile(r"\.(lora_A|lora_B)(?:\.default)?\.weight$")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head"})

# Config fields that make the adapter compute something other than `scale * B @ A` on the
# served base layers; each is refused when set (truthy). Values: what such adapters are.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA adapters",
    "modules_to_save": "adapters that replace whole modules",
    "trainable_token_indices": "adapters that retrain token embeddings",
    "layer_replication": "adapters that replicate layers",
    "target_parameters": "LoRA on parameters rather than linear modules",
    "lora_bias": "adapters with a bias on lora_B",
    "use_qalora": "QALoRA adapters",
    "alora_invocation_tokens": "activated LoRA (aLoRA) adapters",
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) adapters",
    "arrow_config": "Arrow-routed adapters",
    "kasa_config": "KaSA adapters",
    "monteclora_config": "MonteCLoRA adapters",
}
# These initialisations rewrite the base weights, and the adapter only works on the rewritten
# ones; PEFT converts such an adapter to plain LoRA when saved with
# `path_initial_model_for_weight_conversion`, which also resets this field to true.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")

_T = TypeVar("_T")


@dataclass(frozen=True)
class LoRAWeights:
    """One module's delta, `scale * b @ a`, in the file's own dtype, on the CPU."""

    a: torch.Tensor  # [rank, in_features]: PEFT's lora_A.weight
    b: torch.Tensor  # [out_features, rank]: PEFT's lora_B.weight
    scale: float  # alpha / rank, or alpha / sqrt(rank) with use_rslora

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoRAAdapter:
    modules: dict[str, LoRAWeights]  # keyed by the base module's path, e.g. "model.layers.0.self_attn.q_proj"
    rank: int  # the largest rank over modules
    target_modules: tuple[str, ...]  # sorted short names of the adapted modules, e.g. ("q_proj", "v_proj")
    base_model_name: str | None  # the config's base_model_name_or_path; for information only
    num_parameters: int


def base_lora_targets(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every layer an adapter may target, as module path -> (in_features, out_features).

    These are the `nn.Linear` layers other than the output projection, PEFT's `all-linear`:
    q/k/v/o and gate/up/down for Llama. bitsandbytes' `Linear4bit` is an `nn.Linear` whose
    `in_features`/`out_features` keep the unquantized sizes. Pass the `...ForCausalLM` model
    before any LoRA wrapping: its module paths are the ones PEFT saves after `base_model.model.`.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    }


def read_adapter(folder: Path, targets: Mapping[str, tuple[int, int]], max_rank: int) -> LoRAAdapter:
    """Read and check the adapter in `folder` against the base layers `targets` (see `base_lora_targets`).

    Raises AdapterFormatError naming the field, tensor or file at fault.
    """
    config = _read_config(folder)
    _check_supported(config)
    _check_target_modules(config.get("target_modules"), targets)
    settings = _LoRASettings.from_config(config)
    pairs = _pair_tensors(_read_tensors(folder), targets)
    modules = {
        path: _module_weights(path, keys, tensors, targets[path], settings, max_rank)
        for path, (keys, tensors) in pairs.items()
    }
    base_model_name = config.get("base_model_name_or_path")
    return LoRAAdapter(
        modules=modules,
        rank=max(weights.rank for weights in modules.values()),
        target_modules=tuple(sorted({path.rsplit(".", 1)[-1] for path in modules})),
        base_model_name=base_model_name if isinstance(base_model_name, str) else None,
        num_parameters=sum(weights.a.numel() + weights.b.numel() for weights in modules.values()),
    )


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterFormatError(f"{ADAPTER_CONFIG} is missing", ADAPTER_CONFIG) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{ADAPTER_CONFIG} cannot be read: {exc}", ADAPTER_CONFIG) from None
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}", ADAPTER_CONFIG) from None
    except RecursionError:
        raise AdapterFormatError(f"{ADAPTER_CONFIG} is nested too deeply to be a PEFT config", ADAPTER_CONFIG) from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{ADAPTER_CONFIG} is not a JSON object", ADAPTER_CONFIG)
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        for pickled in PICKLED_WEIGHTS:
            if (folder / pickled).exists():
                raise AdapterFormatError(
                    f"{pickled} is a pickle file, which is never loaded; only {ADAPTER_WEIGHTS} is accepted "
                    "(PEFT writes it by default: save_pretrained(..., safe_serialization=True))",
                    ADAPTER_WEIGHTS,
                )
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS} is missing", ADAPTER_WEIGHTS)
    # Loading from bytes gives tensors that own their memory: nothing stays mapped to a file
    # the store may replace or delete later.
    try:
        return safetensors.torch.load(path.read_bytes())
    except OSError as exc:
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS} cannot be read: {exc}", ADAPTER_WEIGHTS) from None
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}", ADAPTER_WEIGHTS) from None


@dataclass(frozen=True)
class _LoRASettings:
    """The config fields that set each module's rank and scale."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _LoRASettings:
        # Defaults are PEFT's LoraConfig defaults.
        return cls(
            r=_positive_int(config.get("r", 8), "r"),
            lora_alpha=_number(config.get("lora_alpha", 8), "lora_alpha"),
            use_rslora=_boolean(config.get("use_rslora", False), "use_rslora"),
            rank_pattern=_pattern_map(config.get("rank_pattern"), "rank_pattern", _positive_int),
            alpha_pattern=_pattern_map(config.get("alpha_pattern"), "alpha_pattern", _number),
        )

    def rank(self, module_path: str) -> tuple[int, str]:
        """The module's configured rank and the field that set it."""
        key = pattern_key(self.rank_pattern, module_path)
        return (self.r, "r") if key is None else (self.rank_pattern[key], "rank_pattern")

    def scale(self, module_path: str, rank: int) -> float:
        key = pattern_key(self.alpha_pattern, module_path)
        alpha = self.lora_alpha if key is None else self.alpha_pattern[key]
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _check_supported(config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: 'peft_type' is {json.dumps(peft_type)}; only LORA adapters are supported", "peft_type"
        )
    for field, kind in _UNSUPPORTED_FIELDS.items():
        if config.get(field):
            raise AdapterFormatError(
                f"{ADAPTER_CONFIG}: {field!r} is {_shown(config[field])}; {kind} are not supported", field
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: 'bias' is {_shown(bias)}; only \"none\" is supported (the adapter would change "
            "the base model's biases)",
            "bias",
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: 'init_lora_weights' is {_shown(init)}; such an adapter only works on the base "
            "weights its initialisation rewrote. Convert it to plain LoRA with PEFT "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) and upload that",
            "init_lora_weights",
        )


def _check_target_modules(target_modules: Any, targets: Mapping[str, tuple[int, int]]) -> None:
    """Refuse targets the base model cannot serve. Which modules are adapted is read from the
    tensors; this only makes sure no module the adapter was trained on is left out."""
    if target_modules is None or target_modules == ALL_LINEAR:
        return
    field = "target_modules"
    if isinstance(target_modules, str):
        check_pattern(target_modules, field)
        if not any(is_targeted(target_modules, path) for path in targets):
            raise AdapterFormatError(
                f"{ADAPTER_CONFIG}: 'target_modules' pattern {target_modules!r} matches none of the base model's "
                f"linear layers ({_short_names(targets)})",
                field,
            )
        return
    if not isinstance(target_modules, list) or not all(isinstance(name, str) for name in target_modules):
        raise AdapterFormatError(f"{ADAPTER_CONFIG}: 'target_modules' must be a list of names or a regex", field)
    for name in target_modules:
        if name.rsplit(".", 1)[-1] in _EMBEDDING_MODULES:
            raise AdapterFormatError(
                f"{ADAPTER_CONFIG}: 'target_modules' names {name!r}; LoRA on embeddings and lm_head is not supported",
                field,
            )
        if not any(is_targeted([name], path) for path in targets):
            raise AdapterFormatError(
                f"{ADAPTER_CONFIG}: unknown target module {name!r}; the base model's linear layers are "
                f"{_short_names(targets)}",
                field,
            )


def _pair_tensors(
    tensors: dict[str, torch.Tensor], targets: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[dict[str, str], dict[str, torch.Tensor]]]:
    """Group the tensors by base module: path -> ({"lora_A": key, ...}, {"lora_A": tensor, ...})."""
    if not tensors:
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS} holds no tensors", ADAPTER_WEIGHTS)
    num_layers = 1 + max((int(m.group(1)) for path in targets if (m := _LAYER_INDEX.search(path))), default=-1)
    pairs: dict[str, tuple[dict[str, str], dict[str, torch.Tensor]]] = {}
    for key in sorted(tensors):
        path, which = _module_of(key, targets, num_layers)
        keys, found = pairs.setdefault(path, ({}, {}))
        if which in found:
            raise AdapterFormatError(f"{ADAPTER_WEIGHTS}: tensors {keys[which]!r} and {key!r} are the same weight", key)
        keys[which], found[which] = key, tensors[key]
    return pairs


def _module_of(key: str, targets: Mapping[str, tuple[int, int]], num_layers: int) -> tuple[str, str]:
    """The base module path a tensor key belongs to, and whether it is lora_A or lora_B."""
    if not key.startswith(_KEY_PREFIX):
        raise AdapterFormatError(
            f"{ADAPTER_WEIGHTS}: tensor {key!r} does not start with {_KEY_PREFIX!r}, as PEFT's keys do", key
        )
    name = key.removeprefix(_KEY_PREFIX)
    if "lora_embedding_" in name:
        raise AdapterFormatError(
            f"{ADAPTER_WEIGHTS}: tensor {key!r} is LoRA on embeddings, which is not supported", key
        )
    if "lora_magnitude_vector" in name:
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS}: tensor {key!r} is a DoRA magnitude; DoRA is not supported", key)
    match = _KEY_SUFFIX.search(name)
    if match is None:
        raise AdapterFormatError(
            f"{ADAPTER_WEIGHTS}: unexpected tensor {key!r}; only lora_A.weight and lora_B.weight tensors are supported",
            key,
        )
    path = name[: match.start()]
    if path not in targets:
        layer = _LAYER_INDEX.search(path)
        if path.rsplit(".", 1)[-1] in _EMBEDDING_MODULES:
            reason = "LoRA on embeddings and lm_head is not supported"
        elif layer and int(layer.group(1)) >= num_layers:
            reason = f"layer {layer.group(1)} does not exist: the base model has {num_layers} layers"
        else:
            reason = f"the base model has no linear layer {path!r}"
        raise AdapterFormatError(f"{ADAPTER_WEIGHTS}: tensor {key!r}: {reason}", key)
    return path, match.group(1)


def _module_weights(
    path: str,
    keys: dict[str, str],
    tensors: dict[str, torch.Tensor],
    in_out: tuple[int, int],
    settings: _LoRASettings,
    max_rank: int,
) -> LoRAWeights:
    for which, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
        if other not in tensors:
            raise AdapterFormatError(f"{ADAPTER_WEIGHTS}: {keys[which]!r} has no matching {other}", keys[which])
    for which, tensor in tensors.items():
        key = keys[which]
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{ADAPTER_WEIGHTS}: tensor {key!r} is {tensor.dtype}, not floating point", key)
        if tensor.dim() != 2:
            raise AdapterFormatError(f"{ADAPTER_WEIGHTS}: tensor {key!r} has shape {list(tensor.shape)}, not 2-D", key)
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{ADAPTER_WEIGHTS}: tensor {key!r} holds NaN or infinite values", key)
    a, b = tensors["lora_A"], tensors["lora_B"]
    in_features, out_features = in_out
    rank = a.shape[0]
    for which, tensor, expected in (("lora_A", a, [rank, in_features]), ("lora_B", b, [out_features, rank])):
        if list(tensor.shape) != expected:
            raise AdapterFormatError(
                f"{ADAPTER_WEIGHTS}: tensor {keys[which]!r} has shape {list(tensor.shape)}, but base module {path!r} "
                f"(in {in_features}, out {out_features}) needs {expected}",
                keys[which],
            )
    configured, field = settings.rank(path)
    if rank != configured:
        raise AdapterFormatError(
            f"{ADAPTER_CONFIG}: {field!r} gives module {path!r} rank {configured}, but its tensors have rank {rank}",
            field,
        )
    if rank > max_rank:
        raise AdapterFormatError(
            f"module {path!r} has rank {rank}, above this server's maximum LoRA rank of {max_rank}", field
        )
    return LoRAWeights(a=a, b=b, scale=settings.scale(path, rank))


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterFormatError(f"{ADAPTER_CONFIG}: {field!r} must be a positive integer, not {_shown(value)}", field)
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterFormatError(f"{ADAPTER_CONFIG}: {field!r} must be a number, not {_shown(value)}", field)
    return float(value)


def _boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise AdapterFormatError(f"{ADAPTER_CONFIG}: {field!r} must be true or false, not {_shown(value)}", field)
    return value


def _pattern_map(value: Any, field: str, parse_value: Callable[[Any, str], _T]) -> dict[str, _T]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{ADAPTER_CONFIG}: {field!r} must be an object of pattern -> value", field)
    for pattern in value:
        check_pattern(pattern, field)
    return {pattern: parse_value(item, f"{field}[{pattern!r}]") for pattern, item in value.items()}


def _shown(value: Any) -> str:
    """A config value as it reads in the JSON file, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _short_names(targets: Mapping[str, tuple[int, int]]) -> str:
    return ", ".join(sorted({path.rsplit(".", 1)[-1] for path in targets}))
