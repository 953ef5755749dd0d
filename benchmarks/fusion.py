"""What the one-pass objective saves over calling its two losses separately.

    python -m benchmarks.fusion                       # counts + timing on this machine's device
    python -m benchmarks.fusion --batch 256 --classes 50000 --dtype float32 --repeats 5

Task: L = CosFace softmax over all C centres W (with gradient) + 1 × USS "pairs" on the bank
(a buffer) with a learnable scalar b; fwd+bwd, reduction "mean". "Together" is
``fused_unitsface_loss``; "separately" is ``fused_margin_softmax_loss(x, W, y) +
fused_uss_loss(x, y, b, bank, arange(C))`` on the same backend.

Measured: fwd+bwd steps of each, interleaved, on this machine's device and backends (native
on the CPU; triton and native on a GPU): medians, and the fastest steps. What the fused
kernels load and compute per launch is counted by benchmarks/cost_model.py.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


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
    _measure(args)


if __name__ == "__main__":
    main()
