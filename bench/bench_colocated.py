"""Serving while a fine-tuning job trains on the same machine, against serving alone, in one run.

    python bench/bench_colocated.py [--train-threads 1] [--concurrency 8] [--max-tokens 48]

One `plait serve` (its defaults, with --train-threads as given). Serving is measured alone,
then while a fine-tuning job created through the API trains (a long job, cancelled at the end),
then alone again; each measurement is --rounds waves of --concurrency streamed chats of
--max-tokens tokens. Reported: time per output token (the mean gap between a request's
streamed tokens, median over requests) and throughput, and how fast the job trained meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
from bench_serving import PROMPTS, machine, start_server  # this folder is on sys.path when run as a script


def wave(client: openai.OpenAI, model: str, concurrency: int, max_tokens: int) -> tuple[list[float], float]:
    def ask(prompt: str) -> tuple[float, int]:
        stamps = []
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter())
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        return statistics.mean(gaps), max_tokens

    with ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(ask, PROMPTS[:concurrency]))
        elapsed = time.perf_counter() - start
    return [r[0] for r in results], sum(r[1] for r in results) / elapsed


def serving(client, model, args) -> dict:
    tpot, rates = [], []
    for _ in range(args.rounds):
        gaps, rate = wave(client, model, args.concurrency, args.max_tokens)
        tpot += gaps
        rates.append(rate)
    return {"tpot_s": statistics.median(tpot), "throughput_tok_s": statistics.median(rates)}


def start_job(url: str) -> str:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": p[::-1]}]})
        for p in PROMPTS
    ]
    with httpx.Client(base_url=f"{url}/v1", timeout=120) as http:
        file_id = http.post(
            "/files", data={"purpose": "fine-tune"}, files={"file": ("data.jsonl", "\n".join(lines).encode())}
        ).json()["id"]
        model = http.get("/models").json()["data"][0]["id"]
        job = http.post(
            "/fine_tuning/jobs",
            json={"model": model, "training_file": file_id, "hyperparameters": {"n_epochs": 100, "batch_size": 4}},
        ).json()
        return job["id"]


def job_steps(url: str, job_id: str) -> list[dict]:
    with httpx.Client(base_url=f"{url}/v1", timeout=60) as http:
        events = http.get(f"/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return [e["data"] for e in events if e["type"] == "metrics"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--train-threads", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads of the server (default: its own)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "colocated")
    args = p.parse_args()

    print(f"machine: {machine()}")
    proc, url = start_server(args, "--train-threads", str(args.train_threads))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        wave(client, model, 2, 8)  # warm-up
        alone = serving(client, model, args)
        print(f"alone: {alone}", file=sys.stderr)
        job_id = start_job(url)
        while len(job_steps(url, job_id)) < 2:  # the trainer has loaded and taken its first steps
            time.sleep(1)
        steps_before = job_steps(url, job_id)
        started = time.perf_counter()
        beside = serving(client, model, args)
        elapsed = time.perf_counter() - started
        steps_after = job_steps(url, job_id)
        print(f"beside training: {beside}", file=sys.stderr)
        httpx.post(f"{url}/v1/fine_tuning/jobs/{job_id}/cancel", timeout=60)
        time.sleep(3)
        again = serving(client, model, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    trained = max(s["tokens"] for s in steps_after) - max(s["tokens"] for s in steps_before)
    alone_tpot = statistics.median([alone["tpot_s"], again["tpot_s"]])
    print(
        f"\n{args.concurrency} concurrent streamed chats of {args.max_tokens} tokens, median of {args.rounds} waves; "
        f"--train-threads {args.train_threads}\n"
    )
    print(f"{'':<18}{'TPOT ms':>9}{'tok/s':>8}")
    print(f"{'alone (before)':<18}{alone['tpot_s'] * 1e3:>9.1f}{alone['throughput_tok_s']:>8.1f}")
    print(f"{'beside a job':<18}{beside['tpot_s'] * 1e3:>9.1f}{beside['throughput_tok_s']:>8.1f}")
    print(f"{'alone (after)':<18}{again['tpot_s'] * 1e3:>9.1f}{again['throughput_tok_s']:>8.1f}")
    print(
        f"\nbeside a job: time per output token {beside['tpot_s'] / alone_tpot:.2f}x alone; "
        f"the job trained {trained / elapsed:.1f} tokens/s meanwhile"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "args": vars(args) | {"out": str(args.out)},
                "alone": alone,
                "beside_training": beside,
                "alone_after": again,
                "trained_tokens_per_s": trained / elapsed,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
