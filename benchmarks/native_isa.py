"""The native backend's CPU row kernels per instruction set, against the GEMM floor
(docs/design.md §7: the AVX2 build within 1.2× of the AVX-512 build; the step within 1.1× of
its useful GEMMs at torch.mm's rate).

    python -m benchmarks.native_isa                       # pairs, 2 threads, avx512 + avx2
    python -m benchmarks.native_isa --threads 1 --isas avx512,avx2,base --form lse

Task: the UniTSFace objective fwd+bwd, fp32, B=256, D=512, C=50k (CosFace s=64, m3=0.4 over
all classes + USS on a memory bank with a scalar threshold), gradients for x, W and b. In one
process, interleaved so that every variant sees the same machine load:

* one step per ISA (UNITSFACE_NATIVE_ISA is read at every call of the ops);
* the floor: the 5 useful GEMMs as full-size torch.mm (x·Wᵀ twice, g·W twice, gᵀ·x);
* with --threads 1, the 6 GEMMs that the native step runs (forward: x·W_cᵀ, x·bank_cᵀ and
  the two ∂x accumulations; backward: x·W_cᵀ again and ∂W_c), on the same 1024-class chunks:
  the native step over these is its epilogue and bookkeeping overhead.

Ratios use the minimum over the repeats (the least disturbed run: the host may be shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from .cpu_headline import add_arguments, five_gemms


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--form", choices=("pairs", "lse"), default="pairs")
    p.add_argument("--isas", default="avx512,avx2")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import unitsface_kernels as uk

    b, d, c = args.batch, args.dim, args.classes
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, d, generator=g)
    w0 = torch.randn(c, d, generator=g)
    bank = torch.nn.functional.normalize(torch.randn(c, d, generator=g))
    labels = torch.randint(0, c, (b,), generator=g)
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    bias = torch.tensor([10.0], requires_grad=True)
    gmat = torch.randn(b, c)

    def step():
        x.grad = w.grad = bias.grad = None
        uk.fused_unitsface_loss(x, labels, w, bank, bias, uss_form=args.form,
                                backend="native").backward()

    chunk = 1024
    dw = torch.empty(c, d)
    buf = torch.empty(b, chunk)

    def chunked_gemms():
        acc_w, acc_b = torch.zeros(b, d), torch.zeros(b, d)
        for j0 in range(0, c, chunk):
            n = min(chunk, c - j0)
            wc, bc, o = w0[j0:j0 + n], bank[j0:j0 + n], buf[:, :n]
            torch.mm(x0, wc.t(), out=o)
            torch.mm(x0, bc.t(), out=o)
            acc_w.addmm_(o, wc)
            acc_b.addmm_(o, bc)
        for j0 in range(0, c, chunk):
            n = min(chunk, c - j0)
            wc, o = w0[j0:j0 + n], buf[:, :n]
            torch.mm(x0, wc.t(), out=o)
            torch.mm(o.t(), x0, out=dw[j0:j0 + n])

    isas = args.isas.split(",")
    runs = {isa: (lambda isa=isa: (os.environ.__setitem__("UNITSFACE_NATIVE_ISA", isa),
                                   step())) for isa in isas}
    runs["floor"] = five_gemms(x0, w0, gmat)
    if args.threads == 1:
        runs["chunk GEMMs"] = chunked_gemms
    times = {k: [] for k in runs}
    for rep in range(args.warmup + args.repeats):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            if rep >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    os.environ.pop("UNITSFACE_NATIVE_ISA", None)

    best = {k: min(v) for k, v in times.items()}
    print(f"UniTSFace objective fwd+bwd ({args.form}), fp32, B={b} D={d} C={c}, "
          f"{args.threads} threads, 1-min load average {os.getloadavg()[0]:.2f}; min / median "
          f"of {args.repeats}")
    for k, v in times.items():
        print(f"  {k:12s} {best[k] * 1e3:8.1f} ms / {statistics.median(v) * 1e3:8.1f} ms")
    if "avx2" in best and "avx512" in best:
        print(f"  avx2 / avx512:           {best['avx2'] / best['avx512']:.3f}   target ≤ 1.2")
    for isa in isas:
        print(f"  {isa} / 5-GEMM floor:  {best[isa] / best['floor']:.3f}   target ≤ 1.1")
    if "chunk GEMMs" in best:
        print(f"  chunk GEMMs / floor:     {best['chunk GEMMs'] / best['floor']:.3f}   "
              f"({isas[0]} / its chunk GEMMs: {best[isas[0]] / best['chunk GEMMs']:.3f})")
    return times


if __name__ == "__main__":
    main()
