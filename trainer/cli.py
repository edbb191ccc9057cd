"""`plait train`: QLoRA fine-tuning of a LoRA adapter on the server's NF4 base model.

Everything that can be checked without the model (settings, every line of the data files,
the output folder) is checked before the model is loaded. The adapter is built in a sibling
folder `<output>.partial` (where checkpoints also live) and renamed to `<output>` only when
complete, so a failed run never leaves a half-written adapter where a server could load it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from plait.server.fine_tuning.contract import ERROR_PREFIX, SERVER_PID_VARIABLE
from plait.trainer.config import FIELDS, MAX_BETA, METHODS, ConfigError, TrainConfig, build_config, load_config_file
from plait.trainer.data import DataError, Example, PairExample, read_examples, read_pairs

DTYPES = ("auto", "bfloat16", "float32")
# plait.server.base_model.CPU_WEIGHTS, spelt out: importing that module imports torch, which
# would make every quick refusal here take two seconds.
CPU_WEIGHTS = ("auto", "nf4", "dequantized")
MAX_LISTED_SKIPS = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    # Every default is None here so that a flag left out can be told from one given: the
    # config file fills the first kind, and the TrainConfig defaults (shown in help) the rest.
    p.add_argument(
        "data",
        nargs="?",
        help="training JSONL: OpenAI chat {messages}, {prompt, completion} or Alpaca; "
        "for --method dpo, preference pairs (OpenAI's or TRL's format)",
    )
    p.add_argument("--output", "-o", help="folder to write the adapter into (must not exist yet)")
    p.add_argument("--config", help="TOML or YAML file holding any of these flags (long names); flags override it")
    p.add_argument(
        "--model", help="local Hugging Face model folder (see the README's Base models); default: embedded SmolLM2-135M"
    )
    p.add_argument("--eval-file", "--validation-file", dest="eval_file", help="JSONL for eval loss (same formats)")
    g = p.add_argument_group("method")
    g.add_argument(
        "--method",
        choices=METHODS,
        help="sft: learn the answers in the data (default); dpo: learn to prefer one answer to another "
        "(preference pairs, OpenAI's or TRL's format)",
    )
    g.add_argument(
        "--beta", type=float, help=f"DPO: how far the adapter may move from the reference (default {d.beta})"
    )
    g.add_argument(
        "--init-adapter",
        metavar="PATH",
        help="a PEFT adapter folder to continue from; its rank and targets are kept, and for DPO it is the reference",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help=f"passes over the data (default {d.epochs})")
    g.add_argument("--max-steps", type=int, help="optimizer steps to take; overrides --epochs")
    g.add_argument("--batch-size", type=int, help=f"examples per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--warmup-ratio", type=float, help=f"share of steps for linear warmup (default {d.warmup_ratio})")
    g.add_argument("--warmup-steps", type=int, help="warmup steps; overrides --warmup-ratio")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--max-grad-norm", type=float, help=f"gradient clipping norm (default {d.max_grad_norm})")
    g.add_argument("--max-seq-len", type=int, help=f"tokens per example, longer ones cut (default {d.max_seq_len})")
    g.add_argument("--seed", type=int, help=f"seed for adapter init, data order and dropout (default {d.seed})")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, help=f"rank (default {d.lora_r})")
    g.add_argument("--lora-alpha", type=float, help=f"scale numerator (default {d.lora_alpha:g})")
    g.add_argument("--lora-dropout", type=float, help=f"dropout on the adapter input (default {d.lora_dropout})")
    g.add_argument("--target-modules", type=_module_list, help="comma-separated module names (default all-linear)")
    g.add_argument("--use-rslora", action=argparse.BooleanOptionalAction, help="scale by alpha/sqrt(r), not alpha/r")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    g.add_argument(
        "--dtype", choices=DTYPES, help="compute dtype; auto: the faster one on this hardware, measured once"
    )
    g.add_argument(
        "--cpu-weights",
        choices=CPU_WEIGHTS,
        help="on the CPU: keep the NF4 weights dequantized too, for speed (default auto: when memory allows)",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute activations in the backward pass to save memory (default on)",
    )
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--eval-every", type=int, help="steps between eval-loss measurements (default: only at the end)")
    g.add_argument("--save-every", type=int, help=f"steps between checkpoints, 0 for none (default {d.save_every})")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, help="continue from the newest checkpoint")
    g.add_argument(
        "--events",
        metavar="PATH",
        help="append progress to this JSONL file, one object per step, "
        "evaluation and checkpoint (what the server's fine-tuning jobs read)",
    )
    g = p.add_argument_group("publishing")
    g.add_argument("--publish", metavar="URL", help="upload the adapter to the Plait server at URL when done")
    g.add_argument("--adapter-id", help="id to publish under (default: the output folder's name)")
    g.add_argument("--admin-key", help="the server's admin key (default: $PLAIT_ADMIN_KEY)")


def run(args: argparse.Namespace) -> int:
    _stop_with_server()
    try:
        config = resolve_config(args)
        read = read_pairs if config.method == "dpo" else read_examples
        train_examples = read(config.data)
        eval_examples = read(config.eval_file) if config.eval_file else []
        output, run_dir, resume_from = prepare_output(config)
        if resume_from is not None:
            check_resumable(config, resume_from)
    except (ConfigError, DataError) as exc:
        return _fail(exc)
    try:
        return train_adapter(config, train_examples, eval_examples, output, run_dir, resume_from)
    except KeyboardInterrupt:
        print(
            f"plait train: interrupted; continue from the last checkpoint in {run_dir} with --resume", file=sys.stderr
        )
        return 130


def _stop_with_server() -> None:
    """A fine-tuning job's trainer ends, with everything it started, once its server is gone."""
    server = os.environ.get(SERVER_PID_VARIABLE)
    if not server or os.getppid() != int(server):
        return

    def watch() -> None:
        while os.getppid() == int(server):
            time.sleep(1.0)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="plait-server-watch", daemon=True).start()


