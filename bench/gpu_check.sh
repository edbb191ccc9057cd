#!/usr/bin/env bash
# Plait's GPU checks in one command, for a machine with a CUDA GPU:
#
#     bash bench/gpu_check.sh OUT_DIR           # on the GPU
#     bash bench/gpu_check.sh OUT_DIR --smoke   # anywhere: tiny shapes on the CPU, checks the script only
#
# Needs Python with torch and triton. Whatever else is missing can come as wheels in .whl/
# (or the folder $WHEELS names), installed here into /tmp/site; Plait itself is imported from this checkout, not installed.
# For the project's H200 image (torch, triton, transformers, peft, httpx, matplotlib there),
# `../shared/gpu/fetch-wheels.sh xgrammar apache-tvm-ffi` fetches the rest (49 MB: bitsandbytes,
# FastAPI, uvicorn, pydantic, xgrammar, ...); carry `.whl`. Not yet timed on a GPU; expect
# most of the time in building and loading the 8B-shaped model. Writes into OUT_DIR:
#   env.json        the GPU, its driver, and the versions of torch, triton, transformers, bitsandbytes
#   kernels.json    bench/bench_kernels.py: the LoRA kernels at Llama-3-8B's shapes, checked
#                   against the PyTorch path, then timed against a per-adapter loop, against
#                   padding to the largest rank, and against the bytes-moved floor
#   attention.json  bench/bench_attention.py: paged decode attention, checked and timed the same way
#   engine.json     bench/bench_adapters.py: `plait serve` on a Llama-3-8B-shaped model with random
#                   weights (bench/random_model.py, quantized NF4 by the server's own loader),
#                   64 adapters of ranks 8-64 on every linear layer, 64 requests in flight each
#                   on a different adapter, 128 tokens each: tokens/s against no adapter
#   training.json   bench/bench_training.py: a few steps of `plait train` on the same model (QLoRA
#                   r16 on every linear layer, gradient checkpointing, paged 8-bit AdamW) next to
#                   PEFT + transformers' Trainer: tokens/s and peak GPU memory
#   steps.log       what each step printed
# Each step runs even when an earlier one failed; the exit status says whether all passed.
# ONLY=kernels,attention (say) runs only the steps named (model is needed by engine and training),
# to split the checks over several calls where one call has a time limit.
set -uo pipefail

out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--smoke]}
smoke=${2:-}
python=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# `plait.kernels` and friends are folders of this checkout (pyproject's package-dir): link
# them under a `plait` folder, unless Plait is installed already.
if ! "$python" -c "import plait.kernels" 2>/dev/null; then
    mkdir -p /tmp/plait-src/plait
    for part in cli kernels server trainer; do ln -sfn "$PWD/$part" "/tmp/plait-src/plait/$part"; done
    export PYTHONPATH=/tmp/plait-src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if [ -z "$smoke" ] && ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh needs a CUDA GPU (none found); --smoke checks the script itself on the CPU" >&2
    exit 2
fi
rm -f "$out/steps.log"

failed=0
step() {  # step NAME COMMAND...: run it, its output onto the screen and into steps.log
    local name=$1
    shift
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        return
    fi
    echo "== $name: $*" | tee -a "$out/steps.log"
    if ! "$@" 2>&1 | tee -a "$out/steps.log"; then
        echo "== $name FAILED" | tee -a "$out/steps.log"
        failed=1
    fi
}

step env "$python" - "$out/env.json" <<'EOF'
import importlib.metadata, json, subprocess, sys

import torch

env = {"python": sys.version.split()[0], "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
for package in ("torch", "triton", "transformers", "bitsandbytes", "peft"):
    try:
        env[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        env[package] = None
try:
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    env["gpus"] = subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip().splitlines()
except (OSError, subprocess.CalledProcessError):
    env["gpus"] = []
print(json.dumps(env, indent=1))
open(sys.argv[1], "w").write(json.dumps(env, indent=1))
EOF

step kernels "$python" bench/bench_kernels.py $smoke --json "$out/kernels.json"
step attention "$python" bench/bench_attention.py $smoke --json "$out/attention.json"

model=$(mktemp -d "${TMPDIR:-/tmp}/plait-gpu-check.XXXXXX")  # 16 GB at 8B: removed at the end
trap 'rm -rf "$model"' EXIT
if [ -n "$smoke" ]; then
    shape=tiny engine=(--adapters 4 --requests 8 --concurrency 4 --max-tokens 8)
    training=(--steps 2 --batch-size 2 --examples 8 --max-seq-len 512)
else
    shape=llama-3-8b engine=(--adapters 64 --requests 128 --concurrency 64 --max-tokens 128 --gpu-slots 64)
    training=(--steps 4 --batch-size 4 --examples 32 --max-seq-len 512)  # byte-level tokens
fi
step model "$python" bench/random_model.py "$model" --shape "$shape"
step engine "$python" bench/bench_adapters.py --model "$model" --all-linear --mix distinct --no-naive \
    "${engine[@]}" --json "$out/engine.json"
step training "$python" bench/bench_training.py --model "$model" --no-dpo "${training[@]}" --json "$out/training.json"

echo "results in $out"
exit $failed
