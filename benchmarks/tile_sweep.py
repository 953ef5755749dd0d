"""Tile-size sweep of the Triton UniTSFace objective on a GPU (a tuning aid, not a headline).

    python -m benchmarks.tile_sweep [--batch 512 --dim 512 --classes 100000]

The fused kernels (unitsface_kernels/triton/fused.py) have one tuning per GEMM-shaped kernel,
"block_m,block_n,bk,num_warps,num_stages" each (config.FUSED_KNOBS): UNITSFACE_TRITON_COS_TILES
(the cosine tiles of the forward and of the backward's recomputation),
UNITSFACE_TRITON_DW_TILES (∂W = g̃ᵀ·x̂') and UNITSFACE_TRITON_DX_TILES (the split-K ∂x
product), UNITSFACE_TRITON_CHUNK_MB (the gradient tiles' L2 budget per class chunk) and
UNITSFACE_TRITON_PERSISTENT=1 (the cosine tiles from persistent programs, one per SM; =resident
from persistent programs that keep their x row block in shared memory). The
sweep times forward + backward in bf16 for each candidate of one knob, the others at their
defaults, and prints them next to the time of one torch.mm of the cosine GEMM's shape: the
objective needs 5 such GEMMs of useful work and the kernels do 6 (docs/design.md §2).
"""

from __future__ import annotations

import argparse
import os

import torch

from .measure import median_ms

# the defaults first (config.fused_config: the first line times them), then the persistent
# cosine launches of both kinds, then one step away from the defaults per knob
CANDIDATES = [
    ("UNITSFACE_TRITON_COS_TILES", "128,128,64,8,3"),
    ("UNITSFACE_TRITON_PERSISTENT", "1"),
    ("UNITSFACE_TRITON_PERSISTENT", "resident"),
    ("UNITSFACE_TRITON_COS_TILES", "128,256,64,8,3"),
    ("UNITSFACE_TRITON_COS_TILES", "128,128,64,8,4"),
    ("UNITSFACE_TRITON_DW_TILES", "128,128,64,8,3"),
    ("UNITSFACE_TRITON_DX_TILES", "128,256,64,8,3"),
    ("UNITSFACE_TRITON_CHUNK_MB", "16"),
]


def main() -> None:
    from unitsface_kernels import fused_unitsface_loss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100_000)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    b, d, c = args.batch, args.dim, args.classes
    x = torch.randn(b, d, device=dev, dtype=dt, generator=g).requires_grad_()
    w = torch.randn(c, d, device=dev, dtype=dt, generator=g).requires_grad_()
    bank = torch.randn(c, d, device=dev, dtype=dt, generator=g)
    bias = torch.tensor([20.0], device=dev, requires_grad=True)
    labels = torch.randint(0, c, (b,), device=dev, generator=g)

    mm_ms = median_ms(lambda: torch.mm(x.detach(), w.detach().T))
    useful = 5 * 2 * b * c * d
    print(f"torch.mm {b}x{d} @ {d}x{c} bf16: {mm_ms:.3f} ms "
          f"({2 * b * c * d / mm_ms / 1e9:.0f} TFLOP/s); useful work = 5 such GEMMs")

    def fwd():
        return fused_unitsface_loss(x, labels, w, bank, bias, backend="triton")

    def step():
        fwd().backward()

    print(f"{'knob':>27} {'value':>16} {'fwd+bwd ms':>11} {'useful TFLOP/s':>15} "
          f"{'% of mm':>8}")
    for knob, value in CANDIDATES:
        ms = _timed(knob, value, step)
        if ms is not None:
            print(f"{knob:>27} {value:>16} {ms:11.3f} {useful / ms / 1e9:15.0f} "
                  f"{100 * 5 * mm_ms / ms:7.1f}%", flush=True)


def _timed(knob: str, tiles: str, fn):
    """Median ms of fn() under one tuning; None (and a line saying why) if it fails."""
    os.environ[knob] = tiles
    try:
        return median_ms(fn)
    except Exception as e:  # a config that does not fit is a finding, not a crash
        print(f"{knob:>27} {tiles:>16} failed: {type(e).__name__}: {str(e)[:120]}")
        return None
    finally:
        os.environ.pop(knob, None)


if __name__ == "__main__":
    main()
