"""Triton building blocks shared by the loss kernels, the host-side finish they share, and the
launch configurations (docs/design.md §2).

One home per formula: the device functions below are the only Triton statement of each piece
of docs/design.md §1 that more than one kernel uses (normalisation, softplus / σ, the online
log-sum-exp, the USS terms and their gradient, the per-row loads); the host-side formulas come
from :mod:`unitsface_kernels.reference` (:func:`~unitsface_kernels.reference.uss_lse_terms`,
:func:`~unitsface_kernels.reference.compute_dtype`, ``EPS``).

The USS kernels (uss.py) work on full-width tiles: a block of rows of x and a block of
reference rows, each with all D features (padded to a power of two, DP). One ``tl.dot`` then
gives a cosine tile, and the same reference tile is reused for the gradient product
G += g·r̂ without a second load (:func:`launch_config`). The fused margin-softmax / objective
kernels (fused.py) are three GEMM-shaped kernels with their own tiles (:func:`fused_config`):
the cosine tiles (K = D), the ∂W product (K = rows) and the split-K ∂x product (K = classes).

NaN and Inf in the data propagate (docs/design.md §5): tl.maximum / tl.minimum have maxnum
semantics (max(NaN, a) = a), so every clamp and max of a data value here is written with
comparisons that a NaN fails (:func:`clamp`, :func:`clamp_min`), and a NaN reaches the loss
and gradients of exactly the rows it touches, as in the reference. Reference rows marked
invalid are loaded as zeros with a norm of 1 (:func:`ref_rows_ok`): whatever they hold
reaches nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import reference

EPS = tl.constexpr(reference.EPS)
"""The normalisation eps of F.normalize (reference.EPS), readable by jitted code."""
# The running max of an empty set: finite, so exp(m_old - m_new) stays defined (a constexpr,
# since jitted code may only read constexpr globals).
NEG_BIG = tl.constexpr(-1.0e30)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes bf16 ``tl.dot`` wrongly (triton 3.8: errors of 1e10), so
    there bf16 tiles are widened to fp32 before the dot; compiled kernels keep bf16. The
    interpreter also converts fp32 to bf16 by truncation (GPUs round to nearest), so there
    the kernels write bf16 outputs into fp32 buffers that the host rounds (:func:`out_dtype`)."""
    return dtype == torch.bfloat16 and interpreting()


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a buffer that a kernel writes a `dtype` result into: `dtype` itself,
    except under :func:`upcast_tiles` (fp32, cast by the host with rounding to nearest)."""
    return torch.float32 if upcast_tiles(dtype) else dtype


@triton.jit
def round_bf16(v):
    """fp32 values rounded to the nearest bf16 (ties to even), kept in fp32; NaN stays NaN.
    Under the interpreter only (:func:`upcast_tiles`), whose own conversion truncates."""
    bits = v.to(tl.uint32, bitcast=True)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, r)


@triton.jit
def as_operand(t, XT: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded tile as x's dtype XT reads it: reference rows of another 16/32-bit dtype
    (fp32 master weights, a half bank) are rounded to XT after the load, in registers, so no
    host copy exists (docs/design.md §3). UPCAST (bf16 under the interpreter): fp32 holding
    the bf16 values, rounded to nearest even as the GPU's conversion does."""
    if UPCAST:
        if t.dtype == tl.bfloat16:
            return t.to(tl.float32)
        return round_bf16(t.to(tl.float32))
    return t.to(XT)


@triton.jit
def to_store(v, XT: tl.constexpr, UPCAST: tl.constexpr):
    """A computed tile rounded to XT for a buffer of :func:`out_dtype` (under UPCAST: fp32
    holding bf16 values, rounded to nearest even)."""
    if UPCAST:
        return round_bf16(v.to(tl.float32))
    return v.to(XT)


# ----------------------------------------------------------------------------- elementwise

@triton.jit
def clamp(z, lo, hi):
    """z clamped to [lo, hi]; NaN stays NaN (tl.minimum / tl.maximum would drop it)."""
    return tl.where(z < lo, lo, tl.where(z > hi, hi, z))


@triton.jit
def clamp_min(z, lo):
    """max(z, lo); NaN stays NaN."""
    return tl.where(z < lo, lo, z)


