"""Every Triton kernel compiles for Hopper (sm_90) ahead of time, without a GPU.

The interpreter runs kernels as Python and forgives what the compiler does not (non-constexpr
globals, dtype clashes in tl.dot, shared memory beyond the chip's limit), so this compiles the
launch configurations the GPU uses, with triton's bundled ptxas, and checks shared memory.
The compiler cannot see kernels that were loaded under TRITON_INTERPRET=1, so each case runs
in a fresh interpreter without it (`python tests/test_triton_compile.py DTYPE D`).

GPU images may carry an older Triton than this venv (the lent H200s: triton 3.6), so every
case also compiles with the oldest supported release, which `make test` unpacks next to the
build (build/triton-3.6.0, put first on PYTHONPATH; torch never imports it at this stage).

Each kernel prints ptxas's registers and spills, how many of its spill instructions (local
loads and stores in the SASS) lie inside a loop, and the shapes of its matrix instructions
(wgmma mMnNkK on Hopper, or mma.sync): the profiler of tile choices. The kernels are the fused
engine's three (the cosine tiles, ∂R, ∂x: triton/fused.py), compiled in the forms each op
family launches: the objective (CosFace and pairs USS, as a training step launches them: the
forward with the USS part's row gradients, the backward without bank programs) and the USS
family (a bank in the lse form with the official clamp, as the benchmarks run it; at the
headline also in-batch pairs and class centres with per-column thresholds, whose backward
forms ∂ref). The D=512 cases also compile the objective's other forms and options
(`python tests/test_triton_compile.py bf16 512 variants`, `… fp16 512 variants`: ArcFace with
the lse form, straight-through with the pairs form and the clamp, the easy margin), and the
margin family's cosine kernels (`… margins`: curricular negatives with the inter-class filter
and per-row margins, AdaFace's angle clip, K = 3 and K = 2 sub-centres; docs/design.md §1.5);
the bf16 variants also the persistent cosine launches of :data:`PERSISTENT_FORMS`
(fused._cos_stream_kernel, and fused._cos_resident_kernel, whose shared memory must hold the
resident x row block beside two reference buffers: the compiler kept the block out of the
loop and pipelines the reference tiles); the variants also the stored exponentials' launches
(:data:`STORED_EXPS`). The finishing kernels (triton/finish.py: the
statistics' merge, ∂x's projection, x̂') and the row norms compile beside them. Every kernel,
in every form and case compiled here, must spill nothing (no spill store, so no spill
instruction inside a loop either), and at the headline (bf16 and fp16, D = 512) every kernel
with a product must run it on wgmma with N ≥ 128 (the resident cosine tiles: N = their 32
columns), under both tritons (issue 24: the cosine kernel's epilogues run a quarter of a
column tile at a time, fused.PARTS).
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
_EMBEDDINGS = {"x_ptr", "r_ptr", "w_ptr", "bank_ptr", "t_ptr", "dw_ptr", "gw_ptr", "gb_ptr",
               "g_ptr", "xg_ptr", "dx_ptr", "e_ptr"}
_LABELS = {"y_ptr", "lab_ptr", "idx_ptr"}
# the settings: fp32 scalars (the kernels' float arguments)
_FLOATS = {"scale", "m3", "cos_m2", "sin_m2", "mm", "tau", "uss_m", "uss_w", "eps"}
# integer arguments that are multiples of 16 at the headline (B = 512, D = 512, C = 100k and
# its chunks): the JIT specializes them so, which lets loads and stores vectorize
_ALIGNED_INTS = {"D", "B", "S", "g_stride", "col0", "n_cols", "k_split"}


def _compile(kernel, dtype, constexprs, cfg):
    """Compile `kernel` for sm_90: pointers to embeddings in `dtype`, statistics in the
    accumulation dtype, labels int64, masks bool, the settings fp32, every other argument an
    int32."""
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
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # as the JIT specializes them at run time: torch's allocations are 16-byte aligned, and
    # D is a multiple of 16 at the usual widths (this lets loads and stores vectorize)
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in signature.items()
               if kind.startswith("*") or name in _ALIGNED_INTS}
    src = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


CASES = [(torch.bfloat16, 512), (torch.float16, 512), (torch.float32, 512), (torch.bfloat16, 128),
         (torch.float32, 1024), (torch.bfloat16, 2048)]


USS_VARIANTS = {
    "bank lse+clamp": dict(USS_LSE=True, USS_CLAMP=True, IN_BATCH=False, HAS_VALID=True,
                           VECTOR_BIAS=False, REF_GRAD=False),
    "in-batch pairs": dict(USS_LSE=False, USS_CLAMP=False, IN_BATCH=True, HAS_VALID=False,
                           VECTOR_BIAS=False, REF_GRAD=True),
    "centres pairs+clamp b_j": dict(USS_LSE=False, USS_CLAMP=True, IN_BATCH=False,
                                    HAS_VALID=False, VECTOR_BIAS=True, REF_GRAD=True),
}
PLAIN_MARGIN = dict(ROW_MARGINS=False, NO_FALLBACK=False, ANGLE_CLIP=False, CURRICULAR=False,
                    FILTER=False, K=1, KP=1)
"""The margin family's constexprs off: CosFace/ArcFace (docs/design.md §1.5)."""
FUSED_VARIANTS = {
    "cosface+pairs": dict(ARC=False, ST=False, EASY=False, USS_LSE=False, USS_CLAMP=False),
    "arc+lse": dict(ARC=True, ST=False, EASY=False, USS_LSE=True, USS_CLAMP=False),
    "arc-st+pairs+clamp": dict(ARC=True, ST=True, EASY=False, USS_LSE=False, USS_CLAMP=True),
    "arc-easy+lse+clamp": dict(ARC=True, ST=False, EASY=True, USS_LSE=True, USS_CLAMP=True),
}
MARGIN_VARIANTS = {
    "curricular+filter+row margins": dict(ARC=True, ST=False, EASY=False, USS_LSE=False,
                                          USS_CLAMP=False, ROW_MARGINS=True, CURRICULAR=True,
                                          FILTER=True),
    "adaface": dict(ARC=True, ST=False, EASY=False, USS_LSE=False, USS_CLAMP=False,
                    ROW_MARGINS=True, ANGLE_CLIP=True),
    "arc K=3": dict(ARC=True, ST=False, EASY=False, USS_LSE=False, USS_CLAMP=False, K=3,
                    KP=4),
    "everything K=2+lse": dict(ARC=True, ST=False, EASY=False, USS_LSE=True, USS_CLAMP=False,
                               ROW_MARGINS=True, CURRICULAR=True, FILTER=True, K=2, KP=2),
}
"""The margin family's forms (its cosine kernels only: the products compile as for the
others, K sub-centres being K columns per class there)."""


