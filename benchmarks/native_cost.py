"""Cost model of the native backend's CUDA sweep (csrc/cuda/unitsface_sweep.cu, docs/design.md §2).

One training step of the UniTSFace objective as ``fused_unitsface_loss(backend="native")``
runs it on CUDA tensors that take a gradient: the forward with the per-row gradients
(row_grads) and the backward for ∂W (∂x and a scalar ∂b come from the forward). For each
kernel the step launches — walking the same chunk plan as the driver, read from the extension
(``unitsface_kernels._C.cuda_plan``, csrc/cuda_plan.h) — its tensor-core FLOPs, its HBM bytes
and its L2 bytes (the chunk buffers the plan keeps in L2), and the time it takes at its
roofline on a device: max(FLOPs / mm rate, HBM bytes / HBM bandwidth, L2 bytes / L2
bandwidth), never less than the launch gap; the device's rates are parameters
(:class:`benchmarks.device.Device`): the pessimistic and optimistic presets and, with
``--inputs``, the ones ``python -m benchmarks.ceilings`` measured.

    python -m benchmarks.native_cost              # the H200 headline: bf16, B = D = 512, C = 100k
    python -m benchmarks.native_cost --index      # the same |S| = 100k through a partial-FC index
    python -m benchmarks.native_cost --inputs inputs.json --measure   # on a GPU: measured too

The model covers the path of the headline (reference rows in x's dtype, no bank validity mask;
a scalar threshold in fp32), with the rows read in place or, with a partial-FC index, staged
per chunk. Read in place, W and the bank are two allocations: whether one GEMM takes both
parts depends on where they lie (``Step.layout``, :func:`layout_of`). The public function adds
a few launches of its own around the ops (the mean, its backward). ``--measure`` profiles the
same step on the benchmark's inputs (:func:`benchmarks.impls.make_inputs`) and prints launches
and device time per kernel group beside the model's (for the layout those inputs have).
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from .device import OPTIMISTIC, Device, devices

F32 = 4


@dataclass(frozen=True)
class Step:
    """One step's shapes: B rows, D columns, S classes, x (and W, bank) of x_bytes each."""

    B: int = 512
    D: int = 512
    S: int = 100_000
    x_bytes: int = 2
    bank: bool = True         # the objective (False: the margin softmax alone)
    row_grads: bool = True    # False: the plain forward, ∂x from the backward's sweep
    index: bool = False       # a partial-FC index: each chunk's rows staged (gathered) first
    layout: str = "w_below"   # rows read in place: where the bank's lie from W's (layout_of)

    @property
    def gemm_flops(self) -> float:
        """One B × S × D GEMM."""
        return 2.0 * self.B * self.S * self.D


@dataclass
class Kernel:
    phase: str  # "fwd" | "bwd"
    name: str
    product: str | None = None  # the GEMM it launches through ATen (cuBLAS): device.PRODUCTS
    launches: int = 0
    flops: float = 0.0
    hbm: float = 0.0
    l2: float = 0.0
    time_s: float = 0.0

    def add(self, dev: Device, launches=1, flops=0.0, hbm=0.0, l2=0.0) -> None:
        """One more instance (launches: 1, or 0 for an instance that launches nothing)."""
        self.launches += launches
        self.flops += flops
        self.hbm += hbm
        self.l2 += l2
        if launches:
            self.time_s += max(flops / dev.mm(self.product), hbm / dev.hbm_bps,
                               l2 / dev.l2_bps, launches * dev.launch_s)


@dataclass
class Model:
    step: Step
    device: Device
    kernels: OrderedDict[tuple, Kernel] = field(default_factory=OrderedDict)
    plans: dict = field(default_factory=dict)

    def k(self, phase: str, name: str, product: str | None = None) -> Kernel:
        return self.kernels.setdefault((phase, name), Kernel(phase, name, product))

    def host_s(self) -> float:
        """The host's time to enqueue the step: without a synchronisation inside a call the
        device runs behind it, so the step takes max(device, host)."""
        dev = self.device
        return sum(k.launches * (dev.host_gemm_s if k.product else dev.host_kernel_s)
                   for k in self.kernels.values())

    def total(self, attr: str, phase: str | None = None) -> float:
        return sum(getattr(k, attr) for k in self.kernels.values()
                   if phase is None or k.phase == phase)


LAYOUTS = ("w_below", "bank_below", "apart")


def layout_of(w_ptr: int, bank_ptr: int) -> str:
    """Where the bank's rows lie from W's (their data pointers) as the driver sees it
    (csrc/cuda/unitsface_sweep.cu, part_offset): "apart" when no batch stride of one GEMM
    operand can join them (the gap is not a multiple of 16 bytes, or 2^40 bytes or more), else
    which one lies below."""
    gap = abs(bank_ptr - w_ptr)
    if gap % 16 or gap >= 1 << 40:
        return "apart"
    return "w_below" if bank_ptr >= w_ptr else "bank_below"


