"""Small Triton building blocks shared by the loss kernels, and the launch configuration.

Every kernel works on full-width tiles: a block of rows of x and a block of reference rows,
each with all D features (padded to a power of two, DP). One ``tl.dot`` then gives a cosine
tile, and the same reference tile is reused for the gradient product G += g·r̂ without a
second load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

EPS = 1e-5
NEG_BIG = -1.0e30  # the running max of an empty set: finite, so exp(m_old - m_new) stays defined


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
def gather_tile(ptr, ids, ok, D, DP: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `ids` (all D features, zero padded to DP; zero where not `ok`) of a row-major
    matrix with D columns. UPCAST returns them in fp32 (see :func:`upcast_tiles`)."""
    offs_d = tl.arange(0, DP)
    mask = ok[:, None] & (offs_d[None, :] < D)
    t = tl.load(ptr + ids[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def load_tile(ptr, rows, n_rows, D, DP: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `rows` of a row-major (n_rows × D) matrix; see :func:`gather_tile`."""
    return gather_tile(ptr, rows, rows < n_rows, D, DP, UPCAST)


@triton.jit
def cos_tile(x_tile, r_tile, inv_x, inv_r):
    """cos_ij = (x_i · r_j) / (max(||x_i||, eps) · max(||r_j||, eps)), accumulated in fp32
    (fp64 for fp64 inputs); 'ieee' keeps fp32 inputs out of TF32."""
    dots = tl.dot(x_tile, tl.trans(r_tile), input_precision="ieee")
    return dots * inv_x[:, None] * inv_r[None, :]


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    dp: int
    num_warps: int
    num_stages: int


def launch_config(d: int, device: torch.device) -> LaunchConfig:
    """Tile sizes for embedding width d: full-width tiles must fit in registers and shared
    memory, so the wider the embedding the smaller the row and reference blocks."""
    dp = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        # The interpreter runs programs one after another: big tiles are fastest, and 32 keeps
        # the tests' odd shapes (37 rows, 53 references) spanning several partial blocks.
        return LaunchConfig(32, 32, dp, 4, 1)
    if dp <= 128:
        return LaunchConfig(64, 64, dp, 4, 3)
    if dp <= 256:
        return LaunchConfig(64, 64, dp, 8, 2)
    if dp <= 512:
        return LaunchConfig(64, 32, dp, 8, 2)
    if dp <= 1024:
        return LaunchConfig(32, 32, dp, 8, 1)
    return LaunchConfig(16, 16, dp, 8, 1)


MAX_D = 4096
"""Widest embedding the full-width tiles support; wider ones belong to the native backend."""


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
