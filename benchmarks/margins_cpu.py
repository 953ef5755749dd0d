"""The margin family on the CPU: each margin's fused step against CosFace's (docs/design.md
§1.5; the target: each ≤ 1.1× CosFace on the native backend).

    python -m benchmarks.margins_cpu                        # B=256, D=512, C=20k, fp32
    python -m benchmarks.margins_cpu --classes 5000 --json out.json --backend reference

A step is ``loss = fused_margin_softmax_loss(x, W, labels, margin=…); loss.backward()`` with
gradients for x and W, over all classes, in one process with torch.set_num_threads(--threads).
The margins are timed in interleaved rounds (every margin once per round, --rounds rounds
after a warm-up round), so that all see the same machine load; the ratio uses each margin's
minimum over the rounds (the least disturbed step: the host may be shared), the median is
printed too. Sub-center ArcFace (K = 3) reads K rows per class: it is compared with CosFace
over the same C·K rows as well ("per row"), the work it cannot avoid.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from unitsface_kernels import fused_margin_softmax_loss, margins

MARGINS = {
    "cosface": None,
    "arcface": dict(kind="arcface", m=0.5),
    "arcface_filter": dict(kind="arcface", m=0.5, interclass_threshold=0.2),
    "subcenter_k3": dict(kind="arcface", m=0.5, sub_centers=3),
    "curricular": dict(kind="curricular"),
    "adaface": dict(kind="adaface"),
    "magface": dict(kind="magface"),
    "elastic_arc": dict(kind="elastic_arc"),
    "elastic_cos_plus": dict(kind="elastic_cos", plus=True),
}


def _step(name, x, w, labels, backend):
    """A callable running one forward + backward of margin `name`."""
    spec = MARGINS[name]
    kw = {}
    if spec is not None:
        spec = dict(spec)
        mg = margins.margin(spec.pop("kind"), **spec)
        kw = dict(margin=mg, margin_state=margins.MarginState(), generator=torch.Generator()
                  .manual_seed(0))
        if mg.sub_centers > 1:
            w = w.repeat_interleave(mg.sub_centers, 0).detach() + 0.01 * torch.randn(
                w.shape[0] * mg.sub_centers, w.shape[1])
            w.requires_grad_()
        if mg.kind == "magface":  # MagFace's norms live in [10, 110]
            x = (x.detach() * 3.0).requires_grad_()

    def step():
        x.grad, w.grad = None, None
        fused_margin_softmax_loss(x, w, labels, backend=backend, **kw).backward()
    return step


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b, d, c = args.batch, args.dim, args.classes
    x = torch.randn(b, d, generator=g).requires_grad_()
    w = torch.randn(c, d, generator=g).requires_grad_()
    labels = torch.randint(0, c, (b,), generator=g)
    steps = {name: _step(name, x, w, labels, args.backend) for name in MARGINS}
    w3 = torch.randn(3 * c, d, generator=g).requires_grad_()
    steps["cosface_3c_rows"] = _step("cosface", x, w3, labels, args.backend)
    times = {name: [] for name in steps}
    for r in range(args.rounds + 1):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    base = min(times["cosface"])
    rows = {}
    for name, ts in times.items():
        ref = min(times["cosface_3c_rows"]) if name == "subcenter_k3" else base
        rows[name] = dict(min_ms=1e3 * min(ts), median_ms=1e3 * statistics.median(ts),
                          vs_cosface=min(ts) / base, vs_same_rows=min(ts) / ref)
    return dict(device=platform.processor() or platform.machine(), threads=args.threads,
                torch=torch.__version__, backend=args.backend, batch=b, dim=d, classes=c,
                rounds=args.rounds, rows=rows)


def table(out: dict) -> str:
    lines = [f"margins, {out['backend']} backend, fp32, B={out['batch']}, D={out['dim']}, "
             f"C={out['classes']}, {out['threads']} threads, min / median of {out['rounds']}",
             "| margin | min ms | median ms | × CosFace | × CosFace on the same rows |",
             "|---|---|---|---|---|"]
    for name, r in out["rows"].items():
        lines.append(f"| {name} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | "
                     f"{r['vs_cosface']:.2f} | {r['vs_same_rows']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--backend", default="native")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    out = run(args)
    print(table(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
