"""Two replicas on one S3-compatible store: how soon an adapter uploaded on one is servable on the other.

    python bench/bench_replicas.py [--uploads 20] [--rank 16] [--threads 1]

Starts moto's S3 server and PostgreSQL (pgserver) on this machine, and two `plait serve`
replicas A and B on them. Then, --uploads times: a new random adapter (rank --rank on every
projection of the embedded model, about 20 MB at rank 16) is uploaded to A, and as soon as A
answers 201 a one-token chat names it on B, which has never seen it: B finds it in the store,
fetches its files and loads them. Reported, p50 and p99: the upload on A, B's first answer
(from the object store) against A's first answer for the same adapter (from A's local copy,
which the upload left), and the two together: upload to servable elsewhere. One replica
computes at a time, so neither slows the other.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import safetensors.torch
import torch
from bench_serving import free_port, machine, start_server  # this folder is on sys.path when run as a script

# SmolLM2-135M's projections: (in, out) features.
SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}
LAYERS = 30


def adapter_files(seed: int, rank: int) -> list[tuple[str, tuple[str, bytes]]]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, (n_in, n_out) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=generator) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=generator) * 0.02
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": [m.split(".")[1] for m in SHAPES],
    }
    return [
        ("files", ("adapter_config.json", json.dumps(config).encode())),
        ("files", ("adapter_model.safetensors", safetensors.torch.save(tensors))),
    ]


def first_answer(url: str, model: str) -> float:
    start = time.perf_counter()
    answer = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        timeout=300,
    )
    answer.raise_for_status()
    return time.perf_counter() - start


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:7.0f} ms   p99 {p99 * 1000:7.0f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--uploads", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model")
    args = p.parse_args()

    import pgserver
    import psycopg
    from moto.server import ThreadedMotoServer

    work = Path(tempfile.mkdtemp(prefix="plait-bench-replicas-"))
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    s3.start()
    endpoint = "http://{}:{}".format(*s3.get_host_and_port())
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    bucket = "plait-bench-" + secrets.token_hex(4)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    postgres = pgserver.get_server(work / "postgres", cleanup_mode="stop")
    with psycopg.connect(postgres.get_uri(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE plait_bench")
    shared = ("--store", f"s3://{bucket}/plait", "--s3-endpoint-url", endpoint)
    shared += ("--database", postgres.get_uri("plait_bench"), "--no-train", "--max-adapter-mb", "256")

    replicas: list[tuple[subprocess.Popen, str]] = []
    try:
        for name in ("a", "b"):
            replicas.append(start_server(args, *shared, "--data-dir", str(work / name)))
        (_, a), (_, b) = replicas
        first_answer(a, "SmolLM2-135M-Instruct")  # warm-up
        first_answer(b, "SmolLM2-135M-Instruct")
        uploads, from_store, from_disk, servable = [], [], [], []
        size = 0
        for n in range(args.uploads):
            files = adapter_files(n, args.rank)
            size = sum(len(data) for _, (_, data) in files)
            start = time.perf_counter()
            answer = httpx.post(f"{a}/v1/adapters", data={"id": f"bench-{n}"}, files=files, timeout=300)
            answer.raise_for_status()
            uploads.append(time.perf_counter() - start)
            from_store.append(first_answer(b, f"bench-{n}"))
            servable.append(uploads[-1] + from_store[-1])
            from_disk.append(first_answer(a, f"bench-{n}"))
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(timeout=60)
        postgres.cleanup()
        s3.stop()

    lines = [
        f"machine: {machine()}",
        f"{args.uploads} adapters of {size / 2**20:.1f} MiB (rank {args.rank}, every projection), "
        f"moto S3 and PostgreSQL on loopback, --threads {args.threads}",
        f"upload on A (to 201)                    {percentiles(uploads)}",
        f"first answer on B (from the store)      {percentiles(from_store)}",
        f"first answer on A (from its local copy) {percentiles(from_disk)}",
        f"upload on A to answered on B            {percentiles(servable)}",
        f"first answer, store / local copy: {statistics.median(from_store) / statistics.median(from_disk):.2f}x "
        "(medians)",
    ]
    print("\n".join(lines))
    out = Path(__file__).parent / "results" / "replicas"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