def plan(st: Step, parts: int, with_q: bool, l2_bytes: int) -> dict:
    """The driver's chunk plan (csrc/cuda_plan.h through the extension)."""
    from unitsface_kernels import native
    c, kw, ns, n_chunks, ns_used, budget = native.require().cuda_plan(
        st.B, st.S, st.D, parts, F32, st.x_bytes, with_q, l2_bytes)
    return dict(c=c, kw=kw, ns=ns, n_chunks=n_chunks, ns_used=ns_used, budget=budget)


def chunks(p: dict, S: int):
    for q in range(p["n_chunks"]):
        yield q, min(p["c"], S - q * p["c"])


def staging(m: Model, phase: str, n: int, parts: int) -> None:
    """uf_stage: a chunk's rows of `parts` tables gathered through the index (one launch),
    read from HBM and written to the chunk's staging buffer."""
    st = m.step
    m.k(phase, "staging").add(m.device, hbm=parts * n * (st.D * st.x_bytes + 8),
                              l2=parts * n * st.D * st.x_bytes)


def dots(m: Model, phase: str, n: int, parts: int) -> None:
    """The chunk's dots x·Rᵀ: both parts in one batched GEMM (chunk_dots) when their rows are
    staged or lie at a batch stride from each other (any order), else a GEMM per part."""
    st = m.step
    joined = parts == 2 and (st.index or st.layout != "apart")
    k = m.k(phase, "dots GEMM x·Rᵀ", "cos")
    for size in ([parts] if joined else [1] * parts):
        k.add(m.device, 1, size * 2.0 * st.B * n * st.D, hbm=size * n * st.D * st.x_bytes,
              l2=size * (st.B * st.D * st.x_bytes + st.B * n * F32))


def products(m: Model, phase: str, p: dict, n: int, first: bool, parts: int = 1) -> None:
    """The ∂x products of a chunk: per part the full slices in one batched GEMM, a partial
    last slice in a second; each slice's fp32 accumulator (B × D) written on the first chunk,
    read and written after it. With parts = 2 (the forward) each of the two is one GEMM for
    both parts where slice_products joins them: the chunk's ns full slices when the rows are
    staged (c rows apart), a single slice when the bank's rows lie above W's."""
    st, dev = m.step, m.device
    full, rem = divmod(n, p["kw"])
    rw = 1 if first else 2
    k = m.k(phase, "∂x products (split-K bmm)", "dx")
    for width, count in ((p["kw"], full), (rem, int(rem > 0))):
        if not count:
            continue
        joined = parts == 2 and (
            (st.index and (count == 1 or count == p["ns"] == p["ns_used"]))
            or (not st.index and count == 1 and st.layout == "w_below"))
        for size in ([parts] if joined else [1] * parts):
            k.add(dev, 1, size * 2.0 * st.B * count * width * st.D,
                  hbm=size * count * (width * st.D * st.x_bytes + rw * st.B * st.D * F32),
                  l2=size * st.B * count * width * st.x_bytes)


def model(st: Step = Step(), dev: Device = OPTIMISTIC) -> Model:
    m = Model(st, dev)
    B, D, S, xb = st.B, st.D, st.S, st.x_bytes
    # ---- forward
    parts = 2 if st.bank else 1
    p = plan(st, parts, False, dev.l2_bytes)
    m.plans["fwd"] = p
    s_pad = max(p["n_chunks"], 1) * p["c"]
    m.k("fwd", "norms (uf_columns)").add(dev, hbm=(B + parts * S) * D * xb
                                         + (B + parts * S) * F32 + 4 * s_pad * F32)
    for q, n in chunks(p, S):
        if st.index:
            staging(m, "fwd", n, parts)
        dots(m, "fwd", n, parts)
        tiles = parts * B * n * xb if st.row_grads else 0
        m.k("fwd", "epilogue").add(dev, hbm=n * (4 if st.bank else 1) * F32,
                                   l2=parts * B * n * F32 + tiles)
        if st.row_grads:
            products(m, "fwd", p, n, q == 0, parts)
    acc = parts * p["ns_used"] * B * D * F32 if st.row_grads else 0
    m.k("fwd", "finish (uf_fwd_finish)").add(
        dev, hbm=acc + B * D * xb * (1 + parts) + (B * D * F32 if st.row_grads else 0))
    # ---- backward: ∂W always; ∂x and the threshold's Σ g from the sweep without row_grads
    parts_b = 1 if st.row_grads or not st.bank else 2
    p = plan(st, parts_b, True, dev.l2_bytes)
    m.plans["bwd"] = p
    s_pad = max(p["n_chunks"], 1) * p["c"]
    m.k("bwd", "norms (uf_columns)").add(dev, hbm=parts_b * S * F32 + 4 * s_pad * F32)
    m.k("bwd", "rows (x̂, ∂x)").add(dev, hbm=B * D * (2 * xb + (F32 + xb if st.row_grads else 0)))
    for q, n in chunks(p, S):
        if st.index:
            staging(m, "bwd", n, parts_b)
        dots(m, "bwd", n, parts_b)
        m.k("bwd", "epilogue").add(dev, hbm=n * (4 if parts_b == 2 else 1) * F32,
                                   l2=parts_b * B * n * (F32 + xb))
        if not st.row_grads:  # (one accumulator for both parts: a GEMM each)
            for _ in range(parts_b):
                products(m, "bwd", p, n, q == 0)
        m.k("bwd", "Q GEMM tileᵀ·x̂", "dw").add(dev, 1, 2.0 * B * n * D,
                                          l2=B * n * xb + B * D * xb + n * D * F32)
        m.k("bwd", "∂W projection").add(dev, hbm=2 * n * D * xb, l2=n * D * F32)
    if not st.row_grads:
        m.k("bwd", "rows (∂x)").add(dev, hbm=p["ns_used"] * B * D * F32 + B * D * 2 * xb)
    return m


