"""Tile-size sweep of the Triton UniTSFace objective on a GPU (a tuning aid, not a headline).

    python -m benchmarks.tile_sweep [--batch 512 --dim 512 --classes 100000]

The fused kernels have two tunings, "block_m,block_n,dc,num_warps,num_stages[,bk]" each:
UNITSFACE_TRITON_FWD_TILES (forward; dc unused) and UNITSFACE_TRITON_BWD_TILES (the one-pass
backward). The sweep times the forward of fused_unitsface_loss in bf16 for every forward
candidate, then forward+backward for every backward candidate with the fastest forward, and
prints them next to the time of one torch.mm of the cosine GEMM's shape: the objective needs
5 such GEMMs of useful work (docs/design.md §7); the kernels do 7 when dc covers D (the backward
recomputes both cosine tiles), 7 + 2·(chunks − 1) otherwise.
"""

from __future__ import annotations

import argparse
import os

import torch

# the defaults first (fused_config), then the trade-offs of benchmarks/results/NOTES.md:
# wider class tiles halve the backward's atomic adds but spill more or recompute the cosines
FWD_CANDIDATES = ["64,64,512,8,3", "64,32,512,4,2", "128,64,512,8,3"]
BWD_CANDIDATES = ["64,64,512,8,2", "64,32,512,8,2", "64,64,256,8,2"]


def _time(fn, warmup=3, reps=10) -> float:
    """Median milliseconds of fn() with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    from unitsface_kernels import fused_unitsface_loss

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--fwd-tiles", nargs="*", default=FWD_CANDIDATES)
    ap.add_argument("--bwd-tiles", nargs="*", default=BWD_CANDIDATES)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    b, d, c = args.batch, args.dim, args.classes
    x = torch.randn(b, d, device=dev, dtype=dt, generator=g).requires_grad_()
    w = torch.randn(c, d, device=dev, dtype=dt, generator=g).requires_grad_()
    bank = torch.randn(c, d, device=dev, dtype=dt, generator=g)
    bias = torch.tensor([20.0], device=dev, requires_grad=True)
    labels = torch.randint(0, c, (b,), device=dev, generator=g)

    mm_ms = _time(lambda: torch.mm(x.detach(), w.detach().T))
    useful = 5 * 2 * b * c * d
    print(f"torch.mm {b}x{d} @ {d}x{c} bf16: {mm_ms:.3f} ms "
          f"({2 * b * c * d / mm_ms / 1e9:.0f} TFLOP/s); useful work = 5 such GEMMs")

    def fwd():
        return fused_unitsface_loss(x, labels, w, bank, bias, backend="triton")

    def step():
        fwd().backward()

    print(f"{'forward tiles':>18} {'fwd ms':>8}")
    best = (float("inf"), None)
    for tiles in args.fwd_tiles:
        f_ms = _timed("UNITSFACE_TRITON_FWD_TILES", tiles, fwd)
        if f_ms is not None:
            print(f"{tiles:>18} {f_ms:8.3f}", flush=True)
            best = min(best, (f_ms, tiles))
    if best[1] is not None:
        os.environ["UNITSFACE_TRITON_FWD_TILES"] = best[1]
    print(f"{'backward tiles':>18} {'fwd+bwd ms':>11} {'useful TFLOP/s':>15} {'% of mm':>8}"
          f"   (forward {best[1]})")
    for tiles in args.bwd_tiles:
        s_ms = _timed("UNITSFACE_TRITON_BWD_TILES", tiles, step)
        if s_ms is not None:
            print(f"{tiles:>18} {s_ms:11.3f} {useful / s_ms / 1e9:15.0f} "
                  f"{100 * 5 * mm_ms / s_ms:7.1f}%", flush=True)
    for name in ("UNITSFACE_TRITON_FWD_TILES", "UNITSFACE_TRITON_BWD_TILES"):
        os.environ.pop(name, None)


def _timed(knob: str, tiles: str, fn):
    """Median ms of fn() under one tuning; None (and a line saying why) if it fails."""
    os.environ[knob] = tiles
    try:
        return _time(fn)
    except Exception as e:  # a config that does not fit is a finding, not a crash
        print(f"{tiles:>18} failed: {type(e).__name__}: {str(e)[:120]}")
        return None
    finally:
        os.environ.pop(knob, None)


if __name__ == "__main__":
    main()
