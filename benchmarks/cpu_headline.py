"""The CPU headline of the native backend's benchmarks (docs/design.md §7): the UniTSFace
objective at fp32, B=256, D=512, C=50k on 2 threads, and its floor, the useful GEMMs of one
step: 2·B·C·D FLOPs each for the cosines against W and against the bank, ∂x through W and
through the bank, and ∂W — five products, run as full-size torch.mm (x·Wᵀ twice, g·W twice,
gᵀ·x: the bank has W's shape)."""

from __future__ import annotations


def add_arguments(p) -> None:
    """The shape, thread count and repetitions, with the headline's values as defaults."""
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=50_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)


def five_gemms(x, w, g):
    """A callable running the five products on x (B × D), w (C × D) and g (B × C)."""
    import torch

    def run():
        torch.mm(x, w.t())
        torch.mm(x, w.t())
        torch.mm(g, w)
        torch.mm(g, w)
        torch.mm(g.t(), x)

    return run