def useful_flops(st: Step) -> float:
    """docs/design.md §7: the GEMMs the maths needs (cosines and ∂x per reference set, ∂W)."""
    return st.gemm_flops * (5 if st.bank else 3)


def report(m: Model) -> str:
    st, dev = m.step, m.device
    lines = [f"native CUDA sweep, cost model with the {dev.name} inputs ({dev.source})",
             (f"step: B={st.B} D={st.D} S={st.S} x {8 * st.x_bytes}-bit, "
              f"{'objective' if st.bank else 'softmax'}, row_grads={st.row_grads}, "
              + ("rows staged through an index" if st.index else f"rows in place ({st.layout})"))]
    for phase, p in m.plans.items():
        lines.append(f"  {phase} plan: {p['n_chunks']} chunks of c={p['c']} "
                     f"({p['ns']} slices of {p['kw']}; budget {p['budget']} elements)")
    lines.append(f"  {'phase':5} {'kernel':28} {'launches':>8} {'GFLOP':>8} {'HBM MB':>8} "
                 f"{'L2 MB':>8} {'µs':>8}")
    for k in m.kernels.values():
        lines.append(f"  {k.phase:5} {k.name:28} {k.launches:8d} {k.flops / 1e9:8.1f} "
                     f"{k.hbm / 1e6:8.1f} {k.l2 / 1e6:8.1f} {k.time_s * 1e6:8.1f}")
    t = m.total("time_s")
    lines.append(f"  total: {m.total('launches'):.0f} launches "
                 f"(fwd {m.total('launches', 'fwd'):.0f}, bwd {m.total('launches', 'bwd'):.0f}), "
                 f"{m.total('flops') / 1e9:.1f} GFLOP "
                 f"({m.total('flops') / st.gemm_flops:.2f} GEMM-equivalents), "
                 f"HBM {m.total('hbm') / 1e9:.3f} GB, L2 {m.total('l2') / 1e9:.3f} GB")
    lines.append(f"  predicted: {t * 1e3:.3f} ms of device time per step (fwd "
                 f"{m.total('time_s', 'fwd') * 1e3:.3f}, bwd {m.total('time_s', 'bwd') * 1e3:.3f}; "
                 f"host enqueue ≈ {m.host_s() * 1e3:.3f} ms); useful FLOPs at "
                 f"{useful_flops(st) / max(t, m.host_s()) / dev.mm('cos'):.0%} of the mm rate")
    return "\n".join(lines)


def predicted_groups(m: Model) -> OrderedDict:
    """The model's kernels by the measured groups (GROUPS): {group: [launches, µs]}."""
    out: OrderedDict[str, list] = OrderedDict()
    for k in m.kernels.values():
        name = "GEMMs (cuBLAS)" if k.product else "rows" if k.name.startswith("rows") \
            else k.name
        row = out.setdefault(name, [0, 0.0])
        row[0] += k.launches
        row[1] += k.time_s * 1e6
    return out


# ----------------------------------------------------------------------------- measurement

GROUPS = (("uf_columns", "norms (uf_columns)"), ("uf_fwd_epilogue", "epilogue"),
          ("uf_bwd_epilogue", "epilogue"), ("uf_fwd_finish", "finish (uf_fwd_finish)"),
          ("uf_project", "∂W projection"), ("uf_rows", "rows"), ("uf_stage", "staging"))


