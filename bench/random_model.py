"""A model folder with random weights at a real model's shapes, for benchmarks where no weights can be downloaded.

    python bench/random_model.py OUT [--shape llama-3-8b] [--layers N]

Writes what `plait serve --model OUT` and `plait train --model OUT` read: config.json,
safetensors weights in bf16 (normal, std 0.02, as transformers initializes them; built on
the GPU when there is one, which is much faster) and a tokenizer. The tokenizer is byte-level
with a chat template and no merges, its vocabulary padded with placeholder tokens `<t…>` to the
model's size, so any id the random model samples decodes. Text costs one token per byte, so
prompts are longer in tokens than with the real tokenizer; the shapes of every weight,
vocabulary included, are the real model's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPES = {
    "llama-3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    },
    # Small enough for a CPU: what the tests and `bench/gpu_check.sh --smoke` build.
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
    },
}
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(vocab_size: int):
    """Byte-level BPE without merges: 256 byte tokens, the specials, then placeholders up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = sorted(alphabet) + list(SPECIALS)
    if vocab_size < len(tokens):
        raise ValueError(f"a vocabulary of {vocab_size} cannot hold the {len(tokens)} byte and special tokens")
    tokens += [f"<t{i}>" for i in range(vocab_size - len(tokens))]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[3],
        pad_token=SPECIALS[1],
        chat_template=CHAT_TEMPLATE,
    )


def write_random_model(out: Path, shape: str = "llama-3-8b", layers: int | None = None) -> int:
    """Write the folder; returns the model's parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dims = dict(SHAPES[shape])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    tokenizer = byte_level_tokenizer(dims["vocab_size"])
    config = LlamaConfig(
        **dims,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model.num_parameters()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    p.add_argument("--layers", type=int, help="decoder layers (default: the model's own)")
    args = p.parse_args()
    params = write_random_model(args.out, args.shape, args.layers)
    layers = json.loads((args.out / "config.json").read_text())["num_hidden_layers"]
    print(f"{args.out}: {args.shape}, {layers} layers, {params:,} parameters")


if __name__ == "__main__":
    main()
