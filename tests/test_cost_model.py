"""benchmarks/cost_model.py: its counts against hand computation on a tiny shape, and its
launches against the launches the Triton objective actually makes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from benchmarks import cost_model, device
from unitsface_kernels.triton.config import FusedConfig, GemmTiles

T = GemmTiles(128, 128, 64, 8, 3)
# B = 256, |S| = 1000, D = 128 in chunks of 512 classes: (0, 512) and (512, 488), each ∂x
# product in 2 split-K slices of 256 classes (the last one 232)
CFG = FusedConfig(T, T, T, chunk=512, splits=2)


def _entry(m, phase, name):
    found = [k for k in m.kernels if (k.phase, k.name) == (phase, name)]
    assert len(found) == 1, (phase, name, found)
    return found[0]


def test_counts_by_hand():
    m = cost_model.fused_unitsface(256, 128, 1000, dtype=torch.bfloat16, form="pairs", config=CFG)
    b, d, e = 256, 128, 2
    cols = 1024  # 1000 classes in whole 128-wide tiles: 4 per chunk
    cos = _entry(m, "forward", "_cos_kernel")
    assert cos.launches == 2
    # W and bank tiles: 2·B·cols·D each
    assert cos.flops == 2 * 2 * b * cols * d
    # 2 row blocks × 8 class tiles × 2 matrices = 32 programs, each loading 128 rows of x and
    # 128 reference rows of D bf16; the bank's g tiles (B × 1000 bf16); 5 per-row partials
    # (3 softmax, 2 USS) per class tile
    assert cos.l2 == 32 * (128 + 128) * d * e + b * 1000 * e + 5 * 8 * b * 4
    # x once per chunk, W and bank rows once with their norms, the partials
    assert cos.hbm == 2 * b * d * e + 2 * 1000 * (d * e + 4) + 5 * 8 * b * 4
    assert cos.mufu == (1 + 3) * b * 1000  # softmax: exp; pairs: exp, log, reciprocal
    dx = _entry(m, "forward", "_dx_kernel")
    # K = 256 + 256 classes per chunk (the 232-class slice padded to 256), 2 × 1 output tiles
    assert dx.flops == 2 * 2 * (2 * 128 * 128 * 512)
    # g once per feature tile (1), the bank rows once per row tile (2), the 2 slices' fp32
    # buffers read and written per chunk
    assert dx.l2 == b * 1000 * e + 2 * 1000 * d * e + 2 * (2 * b * d * 4 * 2)
    dw = _entry(m, "backward", "_dw_kernel")
    assert dw.flops == 2 * 4 * (2 * 128 * 128 * 256)  # 4 class tiles per chunk, K = B
    # g once per feature tile, x̂' once per class tile (4 + 4), the epilogue's h (2 row
    # blocks), norms, W tile and ∂W tile
    assert dw.l2 == (b * 1000 * e + 8 * b * d * e + 2 * 1000 * 4 + 1000 * 4
                     + 2 * 1000 * d * e)
    assert m.useful_flops == 5 * 2 * b * 1000 * d
    k = cos
    for dev in (device.OPTIMISTIC, device.PESSIMISTIC, MEASURED):
        assert k.time(dev) == pytest.approx(
            max(k.flops / dev.mm("cos"), k.hbm / dev.hbm_bps, k.l2 / dev.l2_bps)
            + k.mufu / dev.mufu_ops + 2 * dev.launch_s)
        assert m.time(dev) == pytest.approx(sum(k.time(dev) for k in m.kernels))
    # the measured cos rate (half the preset's) is the one the cosine tiles are timed at
    assert MEASURED.mm("cos") == 225e12 and MEASURED.mm("dw") == 450e12
    assert _entry(m, "backward", "_dw_kernel").product == "dw"


MEASURED = device.from_dict({"name": "GPU X", "mm_flops": 225e12, "hbm_bps": 3.0e12,
                             "l2_bps": 5.0e12, "mm_by_product": {"cos": 225e12, "dw": 450e12},
                             "launch_s": 3e-6, "unknown_field": 1})


@pytest.mark.parametrize("in_batch", [False, True])
def test_uss_plan_counts_its_gemms(in_batch):
    """fused_uss_loss on the engine: the forward cosines, their recomputation and ∂x (3
    GEMM-equivalents), plus ∂ref when the batch is its own reference set (4); the useful work
    is 2 (3) of them (docs/design.md §2)."""
    b, d, n = 256, 128, 1000
    m = cost_model.fused_uss(b, d, n, dtype=torch.bfloat16, form="pairs", config=CFG,
                             in_batch=in_batch)
    n = b if in_batch else n
    cols = -(-n // 128) * 128  # whole 128-wide tiles
    one = 2 * b * cols * d
    fwd = _entry(m, "forward", "_cos_kernel")
    assert (fwd.launches, fwd.flops) == (1, one)  # one launch over every column
    assert _entry(m, "backward", "_cos_kernel").flops == one
    assert _entry(m, "backward", "_dx_kernel").flops == one
    dws = [k for k in m.kernels if k.name == "_dw_kernel"]
    assert [k.flops for k in dws] == ([one] if in_batch else [])
    assert m.useful_flops == (3 if in_batch else 2) * 2 * b * n * d
    assert cost_model.PLANS["fused_uss_loss_inbatch"](b, d, 7).useful_flops == 3 * 2 * b * b * d


@pytest.mark.parametrize("form", ["pairs", "lse"])
def test_sub_centres_count_their_rows(form):
    """Sub-center ArcFace (K = 3): the W cosine tiles over KP = 4 slots per class, forward and
    backward; ∂W and ∂x over the S·K rows; the bank's tiles unchanged; the same launches as
    K = 1 (one cosine launch carries W and bank programs); useful work (4 + K) GEMMs."""
    b, d, n, k = 256, 128, 1000, 3
    one, three = (cost_model.fused_unitsface(b, d, n, dtype=torch.bfloat16, form=form,
                                             config=CFG, sub_centers=kk) for kk in (1, k))
    cols = lambda c: -(-c // 128) * 128  # noqa: E731 (whole 128-wide tiles)
    gemm = lambda c: 2 * b * cols(c) * d  # noqa: E731
    fwd = _entry(three, "forward", "_cos_kernel")
    assert fwd.flops == gemm(4 * n) + gemm(n)  # W over 4 slots per class, the bank per class
    assert _entry(three, "backward", "_cos_kernel").flops == gemm(4 * n) + (
        gemm(n) if form == "lse" else 0)
    assert _entry(three, "backward", "_dw_kernel").flops == 2 * b * cols(k * n) * d
    assert [(x.phase, x.name, x.launches) for x in one.kernels] == [
        (x.phase, x.name, x.launches) for x in three.kernels]
    assert three.useful_flops == (4 + k) * 2 * b * n * d
    assert three.time(device.PESSIMISTIC) > one.time(device.PESSIMISTIC)


def test_presets_are_the_issue_s_bracket():
    """The pessimistic inputs are L2 5.5 TB/s and mm 450 TFLOP/s; the optimistic L2 8 TB/s;
    the headline prediction is worse with the pessimistic ones, and a measured file's fields
    replace the preset's (the rest stay, the source names what was measured)."""
    pess, opt = device.PESSIMISTIC, device.OPTIMISTIC
    assert (pess.l2_bps, pess.mm_flops, opt.l2_bps, opt.mm_flops) == (5.5e12, 450e12, 8e12, 450e12)
    m = cost_model.fused_unitsface()
    assert m.time(pess) > m.time(opt)
    assert MEASURED.hbm_bps == 3.0e12 and MEASURED.mufu_ops == opt.mufu_ops
    assert MEASURED.source.startswith("measured:") and "l2_bps" in MEASURED.source
    assert device.devices(None) == [pess, opt]