# What an --init-adapter brings itself.
ADAPTER_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    file_settings = load_config_file(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in FIELDS}
    config = build_config(file_settings, flags)
    given = [n for n in ADAPTER_SETTINGS if flags.get(n) is not None or n in file_settings]
    if config.init_adapter and given:
        raise ConfigError(
            f"--{given[0].replace('_', '-')} cannot be combined with --init-adapter: the adapter keeps its own"
        )
    if config.admin_key is None and os.environ.get("PLAIT_ADMIN_KEY"):
        config = dataclasses.replace(config, admin_key=os.environ["PLAIT_ADMIN_KEY"])
    check_config(config)
    return config


def check_config(c: TrainConfig) -> None:
    if not c.data:
        raise ConfigError("no training data: give a JSONL file (or `data` in the config file)")
    if not c.output:
        raise ConfigError("no output folder: give --output DIR")
    problems = [
        (c.epochs >= 1, "--epochs must be at least 1"),
        (c.max_steps is None or c.max_steps >= 1, "--max-steps must be at least 1"),
        (c.batch_size >= 1, "--batch-size must be at least 1"),
        (c.grad_accum >= 1, "--grad-accum must be at least 1"),
        (c.lr > 0, "--lr must be positive"),
        (0 <= c.warmup_ratio <= 1, "--warmup-ratio must be between 0 and 1"),
        (c.warmup_steps is None or c.warmup_steps >= 0, "--warmup-steps must not be negative"),
        (c.weight_decay >= 0, "--weight-decay must not be negative"),
        (c.max_grad_norm > 0, "--max-grad-norm must be positive"),
        (c.max_seq_len >= 2, "--max-seq-len must be at least 2"),
        (c.lora_r >= 1, "--lora-r must be at least 1"),
        (c.lora_alpha > 0, "--lora-alpha must be positive"),
        (0 <= c.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (c.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
        (c.cpu_weights in CPU_WEIGHTS, f"--cpu-weights must be one of {', '.join(CPU_WEIGHTS)}"),
        (c.threads is None or c.threads >= 1, "--threads must be at least 1"),
        (c.eval_every is None or c.eval_every >= 1, "--eval-every must be at least 1"),
        (c.save_every >= 0, "--save-every must not be negative"),
        (c.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
        (0 < c.beta <= MAX_BETA, f"--beta must be in (0, {MAX_BETA:g}]"),
        (
            c.init_adapter is None or (Path(c.init_adapter).expanduser() / "adapter_config.json").is_file(),
            f"--init-adapter: {c.init_adapter} is not a PEFT adapter folder (no adapter_config.json)",
        ),
    ]
    for ok, message in problems:
        if not ok:
            raise ConfigError(message)


def prepare_output(config: TrainConfig) -> tuple[Path, Path, Path | None]:
    """The output folder, the folder the run builds it in, and the checkpoint to resume from."""
    from plait.trainer.checkpoint import latest_checkpoint

    output = Path(config.output).expanduser().resolve()
    run_dir = output.with_name(output.name + ".partial")
    if output.exists():
        raise ConfigError(f"output folder {output} already exists; choose another or remove it")
    checkpoint = latest_checkpoint(run_dir)
    if config.resume:
        if checkpoint is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir}")
        return output, run_dir, checkpoint
    if checkpoint is not None:
        raise ConfigError(f"{run_dir} holds checkpoints of an interrupted run: add --resume, or remove it")
    shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of a run that died before its first checkpoint
    return output, run_dir, None


def check_resumable(config: TrainConfig, checkpoint: Path) -> None:
    """A checkpoint continues only the run it came from: same settings, same data."""
    from plait.trainer.checkpoint import read_progress

    settings, saved = run_settings(config), read_progress(checkpoint)["settings"]
    changed = sorted(k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k))
    if changed:
        raise ConfigError(f"--resume: {checkpoint} was made with different {', '.join(changed)}")


def train_adapter(
    config: TrainConfig,
    train_examples: list[Example] | list[PairExample],
    eval_examples: list[Example] | list[PairExample],
    output: Path,
    run_dir: Path,
    resume_from: Path | None,
) -> int:
    import torch
    import transformers

    from plait.server.base_model import ModelLoadError, default_device, load_tokenizer, resolve_model
    from plait.server.fine_tuning.contract import DoneEvent, EventWriter
    from plait.trainer.loop import train
    from plait.trainer.model import LoraSettings, compute_dtype, load_for_training
    from plait.trainer.objectives import DPO, SFT

    transformers.utils.logging.disable_progress_bar()  # the training bar is the one to watch
    started = time.perf_counter()
    try:
        device = torch.device(config.device) if config.device else default_device()
        if config.threads:
            torch.set_num_threads(config.threads)
        spec = resolve_model(config.model)
        tokenizer = load_tokenizer(spec)
        train_set, skipped = tokenize_examples(tokenizer, train_examples, config, Path(config.data))
        eval_set, _ = tokenize_examples(tokenizer, eval_examples, config, Path(config.eval_file or "."))
        if not train_set:
            raise ConfigError(f"every example is longer than --max-seq-len {config.max_seq_len} before its answer")
        dtype = compute_dtype(device, config.dtype)
        torch.manual_seed(config.seed)  # the adapters' initial weights
        lora = LoraSettings(
            config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules, config.use_rslora
        )
        _info(f"loading {spec.name} from {spec.path} on {device} (NF4, {str(dtype).removeprefix('torch.')} compute)")
        init_adapter = Path(config.init_adapter).expanduser() if config.init_adapter else None
        model = load_for_training(
            spec, device, dtype, lora, config.gradient_checkpointing, config.cpu_weights, init_adapter
        )
    except (ConfigError, DataError, ModelLoadError, RuntimeError) as exc:
        return _fail(exc)

    run_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    events = EventWriter(config.events)
    try:
        objective = DPO(config.beta) if config.method == "dpo" else SFT()
        progress = train(
            model,
            train_set,
            eval_set,
            config,
            device,
            pad_id,
            run_dir,
            run_settings(config),
            resume_from,
            events.write,
            objective,
        )
        finish(
            model,
            progress,
            config,
            spec,
            device,
            dtype,
            output,
            run_dir,
            examples={"train": len(train_set), "skipped_too_long": skipped, "eval": len(eval_set)},
            wall_seconds=time.perf_counter() - started,
            resumed_from=resume_from,
        )
        final_eval_loss = progress.eval_loss[-1][1] if progress.eval_loss else None
        events.write(
            DoneEvent(str(output), progress.step, progress.tokens, progress.train_loss[-1][1], final_eval_loss)
        )
    finally:
        events.close()
    _info(f"adapter written to {output} ({progress.step} steps, loss {progress.train_loss[-1][1]:.4f})")
    if config.publish:
        return publish_adapter(config, output)
    return 0


def run_settings(config: TrainConfig) -> dict:
    """What must not change between a run and its resumption: settings plus the data's contents."""
    settings = config.training_settings()
    for key in ("data", "eval_file"):
        path = settings.pop(key)
        settings[f"{key}_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    settings["target_modules"] = list(settings["target_modules"])  # as it reads back from JSON
    return settings


def tokenize_examples(tokenizer, examples: list[Example] | list[PairExample], config: TrainConfig, path: Path):
    """Token ids and labels for each example (each side of a pair); those cut before any answer
    token are skipped, and said so."""
    from plait.trainer.masking import TemplateError, tokenize_conversation, tokenize_pair

    tokenized, skipped, problems = [], [], []
    for example in examples:
        try:
            if isinstance(example, PairExample):
                result = tokenize_pair(tokenizer, example.pair, config.max_seq_len)
            else:
                result = tokenize_conversation(tokenizer, example.messages, config.max_seq_len)
        except TemplateError as exc:
            problems.append(f"line {example.line}: {exc}")
            continue
        if result is None:
            skipped.append(example.line)
        else:
            tokenized.append(result)
    if problems:
        raise DataError(path, problems[:20], len(problems))
    if skipped:
        lines = ", ".join(map(str, skipped[:MAX_LISTED_SKIPS])) + (" ..." if len(skipped) > MAX_LISTED_SKIPS else "")
        _info(
            f"warning: {path}: {len(skipped)} example(s) skipped, no answer token within --max-seq-len "
            f"{config.max_seq_len} (line {lines})"
        )
    return tokenized, len(skipped)


def finish(
    model,
    progress,
    config,
    spec,
    device,
    dtype,
    output: Path,
    run_dir: Path,
    examples: dict,
    wall_seconds: float,
    resumed_from: Path | None,
) -> None:
    """Adapter, report and loss curve into the run folder, checkpoints dropped, then renamed into place."""
    import peft
    import torch
    import transformers

    from plait.trainer.checkpoint import CHECKPOINTS
    from plait.trainer.model import trainable_parameters, write_adapter
    from plait.trainer.report import LOSS_CURVE_FILE, peak_memory, plot_loss_curve, write_report

    write_adapter(model, run_dir)
    report = {
        "adapter": str(output),
        "base_model": {"name": spec.name, "path": str(spec.path), "quantization": "nf4, double quantization"},
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "adapter_dtype": "float32",
        "trainable_parameters": sum(p.numel() for p in trainable_parameters(model)),
        "examples": examples,
        "steps": progress.step,
        "epochs": round(progress.epochs, 4),
        "tokens": progress.tokens,
        "target_tokens": progress.target_tokens,
        "train_seconds": round(progress.seconds, 3),
        "prepare_seconds": round(progress.prepare_seconds, 3),
        "tokens_per_second": round(progress.tokens / progress.seconds, 2) if progress.seconds else None,
        "wall_seconds": round(wall_seconds, 3),
        "peak_memory": peak_memory(device),
        "resumed_from_step": int(resumed_from.name.removeprefix("step-")) if resumed_from else None,
        "method": config.method,
        "final_train_loss": progress.train_loss[-1][1],
        "final_eval_loss": progress.eval_loss[-1][1] if progress.eval_loss else None,
        "train_loss": progress.train_loss,
        "eval_loss": progress.eval_loss,
        "train_metrics": progress.train_metrics,
        "eval_metrics": progress.eval_metrics,
        "step_times": progress.step_times,
        "config": config.public(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    write_report(run_dir, report)
    plot_loss_curve(run_dir / LOSS_CURVE_FILE, progress.train_loss, progress.eval_loss)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    os.replace(run_dir, output)


def publish_adapter(config: TrainConfig, output: Path) -> int:
    from plait.trainer.publish import PublishError, publish

    adapter_id = config.adapter_id or output.name
    try:
        publish(config.publish, adapter_id, output, config.admin_key)
    except PublishError as exc:
        print(f"{ERROR_PREFIX}publishing failed ({exc}); the adapter is still in {output}", file=sys.stderr)
        return 1
    _info(f"published as {adapter_id} to {config.publish}")
    return 0


def _module_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"not a comma-separated list of module names: {text!r}")
    return names


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fail(exc: Exception | str) -> int:
    summary = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    print(f"{ERROR_PREFIX}{summary}", file=sys.stderr)
    if isinstance(exc, DataError):
        for line in exc.details():
            print(f"  {line}", file=sys.stderr)
    return 2
