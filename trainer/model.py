"""The model being trained: the server's NF4 base with LoRA adapters from PEFT, and its loss.

Dtypes, chosen on purpose (see DESIGN.md, "QLoRA memory and dtypes"):
- the base is loaded by the server's own loader (same NF4 + double-quant config), so the
  adapter is trained against exactly the weights it will be served on;
- its non-4-bit weights (embeddings, norms, lm_head) stay frozen in the compute dtype; PEFT's
  `prepare_model_for_kbit_training` would cast them to fp32, doubling their memory for no gain
  since they get no gradient;
- the LoRA A/B matrices are fp32 (PEFT's autocast_adapter_dtype): tiny next to the base, and
  fp32 master weights keep AdamW's small updates from vanishing in bf16 rounding. They are
  saved in fp32 too, so the served adapter is exactly the trained one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from plait.server.base_model import BaseModelSpec, ModelLoadError, fastest_dtype, load_nf4_model, prepare_cpu_weights
from plait.trainer.batching import Batch
from plait.trainer.masking import IGNORE_INDEX

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # module names, or ("all-linear",)
    use_rslora: bool


def compute_dtype(device: torch.device, requested: str) -> torch.dtype:
    """What was asked for, or with `auto` the dtype this hardware computes faster (measured once;
    see `plait.server.base_model.fastest_dtype`)."""
    if requested == "float32":
        return torch.float32
    if requested == "bfloat16":
        return torch.bfloat16
    return fastest_dtype(device)


def load_for_training(
    spec: BaseModelSpec,
    device: torch.device,
    dtype: torch.dtype,
    lora: LoraSettings,
    gradient_checkpointing: bool,
    cpu_weights: str = "auto",
    init_adapter: Path | None = None,
):
    """The NF4 base wrapped by PEFT with fresh trainable LoRA adapters (initialised from torch's RNG),
    or with `init_adapter`'s weights and its own settings (rank, alpha, targets, dropout) to
    continue from, when `lora` is not used.

    On the CPU the NF4 weights are also kept dequantized where memory allows, as the server keeps
    them: the same values, and a training step of four short chats 1.2x faster in bf16 (measured
    on a 2-core AVX-512 machine)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, PeftModel, get_peft_model

    model = load_nf4_model(spec, device, dtype)
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            # On an AVX512-BF16 CPU, bitsandbytes repacks a layer for its inference kernel the
            # first time it runs in eval mode without gradients (an evaluation, DPO's reference
            # pass), and its backward then reads the repacked weights as garbage.
            layer.support_avx512bf16_for_cpu = False
    prepare_cpu_weights(model, cpu_weights)
    model.config.use_cache = False  # no generation while training; the KV cache only costs memory
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no requires_grad on the inputs (the reentrant kind
        # would, which is half of what prepare_model_for_kbit_training is for).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if init_adapter is not None:
        try:
            peft_model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True, autocast_adapter_dtype=True)
        except (ValueError, RuntimeError, KeyError, OSError) as exc:  # shapes or targets of another base
            raise ModelLoadError(f"--init-adapter {init_adapter}: {str(exc).splitlines()[0]}") from None
        peft_model.train()
        return peft_model
    if lora.target_modules == ("all-linear",):
        target = "all-linear"
    else:
        # PEFT only refuses a list none of whose names match; a typo beside a valid name would
        # silently train fewer layers than asked for.
        names = [name for name, _ in model.named_modules()]
        for wanted in lora.target_modules:
            if not any(name == wanted or name.endswith("." + wanted) for name in names):
                raise ModelLoadError(f"--target-modules: {spec.name} has no module named {wanted!r}")
        target = list(lora.target_modules)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target,
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:  # e.g. a target that is not a layer type LoRA supports
        raise ModelLoadError(f"--target-modules: {str(exc).splitlines()[0]}") from None
    peft_model.train()
    return peft_model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def loss_sum(model, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens (fp32)."""
    logits, targets, _ = _target_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum")


def sequence_logps(model, batch: Batch) -> torch.Tensor:
    """Each row's summed log-probability of its target tokens (fp32, [rows]): what DPO compares."""
    logits, targets, rows = _target_logits(model, batch)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")
    return torch.zeros(batch.input_ids.shape[0], device=logits.device).index_add(0, rows, token_logps)


def _target_logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 logits at the positions that predict a target token, those tokens, and their rows.

    The decoder runs on every token, but the vocabulary projection only on positions that
    predict a trained token: with a 49k vocabulary that head is a fifth of a small model's
    compute, and the logits of prompt tokens would be thrown away by the mask anyway. Where the
    model caps its logits (Gemma 2's final soft-capping), they are capped as its forward does.
    """
    causal_lm = model.get_base_model()
    hidden = causal_lm.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, targets[keep], keep.nonzero()[:, 0]


def write_adapter(model, folder: Path) -> None:
    """The adapter in PEFT's own format: adapter_config.json + adapter_model.safetensors."""
    model.save_pretrained(folder, safe_serialization=True)
    # PEFT also writes a model card template naming a hub repo that does not exist; the
    # training report is this adapter's card.
    (folder / "README.md").unlink(missing_ok=True)