def fused_kernels(dtype, d, options, cos_only=False):
    """(label, kernel, constexprs, tiles, is_product) of the fused objective's launches in one
    form: the forward's cosine kernel (W and bank programs; the pairs form also stores its
    USS gradient tiles) and its ∂x product (pairs), the backward's cosine kernel (W programs;
    bank programs for lse), ∂W and ∂x (not with `cos_only`)."""
    from unitsface_kernels.triton import fused
    from unitsface_kernels.triton.config import fused_config
    from unitsface_kernels.triton.loads import TL_DTYPES

    cfg = fused_config(d, torch.device("cuda"), dtype)
    lse = options["USS_LSE"]
    common = dict(HAS_INDEX=True, HAS_LABELS=False, IN_BATCH=False, HAS_VALID=True,
                  UPCAST=False, XT=TL_DTYPES[dtype], VECTOR_BIAS=False,
                  SCALE_G=dtype != torch.float16)
    cos = dict(common, **dict(PLAIN_MARGIN, **options), BLOCK_M=cfg.cos.block_m,
               BLOCK_N=cfg.cos.block_n, BK=cfg.cos.bk)
    fwd = dict(cos, BACKWARD=False, W_PROGS=True, BANK_PROGS=True, STORE_GW=False,
               COL_H=False, STORE_GB=not lse, ROW_GB=False, COL_GB=False, COL_HB=False,
               STORE_E=False)
    bwd = dict(cos, BACKWARD=True, W_PROGS=True, BANK_PROGS=lse, STORE_GW=True, COL_H=True,
               STORE_GB=lse, ROW_GB=lse, COL_GB=False, COL_HB=False, STORE_E=False)
    dx = dict(HAS_INDEX=True, HAS_VALID=True, SCALE_G=common["SCALE_G"], UPCAST=False,
              XT=common["XT"], BLOCK_M=cfg.dx.block_m, BLOCK_N=cfg.dx.block_n, BK=cfg.dx.bk)
    dw = dict(HAS_INDEX=True, HAS_VALID=False, SCALE_G=common["SCALE_G"], UPCAST=False,
              XT=common["XT"], H_BLOCKS=0,
              BLOCK_M=cfg.dw.block_m, BLOCK_N=cfg.dw.block_n, BK=cfg.dw.bk)
    out = [("fwd", fused._cos_kernel, fwd, cfg.cos, False)]
    if cos_only:
        return out + [("bwd", fused._cos_kernel, bwd, cfg.cos, False)]
    if not lse:
        out.append(("fwd", fused._dx_kernel, dict(dx, HAS_W=False, HAS_BANK=True), cfg.dx,
                    True))
    out += [("bwd", fused._cos_kernel, bwd, cfg.cos, False),
            ("", fused._dw_kernel, dw, cfg.dw, True),
            ("bwd", fused._dx_kernel, dict(dx, HAS_W=True, HAS_BANK=lse), cfg.dx, True)]
    return out