@triton.jit
def log1p(u):
    """log(1 + u), accurate for small u too: fl(1 + u) − 1 is exact, and log(w)·u/(w − 1) is
    log1p(u) to a few ulps (Goldberg's trick; log(1 + u) alone loses all of a u below the
    rounding of 1 + u, which a pair term far below the threshold is)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def softplus(z):
    """log(1 + e^z) without overflow: max(z, 0) + log1p(e^{-|z|}); NaN stays NaN."""
    return tl.where(z > 0.0, z, 0.0) + log1p(tl.exp(-tl.abs(z)))


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def softplus_sigmoid(z):
    """(softplus(z), σ(z)) from one exponential e = e^{−|z|}: softplus = max(z, 0) + log1p(e),
    σ = 1/(1 + e) for z ≥ 0, e/(1 + e) below. NaN stays NaN in both."""
    e = tl.exp(-tl.abs(z))
    pos = z >= 0.0
    return tl.where(z > 0.0, z, 0.0) + log1p(e), tl.where(pos, 1.0, e) / (1.0 + e)


@triton.jit
def inv_norm(norm):
    """1 / max(||t||, eps): the scale of F.normalize(t, eps=1e-5); NaN for a NaN norm."""
    return 1.0 / clamp_min(norm, EPS)


# ----------------------------------------------------------------------------- loads

@triton.jit
def gather_chunk(ptr, ids, ok, D, d0, DC: tl.constexpr, UPCAST: tl.constexpr):
    """Features [d0, d0 + DC) (zero padded past D; zero where not `ok`) of rows `ids` of a
    row-major matrix with D columns. UPCAST returns them in fp32 (see :func:`upcast_tiles`)."""
    offs_d = d0 + tl.arange(0, DC)
    mask = ok[:, None] & (offs_d[None, :] < D)
    t = tl.load(ptr + ids[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def gather_tile(ptr, ids, ok, D, DP: tl.constexpr, UPCAST: tl.constexpr):
    """All D features of rows `ids`, padded to DP (see :func:`gather_chunk`)."""
    return gather_chunk(ptr, ids, ok, D, 0, DP, UPCAST)


@triton.jit
def feature_chunk(tile, ptr, ids, ok, D, d0, DP: tl.constexpr, DC: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Features [d0, d0 + DC) of a full-width tile of rows `ids`: the tile itself when one
    chunk covers D, else reloaded (an L1/L2 hit: the tile was just read), since Triton
    cannot slice a tile."""
    if DC == DP:
        return tile
    return gather_chunk(ptr, ids, ok, D, d0, DC, UPCAST)


@triton.jit
def ref_rows_ok(valid_ptr, ids, in_range, HAS_VALID: tl.constexpr):
    """Which reference rows `ids` are read: in range and, with a validity mask, marked valid.
    Rows outside are loaded as zeros with a norm of 1 (:func:`inv_norm_of`), so an invalid
    row contributes nothing, whatever it holds (docs/design.md §5)."""
    if HAS_VALID:
        return in_range & (tl.load(valid_ptr + ids, mask=in_range, other=0) != 0)
    return in_range


@triton.jit
def ref_rows_ok_again(valid_ptr, ids, in_range, HAS_VALID: tl.constexpr):
    """:func:`ref_rows_ok` read a second time in a step, as a load of its own (an L1 hit: the
    ".ca" modifier keeps the compiler from merging it with the first), so that the mask need
    not stay live in between (see uss._ref_chunk)."""
    if HAS_VALID:
        return in_range & (tl.load(valid_ptr + ids, mask=in_range, other=0,
                                   cache_modifier=".ca") != 0)
    return in_range


@triton.jit
def inv_norm_of(norm_ptr, offs, ok):
    """1 / max(||t||, eps) of the rows at `offs` of a norms vector; 1 where not `ok`."""
    return inv_norm(tl.load(norm_ptr + offs, mask=ok, other=1.0))


@triton.jit
def row_block(nx_ptr, y_ptr, rows, B):
    """(rows in range, 1/max(||x_i||, eps), labels y_i (−1 for padding)) of a block of rows."""
    row_ok = rows < B
    return (row_ok, inv_norm_of(nx_ptr, rows, row_ok),
            tl.load(y_ptr + rows, mask=row_ok, other=-1))


