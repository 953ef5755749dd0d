"""benchmarks/native_cost.py, the cost model of the native CUDA sweep, at the GPU headline (bf16,
B = D = 512, 100k classes): the chunk plan keeps its buffers in L2, the step does 6
GEMM-equivalents of tensor-core work (7 without the forward's per-row gradients), and its
launches are the closed forms of the chunk loop below. (tests/test_cuda_emu.py checks the
model's launches against the driver itself, run on the CPU.)"""

from __future__ import annotations

import pytest
from helpers import REQUIRE_NATIVE

from benchmarks import native_cost
from unitsface_kernels import native

pytestmark = pytest.mark.skipif(not native.available() and not REQUIRE_NATIVE,
                                reason="the plan comes from the native extension (not built)")


@pytest.fixture(autouse=True)
def l2_plan(monkeypatch):
    monkeypatch.delenv("UNITSFACE_NATIVE_CHUNK_ELEMS", raising=False)


def test_headline_plan_fits_l2():
    m = native_cost.model()
    st, l2 = m.step, m.device.l2_bytes
    fwd, bwd = m.plans["fwd"], m.plans["bwd"]
    assert (fwd["c"], fwd["kw"], fwd["n_chunks"]) == (8192, 1024, 13)
    assert 2 * st.B * fwd["c"] * (4 + 2) <= l2  # dots + bf16 tiles of W and the bank
    assert st.B * bwd["c"] * (4 + 2) + bwd["c"] * st.D * 4 <= l2  # + Q
    assert bwd["c"] >= fwd["c"] and bwd["c"] % bwd["kw"] == 0


@pytest.mark.parametrize("row_grads", [True, False])
def test_headline_counts(row_grads):
    m = native_cost.model(native_cost.Step(row_grads=row_grads))
    st, fwd, bwd = m.step, m.plans["fwd"], m.plans["bwd"]
    assert m.total("flops") == (6 if row_grads else 7) * st.gemm_flops

    def sizes(p):  # each chunk's (full slices, columns of a partial slice)
        return [divmod(min(p["c"], st.S - q * p["c"]), p["kw"]) for q in range(p["n_chunks"])]

    def product_launches(p, joined):
        """Per chunk a batched GEMM of the full slices and one of a partial slice, per part;
        joined (the forward, the bank's rows above W's): one for both parts where a part has
        a single slice there."""
        return sum((0 if full == 0 else 1 if joined and full == 1 else 2) + (rem > 0) *
                   (1 if joined else 2) for full, rem in sizes(p))

    # per chunk one GEMM of both parts' dots and the epilogue; backward also Q and projection
    launches_fwd = 2 + fwd["n_chunks"] * 2 + (product_launches(fwd, True) if row_grads else 0)
    launches_bwd = (2 + bwd["n_chunks"] * 4 + (0 if row_grads else 1)
                    + (0 if row_grads else product_launches(bwd, False)))
    assert m.total("launches", "fwd") == launches_fwd
    assert m.total("launches", "bwd") == launches_bwd
    if row_grads:
        assert launches_fwd + launches_bwd == 96  # (111 with a GEMM per part)
        assert 0.5e-3 < m.total("time_s") < 1.0e-3  # the issue's ≤ 1 ms, on paper


@pytest.mark.parametrize("layout,index,launches", [("bank_below", False, 98),
                                                   ("apart", False, 111), (None, True, 107)])
def test_headline_launches_by_layout(layout, index, launches):
    """With the bank's rows below W's the single slice of the last chunk's products stays a
    GEMM per part; apart (no batch stride joins the tables) every GEMM is one per part, as
    before the parts shared their GEMMs; through a partial-FC index (rows staged per chunk:
    one more launch per chunk) both parts share every GEMM."""
    st = native_cost.Step(index=index, layout=layout or native_cost.Step.layout)
    assert native_cost.model(st).total("launches") == launches


def test_device_inputs_are_the_shared_ones():
    """One Device description for both models: the pessimistic L2 slows the native sweep's
    L2-bound kernels and nothing else, and the GEMMs take their product's mm rate."""
    import dataclasses

    from benchmarks import device
    opt = native_cost.model(dev=device.OPTIMISTIC)
    pess = native_cost.model(dev=device.PESSIMISTIC)
    assert pess.total("time_s") > opt.total("time_s")
    assert pess.total("launches") == opt.total("launches")
    slow_q = dataclasses.replace(device.OPTIMISTIC, mm_by_product={"dw": 225e12})
    q = native_cost.model(dev=slow_q).kernels[("bwd", "Q GEMM tileᵀ·x̂")]
    assert q.product == "dw"
    assert q.time_s == pytest.approx(opt.kernels[("bwd", "Q GEMM tileᵀ·x̂")].time_s * 2)
