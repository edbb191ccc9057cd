"""Multi-adapter serving throughput, S-LoRA style, side by side in one run.

    python bench/bench_adapters.py [--adapters 1 8 64 512] [--requests 48] [--concurrency 16]
                                   [--model PATH] [--all-linear] [--mix distinct] [--no-naive]

For each N, one request stream: adapters drawn with power-law (Zipf, s=1) popularity over N
adapters (or with --mix distinct, request i on adapter i mod N) of mixed ranks (8-64, on
q/k/v/o or with --all-linear on every linear layer, bf16), every request generating exactly
--max-tokens tokens. Plait runs with --gpu-slots device slots (default: one per request in
flight, which on a CPU costs only memory) and a CPU cache that holds every adapter, as
S-LoRA keeps every adapter in host memory. The same stream goes through
  - Plait (`plait serve` over HTTP, --concurrency requests in flight),
  - the naive approach people run today: one PeftModel holding every adapter, `set_adapter`
    and `generate` per request, one at a time,
and Plait serving the same stream with no adapter at all. It prints tokens/s and the ratios
Plait/naive and Plait(N adapters)/Plait(no adapter).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from bench_serving import PROMPTS, machine, start_server  # this folder is on sys.path when run as a script
from safetensors.torch import save_file

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_adapters(
    root: Path, n: int, targets: dict[str, tuple[int, int]], seed: int, modules: tuple[str, ...] = TARGETS
) -> list[str]:
    """N PEFT-format adapters with random weights and ranks on `modules`, written straight to safetensors."""
    rng = torch.Generator().manual_seed(seed)
    names = []
    for i in range(n):
        rank = RANKS[i % len(RANKS)]
        name = f"bench-{i}-r{rank}"
        tensors = {}
        for path, (fan_in, fan_out) in targets.items():
            if path.rsplit(".", 1)[-1] in modules:
                key = f"base_model.model.{path}"
                a = torch.randn(rank, fan_in, generator=rng) / fan_in**0.5
                tensors[f"{key}.lora_A.weight"] = a.bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=rng) * 0.01).bfloat16()
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, folder / "adapter_model.safetensors")
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(modules),
            "bias": "none",
            "task_type": "CAUSAL_LM",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        names.append(name)
    return names


def zipf_stream(names: list[str], requests: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(names))]
    picks = rng.choices(names, weights=weights, k=requests)
    return [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(picks)]


def distinct_stream(names: list[str], requests: int, seed: int) -> list[tuple[str, str]]:
    """Request i names adapter i mod N: the requests in flight name as many adapters as there can be."""
    return [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(requests)]


STREAMS = {"zipf": zipf_stream, "distinct": distinct_stream}


def plait_throughput(url: str, stream, max_tokens: int, concurrency: int, use_adapters: bool) -> float:
    def ask(job) -> int:
        adapter, prompt = job
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if use_adapters:
            body["model"] = adapter
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(ask, stream))
    return tokens / (time.perf_counter() - start)


def naive_throughput(peft_model, tokenizer, stream, max_tokens: int) -> float:
    tokens = 0
    start = time.perf_counter()
    for adapter, prompt in stream:
        peft_model.set_adapter(adapter)
        ids = tokenizer(prompt, return_tensors="pt")
        out = peft_model.generate(
            **ids,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokens += out.shape[1] - ids["input_ids"].shape[1]
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--gpu-slots", type=int, default=16, help="plait serve --max-gpu-adapters")
    p.add_argument("--cpu-adapters", type=int, help="plait serve --max-cpu-adapters (default: the largest N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="local model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--all-linear", action="store_true", help="adapters on every linear layer, not only q/k/v/o")
    p.add_argument("--no-naive", action="store_true", help="leave out the PeftModel side")
    p.add_argument("--mix", choices=sorted(STREAMS), default="zipf", help="which adapter each request names")
    p.add_argument("--json", type=Path, help="also write the settings and every row here")
    args = p.parse_args()

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from plait.server.adapters.format import base_lora_targets
    from plait.server.base_model import default_device, load_nf4_model, load_tokenizer, resolve_model

    print(f"machine: {machine()}")
    spec = resolve_model(args.model)
    tokenizer = load_tokenizer(spec)
    if args.no_naive:  # the layers' shapes are all the adapters need: no weights loaded here
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec.path))
    else:
        base = load_nf4_model(spec, default_device())
    targets = base_lora_targets(base)
    modules = tuple(sorted({path.rsplit(".", 1)[-1] for path in targets})) if args.all_linear else TARGETS
    work = Path(tempfile.mkdtemp(prefix="plait-bench-"))
    names = make_adapters(work / "adapters", max(args.adapters), targets, args.seed, modules)

    server_args = argparse.Namespace(model=args.model, threads=None)
    cpu_adapters = args.cpu_adapters or max(args.adapters)
    proc, url = start_server(
        server_args,
        "--max-gpu-adapters",
        str(args.gpu_slots),
        "--max-cpu-adapters",
        str(cpu_adapters),
        "--data-dir",
        str(work / "data"),
    )
    print(
        f"\n{args.requests} requests x {args.max_tokens} tokens, {args.mix} adapters, ranks {RANKS} on {modules}, "
        f"{args.concurrency} in flight, {args.gpu_slots} device slots, {cpu_adapters} cached in CPU\n"
    )
    print(
        f"{'N':>5} {'plait tok/s':>12} {'no-adapter tok/s':>17} {'naive tok/s':>12} {'vs no-adapter':>14} "
        f"{'vs naive':>9}",
        flush=True,
    )
    try:
        start = time.perf_counter()
        for name in names:
            folder = work / "adapters" / name
            r = httpx.post(
                f"{url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)}, timeout=120
            )
            r.raise_for_status()
        plait_load = time.perf_counter() - start
        plait_throughput(url, zipf_stream(names[:2], 4, 0), 4, 4, True)  # warm-up
        peft_model, peft_load, loaded, rows = None, 0.0, 0, []
        for n in args.adapters:
            if not args.no_naive:
                start = time.perf_counter()
                for name in names[loaded:n]:
                    # Adapters stay bf16 in PEFT too (by default it widens them to fp32), like Plait's pools.
                    folder = work / "adapters" / name
                    if peft_model is None:
                        peft_model = PeftModel.from_pretrained(
                            base, folder, adapter_name=name, autocast_adapter_dtype=False
                        )
                    else:
                        peft_model.load_adapter(folder, adapter_name=name, autocast_adapter_dtype=False)
                peft_load, loaded = peft_load + time.perf_counter() - start, max(loaded, n)
            stream = STREAMS[args.mix](names[:n], args.requests, args.seed + n)
            with_lora = plait_throughput(url, stream, args.max_tokens, args.concurrency, True)
            bare = plait_throughput(url, stream, args.max_tokens, args.concurrency, False)
            rows.append({"adapters": n, "plait_tokens_per_s": with_lora, "no_adapter_tokens_per_s": bare})
            if peft_model is None:
                print(f"{n:>5} {with_lora:>12.1f} {bare:>17.1f} {'-':>12} {with_lora / bare:>14.2f} {'-':>9}")
                continue
            naive = naive_throughput(peft_model, tokenizer, stream, args.max_tokens)
            rows[-1]["naive_tokens_per_s"] = naive
            print(
                f"{n:>5} {with_lora:>12.1f} {bare:>17.1f} {naive:>12.1f} {with_lora / bare:>14.2f} "
                f"{with_lora / naive:>8.1f}x",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"machine": machine(), **settings, "modules": modules, "rows": rows}, indent=1))
    naive_load = "" if args.no_naive else f", PeftModel (load_adapter each) {peft_load:.0f} s"
    print(f"\nloading {len(names)} adapters: Plait (POST /v1/load_lora_adapter each) {plait_load:.0f} s{naive_load}")


if __name__ == "__main__":
    main()