def uss_kernels(dtype, d, options):
    """(label, kernel, constexprs, tiles, is_product) of the USS family's launches in one
    form (triton/uss_loss.py): the forward's cosine kernel (bank programs alone, the columns'
    own labels), the backward's cosine kernel (g tiles; with a reference gradient also the
    per-column sums of ∂ref's projection), ∂ref (with a reference gradient) and ∂x."""
    from unitsface_kernels.triton import fused
    from unitsface_kernels.triton.config import fused_config
    from unitsface_kernels.triton.loads import TL_DTYPES

    cfg = fused_config(d, torch.device("cuda"), dtype)
    o = dict(options)
    ref_grad = o.pop("REF_GRAD")
    vector = o["VECTOR_BIAS"]
    common = dict(o, HAS_INDEX=False, HAS_LABELS=True, ARC=False, ST=False, EASY=False,
                  **PLAIN_MARGIN, UPCAST=False, XT=TL_DTYPES[dtype], SCALE_G=dtype != torch.float16)
    cos = dict(common, W_PROGS=False, BANK_PROGS=True, STORE_GW=False, COL_H=False,
               STORE_E=False, BLOCK_M=cfg.cos.block_m, BLOCK_N=cfg.cos.block_n, BK=cfg.cos.bk)
    fwd = dict(cos, BACKWARD=False, STORE_GB=False, ROW_GB=False, COL_GB=False, COL_HB=False)
    bwd = dict(cos, BACKWARD=True, STORE_GB=True, ROW_GB=not vector, COL_GB=vector,
               COL_HB=ref_grad)
    flags = dict(HAS_INDEX=False, HAS_VALID=o["HAS_VALID"], SCALE_G=common["SCALE_G"],
                 UPCAST=False, XT=common["XT"])
    out = [("fwd", fused._cos_kernel, fwd, cfg.cos, False),
           ("bwd", fused._cos_kernel, bwd, cfg.cos, False)]
    if ref_grad:
        out.append(("", fused._dw_kernel,
                    dict(flags, H_BLOCKS=0, BLOCK_M=cfg.dw.block_m,
                         BLOCK_N=cfg.dw.block_n, BK=cfg.dw.bk), cfg.dw, True))
    out.append(("bwd", fused._dx_kernel, dict(flags, HAS_W=False, HAS_BANK=True,
                                              BLOCK_M=cfg.dx.block_m, BLOCK_N=cfg.dx.block_n,
                                              BK=cfg.dx.bk), cfg.dx, True))
    return out


H_BLOCKS = 4
"""The cosine programs' row blocks that the resident ∂W programs sum h over (unrolled): B =
512 in 128-row blocks."""


STORED_EXPS = ("cosface+pairs", "arc+lse")
"""The objective's forms whose stored-exponential launches the variants compile
(``saved_exp_bytes``; fp16 the first alone, both compiled without a spill on 2026-12-08): the
forward's cosine kernel that keeps them and the backward's fused._exps_grad_kernel that reads
them instead of the W programs' products."""


