"""Training throughput and peak memory of `plait train`, side by side with a plain PEFT +
transformers `Trainer` script on the same data, base model and settings; and of `plait train
--method dpo` side by side with TRL's `DPOTrainer`.

    python bench/bench_training.py [--model PATH] [--steps 10] [--batch-size 4] [--rounds 1] [--no-dpo] [--json PATH]

Both sides load the base through Plait's own NF4 loader and train the same LoRA (rank 16,
alpha 32, dropout 0.05, all linear layers) with gradient checkpointing, on the same token
ids and loss labels (assistant tokens only), for the same number of optimizer steps. The
Trainer side is the usual QLoRA recipe: `prepare_model_for_kbit_training`, `get_peft_model`,
`DataCollatorForSeq2Seq`, `bf16` autocast, paged 8-bit AdamW on CUDA / AdamW on the CPU.

Each side runs in a child process of its own, one after the other, so the peak memory of one
(peak RSS on the CPU, `max_memory_allocated` on CUDA) is its own. Tokens/s counts the real
(unpadded) tokens of every micro-batch over the time of the optimizer steps after the first
(model loading and one-off warm-up excluded). With --rounds above 1 the sides alternate and the medians are reported.

The DPO rows train on preference pairs made from the same word lists (the reversed words
preferred to a shuffle of them), beta 0.1, batch of --batch-size pairs. Both sides compute the
reference log-probabilities once before the first step (Plait always does; TRL with
`precompute_ref_log_probs`), so the timed steps are alike: a forward and backward pass over
both answers of every pair. TRL keeps a quantized model's adapter in bf16, Plait in fp32.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_serving import machine  # this folder is on sys.path when run as a script

WORDS = (
    "river",
    "stone",
    "lantern",
    "orbit",
    "maple",
    "quiet",
    "copper",
    "signal",
    "harbor",
    "velvet",
    "meadow",
    "prism",
    "ember",
    "canyon",
    "thistle",
    "beacon",
    "delta",
    "forest",
    "glacier",
    "saffron",
    "tundra",
    "willow",
    "zephyr",
)


# The first step of a process pays one-off costs (on the CPU, a long bf16 kernel warm-up) that
# say nothing about training speed; both sides' tokens/s leave it out.
WARMUP_STEPS = 1


def write_dataset(path: Path, examples: int) -> None:
    """Chat examples of varied length (40 to 200 tokens or so), the same every time."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(examples):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))
            messages = [
                {"role": "user", "content": f"Repeat these words in reverse order: {words}"},
                {"role": "assistant", "content": " ".join(reversed(words.split()))},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def write_pairs(path: Path, examples: int) -> None:
    """Preference pairs: the words reversed (preferred) or shuffled, the same every time."""
    rng = random.Random(1)
    with path.open("w") as f:
        for _ in range(examples):
            words = [rng.choice(WORDS) for _ in range(rng.randint(8, 60))]
            shuffled = rng.sample(words, len(words))
            prompt = f"Repeat these words in reverse order: {' '.join(words)}"
            f.write(
                json.dumps({"prompt": prompt, "chosen": " ".join(reversed(words)), "rejected": " ".join(shuffled)})
                + "\n"
            )


def run_child(cmd: list[str], workdir: Path) -> None:
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd[:5])} ... failed ({result.returncode}):\n{result.stderr[-3000:]}")


def run_plait(args, data: Path, workdir: Path, name: str, dpo: bool = False) -> dict:
    output = workdir / name
    cmd = [
        sys.executable,
        "-m",
        "plait.cli",
        "train",
        str(data),
        "-o",
        str(output),
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        "1",
        "--max-seq-len",
        str(args.max_seq_len),
        "--lr",
        "2e-4",
        "--warmup-steps",
        "1",
        "--save-every",
        "0",
        "--lora-r",
        "16",
        "--lora-alpha",
        "32",
        "--lora-dropout",
        "0.05",
        "--seed",
        "0",
    ]
    if args.model:
        cmd += ["--model", args.model]
    if dpo:
        cmd += ["--method", "dpo", "--beta", "0.1"]
    run_child(cmd, workdir)
    report = json.loads((output / "training_report.json").read_text())
    timed = [(tokens, seconds) for step, tokens, seconds in report["step_times"] if step > WARMUP_STEPS]
    return {
        "tokens_per_second": sum(t for t, _ in timed) / sum(s for _, s in timed),
        "peak_memory_bytes": report["peak_memory"]["bytes"],
        "final_loss": report["final_train_loss"],
    }


