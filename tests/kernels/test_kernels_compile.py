"""The Triton kernels compile for real NVIDIA GPUs, checked without one.

The interpreter (test_kernels.py) accepts Python the GPU compiler rejects, so the kernels
are also compiled ahead of time down to a cubin for sm_80 and sm_90 with the ptxas that
ships inside the triton wheel. Skipped where triton has no NVIDIA backend.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")
backends = pytest.importorskip("triton.backends.compiler")
jit = pytest.importorskip("triton.runtime.jit")

from plait.kernels import triton_attention, triton_ops  # noqa: E402

POINTERS = {
    "_shrink_kernel": {
        "x_ptr": "io",
        "a_ptr": "io",
        "v_ptr": "fp32",
        "scales_ptr": "fp32",
        "group_weights_ptr": "fp32",
    },
    "_expand_kernel": {"v_ptr": "fp32", "b_ptr": "io", "y_ptr": "io"},
    "_decode_kernel": {"q_ptr": "io", "k_ptr": "io", "v_ptr": "io", "out_ptr": "io"},
}
SCALARS = {"scale": "fp32", "softcap": "fp32"}  # every other scalar argument is an int32


def compile_for(fn, io: str, constexprs: dict, capability: int):
    # JITFunction directly, not triton.jit: this must compile even when TRITON_INTERPRET=1 is set.
    jitted = jit.JITFunction(fn)
    pointers = POINTERS[fn.__name__]
    signature = {}
    for name in jitted.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = pointers.get(name, "i32")
            signature[name] = "*" + (io if kind == "io" else kind)
        else:
            signature[name] = SCALARS.get(name, "i32")
    source = compiler.ASTSource(jitted, signature, constexprs)
    return triton.compile(source, target=backends.GPUTarget("cuda", capability, 32))


def dot_flags(io: str) -> dict:
    return {"DOT_PRECISION": "ieee" if io == "fp32" else "tf32", "DOT_IN_FP32": False}


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize(("io", "k", "split_k"), [("bf16", 1, 1), ("fp16", 2, 4), ("fp32", 3, 1)])
def test_kernels_compile_to_cubin(tmp_path, monkeypatch, capability, io, k, split_k):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        shrink = compile_for(
            triton_ops._shrink_kernel,
            io,
            dict(K=k, BLOCK_M=16, BLOCK_R=16, BLOCK_I=64, SPLIT_K=split_k, **dot_flags(io)),
            capability,
        )
    except (RuntimeError, FileNotFoundError) as exc:  # no NVIDIA toolchain in this triton build
        if "ptxas" in str(exc) or "backend" in str(exc):
            pytest.skip(f"cannot compile for CUDA here: {exc}")
        raise
    expand = compile_for(
        triton_ops._expand_kernel,
        io,
        dict(K=k, BLOCK_M=64 if split_k == 1 else 16, BLOCK_N=64, BLOCK_R=16, **dot_flags(io)),
        capability,
    )
    assert shrink.asm["cubin"] and expand.asm["cubin"]


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize(
    ("io", "block_size", "head_dim", "softcap"),
    [("bf16", 16, 128, False), ("bf16", 16, 256, True), ("fp16", 32, 64, False), ("fp32", 5, 80, True)],
)
def test_attention_kernel_compiles_to_cubin(tmp_path, monkeypatch, capability, io, block_size, head_dim, softcap):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        kernel = compile_for(
            triton_attention._decode_kernel,
            io,
            dict(
                BLOCK_SIZE=block_size,
                BLOCK_T=triton.next_power_of_2(block_size),
                BLOCK_D=triton.next_power_of_2(head_dim),
                USE_SOFTCAP=softcap,
            ),
            capability,
        )
    except (RuntimeError, FileNotFoundError) as exc:  # no NVIDIA toolchain in this triton build
        if "ptxas" in str(exc) or "backend" in str(exc):
            pytest.skip(f"cannot compile for CUDA here: {exc}")
        raise
    assert kernel.asm["cubin"]