def stored_exps_kernels(dtype, d):
    """(label, kernel, constexprs, tiles, is_product) of the stored-exponential launches of
    :data:`STORED_EXPS`."""
    from types import SimpleNamespace

    from unitsface_kernels.triton import fused
    from unitsface_kernels.triton.config import fused_config

    cfg = fused_config(d, torch.device("cuda"), dtype)
    out = []
    for name in STORED_EXPS[:None if dtype == torch.bfloat16 else 1]:  # (fp16: CI time)
        fwd = fused_kernels(dtype, d, FUSED_VARIANTS[name], True)[0]
        # (as fused.cos_launch launches them: the W programs alone)
        out.append((f"fwd stored-exps {name}", fwd[1],
                    dict(fwd[2], STORE_E=True, BANK_PROGS=False, STORE_GB=False), fwd[3],
                    False))
        flags = {k: fwd[2][k] for k in ("HAS_INDEX", "ARC", "ST", "EASY", "ROW_MARGINS",
                                        "NO_FALLBACK", "SCALE_G", "XT", "UPCAST")}
        out.append((name, fused._exps_grad_kernel,
                     dict(flags, COL_H=True, E_WIDE=True, BLOCK_M=cfg.cos.block_m,
                          BLOCK_N=fused.EXPS_COLS),
                     SimpleNamespace(num_warps=8, num_stages=3), False))
    return out


def finish_kernels(dtype, d, launch):
    """(label, kernel, constexprs, tiles, is_product) of the finishing kernels (finish.py)
    as the objective and the USS family launch them: the merge (the objective's pairs form
    with its ∂b rows; the USS family's lse form with the clamp), ∂x's projection (the
    backward's: go, the forward's row gradients, ∂x in x's dtype) and x̂'."""
    from unitsface_kernels.triton import finish
    from unitsface_kernels.triton.loads import TL_DTYPES

    merge = dict(KP=1, BLOCK_R=finish._MERGE_ROWS, BLOCK_T=finish._MERGE_SLOTS)
    return [
        ("objective pairs", finish._merge_kernel,
         dict(SOFTMAX=True, USS=True, LSE=False, CLAMP=False, DB_ROWS=True, **merge), launch,
         False),
        ("uss lse+clamp", finish._merge_kernel,
         dict(SOFTMAX=False, USS=True, LSE=True, CLAMP=True, DB_ROWS=False, **merge), launch,
         False),
        ("backward", finish._tangent_kernel,
         dict(HAS_GO=True, HAS_EXTRA=True, **finish.tangent_blocks(16, d),
              XT=TL_DTYPES[dtype], UPCAST=False), launch, False),
        ("", finish._unit_rows_kernel,
         dict(**finish.unit_rows_blocks(d), XT=TL_DTYPES[dtype], UPCAST=False), launch,
         False)]


def persistent_kernels(kernels, dtype, d):
    """The persistent launches (FusedConfig.persistent, one per matrix: fused._cos_stream_kernel
    with the cosine kernel's tiles, and fused._cos_resident_kernel with the resident tiles)
    of the cosine kernels among `kernels` with K = 1, (label, kernel, constexprs, tiles,
    is_product) as they are."""
    from unitsface_kernels.triton import fused
    from unitsface_kernels.triton.config import fused_config

    cfg = fused_config(d, torch.device("cuda"), dtype, persistent="resident")
    res = cfg.cos if cfg.resident else None
    forms = [("persistent", fused._cos_stream_kernel, None),
             ("resident", fused._cos_resident_kernel, res)]
    return [(f"{name} {form} {kind}", stream,
             dict(flags, W_PROGS=kind == "W", BANK_PROGS=kind == "bank",
                  **({} if tiles is None else dict(BLOCK_M=tiles.block_m,
                                                   BLOCK_N=tiles.block_n, BK=tiles.bk))),
             tiles or launch, product)
            for name, kernel, flags, launch, product in kernels
            if kernel is fused._cos_kernel and flags["K"] == 1
            for kind, on in (("W", flags["W_PROGS"]), ("bank", flags["BANK_PROGS"])) if on
            for form, stream, tiles in forms if form == "persistent" or res is not None]