@triton.jit
def unit_rows(t, inv):
    """The rows of a tile at their F.normalize length (t·inv), in the tile's dtype. The
    gradient products take their normalisation here, on the operand tile (|t̂| ≤ 1), rather
    than on the gradient weights: g/max(‖t‖, eps) reaches 64·1e5 for a row below the eps,
    past float16's range."""
    return (t.to(inv.dtype) * inv[:, None]).to(t.dtype)


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation (fp64 for fp64); 'ieee' keeps fp32 out of TF32."""
    return tl.dot(a, b, acc=acc, input_precision="ieee")


@triton.jit
def scaled_cos(dots, inv_x, inv_r):
    """cos_ij = (x_i · r_j) / (max(||x_i||, eps) · max(||r_j||, eps)) from raw dot products."""
    return dots * inv_x[:, None] * inv_r[None, :]


@triton.jit
def cos_tile(x_tile, r_tile, inv_x, inv_r):
    """The cosine tile of two full-width tiles (see :func:`scaled_cos`)."""
    zero = tl.zeros((x_tile.shape[0], r_tile.shape[0]), inv_x.dtype)
    return scaled_cos(mma(x_tile, tl.trans(r_tile), zero), inv_x, inv_r)


# ----------------------------------------------------------------------------- reductions

@triton.jit
def lse_init(BLOCK: tl.constexpr, dtype: tl.constexpr):
    """The running (max, Σ exp(z − max)) of an empty set, per row."""
    return tl.full((BLOCK,), NEG_BIG, dtype), tl.zeros((BLOCK,), dtype)


@triton.jit
def online_lse(m, s, z, mask):
    """Merge the masked entries of a tile into the running (max, Σ exp(z − max)) per row.
    A NaN entry makes the sum NaN (exp(NaN − max)), and with it the merged logsumexp: the
    running max may skip it (tl.max has maxnum semantics) without hiding it."""
    zm = tl.where(mask, z, NEG_BIG)
    m_new = tl.maximum(m, tl.max(zm, axis=1))
    s_new = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(zm - m_new[:, None]), 0.0),
                                           axis=1)
    return m_new, s_new


# ----------------------------------------------------------------------------- USS terms

@triton.jit
def uss_terms(cos, y, lj, ids, rows, cols, row_ok, col_ok, bias_ptr, bias_stride, scale, margin,
              IN_BATCH: tl.constexpr):
    """P and N masks of a cosine tile and each pair's softplus argument z (docs/design.md
    §1.1): z⁺ = b_j − s·(cos − m) in P, z⁻ = s·cos − b_j elsewhere (P and N are disjoint, so
    one tile holds both). Column j is reference row `ids[j]` of the bias array (j itself, or
    the class S_j under partial FC) with label l_j = lj[j]; `col_ok` says which columns are read
    (:func:`ref_rows_ok`): the rest are in neither set. `cols` serve the in-batch
    self-exclusion."""
    b = tl.load(bias_ptr + ids * bias_stride, mask=col_ok, other=0.0).to(cos.dtype)
    return uss_terms_of(cos, y, lj, rows, cols, row_ok, col_ok, b[None, :], scale, margin,
                        IN_BATCH)


@triton.jit
def uss_terms_of(cos, y, lj, rows, cols, row_ok, col_ok, b, scale, margin,
                 IN_BATCH: tl.constexpr):
    """:func:`uss_terms` with the thresholds given: `b` one value, or a row of one per
    column (shape (1, N))."""
    ok = row_ok[:, None] & col_ok[None, :]
    same = y[:, None] == lj[None, :]
    pos = ok & same
    if IN_BATCH:
        pos = pos & (rows[:, None] != cols[None, :])
    neg = ok & (y[:, None] != lj[None, :])
    z = tl.where(pos, b - scale * (cos - margin), scale * cos - b)
    return pos, neg, z


@triton.jit
def uss_pairs_sum(z, pos, neg, scale, CLAMP: tl.constexpr):
    """Σ_P softplus(z⁺) + Σ_N softplus(z⁻) per row (the official clamp: z → clamp(z, −s, s))."""
    if CLAMP:
        z = clamp(z, -scale, scale)
    return tl.sum(tl.where(pos | neg, softplus(z), 0.0), axis=1)


@triton.jit
def uss_row_stats(stats_ptr, rows, row_ok, B):
    """The backward's per-row USS statistics (A, σA', B, σB' of the lse form, σ' zero where
    the official clamp is active or the set is empty), stored as four rows of B values from
    `stats_ptr`."""
    return (tl.load(stats_ptr + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 2 * B + rows, mask=row_ok, other=0.0),
            tl.load(stats_ptr + 3 * B + rows, mask=row_ok, other=0.0))


@triton.jit
def uss_grad(z, pos, neg, scale, a, fa, bn, fb, LSE: tl.constexpr, CLAMP: tl.constexpr):
    """g_ij / go_i = ∂L_i/∂cos_ij of USS (docs/design.md §1.1), zero outside P ∪ N:

        pairs: −s·σ(z⁺) (P), s·σ(z⁻) (N), zero where the official clamp is active
        lse:   −s·e^{z⁺ − A_i}·σ(A_i) (P), s·e^{z⁻ − B_i}·σ(B_i) (N)

    (for lse, fa = σ(A_i) is already zero where the clamp on A_i is active, fb likewise)."""
    if LSE:
        g = scale * tl.exp(z - tl.where(pos, a[:, None], bn[:, None]))
        g = g * tl.where(pos, fa[:, None], fb[:, None])
    else:
        g = scale * sigmoid(z)
        if CLAMP:  # the clamp's gradient: 1 inside [−s, s], 0 outside (and for NaN)
            g = tl.where((z < -scale) | (z > scale), 0.0, g)  # NaN z: NaN g, not 0
    return tl.where(pos, -g, tl.where(neg, g, 0.0))


# ----------------------------------------------------------------------------- host finish

def merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Merge per-slice (max, sum-exp) pairs [slices, B] into logsumexp per row; −inf if empty."""
    top = m.max(dim=0).values
    total = (s * torch.exp(m - top)).sum(dim=0)
    # total == 0 only for an empty set; a NaN total stays NaN (NaN inputs are never hidden).
    return torch.where(total == 0, torch.full_like(top, -float("inf")), top + torch.log(total))


