"""Every Triton kernel compiles for Hopper (sm_90) ahead of time, without a GPU.

The interpreter runs kernels as Python and forgives what the compiler does not (non-constexpr
globals, dtype clashes in tl.dot, shared memory beyond the chip's limit), so this compiles the
launch configurations the GPU uses, with triton's bundled ptxas, and checks shared memory.
The compiler cannot see kernels that were loaded under TRITON_INTERPRET=1, so each case runs
in a fresh interpreter without it (`python tests/test_triton_compile.py DTYPE D`).

GPU images may carry an older Triton than this venv (the lent H200s: triton 3.6), so every
case also compiles with the oldest supported release, which `make test` unpacks next to the
build (build/triton-3.6.0, put first on PYTHONPATH; torch never imports it at this stage).

Each kernel prints ptxas's registers and spills, and how many of its spill instructions
(local loads and stores in the SASS) lie inside a loop: the profiler of tile choices. Every
case compiles the configuration of the benchmarks (lse form with the official clamp for USS;
exact ArcFace and pairs USS for the objective); the bf16 D=512 case also compiles the other
forms and options (`python tests/test_triton_compile.py bf16 512 variants`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SMEM_LIMIT = 232448  # bytes of shared memory one block may opt into on an H100/H200
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLDEST_TRITON = os.path.join(ROOT, "build", "triton-3.6.0")

_TL = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
       torch.float64: "fp64"}
_EMBEDDINGS = {"x_ptr", "r_ptr", "w_ptr", "bank_ptr", "t_ptr", "dw_ptr"}
_LABELS = {"y_ptr", "l_ptr", "idx_ptr"}


def _compile(kernel, dtype, constexprs, cfg):
    """Compile `kernel` for sm_90: pointers to embeddings in `dtype`, statistics in the
    accumulation dtype, labels int64, masks bool, every other argument an int32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    acc = "fp64" if dtype == torch.float64 else "fp32"
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _EMBEDDINGS:
            signature[name] = "*" + _TL[dtype]
        elif name in _LABELS:
            signature[name] = "*i64"
        elif name == "valid_ptr":
            signature[name] = "*i1"
        elif name.endswith("_ptr"):
            signature[name] = "*" + acc
        else:
            signature[name] = "i32"
    # as the JIT specializes them at run time: torch's allocations are 16-byte aligned, and
    # D is a multiple of 16 at the usual widths (this lets loads and atomics vectorize)
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in signature.items() if kind.startswith("*") or name == "D"}
    src = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


CASES = [(torch.bfloat16, 512), (torch.float16, 512), (torch.float32, 512), (torch.bfloat16, 128),
         (torch.float32, 1024), (torch.bfloat16, 2048)]


USS_VARIANTS = {"lse+clamp": dict(LSE=True, CLAMP=True), "pairs": dict(LSE=False, CLAMP=False),
                "pairs+clamp": dict(LSE=False, CLAMP=True)}
FUSED_VARIANTS = {
    "arc+pairs": dict(ARC=True, ST=False, EASY=False, USS_LSE=False, USS_CLAMP=False),
    "cosface+lse": dict(ARC=False, ST=False, EASY=False, USS_LSE=True, USS_CLAMP=False),
    "arc-st+pairs+clamp": dict(ARC=True, ST=True, EASY=False, USS_LSE=False, USS_CLAMP=True),
    "arc-easy+lse+clamp": dict(ARC=True, ST=False, EASY=True, USS_LSE=True, USS_CLAMP=True),
}


