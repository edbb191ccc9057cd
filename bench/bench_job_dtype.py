"""A fine-tuning job's training speed with the default dtype (`auto`) against each explicit one.

    python bench/bench_job_dtype.py [--model PATH] [--examples 24] [--rounds 2]

Each run is the trainer command a fine-tuning job starts (`TrainerRun.command`, the contract
the job runner builds on) with the job's default hyperparameters and `plait serve`'s default
`--train-threads`, differing only in `--dtype`: auto, bfloat16, float32. Runs alternate over
the rounds and one at a time; tokens/s counts the real tokens of each optimizer step after
the first (one-off warm-up), from the run's training_report.json. `auto` must never be the
slower choice: it measures the machine once (plait.server.base_model.fastest_dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_serving import machine  # this folder is on sys.path when run as a script
from bench_training import WARMUP_STEPS, write_dataset

from plait.server.fine_tuning import contract
from plait.server.fine_tuning.hyperparameters import Hyperparameters

DTYPES = ("auto", "bfloat16", "float32")


def run_job(args, work: Path, dtype: str, threads: int) -> float:
    h = Hyperparameters()
    micro, accum = h.micro_batches
    run = contract.TrainerRun(
        data="train.jsonl",
        model=args.model or str(default_model()),
        epochs=1,
        batch_size=micro,
        grad_accum=accum,
        lr=h.learning_rate,
        lora_r=h.lora_rank,
        lora_alpha=h.lora_alpha,
        lora_dropout=h.lora_dropout,
        seed=0,
        save_every=0,
        dtype=dtype,
        threads=threads,
    )
    result = subprocess.run(run.command(sys.executable), cwd=work, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"--dtype {dtype} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    report = json.loads((work / contract.ADAPTER_DIR / "training_report.json").read_text())
    timed = [(tokens, seconds) for step, tokens, seconds in report["step_times"] if step > WARMUP_STEPS]
    shutil.rmtree(work / contract.ADAPTER_DIR)
    (work / contract.EVENTS_FILE).unlink()
    return sum(t for t, _ in timed) / sum(s for _, s in timed)


def default_model() -> Path:
    from plait.server.base_model import resolve_model

    return resolve_model(None).path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--examples", type=int, default=24, help="chat examples: steps = examples / the job's batch size")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="trainer threads (serve's default)"
    )
    args = p.parse_args()
    print(f"machine: {machine()}")
    speeds: dict[str, list[float]] = {d: [] for d in DTYPES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_dataset(work / "train.jsonl", args.examples)
        for r in range(args.rounds):
            for dtype in DTYPES:
                speeds[dtype].append(run_job(args, work, dtype, args.threads))
                print(f"round {r + 1}: --dtype {dtype}: {speeds[dtype][-1]:.1f} tokens/s", file=sys.stderr)
    med = {d: statistics.median(v) for d, v in speeds.items()}
    h = Hyperparameters()
    print(
        f"\nfine-tuning job defaults (batch {h.batch_size}, LoRA r{h.lora_rank}), {args.examples} examples, "
        f"{args.threads} trainer thread(s), median of {args.rounds} rounds\n"
    )
    print(f"{'dtype':>10} {'tokens/s':>9} {'auto / this':>12}")
    for d in DTYPES:
        print(f"{d:>10} {med[d]:>9.1f} {med['auto'] / med[d]:>12.2f}")


if __name__ == "__main__":
    main()
