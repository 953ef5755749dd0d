"""The persistent cosine launches (FusedConfig.persistent, docs/design.md §2) against the
launch of a program per tile.

UNITSFACE_TRITON_PERSISTENT=1 (fused._cos_stream_kernel): the same tiles, K steps and
epilogues, so the same numbers — bitwise under the interpreter, and to the last bits on a
GPU, where the two kernels are compiled apart. Under the interpreter a launch has 2
programs, so that the programs run the flat loop over several tiles (the shapes below give a
launch 4–12 tiles, the in-batch backward 2), crossing from one tile's epilogue into the next
tile's K steps.

=resident (fused._cos_resident_kernel, FusedConfig.resident): its own tiles (32 × 16 under
the interpreter, the x row block loaded once per program, one product over all of D per
tile), so the same numbers up to the order of the sums: within torch's tolerance for the
dtype. Its programs own a row block each and stream that block's column tiles: the batch
sizes of :func:`test_resident_lanes` give a row block 1 or 2 programs and a launch 1–4 row
blocks.

Each op family, both USS forms, partial FC, per-class thresholds, the margin family's W
epilogues and every dtype the kernels take. With K sub-centres the launch stays a program
per tile (checked too: the persistent kernels have no sub-centres)."""

from __future__ import annotations

import pytest
import torch

from unitsface_kernels import fused_unitsface_loss
from unitsface_kernels.triton.config import PERSISTENT_KNOB

from helpers import INTERPRETING, make_case, passes_gradcheck, run
from test_triton_margins import _inputs, _options, _run

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               torch.cuda.is_available(), reason="Triton's interpreter runs where no GPU is")),
           pytest.param("cuda", marks=pytest.mark.cuda)]


MODES = ["1", "resident"]


def _same(a: torch.Tensor, b: torch.Tensor, what: str, mode: str = "1") -> None:
    """Mode 1: bitwise under the interpreter (NaN where NaN); on a GPU within torch's
    tolerance for the dtype (a rounding of the last bit apart, should the two kernels'
    epilogues compile to different FMA contractions). Resident (other tiles, other orders of
    the sums): a relative error of the dtype's precision (at least fp32's default tolerance)
    and an absolute one of that precision at the tensor's largest magnitude — the gradient
    tiles of 2-byte dtypes are rounded to them, and a cosine a few ulp apart can round its g
    the other way."""
    if INTERPRETING and mode == "1":
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(),
                                                                   b.nan_to_num()), what
    elif mode == "1" or not b.is_floating_point() or b.numel() == 0:
        torch.testing.assert_close(a, b, equal_nan=True, msg=what)
    else:
        eps = torch.finfo(b.dtype).eps
        atol = max(eps * b.nan_to_num().abs().max().item(), 1e-5)
        torch.testing.assert_close(a, b, equal_nan=True, atol=atol, rtol=max(eps, 1.3e-6),
                                   msg=what)


def _both(monkeypatch, fn, mode="1"):
    """fn() with a program per tile, then with persistent programs of `mode`."""
    monkeypatch.setenv(PERSISTENT_KNOB, "0")
    per_tile = fn()
    monkeypatch.setenv(PERSISTENT_KNOB, mode)
    return per_tile, fn()


CASES = {
    "objective pairs, sampled": dict(family="unitsface", sampled=True, rate=0.8),
    "objective lse, b_j": dict(family="unitsface", vector_bias=True, uss_form="lse"),
    "objective pairs b_j, arc": dict(family="unitsface", vector_bias=True, margin_arc=0.5,
                                     margin_cos=0.0),
    "softmax arc, sampled": dict(family="softmax", sampled=True, rate=0.8, margin_arc=0.5,
                                 margin_cos=0.0),
    "uss bank pairs": dict(family="uss", mode="bank"),
    "uss bank lse, clamp": dict(family="uss", mode="bank", form="lse", official_clamp=True),
    "uss in-batch": dict(family="uss", mode="inbatch"),
    "uss centres, b_j": dict(family="uss", mode="centres", vector_bias=True),
}
_CASE_KEYS = {"family", "sampled", "rate", "vector_bias", "mode"}
# every case in fp32; the 2-byte dtypes (rounded operand tiles and g tiles; fp16's g unscaled,
# its products normalising their operands) on the objective and the bank
RUNS = ([(name, torch.float32) for name in CASES]
        + [(name, dt) for dt in (torch.bfloat16, torch.float16)
           for name in ("objective pairs, sampled", "uss bank pairs")])