def run_trainer(args, data: Path, workdir: Path, name: str, dpo: bool = False) -> dict:
    result = workdir / f"{name}.json"
    cmd = [
        sys.executable,
        __file__,
        "--dpo-worker" if dpo else "--trainer-worker",
        str(result),
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-seq-len",
        str(args.max_seq_len),
    ]
    if args.model:
        cmd += ["--model", args.model]
    run_child(cmd, workdir)
    return json.loads(result.read_text())


def _shared_settings(args, device: torch.device) -> dict:
    """What the Trainer and DPOTrainer sides share with `plait train`'s command above."""
    return dict(
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=True,
        optim="paged_adamw_8bit" if device.type == "cuda" else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device.type == "cpu",
        seed=0,
        disable_tqdm=True,
    )


def _peak_memory(device: torch.device) -> int:
    import resource

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trainer_worker(args) -> None:
    """The plain script: transformers' Trainer over a PEFT model, as the QLoRA recipes write it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from plait.server.base_model import default_device, load_nf4_model, load_tokenizer, resolve_model
    from plait.trainer.data import read_examples
    from plait.trainer.masking import tokenize_conversation

    spec = resolve_model(args.model)
    tokenizer = load_tokenizer(spec)
    device = default_device()
    examples = [tokenize_conversation(tokenizer, e.messages, args.max_seq_len) for e in read_examples(args.data)]
    dataset = [
        {"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
        for e in examples
        if e is not None
    ]

    torch.manual_seed(0)
    model = load_nf4_model(spec, device, torch.bfloat16)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    counted = {"tokens": 0}

    def collate(features):
        batch = collator(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    class Clock(TrainerCallback):
        """Tokens and time of the steps after the warm-up ones, as plait's report gives them."""

        tokens, seconds, counted_before = 0, 0.0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            # The Trainer collates a step's batch before on_step_begin, so the step's tokens
            # are what the collator counted since the previous step ended.
            if state.global_step > WARMUP_STEPS:
                self.tokens += counted["tokens"] - self.counted_before
                self.seconds += time.perf_counter() - self.started
            self.counted_before = counted["tokens"]

    clock = Clock()
    training_args = TrainingArguments(
        output_dir=str(Path(args.trainer_worker).parent / "trainer-out"),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **_shared_settings(args, device),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate, callbacks=[clock])
    trainer.train()
    peak = _peak_memory(device)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    Path(args.trainer_worker).write_text(
        json.dumps(
            {"tokens_per_second": clock.tokens / clock.seconds, "peak_memory_bytes": peak, "final_loss": losses[-1]}
        )
    )