def uss_lse_finish(partial: torch.Tensor, scale: float, clamp: bool):
    """The lse form's per-row loss and the backward's statistics [4, B] = (A, σA', B, σB')
    from per-slice partials [slices, 4, B] = (max⁺, sumexp⁺, max⁻, sumexp⁻):
    :func:`~unitsface_kernels.reference.uss_lse_terms` of the merged A and B."""
    a = merge_lse(partial[:, 0], partial[:, 1])
    b = merge_lse(partial[:, 2], partial[:, 3])
    rows, fa, fb = reference.uss_lse_terms(a, b, scale, clamp)
    return rows, torch.stack([a, fa, b, fb])


def normalised_grad(acc_g, h, t, norms):
    """(G − h·t̂) / max(||t||, eps), without the projection when ||t|| < eps."""
    inv = 1.0 / norms.clamp_min(reference.EPS)
    proj = torch.where(norms >= reference.EPS, h, torch.zeros_like(h))
    return inv[:, None] * (acc_g - (proj * inv)[:, None] * t.to(acc_g.dtype))


def tangent_grad(acc_g, t, norms):
    """(G − (t̂·G)·t̂) / max(||t||, eps), without the projection when ||t|| < eps: the
    normalisation's gradient with h = Σ_j g_ij cos_ij taken as t̂·G, its exact value, from G
    itself. The projection then removes exactly G's own radial part, rounding included (with
    h summed apart in fp32, the rounding of G's radial part, e.g. from half-precision g tiles,
    would stay in the result and dominate it where the gradient is nearly radial)."""
    inv = 1.0 / norms.clamp_min(reference.EPS)
    tc = t.to(acc_g.dtype)
    h = (acc_g * tc).sum(dim=1) * inv
    proj = torch.where(norms >= reference.EPS, h, torch.zeros_like(h))
    return inv[:, None] * (acc_g - (proj * inv)[:, None] * tc)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    dp: int  # the embedding width padded to a power of two: cosine tiles use all of it
    dc: int  # the width of one gradient-accumulator chunk (a divisor of dp)
    num_warps: int
    num_stages: int
    bk: int  # the K-loop width of the fused kernels (a divisor of dc; 0: full-width tiles)