def _group(kernel: str) -> str:
    for key, name in GROUPS:
        if key in kernel:
            return name
    low = kernel.lower()
    if any(t in low for t in ("gemm", "cutlass", "nvjet", "sm90", "xmma", "cublas")):
        return "GEMMs (cuBLAS)"
    return "other"


def measure(st: Step, repeats: int = 20) -> tuple[float, OrderedDict, str]:
    """The step on the GPU: median ms (CUDA events), with the profiler the kernels of one
    step by group ({group: [launches, device µs]}), and the layout of its W and bank."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from unitsface_kernels import fused_margin_softmax_loss, fused_unitsface_loss

    from .impls import Case, make_inputs
    from .measure import time_steps
    dev = torch.device("cuda")
    dtype = {2: "bfloat16", 4: "float32"}[st.x_bytes]
    # with an index: |S| = st.S sampled from 10·|S| classes (partial FC at rate 0.1)
    classes, rate = (10 * st.S, 0.1) if st.index else (st.S, 1.0)
    inp = make_inputs(Case("objective" if st.bank else "softmax", classes, st.B, st.D, dtype,
                           "cuda", sample_rate=rate))

    def step():
        inp.zero_grad()  # as optimizer.zero_grad() does: no accumulation kernels
        if st.bank:
            loss = fused_unitsface_loss(inp.x, inp.labels, inp.centres, inp.bank, inp.bias,
                                        index=inp.index, backend="native")
        else:
            loss = fused_margin_softmax_loss(inp.x, inp.centres, inp.labels, index=inp.index,
                                             backend="native")
        loss.backward()

    for _ in range(3):
        step()
    times = sorted(time_steps(step, repeats, dev))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    groups: OrderedDict[str, list] = OrderedDict()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            row = groups.setdefault(_group(e.name), [0, 0.0])
            row[0] += 1
            row[1] += e.device_time_total
    layout = layout_of(inp.centres.data_ptr(), inp.bank.data_ptr()) if st.bank else st.layout
    return times[len(times) // 2] * 1e3, groups, layout


def compare(models: list[Model], step_ms: float, groups: OrderedDict) -> str:
    """The measured kernels by group beside each model's (launches, µs)."""
    preds = [predicted_groups(m) for m in models]
    import torch
    head = "".join(f" {'model µs':>9}" for _ in models)
    lines = [f"measured on {torch.cuda.get_device_name()}: {step_ms:.3f} ms per step; "
             "kernels of one step by group (model µs: " + ", ".join(
                 m.device.name for m in models) + "):",
             f"  {'group':28} {'launches':>8} {'model':>6}{head} {'measured µs':>12}"]
    for name in list(dict.fromkeys([*groups, *preds[0]])):
        n, us = groups.get(name, (0, 0.0))
        lines.append(f"  {name:28} {n:8d} {preds[0].get(name, (0, 0))[0]:6d}"
                     + "".join(f" {p.get(name, (0, 0.0))[1]:9.1f}" for p in preds)
                     + f" {us:12.1f}")
    lines.append(f"  total {sum(r[0] for r in groups.values())} launches measured, "
                 f"{models[0].total('launches'):.0f} modelled")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=Step.S)
    ap.add_argument("--batch", type=int, default=Step.B)
    ap.add_argument("--dim", type=int, default=Step.D)
    ap.add_argument("--fp32", action="store_true", help="fp32 inputs (default bf16)")
    ap.add_argument("--index", action="store_true",
                    help="the classes through a partial-FC index (rows staged per chunk)")
    ap.add_argument("--layout", choices=LAYOUTS, default=Step.layout,
                    help="rows in place: where the bank's lie from W's (default %(default)s)")
    ap.add_argument("--inputs", metavar="JSON",
                    help="measured device inputs (python -m benchmarks.ceilings --json)")
    ap.add_argument("--measure", action="store_true", help="also measure the step (CUDA)")
    args = ap.parse_args(argv)
    st = Step(args.batch, args.dim, args.classes, 4 if args.fp32 else 2, index=args.index,
              layout=args.layout)
    models = [model(st, dev) for dev in devices(args.inputs)]
    print(report(models[0]))
    for m in models[1:]:
        print(f"  predicted with the {m.device.name} inputs: {m.total('time_s') * 1e3:.3f} ms")
    if args.measure:
        import torch
        if not torch.cuda.is_available():
            print("--measure: no CUDA device")
            return 1
        step_ms, groups, layout = measure(st)
        if layout != st.layout and not st.index:
            print(f"  (the measured inputs' layout: {layout}; the model below is for it)")
            models = [model(replace(st, layout=layout), m.device) for m in models]
        print(compare(models, step_ms, groups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