def _compare(monkeypatch, name, dtype, device, mode, rows=37):
    spec = CASES[name]
    case = make_case(spec["family"], rows, 161, 70, dtype, device, seed=3,
                     **{k: v for k, v in spec.items() if k in _CASE_KEYS - {"family"}})
    kw = {k: v for k, v in spec.items() if k not in _CASE_KEYS}
    (loss0, grads0), (loss1, grads1) = _both(monkeypatch, lambda: run(case, "triton", **kw),
                                             mode)
    assert loss0.isfinite().all()
    _same(loss1, loss0, "loss", mode)
    for k in grads0:
        _same(grads1[k], grads0[k], f"∂{k}", mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,dtype", RUNS, ids=[f"{n}-{str(t)[6:]}" for n, t in RUNS])
def test_persistent_launch_equals_a_program_per_tile(monkeypatch, device, name, dtype, mode):
    _compare(monkeypatch, name, dtype, device, mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 20, 100])
def test_resident_lanes(monkeypatch, device, rows):
    """Resident programs at batch sizes that give a row block two programs (B ≤ 32 under the
    interpreter: each takes every other column tile) or one, and a launch up to 4 row
    blocks (B = 100, more than the 2 programs asked for: the launch grows to one per row
    block)."""
    _compare(monkeypatch, "objective pairs, sampled", torch.float32, device, "resident", rows)


FAMILY = {
    "curricular+filter+row margins": dict(margin_arc=0.3, row_margins=True, curricular=True,
                                          interclass_threshold=0.6),
    "adaface": dict(row_margins=True, angle_clip=True),
    "arc K=3 (a program per tile)": dict(margin_arc=0.5, sub_centers=3.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(FAMILY))
def test_margin_family_persistent(monkeypatch, device, name, mode):
    """The W programs' epilogues of the margin family, the objective's pairs form with its
    row gradients (the forward's bank launch stores g tiles for ∂x)."""
    o = _options(True, uss_form="pairs", **FAMILY[name])
    args = [a.to(device) if isinstance(a, torch.Tensor) else a
            for a in _inputs(o, torch.float32, sampled=True, with_bank=True)]
    needs = [True, True, True]
    (fwd0, bwd0), (fwd1, bwd1) = _both(monkeypatch,
                                       lambda: _run("triton", args, needs, row_grads=True), mode)
    for i, (a, b) in enumerate(zip(fwd0, fwd1)):
        _same(b, a, f"forward output {i}", mode)
    for i, (a, b) in enumerate(zip(bwd0, bwd1)):
        _same(b, a, f"backward output {i}", mode)


@pytest.mark.parametrize("form", ["pairs", "lse"])
def test_resident_gradcheck(monkeypatch, form):
    """float64 gradcheck of the objective through the resident cosine programs (their tiles
    are for 2-byte dtypes on a GPU; the interpreter runs them in any dtype): 3 column tiles
    of 16 among a row block's 2 programs, partial FC, an empty bank slot."""
    if not INTERPRETING:
        pytest.skip("the resident programs take float64 under Triton's interpreter only")
    monkeypatch.setenv(PERSISTENT_KNOB, "resident")
    case = make_case("unitsface", 7, 60, 6, torch.float64, "cpu", seed=5, sampled=True,
                     rate=0.6)

    def f(x, w, bias):
        return fused_unitsface_loss(x, case["labels"], w, case["bank"], bias,
                                    bank_valid=case["bank_valid"], index=case["index"],
                                    scale=8.0, margin_arc=0.3, margin_cos=0.1, uss_form=form,
                                    uss_weight=0.5, reduction="none", backend="triton")

    inputs = [case[k].clone().requires_grad_() for k in ("x", "centres", "bias")]
    assert passes_gradcheck(f, inputs, "triton")
