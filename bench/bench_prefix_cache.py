"""Prefix caching: 16 concurrent chats that share a long system prompt, with and without the cache.

    python bench/bench_prefix_cache.py [--model PATH] [--system-tokens 1000] [--concurrency 16]

The workload of an application behind Plait: one long system prompt (about --system-tokens
tokens) and many users' short questions. Each side is a `plait serve` of its own (one with
the cache, one with --no-prefix-caching), run one after the other so they never compute at
once; each is warmed with one request, then sends --rounds waves of --concurrency streamed
chats, each a different question, --max-tokens tokens each. Reported: time to first token
(median and 90th percentile over every request) and decode throughput (all tokens over the
wave's wall time), medians over rounds, side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from bench_serving import PROMPTS, machine, start_server  # this folder is on sys.path when run as a script

SENTENCES = [
    "You are the support assistant of a company that sells bicycles, spare parts and repairs.",
    "Answer politely, in short sentences, and never promise a delivery date you cannot check.",
    "Prices include tax; shipping is free above fifty euros inside the European Union.",
    "Repairs take three to five working days; a loan bicycle is available for the duration.",
    "Returns are accepted within thirty days if the item is unused and in its packaging.",
    "Frames carry a five year warranty, wheels and components two years, tyres none.",
    "If a customer is angry, apologise once, then explain what you can do for them.",
    "Do not discuss competitors, politics or anything unrelated to cycling and our shop.",
]


def system_prompt(tokens: int) -> str:
    words = []
    while len(words) * 1.16 < tokens:  # about 1.16 of this text's tokens per word
        words.extend(SENTENCES[len(words) % len(SENTENCES)].split())
    return " ".join(words)


def wave(client: openai.OpenAI, model: str, system: str, questions: list[str], max_tokens: int):
    def ask(question: str) -> tuple[float, int, int]:
        start = time.perf_counter()
        first, tokens, cached = None, 0, 0
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
                cached = chunk.usage.prompt_tokens_details.cached_tokens
        return first, tokens, cached

    with ThreadPoolExecutor(len(questions)) as pool:
        start = time.perf_counter()
        results = list(pool.map(ask, questions))
        elapsed = time.perf_counter() - start
    return [r[0] for r in results], sum(r[1] for r in results) / elapsed, [r[2] for r in results]


def measure(args, *flags: str) -> dict:
    proc, url = start_server(args, *flags)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        system = system_prompt(args.system_tokens)
        wave(client, model, system, ["Hello"], 4)  # warm-up: the system prompt is read once
        ttft, throughput, cached = [], [], []
        for r in range(args.rounds):
            questions = [PROMPTS[(r * args.concurrency + i) % len(PROMPTS)] for i in range(args.concurrency)]
            first, rate, hits = wave(client, model, system, questions, args.max_tokens)
            ttft += first
            throughput.append(rate)
            cached += hits
            print(f"{flags or ('caching',)} round {r + 1}/{args.rounds}: {rate:.1f} tok/s", file=sys.stderr)
        prompt_tokens = client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
            max_tokens=1,
        ).usage.prompt_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ttft.sort()
    return {
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "throughput_tok_s": statistics.median(throughput),
        "cached_tokens_median": statistics.median(cached),
        "prompt_tokens": prompt_tokens,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads of the server")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prefix_cache")
    args = p.parse_args()

    print(f"machine: {machine()}")
    cached = measure(args)
    plain = measure(args, "--no-prefix-caching")
    print(
        f"\n{args.concurrency} concurrent chats sharing a {cached['prompt_tokens']}-token prompt, "
        f"{args.max_tokens} tokens each, median of {args.rounds} rounds\n"
    )
    print(f"{'':<22}{'TTFT median':>12}{'TTFT p90':>10}{'tok/s':>8}{'cached tokens':>15}")
    for name, r in (("prefix caching", cached), ("no prefix caching", plain)):
        print(
            f"{name:<22}{r['ttft_median_s']:>11.2f}s{r['ttft_p90_s']:>9.2f}s{r['throughput_tok_s']:>8.1f}"
            f"{r['cached_tokens_median']:>15.0f}"
        )
    print(
        f"\ncaching: time to first token {plain['ttft_median_s'] / cached['ttft_median_s']:.1f}x lower (median), "
        f"throughput {cached['throughput_tok_s'] / plain['throughput_tok_s']:.1f}x"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {"machine": machine(), "args": vars(args) | {"out": str(args.out)}, "caching": cached, "no_caching": plain},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