def _override(name: str, dp: int, bk: int) -> LaunchConfig | None:
    """A tuning knob: "block_m,block_n,dc,num_warps,num_stages[,bk]" in the environment
    (bk defaults to `bk`; dc and bk are clipped to the padded width dp). Block sizes, dc and
    bk must be powers of two (tl.arange), bk ≤ dc."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        bm, bn, dc, warps, stages, *given_bk = (int(v) for v in value.split(","))
        if len(given_bk) > 1:
            raise ValueError("too many fields")
    except ValueError as e:
        raise ValueError(f"{name}={value!r}: expected 'block_m,block_n,dc,num_warps,"
                         f"num_stages[,bk]' (integers): {e}") from None
    dc = min(dc, dp)
    bk = min(given_bk[0] if given_bk else bk, dc)
    sizes = dict(block_m=bm, block_n=bn, dc=dc, num_warps=warps) | ({"bk": bk} if bk else {})
    for key, v in sizes.items():
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}={value!r}: {key}={v} is not a power of two")
    if stages < 1:
        raise ValueError(f"{name}={value!r}: num_stages={stages} must be at least 1")
    return LaunchConfig(bm, bn, dp, dc, warps, stages, bk)


def launch_config(d: int, device: torch.device, dtype: torch.dtype) -> LaunchConfig:
    """Tile sizes of the USS kernels for embedding width d. Hopper's wgmma needs 64-row
    blocks; full-width tiles must fit shared memory (x tile + two reference tiles per
    pipeline stage), and the USS backward's gradient accumulator (rows × dc fp32) must fit
    registers: it is cut into feature chunks of at most 256 columns (2-byte dtypes) so that
    ptxas does not spill."""
    dp = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        # The interpreter runs programs one after another: big tiles are fastest, and 32 keeps
        # the tests' odd shapes (37 rows, 53 references) spanning several partial blocks;
        # chunking D (dc < dp when dp > 64) exercises the feature-chunk path too.
        return LaunchConfig(32, 32, dp, min(dp, 64), 4, 1, 0)
    esize = dtype.itemsize
    override = _override("UNITSFACE_TRITON_TILES", dp, 0)
    if override:
        return override
    row_bytes = dp * esize
    block_m = 64 if row_bytes <= 1024 else 32 if row_bytes <= 2048 else 16
    block_n = 64 if row_bytes <= 512 else 32 if row_bytes <= 1024 else 16
    dc = min(dp, 512 // esize)
    # Measured on an H200 with triton 3.6 (benchmarks/results/NOTES.md): at D=512 in bf16 the
    # pipelined (2-stage) backward kernels ask for 266 KB of shared memory (> 227 KB), and
    # 4 warps beat 8 (6.8 ms against 9.4 ms for the objective's fwd+bwd at C=100k).
    stages = 2 if block_n * row_bytes < 32768 else 1
    return LaunchConfig(block_m, block_n, dp, dc, 8 if dp > 512 else 4, stages, 0)


@dataclass(frozen=True)
class GemmTiles:
    """One GEMM-shaped kernel's tiles: block_m × block_n outputs, a K loop in bk-wide steps."""

    block_m: int
    block_n: int
    bk: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class FusedConfig:
    """Launch configuration of the fused margin-softmax / objective kernels (fused.py).

    cos: the cosine tiles (rows × classes, K = D) of the forward and of the backward's
        recomputation (one configuration for both: the backward recomputes the forward's
        cosines bit for bit);
    dw: ∂W = g̃ᵀ·x̂' (classes × features, K = rows);
    dx: ∂x = g̃·R (rows × features, K = the classes of a chunk, cut into split-K slices);
    chunk_bytes: the gradient tiles of one class chunk (B × chunk in x's dtype, per buffer)
        stay below this, to stay in L2 between the kernel that writes them and the products
        that read them; chunk: classes per chunk instead (the interpreter's);
    programs: how many programs the split-K ∂x product aims for (one wave); splits: a fixed
        split count instead (the interpreter's)."""

    cos: GemmTiles
    dw: GemmTiles
    dx: GemmTiles
    chunk_bytes: int = 32 << 20
    chunk: int = 0
    programs: int = 0
    splits: int = 0

    @property
    def granule(self) -> int:
        """Chunks are multiples of this many classes: whole tiles of every kernel."""
        return max(self.cos.block_n, self.dw.block_m, self.dx.bk)


FUSED_KNOBS = {"cos": "UNITSFACE_TRITON_COS_TILES", "dw": "UNITSFACE_TRITON_DW_TILES",
               "dx": "UNITSFACE_TRITON_DX_TILES"}
"""Tuning knobs of the fused kernels: "block_m,block_n,bk,num_warps,num_stages" (powers of two
but num_stages); UNITSFACE_TRITON_CHUNK_MB sets chunk_bytes."""


def _gemm_override(name: str, dp: int) -> GemmTiles | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        bm, bn, bk, warps, stages = (int(v) for v in value.split(","))
    except ValueError as e:
        raise ValueError(f"{name}={value!r}: expected 'block_m,block_n,bk,num_warps,"
                         f"num_stages' (five integers): {e}") from None
    for key, v in dict(block_m=bm, block_n=bn, bk=bk, num_warps=warps).items():
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name}={value!r}: {key}={v} is not a power of two")
    if stages < 1:
        raise ValueError(f"{name}={value!r}: num_stages={stages} must be at least 1")
    return GemmTiles(bm, bn, bk, warps, stages)


