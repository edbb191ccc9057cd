"""Run the benchmarks as on a CPU with AVX2 but without AVX-512, AVX512-BF16 or AMX.

    PYTHONPATH=bench/avx2_only python bench/bench_serving.py

Python imports this module at the start of every process with this folder on its path, so
the servers and trainers a benchmark starts are restricted too. It caps the instructions
each library picks at run time: torch's own kernels (`ATEN_CPU_CAPABILITY`), oneDNN's
matmuls (`ONEDNN_MAX_CPU_ISA`), MKL (`MKL_ENABLE_INSTRUCTIONS`), and bitsandbytes, which
asks the CPU itself whether it has AVX512-BF16 and is told no here. What it cannot change is
the hardware around the instructions: caches, memory bandwidth and clocks stay this
machine's, so the figures stand for an AVX2-only CPU with this machine's memory system.
"""

import os

os.environ.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")

import bitsandbytes.backends.cpu.ops  # noqa: E402  (after the environment: it imports torch)
import bitsandbytes.functional  # noqa: E402
import bitsandbytes.nn.modules  # noqa: E402


def _no_avx512bf16() -> bool:
    return False


# Each module bound the function by name at import.
for module in (bitsandbytes.functional, bitsandbytes.nn.modules, bitsandbytes.backends.cpu.ops):
    module.has_avx512bf16 = _no_avx512bf16
