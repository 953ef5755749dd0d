"""The cost models' inputs, measured on the GPU at hand (benchmarks/device.py says what each is).

    python -m benchmarks.ceilings --json inputs.json    # then: cost_model / native_cost --inputs

- mm rate: torch.mm in the GEMM dtype at each product's shape at B × D × C (device.PRODUCTS:
  cos = (B×D)·(D×C), dw = (C×B)·(B×D), dx = (B×C)·(C×D)); ``mm_flops`` is the cos product's;
- HBM: a device-to-device copy of 1 GiB, bytes read + written over its time;
- L2: a Triton kernel whose programs read a buffer that fits in L2 (16 MiB) over and over,
  bytes read over its time (``stream_sum``; the same kernel over 1 GiB gives the HBM read rate,
  printed beside);
- launch gap: 1000 one-element adds captured in a CUDA graph, replayed (the device's time per
  dependent kernel); host enqueue: the host's time per eager launch of a one-element add, of a
  tiny torch.mm and of a Triton kernel (the stream kernel, one program);
- L2 size and the MUFU rate (16 per SM per clock) from the device's properties.

Every number is the median of several timed runs (CUDA events) after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
import triton.language as tl

from .device import PRODUCTS
from .device import from_dict as _device
from .measure import median_ms


@triton.jit
def _stream_kernel(src, out, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    """Program p reads blocks p, p + P, p + 2P, ... of src (wrapping at n) and writes the
    sum of what it read, so that no load can be dropped."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(ITERS):
        start = ((pid + i * progs) * BLOCK) % n
        acc += tl.load(src + start + offs)
    tl.store(out + pid * BLOCK + offs, acc)


def stream_sum(src: torch.Tensor, programs: int, iters: int, block: int) -> torch.Tensor:
    """Per program, the element-wise sum of the `iters` blocks it read (fp32 src, its length
    a multiple of `block`)."""
    if src.numel() % block:
        raise ValueError(f"src has {src.numel()} elements, not a multiple of block={block}")
    out = torch.empty(programs * block, device=src.device, dtype=torch.float32)
    _stream_kernel[(programs,)](src, out, src.numel(), ITERS=iters, BLOCK=block)
    return out


def mm_rates(b: int, d: int, c: int, dtype: torch.dtype) -> dict:
    """FLOP/s of torch.mm at each product's shape (random data)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, d, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(c, d, device="cuda", dtype=dtype, generator=g)
    gt = torch.randn(b, c, device="cuda", dtype=dtype, generator=g)
    runs = {"cos": lambda: torch.mm(x, w.t()), "dw": lambda: torch.mm(gt.t(), x),
            "dx": lambda: torch.mm(gt, w)}
    flops = 2.0 * b * c * d
    return {p: flops / (median_ms(runs[p]) * 1e-3) for p in PRODUCTS}


def bandwidths(sms: int) -> dict:
    """HBM (copy, read + written; and the stream kernel's read rate) and L2 (read) bytes/s."""
    big = torch.empty(1 << 28, device="cuda", dtype=torch.float32).normal_()  # 1 GiB
    dst = torch.empty_like(big)
    copy_ms = median_ms(lambda: dst.copy_(big))
    block, programs = 4096, 8 * sms
    iters_hbm = big.numel() // (block * programs)
    hbm_read_ms = median_ms(lambda: stream_sum(big, programs, iters_hbm, block))
    del big, dst
    small = torch.randn(1 << 22, device="cuda")  # 16 MiB: in L2 on an H100 or H200
    iters_l2 = 256
    l2_ms = median_ms(lambda: stream_sum(small, programs, iters_l2, block))
    return {"hbm_bps": 2 * (1 << 30) / (copy_ms * 1e-3),
            "hbm_read_bps": programs * iters_hbm * block * 4 / (hbm_read_ms * 1e-3),
            "l2_bps": programs * iters_l2 * block * 4 / (l2_ms * 1e-3)}


def launch_costs(n: int = 1000) -> dict:
    """The device's time per dependent kernel (graph replay) and the host's per launch."""
    one = torch.zeros(1, device="cuda")
    mm_a = torch.randn(16, 16, device="cuda")
    src = torch.randn(4096, device="cuda")
    stream_sum(src, 1, 1, 4096)  # compiled before it is timed
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            one.add_(1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(n):
                one.add_(1)
    torch.cuda.synchronize()
    gap_ms = median_ms(graph.replay, warmup=2, reps=5)

    def host(fn) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) / n
        torch.cuda.synchronize()
        return dt

    return {"launch_s": gap_ms * 1e-3 / n, "host_kernel_s": host(lambda: one.add_(1)),
            "host_gemm_s": host(lambda: torch.mm(mm_a, mm_a)),
            "host_triton_s": host(lambda: stream_sum(src, 1, 1, 4096))}


def measure(b: int, d: int, c: int, dtype: torch.dtype) -> dict:
    props = torch.cuda.get_device_properties(0)
    clock_hz = getattr(props, "clock_rate", 0) * 1e3 or 1.98e9  # kHz where torch reports it
    rates = mm_rates(b, d, c, dtype)
    out = {"name": torch.cuda.get_device_name(), "source": f"measured {time.strftime('%Y-%m-%d')}"
           f", torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
           "mm_flops": rates["cos"], "mm_by_product": rates,
           "mm_shape": {"batch": b, "dim": d, "classes": c, "dtype": str(dtype)},
           "l2_bytes": int(getattr(props, "L2_cache_size", 50 << 20)),
           "mufu_ops": 16 * props.multi_processor_count * clock_hz, "clock_hz": clock_hz}
    out.update(bandwidths(props.multi_processor_count))
    out.update(launch_costs())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--json", metavar="PATH", help="write the inputs there (for --inputs)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.ceilings: no CUDA device")
        return 1
    got = measure(args.batch, args.dim, args.classes, getattr(torch, args.dtype))
    print(_device(got).table())
    print(f"  (HBM read alone {got['hbm_read_bps'] / 1e12:.2f} TB/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(got, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
