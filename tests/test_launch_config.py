"""Tile configurations of the Triton kernels and their plan (chunks of columns, split-K
slices; unitsface_kernels.triton.config): the shapes the kernels rely on (powers of two, whole
tiles per chunk) and the environment tuning knobs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

triton = pytest.importorskip("triton")

from unitsface_kernels.triton.config import (FUSED_KNOBS, PERSISTENT_KNOB,  # noqa: E402
                                             RESIDENT_BYTES, GemmTiles, fused_config, plan)

DEVICES = [torch.device("cuda"), torch.device("cpu")]  # configs only: no GPU is touched
KNOBS = ["UNITSFACE_TRITON_CHUNK_MB", PERSISTENT_KNOB, *FUSED_KNOBS.values()]


@pytest.fixture(autouse=True)
def no_knobs(monkeypatch):
    for knob in KNOBS:
        monkeypatch.delenv(knob, raising=False)


def _power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [1, 40, 70, 128, 130, 512, 1000, 2048])
def test_defaults_fit_the_kernels(device, dtype, d):
    fused = fused_config(d, device, dtype)
    for tiles in (fused.cos, fused.dw, fused.dx):
        assert all(_power_of_two(v) for v in (tiles.block_m, tiles.block_n, tiles.bk,
                                              tiles.num_warps))
        assert tiles.num_stages >= 1


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("b,s,d", [(1, 1, 8), (37, 301, 70), (512, 100_000, 512),
                                   (4096, 1_000_000, 512), (512, 257, 2048)])
@pytest.mark.parametrize("buffers", [0, 1, 2])
def test_plan_covers_the_classes(device, b, s, d, buffers):
    """Chunks are whole tiles of every kernel and cover S; the gradient tiles of a chunk stay
    within chunk_bytes (unless one granule is more); the split-K slices cover a chunk."""
    p = plan(b, s, d, torch.bfloat16, device, buffers)
    cfg = p.config
    chunks = list(p.chunks())
    assert chunks[0][0] == 0 and sum(n for _, n in chunks) == s
    assert all(c0 == k * p.chunk for k, (c0, _) in enumerate(chunks))
    if buffers == 0:
        assert p.n_chunks == 1
    else:
        assert p.chunk % cfg.granule == 0
        if device.type == "cuda" and p.chunk > cfg.granule:
            assert b * p.chunk * 2 * buffers <= cfg.chunk_bytes
        assert p.k_split % cfg.dx.bk == 0
        assert (p.splits - 1) * p.k_split < p.chunk <= p.splits * p.k_split
    if device.type == "cpu" and s == 301 and buffers:  # the tests' shapes: several chunks
        assert p.n_chunks == 3 and p.splits == 2


def test_interpreter_plan_crosses_a_chunk():
    """Under the interpreter, a backward over more than one granule (32 columns) runs in two
    chunks at least: the tests' small shapes (53 references, an in-batch B = 64) cross a chunk
    boundary, and no gradient tile holds all of B × N; 128 columns per chunk at most."""
    cpu = torch.device("cpu")
    for n, chunks, chunk in ((32, 1, 32), (33, 2, 32), (53, 2, 32), (64, 2, 32),
                             (200, 2, 128), (301, 3, 128)):
        p = plan(37, n, 16, torch.float32, cpu, 1)
        assert (p.n_chunks, p.chunk) == (chunks, chunk), n
    assert plan(37, 301, 16, torch.float32, cpu, 0).n_chunks == 1  # no gradient tiles


def test_headline_plan():
    """B = 512, D = 512, C = 100k in bf16 on an H200 (132 SMs): 4 chunks of 25088 classes
    (25 MB of bf16 gradient tiles each), 16 split-K slices (8 output tiles of 128 × 256: one
    wave)."""
    cuda = torch.device("cuda")
    cfg = dataclasses.replace(fused_config(512, cuda, torch.bfloat16), programs=132)
    p = plan(512, 100_000, 512, torch.bfloat16, cuda, 1, config=cfg)
    assert (p.n_chunks, p.chunk, p.splits, p.dx_tiles) == (4, 25088, 16, 8)


@pytest.mark.parametrize("b,programs", [(512, 132), (100, 132), (4096, 128), (20_000, 157)])
def test_headline_resident_launch(monkeypatch, b, programs):
    """The x-resident launch on 132 SMs: L programs per row block of 128 (132 at B = 512, 33
    per block; 128 at B = 4096, 4 per block; past 132 row blocks one per block, in waves),
    every one with column tiles to take."""
    from unitsface_kernels.triton.fused import resident_programs

    cuda = torch.device("cuda")
    monkeypatch.setenv(PERSISTENT_KNOB, "resident")
    cfg = dataclasses.replace(fused_config(512, cuda, torch.bfloat16), programs=132,
                              persistent=132)
    p = plan(b, 100_000, 512, torch.bfloat16, cuda, 1, config=cfg)
    assert p.config.resident and p.row_blocks == -(-b // 128)
    assert resident_programs(p, p.chunk) == programs
    assert resident_programs(p, p.chunk) % p.row_blocks == 0
    # 40 columns are 2 tiles of 32: at most 2 programs per row block
    assert resident_programs(p, 40) == p.row_blocks * min(2, programs // p.row_blocks)


@pytest.mark.parametrize("b,d,dtype,bk", [
    (512, 512, torch.bfloat16, 512), (300, 512, torch.float16, 512), (1, 512, torch.bfloat16, 16),
    (513, 512, torch.bfloat16, None), (4096, 512, torch.bfloat16, None),
    (512, 64, torch.bfloat16, None), (512, 130, torch.bfloat16, 512)])
def test_resident_dw_tiles(monkeypatch, b, d, dtype, bk):
    """The x̂'-resident ∂W programs come with the resident cosine programs on a GPU: 32
    columns × 128 features with all B rows (rounded up to a power of two) in one K step,
    where that block fits in RESIDENT_BYTES (B ≤ 512 in 2-byte dtypes) and D spans a
    128-feature tile; the launch is L programs per feature tile, each with columns to take."""
    from unitsface_kernels.triton.fused import resident_dw_programs

    cuda = torch.device("cuda")
    assert plan(b, 100_000, d, dtype, cuda, 1).dw_resident is None  # (the knob unset)
    monkeypatch.setenv(PERSISTENT_KNOB, "resident")
    cfg = dataclasses.replace(fused_config(d, cuda, dtype), programs=132, persistent=132)
    p = plan(b, 100_000, d, dtype, cuda, 1, config=cfg)
    if bk is None:
        assert p.dw_resident is None
        return
    assert p.dw_resident == GemmTiles(32, 128, bk, 8, 2)
    assert bk * 128 * dtype.itemsize <= RESIDENT_BYTES
    n_feat = -(-d // 128)
    assert resident_dw_programs(p, p.chunk) == n_feat * (132 // n_feat)
    assert resident_dw_programs(p, 40) == n_feat * 2  # 40 columns: 2 tiles of 32
    assert plan(b, 100_000, d, torch.float32, cuda, 1).dw_resident is None
    assert plan(b, 100_000, d, dtype, cuda, 1, sub_centres=2).dw_resident is None


def test_override_parses(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setenv("UNITSFACE_TRITON_COS_TILES", "128,256,64,8,4")
    monkeypatch.setenv("UNITSFACE_TRITON_DX_TILES", "64,128,32,4,2")
    monkeypatch.setenv("UNITSFACE_TRITON_CHUNK_MB", "8")
    cfg = fused_config(512, cuda, torch.bfloat16)
    assert cfg.cos == GemmTiles(128, 256, 64, 8, 4) and cfg.dx == GemmTiles(64, 128, 32, 4, 2)
    assert cfg.chunk_bytes == 8 << 20
    # the knobs are for GPUs: the interpreter keeps its own tiles
    assert fused_config(512, torch.device("cpu"), torch.bfloat16).cos.block_n == 32


@pytest.mark.parametrize("value,match", [
    ("64,64", "expected 'block_m,block_n,bk,num_warps,num_stages"),
    ("64,64,64,8,2,1", "expected"),
    ("64,a,64,8,2", "five integers"),
    ("64,48,64,8,2", "block_n=48 is not a power of two"),
    ("64,64,96,8,2", "bk=96 is not a power of two"),
    ("64,64,64,8,0", "num_stages=0"),
])
def test_bad_override_names_the_knob(monkeypatch, value, match):
    monkeypatch.setenv("UNITSFACE_TRITON_DW_TILES", value)
    with pytest.raises(ValueError, match="UNITSFACE_TRITON_DW_TILES") as err:
        fused_config(512, torch.device("cuda"), torch.bfloat16)
    assert match in str(err.value)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_persistent_knob(monkeypatch, device):
    """Off by default; on, one program per SM (the interpreter's 2: fewer than the tests'
    tiles, so that a program runs several), the cosine kernel's tiles kept; with K > 1
    sub-centres a program per tile; anything else names the knob."""
    default = fused_config(512, device, torch.bfloat16)
    assert default.persistent == 0 and not default.resident
    monkeypatch.setenv(PERSISTENT_KNOB, "1")
    cfg = fused_config(512, device, torch.bfloat16)
    assert cfg.persistent == (cfg.programs if device.type == "cuda" else 2) > 0
    assert cfg.cos == default.cos and not cfg.resident
    assert fused_config(512, device, torch.bfloat16, sub_centres=3) == default
    # the knob's value given to fused_config rules over the environment's
    assert fused_config(512, device, torch.bfloat16, persistent="0") == default
    monkeypatch.setenv(PERSISTENT_KNOB, "yes")
    with pytest.raises(ValueError, match=f"{PERSISTENT_KNOB}='yes': expected 0, 1 or resident"):
        fused_config(512, device, torch.bfloat16)


@pytest.mark.parametrize("d,dtype,fits", [
    (512, torch.bfloat16, True), (512, torch.float16, True), (130, torch.bfloat16, True),
    (513, torch.bfloat16, False), (1024, torch.float16, False), (512, torch.float32, False)])
def test_resident_knob(monkeypatch, d, dtype, fits):
    """=resident on a GPU: the x-resident tiles (128 rows × 32 columns, one K step over D
    rounded up to a power of two) where the row block fits in RESIDENT_BYTES and the dtype
    takes 2 bytes, else the persistent launches of =1 with the cosine kernel's tiles; with
    K > 1 sub-centres a program per tile. Under the interpreter always (32 × 16 tiles)."""
    cuda = torch.device("cuda")
    default = fused_config(d, cuda, dtype)
    monkeypatch.setenv(PERSISTENT_KNOB, "resident")
    cfg = fused_config(d, cuda, dtype)
    assert cfg.persistent == cfg.programs > 0
    dp = triton.next_power_of_2(d)
    if fits:
        assert cfg.resident and cfg.cos == GemmTiles(128, 32, dp, 8, 3)
        assert 128 * dp * dtype.itemsize <= RESIDENT_BYTES
    else:
        assert not cfg.resident and cfg.cos == default.cos
    assert cfg.dw == default.dw and cfg.dx == default.dx
    monkeypatch.delenv(PERSISTENT_KNOB)
    assert fused_config(d, cuda, dtype, persistent="resident") == cfg
    monkeypatch.setenv(PERSISTENT_KNOB, "resident")
    assert fused_config(d, cuda, dtype, sub_centres=2) == default
    interp = fused_config(d, torch.device("cpu"), dtype)
    assert interp.resident and interp.cos == GemmTiles(32, 16, max(16, dp), 4, 1)
