"""Aggregate decode throughput of `plait serve` at 1, 4 and 16 concurrent requests, side by
side with transformers' own batched `generate` on the same model unquantized (bf16), with the
same prompts.

    [PYTHONPATH=bench/avx2_only] python bench/bench_serving.py [--model PATH] [--max-tokens 64] [--concurrency 1 4 16]
                                  [--cpu-weights nf4 auto]

Plait is driven over HTTP with the official OpenAI client, as a user would; `generate` runs
in this process while the server sits idle, so the two never compute at once. Each server
setting of --cpu-weights (bitsandbytes' NF4 kernels alone, and the default that also keeps the
weights dequantized; see plait.server.base_model) gets a server of its own, one after the
other; each round measures every concurrency on both sides in turn, and the medians over
rounds are reported, so drifts in the machine's speed hit both alike. Every request produces
exactly --max-tokens tokens (ignore_eos / min_new_tokens) so the counts compare.

`generate` computes in the dtype `plait serve --dtype auto` picks (bfloat16 where the CPU has
it natively, float32 where it only emulates it), so neither side runs in a dtype the machine
is slow at. With bench/avx2_only on PYTHONPATH, both sides run as on an AVX2-only CPU.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import torch

from plait.server.base_model import cpu_name

PROMPTS = [
    "Explain how a bicycle stays upright.",
    "Write a short poem about autumn leaves.",
    "What are the main causes of ocean tides?",
    "Describe the water cycle for a ten-year-old.",
    "Give three tips for learning a new language.",
    "Why is the sky blue?",
    "Summarize the plot of a heist movie you invent.",
    "How does a refrigerator keep food cold?",
    "List some uses of baking soda around the house.",
    "What makes a good cup of coffee?",
    "Explain what a prime number is.",
    "Describe a walk through a rainy city at night.",
    "How do bees make honey?",
    "What should I pack for a weekend hiking trip?",
    "Explain the difference between weather and climate.",
    "Tell me about the history of paper.",
]


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    isa = torch.backends.cpu.get_cpu_capability()  # AVX2 under bench/avx2_only
    return f"{cpu_name()}, {os.cpu_count()} cores ({isa} kernels), {gpu}, torch {torch.__version__}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "plait.cli", "serve", "--port", str(port), "--log-level", "warning", *extra]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # The server runs elsewhere, so a relative PYTHONPATH (bench/avx2_only) is made absolute.
    path = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)} if path else None
    proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("server did not start")


def plait_throughput(url: str, concurrency: int, max_tokens: int) -> float:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    def ask(prompt: str) -> int:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return r.usage.completion_tokens

    prompts = PROMPTS[:concurrency]
    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(ask, prompts))
        elapsed = time.perf_counter() - start
    assert tokens == concurrency * max_tokens, tokens
    return tokens / elapsed


def generate_throughput(model, tokenizer, concurrency: int, max_tokens: int) -> float:
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS[:concurrency]
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    start = time.perf_counter()
    out = model.generate(
        **batch,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * concurrency
    return tokens / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--threads", type=int, help="torch CPU threads for both sides")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpu-weights", nargs="+", default=["nf4", "auto"], help="server settings to compare")
    args = p.parse_args()
    if max(args.concurrency) > len(PROMPTS):
        sys.exit(f"at most {len(PROMPTS)} concurrent requests")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {machine()}")
    from transformers import AutoModelForCausalLM

    from plait.server.base_model import default_device, fastest_dtype, load_tokenizer, resolve_model

    spec = resolve_model(args.model)
    tokenizer = load_tokenizer(spec)
    tokenizer.padding_side = "left"
    dtype = fastest_dtype(default_device())
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype, device_map={"": default_device()})
    plait: dict[tuple[str, int], list[float]] = {(w, c): [] for w in args.cpu_weights for c in args.concurrency}
    hf: dict[int, list[float]] = {c: [] for c in args.concurrency}
    generate_throughput(model, tokenizer, 2, 8)  # warm-up
    for weights in args.cpu_weights:
        proc, url = start_server(args, "--cpu-weights", weights)
        try:
            plait_throughput(url, 2, 8)  # warm-up
            for r in range(args.rounds):
                for c in args.concurrency:
                    plait[weights, c].append(plait_throughput(url, c, args.max_tokens))
                    hf[c].append(generate_throughput(model, tokenizer, c, args.max_tokens))
                print(f"--cpu-weights {weights}: round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    med = {k: statistics.median(v) for k, v in plait.items()}
    med_hf = {c: statistics.median(v) for c, v in hf.items()}
    print(
        f"\nmodel: {spec.name}, {args.max_tokens} new tokens per request, greedy, median of {args.rounds} rounds; "
        f"plait serves it NF4, generate runs it unquantized in {str(dtype).removeprefix('torch.')}\n"
    )
    header = "".join(f"{'plait ' + w:>18}" for w in args.cpu_weights)
    print(f"{'concurrent':>10}{header}{'generate':>10}" + "".join(f"{w + '/generate':>18}" for w in args.cpu_weights))
    for c in args.concurrency:
        cells = "".join(f"{med[w, c]:>18.1f}" for w in args.cpu_weights)
        ratios = "".join(f"{med[w, c] / med_hf[c]:>18.2f}" for w in args.cpu_weights)
        print(f"{c:>10}{cells}{med_hf[c]:>10.1f}{ratios}")


if __name__ == "__main__":
    main()