def resident_dw_kernels(dtype, d, rows=512):
    """(label, kernel, constexprs, tiles, is_product) of the x̂'-resident ∂W launch
    (fused._dw_resident_kernel, with the resident cosine launches) at B = rows: the
    objective's ∂W and the USS family's ∂ref (rows marked invalid)."""
    from unitsface_kernels.triton import fused
    from unitsface_kernels.triton.config import fused_config, resident_dw_tiles
    from unitsface_kernels.triton.loads import TL_DTYPES

    cuda = torch.device("cuda")
    tiles = resident_dw_tiles(fused_config(d, cuda, dtype, persistent="resident"), rows, dtype)
    flags = dict(HAS_INDEX=True, SCALE_G=dtype != torch.float16, UPCAST=False,
                 XT=TL_DTYPES[dtype], H_BLOCKS=H_BLOCKS, BLOCK_M=tiles.block_m,
                 BLOCK_N=tiles.block_n, BK=tiles.bk)
    return [(f"resident {what}", fused._dw_resident_kernel, dict(flags, HAS_VALID=valid),
             tiles, True) for what, valid in (("∂W", False), ("∂ref", True))]


PERSISTENT_FORMS = {"fwd cosface+pairs", "bwd cosface+pairs", "bwd arc-easy+lse+clamp",
                    "uss fwd bank lse+clamp", "uss bwd in-batch pairs",
                    "fwd stored-exps cosface+pairs"}
"""The forms whose persistent launches the compile test keeps (bf16): the headline's and the
ones with the most registers under either triton (all of them, bf16 and fp16, compiled
without a spill on 2026-12-07, docs/design.md §2)."""
NO_MMA = {"_row_norms_kernel", "_merge_kernel", "_tangent_kernel", "_unit_rows_kernel",
          "_exps_grad_kernel"}
"""The kernels without a matrix product (the norms, the finishing, the stored exponentials'
backward)."""
RESIDENT = {"_cos_resident_kernel": ("BLOCK_M", "BLOCK_N"),
            "_dw_resident_kernel": ("BLOCK_N", "BLOCK_M")}
"""The resident kernels: (the resident block's tile size, the streamed tiles' width)."""
HEADLINE = {(torch.bfloat16, 512), (torch.float16, 512)}
"""Cases whose fused kernels must run wgmma with N ≥ 128 in their products and cosine
tiles."""


def compile_all(dtype, d, variants=""):
    """Compile every kernel in the configuration the launchers pick for width d (the USS
    family in each of its modes at the headline; with `variants` = "variants", the objective
    in every form and option too, and in bf16 the persistent launches of
    :data:`PERSISTENT_FORMS`; with "margins", the margin family's cosine kernels alone)."""
    from types import SimpleNamespace

    from unitsface_kernels.triton import norms
    from unitsface_kernels.triton.loads import TL_DTYPES

    kernels = []
    if variants == "margins":
        for name, options in MARGIN_VARIANTS.items():
            for step, kernel, flags, launch, product in fused_kernels(dtype, d, options, True):
                kernels.append((f"{step} {name}", kernel, flags, launch, product))
    else:
        n_uss = None if (dtype, d) in HEADLINE else 1
        for name, options in list(USS_VARIANTS.items())[:n_uss]:
            for step, kernel, flags, launch, product in uss_kernels(dtype, d, options):
                kernels.append((f"uss {step} {name}".replace("  ", " "), kernel, flags, launch,
                                product))
        for name, options in list(FUSED_VARIANTS.items())[:None if variants else 1]:
            for step, kernel, flags, launch, product in fused_kernels(dtype, d, options):
                kernels.append((f"{step} {name}".strip(), kernel, flags, launch, product))
        if variants:
            kernels += stored_exps_kernels(dtype, d)
        if variants and dtype == torch.bfloat16:
            kernels += persistent_kernels([k for k in kernels if k[0] in PERSISTENT_FORMS],
                                          dtype, d)
            kernels += resident_dw_kernels(dtype, d)
        small = SimpleNamespace(num_warps=4, num_stages=3)
        kernels.append(("", norms._row_norms_kernel,
                        dict(HAS_INDEX=True, BLOCK_R=32, BLOCK_D=256, XT=TL_DTYPES[dtype],
                             UPCAST=False), small, False))
        kernels += finish_kernels(dtype, d, small)
    problems = []
    for name, kernel, flags, launch, product in kernels:
        compiled = _compile(kernel, dtype, flags, launch)
        shared = compiled.metadata.shared
        label = kernel.fn.__name__ + (f" [{name}]" if name else "")
        report = _report(compiled)
        mma = ", ".join(sorted(report["mma"])) or "no MMA"
        print(f"{label}: {shared} bytes of shared memory; {report['text']}; {mma}", flush=True)
        assert shared <= SMEM_LIMIT, (label, shared)
        # the resident programs: their block and two buffers of the streamed operand (less
        # means the compiler stopped loading the next tile while this one is multiplied),
        # and their products' N (the streamed tile's width)
        wide, narrow_dim = RESIDENT.get(kernel.fn.__name__, (None, None))
        if wide is not None:
            resident = (flags[wide] + 2 * flags[narrow_dim]) * flags["BK"] * dtype.itemsize
            if shared < resident:
                problems.append(f"{label}: {shared} bytes of shared memory, less than the "
                                f"resident block and two streamed buffers ({resident})")
        if report["spill_bytes"] != 0 or report["spills_in_loops"]:
            problems.append(f"{label}: {report['spill_bytes']} bytes of spill stores, "
                            f"{report['spills_in_loops']} spill instructions inside loops")
        if (dtype, d) in HEADLINE and kernel.fn.__name__ not in NO_MMA:
            n_min = flags[narrow_dim] if wide is not None else 128
            narrow = [m for m in report["mma"] if not _wgmma_n(m) or _wgmma_n(m) < n_min]
            if not report["mma"] or narrow:
                problems.append(f"{label}: matrix instructions {sorted(report['mma'])} "
                                f"(wanted wgmma with N ≥ {n_min})")
    assert not problems, "\n".join(problems)


