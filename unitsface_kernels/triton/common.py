"""Small Triton building blocks shared by the loss kernels, and the launch configurations.

The USS kernels (uss.py) work on full-width tiles: a block of rows of x and a block of
reference rows, each with all D features (padded to a power of two, DP). One ``tl.dot`` then
gives a cosine tile, and the same reference tile is reused for the gradient product
G += g·r̂ without a second load (:func:`launch_config`). The fused margin-softmax / objective
kernels (fused.py) loop over D in BK-wide chunks instead (:func:`fused_config`): the one-pass
backward holds a ∂W accumulator across the row blocks, and full-width tiles would leave it no
registers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

EPS = 1e-5
# The running max of an empty set: finite, so exp(m_old - m_new) stays defined (a constexpr,
# since jitted code may only read constexpr globals).
NEG_BIG = tl.constexpr(-1.0e30)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Triton's interpreter computes bf16 ``tl.dot`` wrongly (triton 3.8: errors of 1e10), so
    there bf16 tiles are widened to fp32 before the dot; compiled kernels keep bf16."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def softplus(z):
    """log(1 + e^z) without overflow: max(z, 0) + log(1 + e^{-|z|})."""
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def inv_norm(norm):
    """1 / max(||t||, eps): the scale of F.normalize(t, eps=1e-5)."""
    return 1.0 / tl.maximum(norm, 1e-5)


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
def load_tile(ptr, rows, n_rows, D, DP: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `rows` of a row-major (n_rows × D) matrix; see :func:`gather_tile`."""
    return gather_tile(ptr, rows, rows < n_rows, D, DP, UPCAST)


@triton.jit
def mma(a, b, acc):
    """acc + a @ b with fp32 accumulation (fp64 for fp64); 'ieee' keeps fp32 out of TF32."""
    return tl.dot(a, b, acc=acc, input_precision="ieee")


@triton.jit
def cos_tile(x_tile, r_tile, inv_x, inv_r):
    """cos_ij = (x_i · r_j) / (max(||x_i||, eps) · max(||r_j||, eps))."""
    zero = tl.zeros((x_tile.shape[0], r_tile.shape[0]), inv_x.dtype)
    return mma(x_tile, tl.trans(r_tile), zero) * inv_x[:, None] * inv_r[None, :]


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


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
    esize = _element_size(dtype)
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


def fused_config(d: int, device: torch.device, dtype: torch.dtype, *,
                 backward: bool) -> LaunchConfig:
    """Tiles of the fused margin-softmax / objective kernels (fused.py), which compute the
    cosines with a K loop over BK-wide chunks of D (no full-width tiles). The backward's
    program owns BLOCK_N classes × dc features of ∂W (an fp32 register accumulator kept
    across all row blocks); feature chunks beyond the first recompute the cosines.

    GPU defaults from the sm_90 compile and ptxas's register report (triton 3.6 and 3.8, with
    the run-time alignment specialization; not yet timed on a GPU), bf16 at D=512:
    - forward 64×64, 8 warps: 0 spills (64×128 reaches 255 registers on triton 3.6);
    - backward 64×64 with the whole width in one chunk (no recomputed cosines), 8 warps:
      1.2 KB of spills per thread, every product on wgmma, and half the atomic adds of ∂x
      that 64×32 tiles need (those spill 0.2 KB, but their ∂W product has M=32 and falls
      back to mma.sync); 4 warps spill 2–8 KB. The atomic adds are the larger cost by the
      byte count (benchmarks/fusion.py): each class tile adds a B × D fp32 block.
    fp32 (exact products, no tensor cores) needs far more registers: dc=128 and 64×32 tiles.
    Tuning knobs: UNITSFACE_TRITON_FWD_TILES / UNITSFACE_TRITON_BWD_TILES
    ("block_m,block_n,dc,num_warps,num_stages[,bk]")."""
    dp = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        # Under the interpreter: BK < dc < dp at the tests' widths, so the K loop, the
        # feature chunks and their partial last pieces all run; the forward and backward
        # share BLOCK_M, BLOCK_N and BK, so the backward recomputes the cosines bit for bit.
        dc = min(dp, 64)
        return LaunchConfig(32, 32, dp, dc, 4, 1, min(dc, 32))
    esize = _element_size(dtype)
    bk = min(dp, 128 // esize)  # 128-byte rows of a K chunk
    override = _override("UNITSFACE_TRITON_BWD_TILES" if backward
                         else "UNITSFACE_TRITON_FWD_TILES", dp, bk)
    if override:
        return override
    if not backward:
        return LaunchConfig(64, 64, dp, dp, 8, 3, bk)
    if esize == 2:
        return LaunchConfig(64, 64, dp, min(dp, 512), 8, 2, bk)
    return LaunchConfig(64, 32, dp, min(dp, 128), 8, 2, bk)


MAX_ROW_BYTES = 4096
"""Widest embedding row (padded width × element size) whose full-width tiles fit shared
memory: D ≤ 2048 for 2-byte dtypes, 1024 for fp32; wider ones belong to the native backend."""


def check_width(d: int, dtype: torch.dtype, device: torch.device) -> None:
    """The shapes and dtypes the compiled kernels support (the interpreter runs any)."""
    dp = max(16, triton.next_power_of_2(d))
    if dp * _element_size(dtype) > MAX_ROW_BYTES:
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
