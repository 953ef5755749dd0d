"""Launch configuration of the fused kernels (docs/design.md §2): the tiles of each
GEMM-shaped kernel (:func:`fused_config`, with its environment tuning knobs), the widths and
dtypes the compiled kernels support (:func:`check_width`), and how one call runs — its chunks
of classes and split-K slices (:func:`plan`, which the cost model reads too).

The three kernels of fused.py have their own tiles: the cosine tiles (K = D), the ∂W product
(K = rows) and the split-K ∂x product (K = the classes of a chunk).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton


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
    """Launch configuration of the fused kernels (fused.py: every op family).

    cos: the cosine tiles (rows × classes, K = D) of the forward and of the backward's
        recomputation (one configuration for both: the backward recomputes the forward's
        cosines bit for bit);
    dw: ∂W = g̃ᵀ·x̂' (classes × features, K = rows);
    dx: ∂x = g̃·R (rows × features, K = the classes of a chunk, cut into split-K slices);
    chunk_bytes: the gradient tiles of one class chunk (B × chunk in x's dtype, per buffer)
        stay below this, to stay in L2 between the kernel that writes them and the products
        that read them; chunk: at most this many classes per chunk instead, and at least
        two chunks where S holds more than `granule` classes (the interpreter's: the tests'
        small shapes cross a chunk boundary);
    programs: how many programs the split-K ∂x product aims for (one wave); splits: a fixed
        split count instead (the interpreter's);
    persistent: the cosine tiles from at most this many persistent programs
        (fused._cos_stream_kernel; K = 1), 0: a program per tile (fused._cos_kernel);
    resident: with `persistent`, programs that keep their x row block resident
        (fused._cos_resident_kernel; `cos` is then its tiles, bk the width D rounded up to a
        power of two; about `persistent` programs, a multiple of the row blocks);
    dw_resident: with `resident`, the tiles of the ∂W programs that keep their block of x̂'
        resident (fused._dw_resident_kernel; block_m columns × block_n features, bk 0: all
        the rows, which the plan fills in where they fit, :func:`resident_dw_tiles`), or
        None."""

    cos: GemmTiles
    dw: GemmTiles
    dx: GemmTiles
    chunk_bytes: int = 32 << 20
    chunk: int = 0
    programs: int = 0
    splits: int = 0
    persistent: int = 0
    resident: bool = False
    dw_resident: GemmTiles | None = None

    @property
    def granule(self) -> int:
        """Chunks are multiples of this many classes: whole tiles of every kernel."""
        return max(self.cos.block_n, self.dw.block_m, self.dx.bk)


FUSED_KNOBS = {"cos": "UNITSFACE_TRITON_COS_TILES", "dw": "UNITSFACE_TRITON_DW_TILES",
               "dx": "UNITSFACE_TRITON_DX_TILES"}
"""Tuning knobs of the fused kernels: "block_m,block_n,bk,num_warps,num_stages" (powers of two
but num_stages); UNITSFACE_TRITON_CHUNK_MB sets chunk_bytes; UNITSFACE_TRITON_PERSISTENT=1
runs the cosine tiles from persistent programs, one per SM (2 under the interpreter, so that
a program takes several tiles), =resident from persistent programs that keep their x row
block resident in shared memory (where it fits: :func:`resident_tiles`, which then replace
the cosine tiles, UNITSFACE_TRITON_COS_TILES included; else as =1)."""
PERSISTENT_KNOB = "UNITSFACE_TRITON_PERSISTENT"


RESIDENT_BYTES = 128 << 10
"""The largest x row block (BLOCK_M × D rounded up, in x's dtype) that a resident program
keeps in shared memory: with its two or three 32-column reference buffers, 192–224 KB of the
227 KB a block may take on an H100 or H200."""


def _persistent(programs: int, value: str | None) -> tuple[int, bool]:
    """(FusedConfig.persistent, whether the resident form is asked for) from the knob's value
    (None: :data:`PERSISTENT_KNOB`'s)."""
    if value is None:
        value = os.environ.get(PERSISTENT_KNOB, "0")
    if value not in ("0", "1", "resident"):
        raise ValueError(f"{PERSISTENT_KNOB}={value!r}: expected 0, 1 or resident")
    return (programs if value != "0" else 0), value == "resident"


def resident_tiles(dp: int, device: torch.device, dtype: torch.dtype) -> GemmTiles | None:
    """The tiles of the resident cosine programs at padded width dp, or None where the row
    block would not fit in :data:`RESIDENT_BYTES` (or the dtype is fp32 on a GPU: its FMA
    products hold their operands in registers). sm_90, D = 512, bf16 and fp16
    (tests/test_triton_compile.py): 128 rows × 32 columns with 8 warps (wgmma m64n32k16,
    both operands from shared memory), 3 stages (two reference buffers in flight)."""
    if device.type != "cuda":
        return GemmTiles(32, 16, dp, 4, 1)  # the interpreter's: several tiles per row block
    if dtype.itemsize != 2 or 128 * dp * dtype.itemsize > RESIDENT_BYTES:
        return None
    return GemmTiles(128, 32, dp, 8, 3)


def resident_dw_tiles(cfg: FusedConfig, rows: int, dtype: torch.dtype) -> GemmTiles | None:
    """The tiles of the x̂'-resident ∂W programs (fused._dw_resident_kernel) for B = rows:
    FusedConfig.dw_resident with bk all the rows, rounded up to a power of two, or None (the
    ∂W programs of FusedConfig.dw then) where the x̂' block (bk × its features, in x's
    dtype) would not fit in :data:`RESIDENT_BYTES` (B ≤ 512 in bf16 and fp16 on a GPU)."""
    t = cfg.dw_resident
    bk = max(16, triton.next_power_of_2(rows))
    if t is None or bk * t.block_n * dtype.itemsize > RESIDENT_BYTES:
        return None
    return replace(t, bk=bk)


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


def fused_config(d: int, device: torch.device, dtype: torch.dtype, sub_centres: int = 1,
                 persistent: str | None = None) -> FusedConfig:
    """Tiles of the fused kernels for embedding width d and K = sub_centres rows per class
    (the persistent cosine launches are for K = 1: with K > 1, a program per tile);
    `persistent`: :data:`PERSISTENT_KNOB`'s value to use instead of the environment's (the
    cost model and the compile report compare the forms side by side).

    GPU defaults (2-byte dtypes) from the sm_90 compile (ptxas's report with triton 3.6 and
    3.8, tests/test_triton_compile.py: no spill in any form; not yet timed on a GPU):
    128 × 128 cosine tiles with 8 warps (two warpgroups of wgmma m64n128; 128 × 256 leaves the
    backward's epilogue no registers), 128 × 256 ∂W and ∂x tiles (wgmma m64n256; ∂x stores its
    carried sums a quarter tile at a time to stay clear of spills: 220 registers in bf16, up
    to 254 in fp16, whose operand tiles are normalised in registers), K steps of 64, 3 stages.
    fp32 (exact products on the FMA units, no TF32): 64 × 64 tiles, K steps of 32; the
    cosine tiles with 8 warps and K steps of 16 (the FMA dot holds its operand tiles in
    registers: with 4 warps, or K steps of 32, the epilogues spilled 8–52 bytes).
    Tuning knobs: :data:`FUSED_KNOBS`, UNITSFACE_TRITON_CHUNK_MB, :data:`PERSISTENT_KNOB`
    (with =resident the cosine tiles are :func:`resident_tiles`, where the row block fits)."""
    dp = max(16, triton.next_power_of_2(d))
    if device.type != "cuda":
        # Under the interpreter: small tiles so that the tests' odd shapes (37 rows, 53 or 301
        # classes, D = 70) run the K loops' partial last steps, several chunks (the last one
        # partial), split-K slices that are empty in the last chunk, several feature tiles.
        t = GemmTiles(32, 32, 32, 4, 1)
        return _with_persistent(FusedConfig(t, t, t, chunk=128, splits=2), 2, dp, device,
                                dtype, sub_centres, persistent)
    esize = dtype.itemsize
    if esize == 2:
        bk = min(dp, 64)
        cos = GemmTiles(128, 128, bk, 8, 3)
        dw = GemmTiles(128, min(256, dp), 64, 8, 3)
        dx = GemmTiles(128, min(256, dp), 64, 8, 3)
    else:
        bk = min(dp, 32)
        cos = GemmTiles(64, 64, min(dp, 16), 8, 2)
        dw = GemmTiles(64, min(64, dp), 32, 4, 2)
        dx = GemmTiles(64, min(64, dp), 32, 4, 2)
    tiles = dict(cos=cos, dw=dw, dx=dx)
    for key, knob in FUSED_KNOBS.items():
        tiles[key] = _gemm_override(knob, dp) or tiles[key]
    chunk_mb = os.environ.get("UNITSFACE_TRITON_CHUNK_MB")
    chunk_bytes = int(float(chunk_mb) * (1 << 20)) if chunk_mb else 32 << 20
    if chunk_bytes < 1:
        raise ValueError(f"UNITSFACE_TRITON_CHUNK_MB={chunk_mb!r} must be positive")
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if torch.cuda.is_available() else 132)
    return _with_persistent(FusedConfig(**tiles, chunk_bytes=chunk_bytes, programs=sms), sms,
                            dp, device, dtype, sub_centres, persistent)


def _with_persistent(cfg: FusedConfig, programs: int, dp: int, device: torch.device,
                     dtype: torch.dtype, sub_centres: int, value: str | None) -> FusedConfig:
    """cfg with the persistent cosine launches that the knob's value asks for (K = 1): at
    most `programs` programs, resident ones (with their tiles) where the row block fits."""
    persistent, resident = _persistent(programs, value)
    if sub_centres != 1:
        return cfg
    tiles = resident_tiles(dp, device, dtype) if resident else None
    if tiles is None:
        return replace(cfg, persistent=persistent)
    return replace(cfg, cos=tiles, persistent=persistent, resident=True,
                   dw_resident=_dw_resident(dp, device))


def _dw_resident(dp: int, device: torch.device) -> GemmTiles | None:
    """FusedConfig.dw_resident beside the resident cosine tiles (2-byte dtypes on a GPU),
    where D spans a 128-feature tile. sm_90: 32 columns × 128 features (the product
    transposed, the resident block the wide operand: wgmma m64n32k16 as in the resident
    cosine programs), 8 warps, 2 stages (two g̃ buffers: 208 KB of shared memory with the
    epilogue's at B = 512; 3 stages took 240 KB, past the 227 KB a block may have).
    Interpreted: 16 × 16."""
    if device.type != "cuda":
        return GemmTiles(16, 16, 0, 4, 1)
    return GemmTiles(32, 128, 0, 8, 2) if dp >= 128 else None


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """The dtypes the compiled kernels support (the interpreter runs any). Every width D is
    supported: each kernel loops over D, or tiles it, in steps of its own tile size."""
    if dtype == torch.float64 and device.type == "cuda":
        # Triton's fp64 tl.dot fails to compile for these tiles (triton 3.6 and 3.8, sm_90).
        raise TypeError("the triton backend has no float64 kernels for GPUs (float64 is for "
                        "gradcheck: run it on the CPU, or use backend='native' on the GPU)")


@dataclass(frozen=True)
class Plan:
    """How one call runs: the configuration, the chunks of classes, the ∂x product's split-K
    slices. `plan` is the only place that decides it (the cost model reads it too)."""

    config: FusedConfig
    rows: int          # B
    classes: int       # |S|
    width: int         # D
    chunk: int         # classes per chunk (a multiple of config.granule, or all of S)
    n_chunks: int
    splits: int        # split-K slices of the ∂x product
    k_split: int       # classes per slice (a multiple of config.dx.bk)
    dw_resident: GemmTiles | None = None  # the ∂W product's resident tiles, if it has them

    @property
    def row_blocks(self) -> int:
        return triton.cdiv(self.rows, self.config.cos.block_m)

    @property
    def class_tiles(self) -> int:
        return triton.cdiv(self.classes, self.config.cos.block_n)

    def chunks(self):
        """(first column, columns) of every chunk, in order."""
        for k in range(self.n_chunks):
            col0 = k * self.chunk
            yield col0, min(self.chunk, self.classes - col0)

    @property
    def dx_tiles(self) -> int:
        return (triton.cdiv(self.rows, self.config.dx.block_m)
                * triton.cdiv(self.width, self.config.dx.block_n))


def plan(b: int, n_cls: int, d: int, dtype: torch.dtype, device: torch.device, g_buffers: int,
         config: FusedConfig | None = None, sub_centres: int = 1) -> Plan:
    """Chunks and split-K slices of a call with B = b rows, |S| = n_cls classes (K =
    sub_centres rows each), width d, that keeps `g_buffers` gradient tiles (B × chunk each)
    per chunk (0: one chunk, all of S)."""
    cfg = config or fused_config(d, device, dtype, sub_centres)
    n_cls = max(1, n_cls)
    granule = cfg.granule
    if g_buffers == 0:
        chunk, n_chunks = n_cls, 1
    else:
        if cfg.chunk:  # the interpreter's: S in two chunks at least, where it spans two tiles
            most = min(cfg.chunk, triton.cdiv(triton.cdiv(n_cls, 2), granule) * granule)
        else:
            per_class = b * dtype.itemsize * g_buffers
            most = max(granule, cfg.chunk_bytes // per_class // granule * granule)
        n_chunks = triton.cdiv(n_cls, most)
        chunk = min(most, triton.cdiv(triton.cdiv(n_cls, n_chunks), granule) * granule)
        n_chunks = triton.cdiv(n_cls, chunk)
    bk = cfg.dx.bk
    out_tiles = triton.cdiv(b, cfg.dx.block_m) * triton.cdiv(d, cfg.dx.block_n)
    splits = cfg.splits or max(1, cfg.programs // out_tiles)
    k_split = triton.cdiv(triton.cdiv(chunk, splits), bk) * bk
    splits = triton.cdiv(chunk, k_split)
    return Plan(cfg, b, n_cls, d, chunk, n_chunks, splits, k_split,
                resident_dw_tiles(cfg, b, dtype))