def _wgmma_n(shape: str) -> int:
    """N of a 'wgmma m64nNk16' shape (0 for other instructions)."""
    import re

    found = re.match(r"wgmma m\d+n(\d+)k\d+", shape)
    return int(found.group(1)) if found else 0


def _report(compiled) -> dict:
    """ptxas's register and spill report for the kernel (the offline proxy for tile tuning:
    the GPU's own numbers need a GPU to load the binary), the spill instructions that lie
    inside loops (:func:`_spills_in_loops`), and the shapes of the matrix instructions in the
    PTX."""
    import re
    import tempfile

    ptx = compiled.asm["ptx"]
    mma = {f"wgmma m{m}n{n}k{k}" for m, n, k in
           re.findall(r"wgmma\.mma_async[.\w]*?\.m(\d+)n(\d+)k(\d+)", ptx)}
    mma |= {f"mma.sync m{m}n{n}k{k}" for m, n, k in
            re.findall(r"\bmma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", ptx)}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    inside, total = _spills_in_loops(compiled)
    if not (regs and spills):
        return dict(text="no ptxas report", mma=mma, spills_in_loops=inside, spill_bytes=None)
    return dict(text=f"{regs.group(1)} registers, {spills.group(1)} bytes of spill stores per "
                f"thread, {inside} of {total} spill instructions in loops",
                mma=mma, spills_in_loops=inside, spill_bytes=int(spills.group(1)))


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


RUNS = ([(t, d, "") for t, d in CASES if (t, d) not in HEADLINE]
        + [(t, 512, v) for v in ("variants", "margins") for t in (torch.bfloat16, torch.float16)])
"""The headline's plain cases are left out: its "variants" runs compile all they do."""


@pytest.mark.parametrize("triton_dir", [None, OLDEST_TRITON], ids=["this-triton", "triton-3.6"])
@pytest.mark.parametrize("dtype,d,variants", RUNS,
                         ids=[f"{_TL[t]}-D{d}" + (f"-{v}" if v else "") for t, d, v in RUNS])
def test_kernels_compile_for_sm90(dtype, d, variants, triton_dir):
    pytest.importorskip("triton")
    if triton_dir is not None and not os.path.isdir(triton_dir):
        pytest.fail(f"{triton_dir} is missing: `make test` unpacks triton 3.6.0 there")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_dir, ROOT, env.get("PYTHONPATH")]))
    args = [_TL[dtype], str(d)] + ([variants] if variants else [])
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
                variants=sys.argv[3] if sys.argv[3:] else "")
