"""The native backend on the CPU against docs/design.md §7's CPU targets.

    python -m benchmarks.native_cpu                 # B=256, D=512, C=50k, fp32, 2 threads
    python -m benchmarks.native_cpu --classes 20000 --threads 1 --json out.json

Task: the UniTSFace objective, fwd+bwd: CosFace softmax (s = 64, m3 = 0.4) over all C class
centres W (with gradient) + 1 × USS "pairs" (m = 0.1) on a memory bank (C × D, a buffer)
with a learnable scalar threshold b; gradients for x, W and b; reduction "mean".

Each implementation runs in its own subprocess (so that one's allocations do not hide the
other's peak), with torch.set_num_threads(--threads):

* time: --repeats steps after --warmup steps; a step is
  ``grads ← None; loss = fused_unitsface_loss(..., backend=impl); loss.backward()``.
  The useful-GEMM baseline (below) is timed in the same process, interleaved with the
  steps, so that both see the same machine load. The ratios use the minimum over the
  repeats of each (the least disturbed run: the host may be shared); medians are printed too.
* peak extra memory: the resident-set high-water mark over one more step, on top of the
  inputs: freed heap is handed back to the OS (malloc_trim), the mark is reset
  (/proc/self/clear_refs ← 5) and VmHWM − VmRSS(before) is read. It includes the gradients
  the step writes (∂W is C × D: 98 MiB here), which every implementation must produce;
  "work" memory is the peak minus those gradients.

Useful GEMM time: docs/design.md §7 counts 2·B·C·D FLOPs per GEMM the maths needs — cos against W,
cos against the bank, ∂x via W, ∂x via the bank, ∂W — 5 GEMMs, timed with torch.mm on the
full-size products (x·Wᵀ twice, g·W twice, gᵀ·x). The same FLOPs at the best rate torch.mm
reaches on this machine (x times 1024-class chunks, the shape the native backend runs) are
the stricter yardstick, reported too.

Targets (docs/design.md §7): native ≥ 1.5× faster than the eager reference, within 1.3× of the
useful-GEMM time, peak extra memory ≤ 1/10 of the reference's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from .cpu_headline import add_arguments, five_gemms
from .procmem import malloc_trim, must_reset_hwm, status_kb

TAG = "@@NATIVE_CPU@@ "


def _inputs(args, torch):
    g = torch.Generator().manual_seed(0)
    b, d, c = args.batch, args.dim, args.classes
    x = torch.randn(b, d, generator=g)
    centres = torch.randn(c, d, generator=g)
    bank = torch.nn.functional.normalize(torch.randn(c, d, generator=g))
    labels = torch.randint(0, c, (b,), generator=g)
    bias = torch.tensor([10.0])
    return x, centres, bank, labels, bias


def _gemm_baseline(args, torch, x, centres):
    """Callables running the useful GEMMs with torch.mm: the 5 full-size products
    (benchmarks.cpu_headline), and the same FLOPs as x times 1024-class chunks (scaled by the
    returned factor)."""
    ch = min(1024, args.classes)
    w_ch = centres[:ch].contiguous()
    reps = max(1, round(5 * args.classes / ch))

    def chunked():
        for _ in range(reps):
            torch.mm(x, w_ch.t())

    full = five_gemms(x, centres, torch.randn(args.batch, args.classes))
    return full, chunked, 5 * args.classes / (reps * ch)


def worker(args):
    """One implementation: time (interleaved with the GEMM baseline) and peak memory,
    printed as one tagged JSON line."""
    import gc

    import torch

    torch.set_num_threads(args.threads)
    import unitsface_kernels as uk

    x0, centres0, bank, labels, bias0 = _inputs(args, torch)
    x = x0.clone().requires_grad_()
    centres = centres0.clone().requires_grad_()
    bias = bias0.clone().requires_grad_()
    impl = args.worker

    def step():
        x.grad = centres.grad = bias.grad = None
        loss = uk.fused_unitsface_loss(x, labels, centres, bank, bias, backend=impl)
        loss.backward()
        return loss

    full, chunked, chunk_scale = _gemm_baseline(args, torch, x0, centres0)
    for _ in range(args.warmup):
        step()
        full()
        chunked()
    times, t_full, t_chunk = [], [], []
    for _ in range(args.repeats):
        for f, out in ((step, times), (full, t_full), (chunked, t_chunk)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    # peak memory over one step, on top of the inputs (gradients freed first)
    x.grad = centres.grad = bias.grad = None
    gc.collect()
    malloc_trim()
    must_reset_hwm()
    (rss0,) = status_kb("VmRSS")
    loss = step()
    (hwm,) = status_kb("VmHWM")
    grad_mb = sum(t.grad.numel() * t.grad.element_size() for t in (x, centres, bias)) / 2**20
    print(TAG + json.dumps(dict(
        impl=impl, times=times, median=statistics.median(times), min=min(times),
        gemm_full=dict(median=statistics.median(t_full), min=min(t_full)),
        gemm_best=dict(median=statistics.median(t_chunk) * chunk_scale,
                       min=min(t_chunk) * chunk_scale),
        peak_extra_mb=(hwm - rss0) / 1024, grad_mb=grad_mb,
        work_mb=(hwm - rss0) / 1024 - grad_mb, loss=float(loss))))


def run_worker(impl, args):
    cmd = [sys.executable, "-m", "benchmarks.native_cpu", "--worker", impl,
           "--batch", str(args.batch), "--dim", str(args.dim), "--classes", str(args.classes),
           "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    for line in out.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise RuntimeError(f"{impl} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    load = os.getloadavg()[0]
    res = dict(shape=dict(B=args.batch, D=args.dim, C=args.classes, dtype="float32"),
               threads=args.threads, loadavg_1min=load,
               device=platform.processor() or platform.machine(),
               date=datetime.date.today().isoformat())
    res["native"] = run_worker("native", args)
    res["reference"] = run_worker("reference", args)
    nat, ref = res["native"], res["reference"]
    flops = 5 * 2.0 * args.batch * args.classes * args.dim
    res["speedup_vs_reference"] = ref["min"] / nat["min"]
    res["speedup_vs_reference_median"] = ref["median"] / nat["median"]
    res["vs_useful_gemm"] = nat["min"] / nat["gemm_full"]["min"]
    res["vs_useful_gemm_best_rate"] = nat["min"] / nat["gemm_best"]["min"]
    res["memory_ratio_peak"] = nat["peak_extra_mb"] / ref["peak_extra_mb"]
    res["memory_ratio_work"] = nat["work_mb"] / ref["work_mb"]
    res["loss_rel_diff"] = abs(nat["loss"] - ref["loss"]) / abs(ref["loss"])

    def ms(t):
        return f"{t * 1e3:7.1f} ms"

    print(f"UniTSFace objective fwd+bwd, fp32, B={args.batch} D={args.dim} C={args.classes}, "
          f"{args.threads} threads (1-min load average {load:.2f}); min / median of "
          f"{args.repeats}")
    for key, label in (("gemm_full", "useful GEMMs, torch.mm full-size products"),
                       ("gemm_best", "useful GEMMs, torch.mm best (chunk) rate  ")):
        g = nat[key]
        print(f"  {label}: {ms(g['min'])} / {ms(g['median'])}  "
              f"({flops / g['min'] / 1e9:.0f} GFLOP/s)")
    for name in ("native", "reference"):
        r = res[name]
        print(f"  {name:9s}: {ms(r['min'])} / {ms(r['median'])}   peak extra "
              f"{r['peak_extra_mb']:6.1f} MiB (work {r['work_mb']:6.1f} MiB + gradients "
              f"{r['grad_mb']:.1f} MiB)   loss {r['loss']:.6f}")
    print(f"  speedup vs eager reference:   {res['speedup_vs_reference']:.2f}× "
          f"(medians {res['speedup_vs_reference_median']:.2f}×)   target ≥ 1.5×")
    print(f"  native / useful-GEMM time:    {res['vs_useful_gemm']:.2f}× (full-size mm rate), "
          f"{res['vs_useful_gemm_best_rate']:.2f}× (best mm rate)   target ≤ 1.3×")
    print(f"  extra memory native / eager:  {res['memory_ratio_peak']:.3f} (peak), "
          f"{res['memory_ratio_work']:.3f} (work, without the gradients)   target ≤ 0.1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
