"""What the one-pass objective saves over calling its two losses separately.

    python -m benchmarks.fusion                       # counts + timing on this machine's device
    python -m benchmarks.fusion --batch 256 --classes 50000 --dtype float32 --repeats 5

Task: L = CosFace softmax over all C centres W (with gradient) + 1 × USS "pairs" on the bank
(a buffer) with a learnable scalar b; fwd+bwd, reduction "mean". "Together" is
``fused_unitsface_loss``; "separately" is ``fused_margin_softmax_loss(x, W, y) +
fused_uss_loss(x, y, b, bank, arange(C))`` on the same backend.

1. Bytes moved by the Triton kernels (a count, valid without a GPU). Each program's loads
   and atomic adds are counted in bytes, from the tile sizes the kernels launch with on a GPU
   (unitsface_kernels.triton.common.fused_config). To isolate the fusion, "separately" is the
   same kernels run twice, once with W alone and once with the bank alone: what the fusion
   saves is what the two parts share — the x chunks (each K-loop chunk of x feeds both
   dots), labels, norms and statistics, one set of atomic adds of G (the two parts' ∂x
   contributions are summed in registers first), the launches and the host-side finishing.
   W and bank tiles are read by both alike and are not a saving.
2. Time, measured: fwd+bwd steps of each, interleaved, on this machine's device and backends
   (native on the CPU; triton and native on a GPU): medians, and the fastest steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def kernel_bytes(b: int, c: int, d: int, esize: int, *, use_w: bool, use_bank: bool,
                 device: torch.device) -> dict:
    """Bytes loaded / atomically added by the fused kernels for one fwd+bwd, by tensor."""
    from unitsface_kernels.triton.common import fused_config

    dtype = {2: torch.bfloat16, 4: torch.float32}[esize]
    fwd = fused_config(d, device, dtype, backward=False)
    bwd = fused_config(d, device, dtype, backward=True)
    refs = int(use_w) + int(use_bank)
    cdiv = lambda a, k: -(-a // k)  # noqa: E731
    out = {}
    # forward: program (row block, slice) walks its class tiles; per tile the K loop reads
    # the x chunks once (shared by the W and bank dots) and the reference tiles
    out["x (fwd)"] = cdiv(c, fwd.block_n) * b * d * esize
    out["W, bank (fwd)"] = refs * cdiv(b, fwd.block_m) * c * d * esize
    out["norms (fwd)"] = refs * cdiv(b, fwd.block_m) * c * 4
    # backward: program (class tile, feature chunk) walks all row blocks
    chunks = bwd.dp // bwd.dc
    tiles, blocks = cdiv(c, bwd.block_n), cdiv(b, bwd.block_m)
    out["x (bwd)"] = chunks * tiles * b * d * esize + (tiles * b * d * esize if use_w else 0)
    out["W, bank (bwd)"] = refs * (chunks + 1) * blocks * c * d * esize
    # per row: label (8 bytes), ||x||, upstream gradient, lse (+ the four USS statistics)
    out["labels, norms, stats (bwd)"] = chunks * tiles * b * (20 + 16 * use_bank)
    out["atomic adds to G, h (bwd)"] = 2 * tiles * b * (d + 1) * 4  # read-modify-write
    out["dW store"] = c * d * esize if use_w else 0
    return out


def _count(args) -> None:
    dev = torch.device("cuda")  # the GPU tiling, whatever this machine has
    esize = 2 if args.dtype == "bfloat16" else 4
    together = kernel_bytes(args.batch, args.classes, args.dim, esize, use_w=True,
                            use_bank=True, device=dev)
    soft = kernel_bytes(args.batch, args.classes, args.dim, esize, use_w=True, use_bank=False,
                        device=dev)
    uss = kernel_bytes(args.batch, args.classes, args.dim, esize, use_w=False, use_bank=True,
                       device=dev)
    print(f"Bytes moved by the Triton kernels (GPU tiling), B={args.batch} D={args.dim} "
          f"C={args.classes} {args.dtype}, in MB:")
    print(f"{'':32} {'together':>10} {'separately':>11} {'saved':>8}")
    for key in together:
        sep = soft[key] + uss[key]
        print(f"{key:32} {together[key] / 1e6:10.0f} {sep / 1e6:11.0f} "
              f"{(sep - together[key]) / 1e6:8.0f}")
    t, s = sum(together.values()), sum(soft.values()) + sum(uss.values())
    print(f"{'total':32} {t / 1e6:10.0f} {s / 1e6:11.0f} {(s - t) / 1e6:8.0f}  "
          f"({100 * (s - t) / s:.0f} % less; launches: 2 against 4)")


def _times(fns, device, warmup: int, repeats: int) -> list:
    """Seconds of every repeat of each callable, the callables interleaved (so that both see
    the same machine load: the host may be shared)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
    return times


def _measure(args) -> None:
    from unitsface_kernels import fused_margin_softmax_loss, fused_unitsface_loss, fused_uss_loss
    from unitsface_kernels.native import has_family

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if dev.type == "cuda" else torch.float32
    backends = (["triton"] if dev.type == "cuda" else []) + \
        (["native"] if has_family("unitsface") else [])
    g = torch.Generator(device=dev).manual_seed(0)
    b, d, c = args.batch, args.dim, args.classes
    x = torch.randn(b, d, device=dev, dtype=dtype, generator=g).requires_grad_()
    w = torch.randn(c, d, device=dev, dtype=dtype, generator=g).requires_grad_()
    bank = torch.nn.functional.normalize(torch.randn(c, d, device=dev, generator=g)).to(dtype)
    bias = torch.tensor([10.0], device=dev, requires_grad=True)
    labels = torch.randint(0, c, (b,), device=dev, generator=g)
    classes = torch.arange(c, device=dev)
    print(f"Measured on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'} "
          f"({torch.get_num_threads()} threads), {dtype}, {args.repeats} fwd+bwd steps each:")
    for backend in backends:
        def together():
            fused_unitsface_loss(x, labels, w, bank, bias, backend=backend).backward()

        def separately():
            (fused_margin_softmax_loss(x, w, labels, backend=backend)
             + fused_uss_loss(x, labels, bias, bank, classes, backend=backend)).backward()

        t, s = _times([together, separately], dev, args.warmup, args.repeats)
        med = 1e3 * statistics.median(t), 1e3 * statistics.median(s)
        best = 1e3 * min(t), 1e3 * min(s)
        print(f"  {backend:>7}: together {med[0]:9.2f} ms, separately {med[1]:9.2f} ms "
              f"({med[1] / med[0]:.2f}×; fastest steps {best[0]:.2f} against {best[1]:.2f} "
              f"ms, {best[1] / best[0]:.2f}×)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    _count(args)
    _measure(args)


if __name__ == "__main__":
    main()