def fused_config(d: int, device: torch.device, dtype: torch.dtype) -> FusedConfig:
    """Tiles of the fused margin-softmax / objective kernels for embedding width d.

    GPU defaults (2-byte dtypes) from the sm_90 compile (ptxas's report with triton 3.6 and
    3.8, tests/test_triton_compile.py; not yet timed on a GPU): 128 × 128 cosine tiles with
    8 warps (two warpgroups of wgmma m64n128; 128 × 256 leaves the backward's epilogue no
    registers), 128 × 256 ∂W tiles and 128 × 128 ∂x tiles, K steps of 64, 3 stages.
    fp32 (exact products on the FMA units, no TF32): 64 × 64 tiles, K steps of 32.
    Tuning knobs: :data:`FUSED_KNOBS`, UNITSFACE_TRITON_CHUNK_MB."""
    dp = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        # Under the interpreter: small tiles so that the tests' odd shapes (37 rows, 301
        # classes, D = 70) run the K loops' partial last steps, several chunks (the last one
        # partial), split-K slices that are empty in the last chunk, several feature tiles.
        t = GemmTiles(32, 32, 32, 4, 1)
        return FusedConfig(t, t, t, chunk=128, splits=2)
    esize = dtype.itemsize
    if esize == 2:
        bk = min(dp, 64)
        cos = GemmTiles(128, 128, bk, 8, 3)
        dw = GemmTiles(128, min(256, dp), 64, 8, 3)
        dx = GemmTiles(128, min(128, dp), 64, 8, 3)
    else:
        bk = min(dp, 32)
        cos = GemmTiles(64, 64, bk, 4, 2)
        dw = GemmTiles(64, min(64, dp), 32, 4, 2)
        dx = GemmTiles(64, min(64, dp), 32, 4, 2)
    tiles = dict(cos=cos, dw=dw, dx=dx)
    for key, knob in FUSED_KNOBS.items():
        tiles[key] = _gemm_override(knob, dp) or tiles[key]
    chunk_mb = os.environ.get("UNITSFACE_TRITON_CHUNK_MB")
    chunk_bytes = int(float(chunk_mb) * (1 << 20)) if chunk_mb else 32 << 20
    if chunk_bytes < 1:
        raise ValueError(f"UNITSFACE_TRITON_CHUNK_MB={chunk_mb!r} must be positive")
    return FusedConfig(**tiles, chunk_bytes=chunk_bytes,
                       programs=torch.cuda.get_device_properties(device).multi_processor_count
                       if torch.cuda.is_available() else 132)


MAX_ROW_BYTES = 4096
"""Widest embedding row (padded width × element size) whose full-width tiles fit shared
memory: D ≤ 2048 for 2-byte dtypes, 1024 for fp32; wider ones belong to the native backend."""


def check_width(d: int, dtype: torch.dtype, device: torch.device) -> None:
    """The shapes and dtypes the compiled kernels support (the interpreter runs any)."""
    dp = max(16, triton.next_power_of_2(d))
    if dp * dtype.itemsize > MAX_ROW_BYTES:
        raise ValueError(f"the triton backend supports embeddings up to {MAX_ROW_BYTES} bytes "
                         f"per padded row; D={d} in {dtype} is wider: use backend='native'")
    if dtype == torch.float64 and device.type == "cuda":
        # Triton's fp64 tl.dot fails to compile for these tiles (triton 3.6 and 3.8, sm_90).
        raise TypeError("the triton backend has no float64 kernels for GPUs (float64 is for "
                        "gradcheck: run it on the CPU, or use backend='native' on the GPU)")


def num_splits(row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """How many slices the reference dimension is cut into so that a small batch (B=512 is
    8 row blocks) still fills every multiprocessor: about two programs per SM."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # under the interpreter: enough slices to exercise the cross-split combine
    splits = max(1, min(n_tiles, target // max(1, row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split)


def read_as(ref: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Reference rows as the kernels read them: in x's dtype (fp32 master weights for half
    embeddings are rounded, a half bank for fp32 ones widened; docs/design.md §3). A copy
    when the dtypes differ: the kernels take one operand dtype."""
    return ref if ref is None or ref.dtype == x.dtype else ref.to(x.dtype)
