"""The head's whole training step at scale (docs/design.md §7, "Scale"): forward, backward,
the bank update and the optimizer step of ``UniTSFaceHead``, at C = 1M classes with partial FC
rate 0.1 against C = 100k classes with rate 1.0 — the same sampled work (100k classes per
step) — and what a user got before the head read its weights and bank in place and stepped
only the sampled rows (a bank snapshot and a dense C × D gradient per step, dense SGD).

    python -m benchmarks.head_step                      # the GPU if there is one, else the CPU
    python -m benchmarks.head_step --device cpu         # CPU: B=256, D=512, fp32, 2 threads
    python -m benchmarks.head_step --classes 200000 --steps 3 --json out.json
    python -m benchmarks.head_step --model              # the GPU bookkeeping model only

Each configuration runs in its own subprocess (its memory does not hide another's); a step is
``loss = head(x, labels); opt.zero_grad(); loss.backward(); opt.step()`` with SGD (momentum
0.9, weight decay 5e-4): ``SparseSGD`` on ``sparse_grad=True`` heads, torch.optim.SGD on the
dense one. On a GPU: B = 512, bf16 embeddings (the head's fp32 weight read in place), CUDA
synchronised wall time around the step. Reported: median and minimum step time, peak memory
over the steps (resident on the CPU, allocated on the GPU; the set-up's temporaries not
counted), and the ratio of the 1M-class step to the 100k-class step (target ≤ 1.3).

``--model`` prints what the bookkeeping of a step moves on an H200 at arcface_torch's
29M-identity, 8-GPU setting (3.6M classes per rank, rate 0.1, D = 512), before and after: the
bytes of the bank snapshot, the dense gradient's fill and the dense SGD step over the fp32
shard, against the sampled rows only, at the HBM bandwidth — next to the ~0.7 ms the fused
loss itself is to take.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from .procmem import malloc_trim, must_reset_hwm, status_kb

TAG = "@@HEAD_STEP@@ "


def _worker(cfg: dict) -> None:
    import torch

    from unitsface_kernels.nn import UniTSFaceHead
    from unitsface_kernels.optim import SparseSGD

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    c, b, d = cfg["classes"], cfg["batch"], cfg["dim"]
    dev, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    cuda = dev.type == "cuda"
    head = UniTSFaceHead(d, c, sample_rate=cfg["rate"], sparse_grad=cfg["sparse"],
                         backend=cfg["backend"]).to(dev)
    with torch.no_grad():  # a bank already full, b already initialised (a mid-training step)
        head.bank.copy_(torch.nn.functional.normalize(torch.randn(c, d, device=dev), dim=1))
        head.bank_valid.fill_(True)
        head.bias.fill_(20.0)
    opt_cls = SparseSGD if cfg["sparse"] else torch.optim.SGD
    opt = opt_cls(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator(dev).manual_seed(1)
    # the peak of the steps alone (the set-up's temporaries are not the head's memory)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        malloc_trim()
        must_reset_hwm()
    times = []
    for step in range(cfg["warmup"] + cfg["steps"]):
        x = torch.randn(b, d, generator=g, device=dev, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, c, (b,), generator=g, device=dev)
        if cuda:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        loss = head(x, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(dev)
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - t)
    if cuda:
        peak = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    else:
        peak = status_kb("VmHWM")[0] / 2 ** 20
    print(TAG + json.dumps(dict(cfg, median_s=statistics.median(times), min_s=min(times),
                                peak_gib=peak)), flush=True)


def _run(cfg: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.head_step", "--worker",
                          json.dumps(cfg)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for line in out.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise RuntimeError(f"{cfg['name']} failed:\n{out.stderr[-3000:]}")


def gpu_model(classes_per_rank: int = 3_600_000, rate: float = 0.1, dim: int = 512) -> dict:
    """Bytes the head's bookkeeping moves per step on one rank, before and after (bf16 bank,
    fp32 weight and momentum), and their time at the HBM bandwidth."""
    rows, sampled = classes_per_rank, int(rate * classes_per_rank)
    f32, bf16 = 4 * dim, 2 * dim
    before = {
        "bank snapshot (read + write, bf16)": 2 * rows * bf16,
        "dense ∂W fill (fp32 write)": rows * f32,
        "dense SGD (read w, ∂W, v; write w, v)": 5 * rows * f32,
    }
    after = {
        "bank rows read in place": 0,
        "sampled ∂W rows (fp32 write)": sampled * f32,
        "lazy SGD on sampled rows (read w, ∂W, v; write w, v)": 5 * sampled * f32,
        "catch-up of sampled rows (read + write w, v)": 4 * sampled * f32,
    }
    from .cost_model import H200  # the H200's effective HBM bandwidth, as the loss's model

    ms = lambda n: n / H200.hbm_bps * 1e3  # noqa: E731
    return {"before": {k: (v, ms(v)) for k, v in before.items()},
            "after": {k: (v, ms(v)) for k, v in after.items()},
            "before_ms": ms(sum(before.values())), "after_ms": ms(sum(after.values()))}


def _print_model() -> None:
    from .cost_model import H200

    m = gpu_model()
    print("GPU model (H200, 29M identities over 8 ranks: 3.6M classes per rank, rate 0.1, "
          f"D = 512, HBM {H200.hbm_bps / 1e12:.1f} TB/s): the head's bookkeeping per step")
    for side in ("before", "after"):
        print(f"  {side}:")
        for k, (n, t) in m[side].items():
            print(f"    {k:58s} {n / 2 ** 30:7.2f} GiB  {t:6.2f} ms")
        print(f"    {'total':58s} {'':7s}      {m[side + '_ms']:6.2f} ms")
    print("  (the fused loss of the step itself: ~0.7 ms at the 100k-sampled-class headline)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--batch", type=int, help="default: 512 on a GPU, 256 on the CPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="of the embeddings; default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-dense", action="store_true", help="skip the dense-gradient baseline")
    p.add_argument("--json")
    p.add_argument("--model", action="store_true", help="only the GPU bookkeeping model")
    args = p.parse_args()
    if args.worker:
        _worker(json.loads(args.worker))
        return
    if args.model:
        _print_model()
        return
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    base = dict(batch=args.batch or (512 if gpu else 256), dim=args.dim, threads=args.threads,
                steps=args.steps, warmup=args.warmup, backend=args.backend, device=args.device,
                dtype=args.dtype or ("bfloat16" if gpu else "float32"))
    print(f"device {args.device}, B={base['batch']}, D={args.dim}, {base['dtype']} embeddings"
          + ("" if gpu else f", {args.threads} threads"), flush=True)
    sampled = int(args.rate * args.classes)
    configs = [dict(base, name=f"{args.classes // 1000}k classes, rate {args.rate}, sparse",
                    classes=args.classes, rate=args.rate, sparse=True),
               dict(base, name=f"{sampled // 1000}k classes, rate 1.0 (same sampled work)",
                    classes=sampled, rate=1.0, sparse=True)]
    if not args.no_dense:
        configs.append(dict(base, name=f"{args.classes // 1000}k classes, rate {args.rate}, "
                            "dense ∂W + torch SGD", classes=args.classes, rate=args.rate,
                            sparse=False))
    results = []
    for cfg in configs:
        r = _run(cfg)
        results.append(r)
        print(f"{r['name']:52s} median {r['median_s'] * 1e3:8.1f} ms  min "
              f"{r['min_s'] * 1e3:8.1f} ms  peak {r['peak_gib']:5.2f} GiB", flush=True)
    ratio = results[0]["median_s"] / results[1]["median_s"]
    print(f"\nscale ratio (sparse {args.classes // 1000}k / {sampled // 1000}k, medians): "
          f"{ratio:.2f}  (target ≤ 1.3)")
    if len(results) > 2:
        print(f"dense baseline / sparse: {results[2]['median_s'] / results[0]['median_s']:.2f}×")
    _print_model()
    if args.json:
        import datetime

        import torch

        from .__main__ import device_name
        about = dict(device=device_name(args.device), date=f"{datetime.date.today()}",
                     torch=torch.__version__)
        with open(args.json, "w") as f:
            json.dump(dict(about, results=results, ratio=ratio, model=gpu_model()), f, indent=1)


if __name__ == "__main__":
    main()