def compile_all(dtype, d, variants=False):
    """Compile every kernel in the configuration the launchers pick for width d (with
    `variants`, in every form and option too)."""
    from unitsface_kernels.triton import fused, norms, uss
    from unitsface_kernels.triton.common import fused_config, launch_config

    cuda = torch.device("cuda")
    cfg = launch_config(d, cuda, dtype)
    fwd = fused_config(d, cuda, dtype, backward=False)
    bwd = fused_config(d, cuda, dtype, backward=True)
    tiles = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DP=cfg.dp, UPCAST=False)
    kernels = []
    for name, options in list(USS_VARIANTS.items())[:None if variants else 1]:
        uss_flags = dict(options, IN_BATCH=False, HAS_VALID=True, **tiles)
        kernels += [
            (name, uss._uss_fwd_kernel, uss_flags, cfg),
            (name, uss._uss_bwd_rows_kernel, dict(uss_flags, NEED_DX=True, DC=cfg.dc), cfg),
            (name, uss._uss_bwd_cols_kernel, dict(uss_flags, NEED_DR=True, DC=cfg.dc), cfg)]
    for name, options in list(FUSED_VARIANTS.items())[:None if variants else 1]:
        fused_flags = dict(options, HAS_INDEX=True, HAS_USS=True, HAS_VALID=True, UPCAST=False)
        kernels += [
            (name, fused._fwd_kernel,
             dict(fused_flags, BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, BK=fwd.bk), fwd),
            (name, fused._bwd_kernel,
             dict(fused_flags, BLOCK_M=bwd.block_m, BLOCK_N=bwd.block_n, DC=bwd.dc, BK=bwd.bk,
                  NEED_DX=True, NEED_DW=True), bwd)]
    kernels.append(("", norms._row_norms_kernel, dict(HAS_INDEX=True, BLOCK_R=32, BLOCK_D=256),
                    cfg))
    for name, kernel, flags, launch in kernels:
        compiled = _compile(kernel, dtype, flags, launch)
        shared = compiled.metadata.shared
        label = kernel.fn.__name__ + (f" [{name}]" if name else "")
        print(f"{label}: {shared} bytes of shared memory; {_registers(compiled)}", flush=True)
        assert shared <= SMEM_LIMIT, (label, shared)


def _registers(compiled) -> str:
    """ptxas's register and spill report for the kernel (the offline proxy for tile tuning:
    the GPU's own numbers need a GPU to load the binary), and the spill instructions that lie
    inside loops (:func:`_spills_in_loops`)."""
    import re
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        log = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if not (regs and spills):
        return "no ptxas report"
    inside, total = _spills_in_loops(compiled)
    return (f"{regs.group(1)} registers, {spills.group(1)} bytes of spill stores per thread, "
            f"{inside} of {total} spill instructions in loops")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _spills_in_loops(compiled) -> tuple[int, int]:
    """(local loads/stores inside a loop, all of them) in the kernel's SASS (nvdisasm of the
    cubin): a loop is the span from a label to a branch back to it."""
    import re
    import tempfile

    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True,
                              text=True).stdout
    labels, insts, pending = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        inst = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if inst:
            addr = int(inst.group(1), 16)
            labels.update((p, addr) for p in pending)
            pending = []
            insts.append((addr, inst.group(2)))
    loops = []
    for addr, text in insts:
        branch = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if branch and labels.get(branch.group(1), addr + 1) < addr:
            loops.append((labels[branch.group(1)], addr))
    spills = [addr for addr, text in insts if re.search(r"\b(STL|LDL)\b", text)]
    return sum(any(a <= s <= b for a, b in loops) for s in spills), len(spills)


RUNS = [(t, d, False) for t, d in CASES] + [(torch.bfloat16, 512, True)]


@pytest.mark.parametrize("triton_dir", [None, OLDEST_TRITON], ids=["this-triton", "triton-3.6"])
@pytest.mark.parametrize("dtype,d,variants", RUNS,
                         ids=[f"{_TL[t]}-D{d}" + ("-variants" if v else "") for t, d, v in RUNS])
def test_kernels_compile_for_sm90(dtype, d, variants, triton_dir):
    pytest.importorskip("triton")
    if triton_dir is not None and not os.path.isdir(triton_dir):
        pytest.fail(f"{triton_dir} is missing: `make test` unpacks triton 3.6.0 there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_dir, ROOT, env.get("PYTHONPATH")]))
    args = [_TL[dtype], str(d)] + (["variants"] if variants else [])
    code = ("import runpy, sys, triton; print('triton', triton.__version__); "
            f"sys.argv = [''] + {args!r}; runpy.run_path({__file__!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)  # the register report: pytest -rP (or -s) shows it
    if triton_dir is not None:
        assert "triton 3.6.0" in done.stdout, done.stdout


if __name__ == "__main__":
    compile_all({v: k for k, v in _TL.items()}[sys.argv[1]], int(sys.argv[2]),
                variants=sys.argv[3:] == ["variants"])
