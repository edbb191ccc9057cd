"""`plait train-router`: train a learned router for a fusion of adapters, and optionally publish it.

    plait train-router --adapter json=out/json --data json=json.jsonl \\
                       --adapter upper=out/upper --data upper=upper.jsonl --output router/ \\
                       --publish http://localhost:8000 --fusion-id skills --top-k 1

Each member comes with a few examples of its own data (the formats `plait train` reads);
the router learns, per layer, which member's data a token belongs to (see
plait.trainer.router). The adapters themselves are only read for the layers they adapt. The output folder gets
`router.safetensors` (the gates), `fusion.json` (the members in the gates' order and the
routing settings) and `report.json`; `--publish` creates the fusion on the server from them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from plait.trainer.data import DataError, read_examples

ROUTER_FILE = "router.safetensors"
FUSION_FILE = "fusion.json"
REPORT_FILE = "report.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="ID=FOLDER",
        required=True,
        help="a member: its id on the server and its PEFT adapter folder (repeat per member)",
    )
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="ID=FILE",
        required=True,
        help="examples of a member's skill, JSONL as plait train reads (one per member)",
    )
    p.add_argument("--output", "-o", required=True, help="folder to write the router into (must not exist yet)")
    p.add_argument("--model", help="local Hugging Face model folder; default: embedded SmolLM2-135M")
    p.add_argument("--max-examples", type=int, default=32, help="examples used per member (default 32)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the examples (default 2)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate of the gates (default 5e-3)")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per example, longer ones cut (default 256)")
    p.add_argument("--seed", type=int, default=0, help="example choice and order (default 0)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto", help="compute dtype")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    g = p.add_argument_group("the fusion (saved in fusion.json, and created on the server with --publish)")
    g.add_argument("--fusion-id", help="the fusion's model id (default: the output folder's name)")
    g.add_argument("--top-k", type=int, default=1, help="members each token uses (default 1)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    g.add_argument("--publish", metavar="URL", help="create the fusion on the Plait server at URL")
    g.add_argument("--admin-key", help="the server's admin key (default: $PLAIT_ADMIN_KEY)")


def run(args: argparse.Namespace) -> int:
    try:
        members = _pairs(args.adapter, "--adapter")
        data = _pairs(args.data, "--data")
        if set(members) != set(data):
            raise ValueError(
                f"--adapter and --data must name the same members, got {sorted(members)} and {sorted(data)}"
            )
        if not 1 <= args.top_k <= len(members):
            raise ValueError(f"--top-k must be between 1 and the number of members ({len(members)})")
        for name, folder in members.items():
            if not (Path(folder) / "adapter_config.json").is_file():
                raise ValueError(f"--adapter {name}: no adapter_config.json in {folder}")
        examples = {name: read_examples(path) for name, path in data.items()}
        output = Path(args.output)
        if output.exists():
            raise ValueError(f"--output {output} exists; choose a new folder")
    except (ValueError, DataError) as exc:
        return _fail(exc)
    fusion = {
        "id": args.fusion_id or output.name,
        "members": list(members),
        "router": "learned",
        "top_k": args.top_k,
        "temperature": args.temperature,
    }
    try:
        report = _train(args, members, examples, output, fusion)
    except (ValueError, OSError, RuntimeError) as exc:
        return _fail(exc)
    _info(f"router written to {output} (routing accuracy on its examples: {report['routing_accuracy']:.1%})")
    if args.publish:
        return _publish(args, output, fusion)
    return 0


def _train(args, members: dict[str, str], examples: dict, output: Path, fusion: dict) -> dict:
    import torch
    import transformers
    from tqdm import tqdm

    from plait.server.adapters.format import base_lora_targets, read_adapter
    from plait.server.base_model import default_device, load_nf4_model, load_tokenizer, resolve_model
    from plait.trainer.masking import tokenize_conversation
    from plait.trainer.model import compute_dtype
    from plait.trainer.router import Gates, RouterExample, save_router, train_router

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    device = torch.device(args.device) if args.device else default_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = resolve_model(args.model)
    tokenizer = load_tokenizer(spec)
    rng = random.Random(args.seed)
    chosen: list[RouterExample] = []
    for index, name in enumerate(members):
        pool = list(examples[name])
        rng.shuffle(pool)
        for example in pool[: args.max_examples]:
            tokens = tokenize_conversation(tokenizer, example.messages, args.max_seq_len)
            if tokens is not None:
                chosen.append(RouterExample(index, tokens.input_ids))
    _info(f"loading {spec.name} on {device}")
    base = load_nf4_model(spec, device, compute_dtype(device, args.dtype))
    targets = base_lora_targets(base)
    adapters = {name: read_adapter(Path(folder), targets, max_rank=1 << 16) for name, folder in members.items()}
    paths = [p for p in targets if any(p in a.modules for a in adapters.values())]
    gates = Gates(
        {p: targets[p][0] for p in paths}, {p: [p in a.modules for a in adapters.values()] for p in paths}
    ).to(device)
    names = list(members)
    base.eval()
    with tqdm(total=args.epochs * len(chosen), desc="router", unit="example", file=sys.stderr) as bar:

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        accuracy = train_router(base, gates, chosen, args.epochs, args.lr, args.seed, on_step)
    staging = output.with_name(output.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    save_router(gates, staging / ROUTER_FILE)
    (staging / FUSION_FILE).write_text(json.dumps(fusion, indent=2))
    report = {
        "fusion": fusion,
        "adapters": members,
        "examples_per_member": {n: sum(e.member == i for e in chosen) for i, n in enumerate(names)},
        "layers": len(paths),
        "epochs": args.epochs,
        "lr": args.lr,
        "routing_accuracy": accuracy,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "base_model": {"name": spec.name, "path": str(spec.path)},
    }
    (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
    staging.rename(output)
    return report


def _publish(args, output: Path, fusion: dict) -> int:
    import os

    from plait.trainer.publish import PublishError, publish_fusion

    try:
        publish_fusion(args.publish, fusion, output / ROUTER_FILE, args.admin_key or os.environ.get("PLAIT_ADMIN_KEY"))
    except PublishError as exc:
        print(f"plait train-router: error: publishing failed ({exc}); the router is still in {output}", file=sys.stderr)
        return 1
    _info(f"published fusion {fusion['id']} to {args.publish}")
    return 0


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        name, sep, target = value.partition("=")
        if not sep or not name or not target:
            raise ValueError(f"{flag} takes ID=PATH, got {value!r}")
        if name in pairs:
            raise ValueError(f"{flag} names {name!r} twice")
        pairs[name] = target
    return pairs


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fail(exc: Exception) -> int:
    print(f"plait train-router: error: {str(exc).splitlines()[0]}", file=sys.stderr)
    return 2