def test_main_prints_every_input_and_both_predictions(tmp_path, capsys):
    """`python -m benchmarks.cost_model --inputs FILE`: the inputs of every device and the
    headline predicted with the measured, the pessimistic and the optimistic ones."""
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps(device.to_dict(MEASURED)))
    cost_model.main(["--inputs", str(path)])
    out = capsys.readouterr().out
    m = cost_model.fused_unitsface()
    for dev in (MEASURED, device.PESSIMISTIC, device.OPTIMISTIC):
        assert f"device inputs: {dev.name}" in out
        assert f"predicted {1e3 * m.time(dev):.3f} ms with the {dev.name} inputs" in out
    assert "L2               5.50 TB/s" in out and "mm rate           225 TFLOP/s" in out


class _Recorder:
    """Stands in for a Triton kernel: records each launch's grid and tiles, then runs it
    outside any dispatch mode (the interpreter's own tensor traffic is not the host code's)."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append((self.kernel.fn.__name__, tuple(grid),
                             dict(zip(self.kernel.arg_names, args), **kw)))
            with _disable_current_modes():
                return self.kernel[grid](*args, **kw)
        return launch


class _TorchOps(TorchDispatchMode):
    """Counts the tensor operations that launch a kernel on a GPU, by phase."""

    NO_KERNEL = {"empty", "new_empty", "view", "detach", "select", "slice", "alias",
                 "as_strided", "expand", "t", "unsqueeze", "_reshape_alias", "reshape"}

    def __init__(self):
        super().__init__()
        self.phase, self.counts = "forward", {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.NO_KERNEL:
            self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("op,form,persistent,saved", [
    ("fused_unitsface_loss", "pairs", "0", False), ("fused_unitsface_loss", "lse", "0", False),
    ("fused_uss_loss", "lse", "0", False), ("fused_uss_loss_inbatch", "pairs", "0", False),
    ("fused_unitsface_loss", "pairs", "1", False), ("fused_uss_loss", "lse", "1", False),
    ("fused_unitsface_loss", "lse", "resident", False),
    ("fused_uss_loss", "pairs", "resident", False),
    ("fused_unitsface_loss", "pairs", "0", True),
    ("fused_unitsface_loss", "lse", "resident", True)])
def test_model_follows_the_launches(op, form, persistent, saved, monkeypatch):
    """The model's launches and FLOPs of every Triton kernel are those that the op makes
    (here under the interpreter's configuration, with a program per cosine tile or with
    persistent programs of either kind, with or without the stored exponentials), forward
    and backward, and its "torch" rows hold the tensor operations that the host code
    dispatches (the Triton host functions called as the op's autograd calls them)."""
    from unitsface_kernels import options
    from unitsface_kernels.triton import finish, fused, norms, uss_loss
    from unitsface_kernels.triton.config import PERSISTENT_KNOB, fused_config

    monkeypatch.setenv(PERSISTENT_KNOB, persistent)
    streams = ("_cos_stream_kernel", "_cos_resident_kernel")
    log = []
    dws = ("_dw_kernel", "_dw_resident_kernel")
    for mod, names in ((fused, ("_cos_kernel", *streams, "_exps_grad_kernel", "_dx_kernel",
                                *dws)),
                       (norms, ("_row_norms_kernel",)),
                       (finish, ("_merge_kernel", "_tangent_kernel", "_unit_rows_kernel"))):
        for name in names:
            monkeypatch.setattr(mod, name, _Recorder(getattr(mod, name), log))
    g = torch.Generator().manual_seed(0)
    b, d, c = 37, 70, 301
    x = torch.randn(b, d, generator=g)
    w = torch.randn(c, d, generator=g)
    bank = torch.randn(c, d, generator=g)
    bias = torch.tensor([5.0])
    labels = torch.randint(0, c, (b,), generator=g)
    go = torch.rand(b, generator=g)
    ops = _TorchOps()
    if op == "fused_unitsface_loss":
        o = options.unitsface_options(
            scale=64.0, margin_arc=0.0, margin_cos=0.4, arcface_grad="exact",
            easy_margin=False, uss_margin=0.1, uss_form=form, uss_weight=1.0,
            official_clamp=False, saved_exp_bytes=(1 << 40) if saved else 0).pack()
        with ops:
            out = fused.fused_forward(x, w, bank, labels, None, None, bias, None, o, True)
            ops.phase = "backward"
            fused.fused_backward(go, x, w, bank, labels, None, None, bias, None, *out[1:], o,
                                 [True, True, True])
        plan = cost_model.fused_unitsface
    else:
        in_batch = op == "fused_uss_loss_inbatch"
        ref, ref_labels = (x, labels) if in_batch else (bank, torch.arange(c))
        o = options.uss_options(scale=64.0, margin=0.1, form=form, official_clamp=True,
                                in_batch=in_batch).pack()
        with ops:
            out = uss_loss.uss_forward(x, ref, labels, ref_labels, None, bias, o)
            ops.phase = "backward"
            uss_loss.uss_backward(go, x, ref, labels, ref_labels, None, bias, *out[1:], o,
                                  [True, in_batch, True])
        plan = cost_model.PLANS[op]
    cfg = fused_config(d, torch.device("cpu"), torch.float32)
    m = plan(b, d, c, dtype=torch.float32, form=form, config=cfg,
             **(dict(saved_exps=True) if saved else {}))
    launched, several = {}, False
    for name, grid, kw in log:
        n, flops = launched.get(name, (0, 0))
        tile, tiles = 0, math.prod(grid)
        if name in ("_cos_kernel", *streams, *dws):
            k = (b if name in dws else d)
            tile = 2 * kw["BLOCK_M"] * kw["BLOCK_N"] * math.ceil(k / kw["BK"]) * kw["BK"]
        if name in streams:  # every tile of the chunk, whatever the programs
            tiles = kw["n_row_blocks"] * math.ceil(kw["n_cols"] / kw["BLOCK_N"])
            assert math.prod(grid) <= tiles
            several |= math.prod(grid) < tiles  # programs that run more than one tile
        if name == "_dw_resident_kernel":
            tiles = kw["n_feat_tiles"] * math.ceil(kw["n_cols"] / kw["BLOCK_M"])
            assert math.prod(grid) <= tiles
        launched[name] = (n + 1, flops + tile * tiles)
    kind = {"1": "_cos_stream_kernel", "resident": "_cos_resident_kernel"}.get(persistent)
    assert [s for s in streams if s in launched] == ([kind] if kind else [])
    assert several == (kind is not None) and ("_cos_kernel" in launched) == (kind is None)
    assert ("_exps_grad_kernel" in launched) == saved
    if op == "fused_unitsface_loss":  # (∂W: x̂' resident with the resident cosine programs)
        assert [n for n in dws if n in launched] == [dws[persistent == "resident"]]
    for name, (n, flops) in launched.items():
        kernels = [k for k in m.kernels if k.name == name]
        assert sum(k.launches for k in kernels) == n, (name, n)
        if flops:
            assert sum(k.flops for k in kernels) == flops, name
    assert set(launched) == {k.name for k in m.kernels} - {"torch"}
    modelled = {ph: sum(k.launches for k in m.kernels if (k.phase, k.name) == (ph, "torch"))
                for ph in ("forward", "backward")}
    assert {ph: ops.counts.get(ph, 0) for ph in modelled} == modelled


@pytest.mark.cuda
def test_measure_finds_every_kernel():
    """On a GPU, the profiler's kernels are attributed to the model's (phase, kernel) rows."""
    measured, step = cost_model.measure(256, 128, 4096, repeats=1)
    m = cost_model.fused_unitsface(256, 128, 4096)
    assert {(k.phase, k.name) for k in m.kernels} <= set(measured), measured
    assert step > 0 and all(v > 0 for v in measured.values())


def test_stream_kernel_reads_what_it_sums():
    """benchmarks.ceilings' bandwidth kernel: program p sums blocks p, p + P, ... (wrapping),
    so its bytes are the bytes it is credited with (here under the interpreter on the CPU)."""
    from benchmarks.ceilings import stream_sum
    src = torch.randn(5 * 64, generator=torch.Generator().manual_seed(0))
    out = stream_sum(src, programs=3, iters=4, block=64)
    blocks = src.view(5, 64)
    want = torch.stack([sum(blocks[(p + i * 3) % 5] for i in range(4)) for p in range(3)])
    torch.testing.assert_close(out, want.flatten())
    with pytest.raises(ValueError, match="multiple of block"):
        stream_sum(src[:100], 1, 1, 64)
