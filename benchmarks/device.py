"""The device the cost models predict for: every assumption they make, as one parameter set.

Both models (:mod:`benchmarks.cost_model`, the Triton kernels; :mod:`benchmarks.native_cost`,
the native CUDA sweep) predict a kernel's time from the same numbers:

    time = max(FLOPs / mm rate of its product, HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth)
           + transcendentals / MUFU rate + launches × launch gap

Two fixed sets bracket the H200 (the only GPU measured so far, 2026-11-28):

- ``OPTIMISTIC``: torch.mm at the headline shape (445–455 TFLOP/s, results/h200-2026-11-28),
  ≈ 4.0 TB/s of HBM, an assumed 8 TB/s of L2 (5–10 TB/s is what is quoted for Hopper);
- ``PESSIMISTIC``: the same mm rate and HBM, L2 at 5.5 TB/s.

``python -m benchmarks.ceilings --json inputs.json`` measures each of these numbers on the GPU
at hand (benchmarks/gpu_suite.sh does, before the models run); :func:`load` reads that file,
so that ``--inputs inputs.json`` predicts with measured inputs instead of assumed ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

PRODUCTS = ("cos", "dw", "dx")
"""The GEMM shapes the kernels run (B × D × C): cos = x̂·Rᵀ (M=B, N=C, K=D); dw = g̃ᵀ·x̂'
(M=C, N=D, K=B); dx = g̃·R (M=B, N=D, K=C, split-K in the kernels)."""


@dataclass(frozen=True)
class Device:
    name: str
    mm_flops: float                 # FLOP/s of torch.mm in the GEMM dtype (any product)
    hbm_bps: float                  # bytes/s, read + written
    l2_bps: float                   # bytes/s, what the programs load and store
    l2_bytes: int = 50 << 20        # the L2 the native plan sizes its chunks for
    mufu_ops: float = 16 * 132 * 1.98e9  # transcendentals/s: 16 per SM per clock
    launch_s: float = 2e-6          # between dependent launches (the shortest kernel)
    host_gemm_s: float = 8e-6       # host time to enqueue one ATen GEMM
    host_kernel_s: float = 3e-6     # host time to enqueue one raw kernel or torch op
    host_triton_s: float = 10e-6    # host time to launch one Triton kernel from Python
    source: str = "assumed"
    mm_by_product: dict = field(default_factory=dict, compare=False)  # product → FLOP/s

    def mm(self, product: str | None) -> float:
        """The mm rate of `product` (one of PRODUCTS), measured if the inputs have it."""
        return self.mm_by_product.get(product, self.mm_flops)

    def table(self) -> str:
        """The inputs, one per line: what the model assumes or what was measured."""
        rates = "".join(f", {p} {self.mm(p) / 1e12:.0f}" for p in PRODUCTS
                        if p in self.mm_by_product)
        return "\n".join([
            f"device inputs: {self.name} ({self.source})",
            f"  mm rate       {self.mm_flops / 1e12:7.0f} TFLOP/s" + (
                f" (by product:{rates[1:]})" if rates else ""),
            f"  HBM           {self.hbm_bps / 1e12:7.2f} TB/s",
            f"  L2            {self.l2_bps / 1e12:7.2f} TB/s, {self.l2_bytes >> 20} MiB",
            f"  MUFU          {self.mufu_ops / 1e12:7.2f} Tops/s",
            f"  launch gap    {self.launch_s * 1e6:7.2f} µs; host enqueue: GEMM "
            f"{self.host_gemm_s * 1e6:.1f} µs, kernel {self.host_kernel_s * 1e6:.1f} µs, "
            f"Triton kernel {self.host_triton_s * 1e6:.1f} µs"])


OPTIMISTIC = Device("H200, optimistic", mm_flops=450e12, hbm_bps=4.0e12, l2_bps=8.0e12)
PESSIMISTIC = replace(OPTIMISTIC, name="H200, pessimistic", l2_bps=5.5e12)
H200 = OPTIMISTIC
PRESETS = {"optimistic": OPTIMISTIC, "pessimistic": PESSIMISTIC}


def to_dict(dev: Device) -> dict:
    return asdict(dev)


def from_dict(d: dict) -> Device:
    """A Device from a measured-inputs dict (:mod:`benchmarks.ceilings`); missing fields keep
    the optimistic preset's values, and the source says which were measured."""
    known = {k: v for k, v in d.items() if k in Device.__dataclass_fields__}
    dev = replace(OPTIMISTIC, **known)
    if "source" not in known:
        dev = replace(dev, source="measured: " + ", ".join(sorted(known)))
    return dev


def load(path: str) -> Device:
    with open(path) as f:
        return from_dict(json.load(f))


def devices(inputs: str | None) -> list[Device]:
    """The devices a model prints: the measured inputs (if a file is given), then the
    pessimistic and the optimistic presets."""
    return ([load(inputs)] if inputs else []) + [PESSIMISTIC, OPTIMISTIC]