def dpo_worker(args) -> None:
    """TRL's DPOTrainer over the same NF4 model with a fresh LoRA, as TRL's QLoRA examples set it up."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from plait.server.base_model import default_device, load_nf4_model, load_tokenizer, resolve_model

    spec = resolve_model(args.model)
    tokenizer = load_tokenizer(spec)
    device = default_device()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
    )
    torch.manual_seed(0)
    model = load_nf4_model(spec, device, torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")

    class Clock(TrainerCallback):
        tokens, seconds = 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > WARMUP_STEPS:
                self.seconds += time.perf_counter() - self.started

    clock = Clock()
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=str(Path(args.dpo_worker).parent / "dpo-out"),
            beta=0.1,
            max_length=args.max_seq_len,
            precompute_ref_log_probs=True,
            **_shared_settings(args, device),
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[clock],
    )
    # Tokens per step as TRL's own count gives them (prompt and both answers of each pair).
    trainer.train()
    tokens = [entry["num_tokens"] for entry in trainer.state.log_history if "num_tokens" in entry]
    timed_tokens = tokens[-1] - tokens[WARMUP_STEPS - 1] if len(tokens) > WARMUP_STEPS else tokens[-1]
    peak = _peak_memory(device)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    Path(args.dpo_worker).write_text(
        json.dumps(
            {"tokens_per_second": timed_tokens / clock.seconds, "peak_memory_bytes": peak, "final_loss": losses[-1]}
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-dpo", action="store_true", help="leave out the DPO rows")
    p.add_argument("--json", type=Path, help="also write the settings and every run's figures here")
    p.add_argument("--trainer-worker", metavar="RESULT", help=argparse.SUPPRESS)
    p.add_argument("--dpo-worker", metavar="RESULT", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trainer_worker:
        trainer_worker(args)
        return
    if args.dpo_worker:
        dpo_worker(args)
        return

    print(f"machine: {machine()}")
    plait: list[dict] = []
    hf: list[dict] = []
    plait_dpo: list[dict] = []
    trl_dpo: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="plait-bench-train-") as tmp:
        workdir = Path(tmp)
        data, pairs = workdir / "data.jsonl", workdir / "pairs.jsonl"
        write_dataset(data, args.examples)
        write_pairs(pairs, args.examples)
        for r in range(args.rounds):
            plait.append(run_plait(args, data, workdir, f"plait-{r}"))
            hf.append(run_trainer(args, data, workdir, f"trainer-{r}"))
            if not args.no_dpo:
                plait_dpo.append(run_plait(args, pairs, workdir, f"plait-dpo-{r}", dpo=True))
                trl_dpo.append(run_trainer(args, pairs, workdir, f"trl-dpo-{r}", dpo=True))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    if args.json:
        settings = {
            k: v for k, v in vars(args).items() if k in ("model", "steps", "batch_size", "max_seq_len", "examples")
        }
        runs = {"plait": plait, "trainer": hf, "plait_dpo": plait_dpo, "trl_dpo": trl_dpo}
        args.json.write_text(json.dumps({"machine": machine(), **settings, **runs}, indent=1))

    def median(rows: list[dict], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    tps, tps_hf = median(plait, "tokens_per_second"), median(hf, "tokens_per_second")
    mem, mem_hf = median(plait, "peak_memory_bytes") / 2**20, median(hf, "peak_memory_bytes") / 2**20
    memory_kind = "peak GPU memory allocated" if torch.cuda.is_available() else "peak RSS"
    print(
        f"\n{args.examples} chat examples, {args.steps} steps of batch {args.batch_size}, LoRA r16 all-linear, "
        f"NF4 base, bf16 compute, median of {args.rounds} round(s)\n"
    )
    print(f"{'':>22} {'tokens/s':>10} {memory_kind + ' MiB':>{len(memory_kind) + 5}} {'final loss':>11}")
    for label, t, m, rows in (("plait train", tps, mem, plait), ("PEFT + Trainer", tps_hf, mem_hf, hf)):
        print(f"{label:>22} {t:>10.1f} {m:>{len(memory_kind) + 5}.0f} {median(rows, 'final_loss'):>11.3f}")
    print(f"{'plait / Trainer':>22} {tps / tps_hf:>10.2f} {mem / mem_hf:>{len(memory_kind) + 5}.2f}")
    if plait_dpo:
        tps, tps_trl = median(plait_dpo, "tokens_per_second"), median(trl_dpo, "tokens_per_second")
        mem, mem_trl = median(plait_dpo, "peak_memory_bytes") / 2**20, median(trl_dpo, "peak_memory_bytes") / 2**20
        print(f"\nDPO, {args.examples} preference pairs, beta 0.1, same settings otherwise\n")
        for label, t, m, rows in (
            ("plait train, dpo", tps, mem, plait_dpo),
            ("TRL DPOTrainer", tps_trl, mem_trl, trl_dpo),
        ):
            print(f"{label:>22} {t:>10.1f} {m:>{len(memory_kind) + 5}.0f} {median(rows, 'final_loss'):>11.3f}")
        print(f"{'plait / TRL':>22} {tps / tps_trl:>10.2f} {mem / mem_trl:>{len(memory_kind) + 5}.2f}")


if __name__ == "__main__":
    main()
