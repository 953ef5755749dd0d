"""Cost model of the Triton objective kernels: FLOPs and bytes per kernel, predicted GPU time.

    python -m benchmarks.cost_model                     # headline + partial FC 1M at rate 0.1
    python -m benchmarks.cost_model --classes 10000 --form lse
    python -m benchmarks.cost_model --inputs inputs.json --measure   # on a GPU (gpu_suite.sh)
    python -m benchmarks.cost_model --sub-centers 3                  # sub-center ArcFace

For the launch configuration that unitsface_kernels/triton/fused.py actually runs with on a
GPU (its `plan`: class chunks, tiles, grids, split-K slices; valid on any machine, since the
plan only needs the GPU's tile table), every kernel launch of one forward + backward of
``fused_unitsface_loss`` is counted:

- FLOPs: the tensor-core work of the tiles as launched (padding included: a partial last
  tile costs a whole one);
- L2 bytes: what all programs load and store, tile by tile (an operand reloaded by every
  program that needs it is counted every time: this is where tile shapes matter);
- HBM bytes: the compulsory traffic — each launch reads its operands' distinct rows once and
  writes its outputs once; the gradient tiles g of a class chunk (B × chunk, sized by
  FusedConfig.chunk_bytes to stay in L2) and the split-K partial sums are counted in L2
  only (``--g-in-hbm`` counts g's round trip in HBM too: the bound if L2 does not keep it);
- transcendentals (MUFU instructions: ex2, lg2, rcp) of the loss epilogues, per element.

Predicted time of a kernel = max(FLOPs / mm rate of its product, HBM / HBM bandwidth, L2 / L2
bandwidth) + transcendentals / MUFU rate + launches × launch gap. Triton's kernels run their
epilogue after their K loop (no warp specialisation), so the epilogue is added, not
overlapped — except the persistent cosine launches (``--persistent``, ``--persistent
resident``), whose next tile's loads are in flight during an epilogue: there it counts beside
the memory terms, max(FLOPs / mm rate + epilogue, HBM, L2). The resident programs' L2 bytes
are the x row block once per program and each reference tile once per row block; their
products (wgmma m64n32k16, both operands from shared memory: 21 FLOP per byte of shared
memory at 128 × 32 in bf16, ≈ 600 TFLOP/s at 128 B per clock per SM) are counted at the
mm rate like the others. The epilogue's other ALU work (masks, selects, scaling) is not
modelled, nor is the pipeline's fill at the start of each program's tile, which the measured
times beside the predictions (benchmarks/gpu_suite.sh, ``--measure``) show. The finishing
over O(B·D + tiles·B) numbers (merging the statistics, the normalisation's projection, x̂')
runs as finish.py's kernels, one launch each; what is left to torch ("torch" rows: ∂b, the
lse form's zero row gradients) is the tensor ops that the host code dispatches, which
tests/test_cost_model.py counts with a TorchDispatchMode.

Every rate is a parameter (:class:`benchmarks.device.Device`): the model prints its
prediction with the pessimistic inputs (L2 5.5 TB/s, mm 450 TFLOP/s), the optimistic ones
(L2 8 TB/s) and, given ``--inputs`` (the JSON that ``python -m benchmarks.ceilings``
writes on a GPU), the measured ones.

One function per launch plan (``PLANS``): :func:`fused_unitsface` counts
``fused_unitsface_loss``, :func:`fused_uss` counts ``fused_uss_loss`` (a memory bank, or the
batch itself: ``--op fused_uss_loss_inbatch``); another op's plan is another function of the
same signature.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from dataclasses import dataclass, field

import torch

from .device import H200, OPTIMISTIC, PESSIMISTIC, Device, devices  # noqa: F401 (H200: head_step)


@dataclass
class Kernel:
    """One kernel's launches in one phase, summed."""

    phase: str        # "forward" or "backward"
    name: str         # the Triton kernel (or "torch" for the host-side finishing)
    what: str
    product: str | None = None  # the GEMM shape it runs (device.PRODUCTS), for its mm rate
    launches: int = 0
    flops: float = 0.0
    hbm: float = 0.0  # bytes
    l2: float = 0.0   # bytes
    mufu: float = 0.0  # transcendental instructions
    streamed: bool = False  # persistent programs: the epilogue runs under the next loads

    def terms(self, dev: Device) -> dict:
        return {"mm": self.flops / dev.mm(self.product), "HBM": self.hbm / dev.hbm_bps,
                "L2": self.l2 / dev.l2_bps}

    def time(self, dev: Device = OPTIMISTIC) -> float:
        """Predicted seconds on `dev`: the epilogue's transcendentals after the main term, or
        (``streamed``) beside the memory terms, which keep loading the next tile meanwhile,
        though not beside the program's own MMAs."""
        terms = self.terms(dev)
        epilogue = self.mufu / dev.mufu_ops
        if self.streamed:
            main = max(terms["mm"] + epilogue, terms["HBM"], terms["L2"])
        else:
            main = max(terms.values()) + epilogue
        return main + self.launches * dev.launch_s

    def bound(self, dev: Device = OPTIMISTIC) -> str:
        """Which of FLOPs, HBM and L2 sets the kernel's main term."""
        terms = self.terms(dev)
        return max(terms, key=terms.get)


@dataclass
class Model:
    kernels: list[Kernel] = field(default_factory=list)
    useful_flops: float = 0.0   # 2·B·|S|·D per GEMM the maths needs (docs/design.md §7)
    chunks: tuple = (0, 0)      # class chunks of the forward and of the backward

    def add(self, phase, name, what, product=None, **counts) -> None:
        """Adds one launch's counts to the (phase, name, what) entry."""
        for k in self.kernels:
            if (k.phase, k.name, k.what) == (phase, name, what):
                break
        else:
            k = Kernel(phase, name, what, product,
                       streamed=name in (_STREAM, _RESIDENT, _DW_RESIDENT))
            self.kernels.append(k)
        k.launches += counts.pop("launches", 1)
        for key, v in counts.items():
            setattr(k, key, getattr(k, key) + v)

    def time(self, dev: Device = OPTIMISTIC) -> float:
        return sum(k.time(dev) for k in self.kernels)

    def host_s(self, dev: Device = OPTIMISTIC) -> float:
        """The host's time to enqueue the step (Triton launches from Python, torch ops): the
        device cannot run ahead of it."""
        return sum(k.launches * (dev.host_kernel_s if k.name == "torch" else dev.host_triton_s)
                   for k in self.kernels)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Transcendentals per element of a tile's epilogue (MUFU instructions). Softmax, lse USS and
# the backward's probabilities: one exp (ex2). Pairs USS forward (maths.softplus_sigmoid):
# one exp, one log and one reciprocal (σ and log1p's correction share 1/(1 + e)); its
# backward: σ, one exp and one reciprocal.
_MUFU = {"softmax": 1, "uss_pairs_fwd": 3, "uss_pairs_bwd": 2, "uss_lse": 1}


def fused_unitsface(b: int = 512, d: int = 512, n_classes: int = 100_000, *,
                    dtype=torch.bfloat16, form: str = "pairs", rate: float = 1.0,
                    total_classes: int | None = None, sparse_grad: bool = False,
                    g_in_hbm: bool = False, config=None, sub_centers: int = 1,
                    saved_exps: bool = False) -> Model:
    """The counts of one fused_unitsface_loss forward + backward (CosFace + λ·USS on a bank
    with a scalar threshold; x, W and b take gradients) at B = b, width d, |S| = n_classes
    sampled classes (of `total_classes`, when partial FC samples them: rate < 1), as
    fused.plan lays it out for a GPU (`config`: a FusedConfig instead of the GPU default).

    ``sub_centers`` K > 1 (sub-center ArcFace, docs/design.md §1.5): the W programs of a
    class tile are KP = K rounded up to a power of two programs over (sub-centre, class)
    slots (the cosine tiles of W cost KP× CosFace's, forward and backward), the ∂W and ∂x
    products run over the |S|·K rows, the bank's stay per class. The maths needs the cosines
    of all S·K rows, but the gradient of the arg-max row of each class only: useful work
    counts 2·B·S·K·D for the forward W GEMM and 2·B·S·D for each of ∂x and ∂W. The margin
    family's other settings add no FLOPs or bytes: per-row terms (O(B), made once per call)
    and a compare, a select and an FMA per element of the W epilogue, ALU work this model
    does not count (the measured times beside it do).

    ``saved_exps`` (``saved_exp_bytes`` ≥ B·|S| in x's dtype, K = 1): the forward's W
    programs also write their exponentials e' (B·|S|, to HBM: they outlive the step's L2),
    and the backward reads them in fused._exps_grad_kernel instead of the W programs'
    products: 5 GEMM-equivalents instead of 6 in the pairs form."""
    from unitsface_kernels.triton.fused import exp_group_width, forward_w_alone, plan

    cuda = torch.device("cuda")
    e = torch.empty((), dtype=dtype).element_size()
    acc = 4
    lse = form == "lse"
    indexed = rate < 1.0
    s_cls = n_classes
    k = sub_centers
    kp = 1 << (k - 1).bit_length()  # the W programs per class tile
    assert k == 1 or not saved_exps, "sub-centres keep the W products (keeps_exps)"
    m = Model()
    m.useful_flops = (4 + k) * 2 * b * s_cls * d

    def cos_launch(phase, p, n_cols, *, w, bank, bank_g, row_outs, col_outs, mufu):
        """_cos over a chunk: its W programs (over n_cols·KP slots) and bank programs."""
        if k == 1 or not w:
            _cos(m, phase, p, b, n_cols, d, e, acc, mats=int(w) + int(bank),
                 g_bufs=int(w and phase == "backward") + int(bank_g), row_outs=row_outs,
                 col_outs=col_outs, indexed=indexed, mufu=mufu, g_in_hbm=g_in_hbm,
                 stream=bool(p.config.persistent))
            return
        _cos(m, phase, p, b, n_cols * kp, d, e, acc, mats=1, g_bufs=0, row_outs=row_outs,
             col_outs=col_outs, indexed=indexed, mufu=mufu, g_in_hbm=g_in_hbm)
        if phase == "backward":  # the gradient tile: K columns per class
            m.add(phase, "_cos_kernel", "cosine tiles + loss epilogue", "cos", launches=0,
                  l2=b * n_cols * k * e, hbm=b * n_cols * k * e if g_in_hbm else 0)
        if bank:
            _cos(m, phase, p, b, n_cols, d, e, acc, mats=1, g_bufs=int(bank_g), row_outs=0,
                 col_outs=0, indexed=indexed, mufu=0, g_in_hbm=g_in_hbm)
            m.add(phase, "_cos_kernel", "cosine tiles + loss epilogue", "cos", launches=-1)

    # ---- forward (fused.fused_forward): norms, then per chunk the cosine tiles of W and of
    # the bank (+ the bank's ∂x product in the pairs form: the forward forms that part)
    fwd = plan(b, s_cls, d, dtype, cuda, 0 if lse else 1, config, sub_centres=k)
    group = exp_group_width(fwd)  # columns per stored maximum
    for rows, vec in ((b, False), (s_cls, indexed), (s_cls, indexed)):
        m.add("forward", "_row_norms_kernel", "‖x‖, ‖W[S]‖, ‖bank[S]‖",
              hbm=rows * d * e + rows * acc + (rows * 8 if vec else 0),
              l2=rows * d * e + rows * acc)
    uss_mufu = _MUFU["uss_lse"] if lse else _MUFU["uss_pairs_fwd"]
    w_alone = forward_w_alone(fwd, saved_exps)  # W's tiles in one launch over all of S
    if w_alone:
        _cos(m, "forward", fwd, b, s_cls, d, e, acc, mats=1, g_bufs=0, row_outs=3, col_outs=0,
             indexed=indexed, mufu=_MUFU["softmax"], g_in_hbm=g_in_hbm,
             stream=bool(fwd.config.persistent))
    if saved_exps:  # e' of the W tiles, their groups' maxima, the target cosines
        kept = b * s_cls * e + b * _cdiv(s_cls, group) * acc + b * acc
        m.add("forward", _cos_name(fwd), "cosine tiles + loss epilogue", "cos", launches=0,
              l2=kept, hbm=kept)
    for _, n_cols in fwd.chunks():
        if w_alone:
            _cos(m, "forward", fwd, b, n_cols, d, e, acc, mats=1, g_bufs=int(not lse),
                 row_outs=4 if lse else 2, col_outs=0, indexed=indexed, mufu=uss_mufu,
                 g_in_hbm=g_in_hbm, stream=bool(fwd.config.persistent))
        else:
            cos_launch("forward", fwd, n_cols, w=True, bank=True, bank_g=not lse,
                       row_outs=3 + (4 if lse else 2), col_outs=0,
                       mufu=_MUFU["softmax"] + uss_mufu)
        if not lse:
            _dx(m, "forward", fwd, b, n_cols, d, e, acc, mats=1, indexed=indexed,
                g_in_hbm=g_in_hbm)
    tiles = fwd.class_tiles
    _merge(m, tiles, kp, b, acc, softmax=True, uss_slots=4 if lse else 2)
    if saved_exps:  # exp_rows' target row zeroed (a row's target may lie in no column)
        m.add("forward", "torch", "exp_rows' target row", hbm=b * acc, l2=b * acc)
    if lse:  # the pairs part's row gradients, zeros here (the backward forms every part)
        zeros = b * d * acc + b * acc
        m.add("forward", "torch", "zero row gradients", hbm=zeros, l2=zeros, launches=2)
    else:
        _tangent(m, "forward", fwd.splits, b, d, acc, acc, e, extra=False)

    # ---- backward (fused.fused_backward): x̂' = go·x̂ once, then per chunk the cosine tiles
    # of W (+ bank for lse: its statistics are global), ∂W = g̃ᵀ·x̂', ∂x += g̃·W (+ g̃'·bank)
    bwd = plan(b, s_cls, d, dtype, cuda, 2 if lse else 1, config, sub_centres=k)
    m.chunks = (fwd.n_chunks, bwd.n_chunks)
    _unit_rows(m, b, d, e, acc)
    for _, n_cols in bwd.chunks():
        if saved_exps:
            _exps_grad(m, bwd, b, n_cols, e, acc, group, g_in_hbm=g_in_hbm)
        if lse or not saved_exps:
            cos_launch("backward", bwd, n_cols, w=not saved_exps, bank=lse, bank_g=lse,
                       row_outs=1 if lse else 0, col_outs=0 if saved_exps else 1,
                       mufu=(0 if saved_exps else _MUFU["softmax"])
                       + (_MUFU["uss_lse"] if lse else 0))
        _dw(m, bwd, b, n_cols * k, d, e, acc, indexed=indexed, g_in_hbm=g_in_hbm)
        if k == 1:
            _dx(m, "backward", bwd, b, n_cols, d, e, acc, mats=2 if lse else 1,
                indexed=indexed, g_in_hbm=g_in_hbm)
        else:  # the W rows' product over S·K rows, the bank's (lse) over S
            _dx(m, "backward", bwd, b, n_cols * k, d, e, acc, mats=1, indexed=indexed,
                g_in_hbm=g_in_hbm)
            if lse:
                _dx(m, "backward", bwd, b, n_cols, d, e, acc, mats=1, indexed=indexed,
                    g_in_hbm=g_in_hbm)
                m.add("backward", "_dx_kernel", "∂x += g̃·R (split-K)", "dx", launches=-1)
    _tangent(m, "backward", bwd.splits, b, d, acc, e, e, extra=not lse)
    # ∂b: lse Σ over the tiles of the row sums, then Σ_i go_i·(·)/−s; pairs Σ_i go_i·db_rows_i
    db = (tiles * b * acc + 3 * b * acc) if lse else 2 * b * acc
    m.add("backward", "torch", "∂b", hbm=db, l2=db, launches=4 if lse else 2)
    if indexed and not sparse_grad:
        # autograd's dense C × D gradient of W: zeros, then the |S| rows copied in
        # (contract._scatter_rows); with sparse_grad the |S| rows are passed on as they are
        dense = (total_classes or s_cls) * d * e + 2 * s_cls * d * e
        m.add("backward", "torch", "dense ∂W (sparse_grad=False)", hbm=dense, l2=dense,
              launches=2)
    return m


_STREAM = "_cos_stream_kernel"
_RESIDENT = "_cos_resident_kernel"
_DW_RESIDENT = "_dw_resident_kernel"


def _cos_name(p) -> str:
    """The cosine kernel that plan p launches (fused.cos_launch)."""
    if not p.config.persistent:
        return "_cos_kernel"
    return _RESIDENT if p.config.resident else _STREAM


def _exps_grad(m, p, b, n_cols, e, acc, width, *, g_in_hbm):
    """fused._exps_grad_kernel on one chunk: a program per (row block, 128 columns) reads
    the stored e' (HBM) and the maxima of the forward's `width`-column groups, and writes
    the g̃ tile and the per-column Σ go·g·cos of ∂W's projection, as the W programs would;
    one log per element (cos from e', for the clamp rule and the projection sums; p is e'
    times one exponential per row and group)."""
    maxima = b * _cdiv(n_cols, width) * acc
    cols = p.row_blocks * n_cols * acc
    g = b * n_cols * e
    m.add("backward", "_exps_grad_kernel", "W tiles from the stored exponentials",
          launches=1, l2=b * n_cols * e + maxima + cols + g,
          hbm=b * n_cols * e + maxima + cols + (g if g_in_hbm else 0),
          mufu=b * n_cols + b * _cdiv(n_cols, width))


def _cos(m, phase, p, b, n_cols, d, e, acc, *, mats, g_bufs, row_outs, col_outs, indexed,
         mufu, g_in_hbm, stream=False):
    """fused._cos_kernel on one chunk: a program per (row block, class tile, matrix), K = D;
    with `stream` (FusedConfig.persistent, K = 1) fused._cos_stream_kernel instead, the same
    tiles from persistent programs, one launch per matrix, or with FusedConfig.resident
    fused._cos_resident_kernel, whose programs load their x row block once."""
    from unitsface_kernels.triton.fused import resident_programs

    t = p.config.cos
    rb, ct = p.row_blocks, _cdiv(n_cols, t.block_n)
    tiles = rb * ct * mats
    k = _cdiv(d, t.bk) * t.bk
    g = g_bufs * b * n_cols * e  # the gradient tiles written (forward pairs: the bank's)
    resident = stream and p.config.resident
    if resident:  # each program's row block once, each reference tile once per row block
        operands = mats * (resident_programs(p, n_cols) * t.block_m + rb * ct * t.block_n)
    else:  # each tile: its row block of x and its class tile of W or the bank, all of D
        operands = tiles * (t.block_m + t.block_n)
    m.add(phase, _cos_name(p) if stream else "_cos_kernel", "cosine tiles + loss epilogue", "cos",
          launches=mats if stream else 1,
          flops=2 * t.block_m * t.block_n * k * tiles,
          l2=operands * d * e + g
          + (row_outs * ct * b + col_outs * rb * n_cols) * acc,
          hbm=b * d * e + mats * n_cols * (d * e + acc) + (mats * n_cols * 8 if indexed else 0)
          + (row_outs * ct * b + col_outs * rb * n_cols) * acc + (g if g_in_hbm else 0),
          mufu=mufu * b * n_cols)


def _dw(m, p, b, n_cols, d, e, acc, *, indexed, g_in_hbm):
    """fused._dw_kernel on one chunk: a program per (class tile, feature tile), K = B; with
    Plan.dw_resident fused._dw_resident_kernel, persistent programs that load their x̂'
    block (all B rows × a feature tile) once and stream the g̃ column tiles (their epilogue
    beside the next tile's loads, as the persistent cosine programs')."""
    from unitsface_kernels.triton.fused import resident_dw_programs

    t = p.dw_resident or p.config.dw
    ct, ft = _cdiv(n_cols, t.block_m), _cdiv(d, t.block_n)
    progs = ct * ft
    k = _cdiv(b, t.bk) * t.bk
    g = b * n_cols * e
    # each program: all B rows of its g̃ columns and of its x̂' features (resident: the x̂'
    # block once per program); the epilogue reads h (one per row block), the norms and the
    # W tile, and writes the ∂W tile
    epi = p.row_blocks * n_cols * acc * ft + n_cols * acc * ft + 2 * n_cols * d * e
    if p.dw_resident is not None:
        x_reads = resident_dw_programs(p, n_cols) * b * t.block_n * e
        name = _DW_RESIDENT
    else:
        x_reads, name = b * d * e * ct, "_dw_kernel"
    m.add("backward", name, "∂W = g̃ᵀ·x̂' + projection", "dw",
          flops=2 * t.block_m * t.block_n * k * progs,
          l2=g * ft + x_reads + epi,
          hbm=b * d * e + p.row_blocks * n_cols * acc + n_cols * acc + 2 * n_cols * d * e
          + (n_cols * 8 if indexed else 0) + (g if g_in_hbm else 0))


def _dx(m, phase, p, b, n_cols, d, e, acc, *, mats, indexed, g_in_hbm):
    """fused._dx_kernel on one chunk: a program per (row tile, feature tile, split-K slice),
    adding into its slice's fp32 buffer (read back from the second chunk on)."""
    t = p.config.dx
    rt, ft = _cdiv(b, t.block_m), _cdiv(d, t.block_n)
    slices = [min(p.k_split, n_cols - s * p.k_split) for s in range(p.splits)]
    k = sum(_cdiv(max(0, s), t.bk) * t.bk for s in slices)
    g = mats * b * n_cols * e
    part = p.splits * b * d * acc * 2  # read and written (the first chunk only writes: +0)
    m.add(phase, "_dx_kernel", "∂x += g̃·R (split-K)", "dx",
          flops=2 * t.block_m * t.block_n * k * rt * ft * mats,
          l2=g * ft + mats * n_cols * d * e * rt + part,
          hbm=mats * n_cols * d * e + (mats * n_cols * 8 if indexed else 0)
          + (g if g_in_hbm else 0))


def _merge(m, tiles, kp, b, acc, *, softmax, uss_slots, uss_stats=0):
    """finish._merge_kernel: the forward partials it reads (the softmax's max, sum-exp and
    target of every slot; `uss_slots` of each column tile's first), the statistics and the
    loss rows it writes (the objective's 7 rows, or `uss_stats`, and the pairs' ∂b rows)."""
    reads = (3 * tiles * kp if softmax else 0) + uss_slots * tiles
    writes = (7 + 2 if softmax else uss_stats + 1)
    n = (reads + writes) * b * acc
    m.add("forward", "_merge_kernel", "finish: statistics, per-row loss", hbm=n, l2=n)


def _tangent(m, phase, splits, b, d, acc, x_e, out_e, *, extra):
    """finish._tangent_kernel: ∂x's normalisation from the split-K slices, read twice (the
    second time from L2), as x; dx_rows (`extra`) added, out in out_e bytes per element."""
    once = splits * b * d * acc + b * d * x_e + (b * d * acc if extra else 0) + b * d * out_e
    again = splits * b * d * acc + b * d * x_e
    m.add(phase, "_tangent_kernel", "finish: Σ slices, projection", hbm=once,
          l2=once + again)


def _unit_rows(m, b, d, e, acc):
    """finish._unit_rows_kernel: x̂' = go·x̂ in x's dtype, the ∂R product's operand."""
    n = 2 * b * d * e + 2 * b * acc
    m.add("backward", "_unit_rows_kernel", "x̂' = go·x̂", hbm=n, l2=n)


def fused_uss(b: int = 512, d: int = 512, n_classes: int = 100_000, *, dtype=torch.bfloat16,
              form: str = "pairs", rate: float = 1.0, total_classes: int | None = None,
              sparse_grad: bool = False, g_in_hbm: bool = False, config=None,
              in_batch: bool = False) -> Model:
    """The counts of one fused_uss_loss forward + backward (a scalar threshold; x and b take
    gradients) as triton/uss_loss.py lays it out: a memory bank of n_classes rows, or with
    ``in_batch`` the batch itself (N = B; the reference rows take a gradient, ∂ref through the
    ∂W-type product). No partial FC (rate, total_classes, sparse_grad are not used)."""
    from unitsface_kernels.triton.fused import plan

    cuda = torch.device("cuda")
    e = torch.empty((), dtype=dtype).element_size()
    acc = 4
    lse = form == "lse"
    n = b if in_batch else n_classes
    m = Model()
    m.useful_flops = (3 if in_batch else 2) * 2 * b * n * d

    # ---- forward (uss_forward): norms, then one cosine launch over every column (bank
    # programs alone, no gradient tile), the per-tile partials merged by the host
    fwd = plan(b, n, d, dtype, cuda, 0, config)
    for rows in (b, n):
        m.add("forward", "_row_norms_kernel", "‖x‖, ‖ref‖", hbm=rows * d * e + rows * acc,
              l2=rows * d * e + rows * acc)
    for _, n_cols in fwd.chunks():
        _cos(m, "forward", fwd, b, n_cols, d, e, acc, mats=1, g_bufs=0,
             row_outs=4 if lse else 1, col_outs=0, indexed=False,
             mufu=_MUFU["uss_lse"] if lse else _MUFU["uss_pairs_fwd"], g_in_hbm=g_in_hbm,
             stream=bool(fwd.config.persistent))
    _merge(m, fwd.class_tiles, 1, b, acc, softmax=False, uss_slots=4 if lse else 1,
           uss_stats=4)

    # ---- backward (uss_backward): x̂' = go·x̂ (in-batch), then per chunk the cosine tiles
    # (g, Σ_j g per row for ∂b), ∂ref = gᵀ·x̂' (in-batch), ∂x += g·R
    bwd = plan(b, n, d, dtype, cuda, 1, config)
    m.chunks = (fwd.n_chunks, bwd.n_chunks)
    if in_batch:
        _unit_rows(m, b, d, e, acc)
    for _, n_cols in bwd.chunks():
        _cos(m, "backward", bwd, b, n_cols, d, e, acc, mats=1, g_bufs=1, row_outs=1,
             col_outs=1 if in_batch else 0, indexed=False,
             mufu=_MUFU["uss_lse"] if lse else _MUFU["uss_pairs_bwd"], g_in_hbm=g_in_hbm,
             stream=bool(bwd.config.persistent))
        if in_batch:
            _dw(m, bwd, b, n_cols, d, e, acc, indexed=False, g_in_hbm=g_in_hbm)
        _dx(m, "backward", bwd, b, n_cols, d, e, acc, mats=1, indexed=False,
            g_in_hbm=g_in_hbm)
    _tangent(m, "backward", bwd.splits, b, d, acc, e, e, extra=False)
    db = bwd.class_tiles * b * acc + 3 * b * acc  # Σ over the tiles, Σ_i go_i·(·)/−s
    m.add("backward", "torch", "∂b", hbm=db, l2=db, launches=4)
    return m


PLANS = {"fused_unitsface_loss": fused_unitsface, "fused_uss_loss": fused_uss,
         "fused_uss_loss_inbatch": functools.partial(fused_uss, in_batch=True)}
"""The launch plans counted, by the op that runs them: each a function (b, d, n_classes, *,
dtype, form, rate, total_classes, sparse_grad, g_in_hbm, config) → Model (the in-batch USS
plan takes N = B)."""
PARTIAL_FC = ("fused_unitsface_loss",)
"""The plans that partial FC applies to (the others are counted at rate 1 only)."""


# ----------------------------------------------------------------------------- printing

def report(m: Model, title: str, devs: list[Device], measured: dict | None = None) -> str:
    """A table of the model's kernels with the predicted ms on each device of `devs` (the
    first one's bound column), and the measured ms per (phase, kernel), if given."""
    cols = "".join(f" {_short(dev):>9}" for dev in devs)
    lines = [title, f"{'phase':9} {'kernel':20} {'launch':>6} {'GFLOP':>8} {'HBM MB':>8} "
             f"{'L2 MB':>8} {'MUFU G':>7} {'bound':>5}{cols}"
             + (f" {'measured':>9}" if measured is not None else "")]
    unmatched = dict(measured or {})
    for k in m.kernels:
        row = (f"{k.phase:9} {k.name:20} {k.launches:6d} {k.flops / 1e9:8.1f} "
               f"{k.hbm / 1e6:8.1f} {k.l2 / 1e6:8.1f} {k.mufu / 1e9:7.3f} {k.bound(devs[0]):>5}"
               + "".join(f" {1e3 * k.time(dev):9.3f}" for dev in devs))
        if measured is not None:
            got = unmatched.pop((k.phase, k.name), None)
            row += f" {got:9.3f}" if got is not None else f" {'-':>9}"
        lines.append(row + f"  {k.what}")
    for dev in devs:
        total = m.time(dev)
        lines.append(f"predicted {1e3 * total:.3f} ms with the {dev.name} inputs ({dev.source}); "
                     f"useful work {m.useful_flops / 1e9:.0f} GFLOP = "
                     f"{m.useful_flops / dev.mm('cos') * 1e3:.3f} ms at its mm rate → "
                     f"{m.useful_flops / total / dev.mm('cos'):.0%} of mm; host enqueue ≈ "
                     f"{1e3 * m.host_s(dev):.3f} ms")
    lines.append(f"class chunks: {m.chunks[0]} forward, {m.chunks[1]} backward")
    if unmatched:
        lines.append("measured, not modelled: " + ", ".join(
            f"{ph} {name} {ms:.3f} ms" for (ph, name), ms in unmatched.items()))
    return "\n".join(lines)


def _short(dev: Device) -> str:
    """A column header for the device's predictions."""
    kind = dev.name.rsplit(", ", 1)[-1]
    return {"optimistic": "opt", "pessimistic": "pess"}.get(kind, "inputs") + " ms"


def measure(b: int, d: int, n_classes: int, *, dtype=torch.bfloat16, form: str = "pairs",
            rate: float = 1.0, repeats: int = 5, op: str = "fused_unitsface_loss",
            saved_exp_bytes: int = 0) -> tuple[dict, float]:
    """On the GPU: ({(phase, kernel): ms per step} from torch.profiler, and the median ms of
    a whole step from CUDA events) for the call that the plan PLANS[op] counts, on the
    benchmark's inputs (:func:`benchmarks.impls.make_inputs`; the USS calls read its bank, or
    the batch itself). Kernels that are not the Triton engine's own count as "torch"
    (validation, statistics, finishing)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from unitsface_kernels import fused_unitsface_loss, fused_uss_loss

    from .impls import Case, make_inputs
    from .measure import time_steps

    dev = torch.device("cuda")
    total = n_classes if rate >= 1.0 else round(n_classes / rate)
    inp = make_inputs(Case("objective", total, b, d, str(dtype).replace("torch.", ""), "cuda",
                           sample_rate=rate))
    calls = {
        "fused_unitsface_loss": lambda: fused_unitsface_loss(
            inp.x, inp.labels, inp.centres, inp.bank, inp.bias, index=inp.index, uss_form=form,
            backend="triton", saved_exp_bytes=saved_exp_bytes),
        "fused_uss_loss": lambda: fused_uss_loss(inp.x, inp.labels, inp.bias, inp.bank,
                                                 form=form, backend="triton"),
        "fused_uss_loss_inbatch": lambda: fused_uss_loss(inp.x, inp.labels, inp.bias,
                                                         form=form, backend="triton")}

    def forward():
        inp.zero_grad()
        return calls[op]()

    for _ in range(3):  # compile the kernels
        forward().backward()
    step_ms = statistics.median(time_steps(lambda: forward().backward(), repeats, dev)) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            with record_function("cost_model.forward"):
                loss = forward()
                torch.cuda.synchronize()
            with record_function("cost_model.backward"):
                loss.backward()
                torch.cuda.synchronize()
    events = prof.events()
    windows = [(e.time_range.start, e.time_range.end, e.name.split(".")[1]) for e in events
               if e.name.startswith("cost_model.") and e.device_type == DeviceType.CPU]
    kernels = ("_cos_kernel", _STREAM, _RESIDENT, "_exps_grad_kernel", "_dx_kernel",
               "_dw_kernel", _DW_RESIDENT, "_row_norms_kernel", "_merge_kernel",
               "_tangent_kernel", "_unit_rows_kernel")
    out: dict = {}
    for e in events:
        if e.device_type != DeviceType.CUDA or e.name.startswith("cost_model."):
            continue
        phase = next((ph for lo, hi, ph in windows if lo <= e.time_range.start <= hi), None)
        if phase is None:
            continue
        name = next((k for k in kernels if k in e.name), "torch")
        out[(phase, name)] = out.get((phase, name), 0.0) + e.time_range.elapsed_us() / 1e3
    return {k: v / repeats for k, v in out.items()}, step_ms


def main(argv=None) -> None:
    from unitsface_kernels.triton.config import PERSISTENT_KNOB

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=sorted(PLANS), nargs="+", default=["fused_unitsface_loss"],
                    help="the launch plans to count, one after the other")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100_000)
    ap.add_argument("--form", choices=["pairs", "lse"], default="pairs")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--sub-centers", type=int, default=1, metavar="K",
                    help="fused_unitsface_loss with sub-center ArcFace's K rows per class")
    ap.add_argument("--g-in-hbm", action="store_true",
                    help="count the gradient tiles' round trip in HBM (L2 does not keep them)")
    ap.add_argument("--inputs", metavar="JSON",
                    help="measured device inputs (python -m benchmarks.ceilings --json): "
                         "predict with them too, beside the pessimistic and optimistic ones")
    ap.add_argument("--measure", action="store_true",
                    help="on a GPU: per-kernel times (torch.profiler) beside the predictions")
    ap.add_argument("--saved-exps", action="store_true",
                    help="fused_unitsface_loss with saved_exp_bytes = B·|S| in x's dtype: the "
                         "backward reads the forward's stored exponentials")
    ap.add_argument("--persistent", nargs="?", const="1", choices=["1", "resident"],
                    help=f"count (and measure) the persistent cosine launches ({PERSISTENT_KNOB}"
                         "=1: fused._cos_stream_kernel; =resident: fused._cos_resident_kernel)")
    args = ap.parse_args(argv)
    if args.persistent:
        os.environ[PERSISTENT_KNOB] = args.persistent  # the plan's, and the op's (--measure)
    dt = getattr(torch, args.dtype)
    devs = devices(args.inputs)
    for dev in devs:
        print(dev.table())
    print()
    for op in args.op:
        _print_plan(op, args, dt, devs)


def _config(d: int, dt, kind: str):
    """The GPU's FusedConfig at width d with the persistent knob's value `kind`, whatever the
    knob says in this process."""
    from unitsface_kernels.triton.config import fused_config

    return fused_config(d, torch.device("cuda"), dt, persistent=kind)


def _persistent_configs(d: int, dt) -> dict:
    """The GPU's FusedConfig at width d with each kind of persistent cosine launch (the
    knob's value → the configuration): "1", and "resident" where the row block fits."""
    configs = {kind: _config(d, dt, kind) for kind in ("1", "resident")}
    return {kind: cfg for kind, cfg in configs.items() if kind == "1" or cfg.resident}


def _print_plan(op: str, args, dt, devs) -> None:
    """The report of one plan at the arguments' shape (and at partial FC, where it applies),
    and beside it with the persistent cosine launches of each kind it does not count."""
    from unitsface_kernels.triton.config import PERSISTENT_KNOB

    b, d, c = args.batch, args.dim, args.classes
    count = PLANS[op]
    if op == "fused_uss_loss_inbatch":
        c = b  # the batch is its own reference set
    for rate in (1.0, 0.1) if op in PARTIAL_FC else (1.0,):
        total = round(c / rate)
        title = (f"{op} fwd+bwd, {args.dtype}, B={b} D={d}, USS {args.form}: "
                 + (f"C={c}" if rate == 1.0 else
                    f"partial FC, C={total} at rate {rate} (|S| = {c})"))
        measured = None
        if args.measure:
            budget = b * c * dt.itemsize if "saved_exps" in extra else 0
            measured, step = measure(b, d, c, dtype=dt, form=args.form, rate=rate, op=op,
                                     saved_exp_bytes=budget)
            title += f"; {torch.cuda.get_device_name()}: a step takes {step:.3f} ms"
        extra = {}
        if args.sub_centers > 1 and op == "fused_unitsface_loss":
            extra = dict(sub_centers=args.sub_centers)
            title += f", K = {args.sub_centers} sub-centres per class"
        elif args.saved_exps and op == "fused_unitsface_loss":
            extra = dict(saved_exps=True)
            title += ", stored exponentials"
        print(report(count(b, d, c, dtype=dt, form=args.form, rate=rate, total_classes=total,
                           g_in_hbm=args.g_in_hbm, **extra), title, devs, measured=measured))
        for kind, config in _persistent_configs(d, dt).items():
            if kind == args.persistent or args.sub_centers > 1:
                continue
            streamed = count(b, d, c, dtype=dt, form=args.form, rate=rate, total_classes=total,
                             g_in_hbm=args.g_in_hbm, config=config, **extra)
            print(f"with {'x-resident' if kind == 'resident' else 'persistent'} cosine "
                  f"launches (--persistent {kind}, {PERSISTENT_KNOB}={kind}): "
                  + ", ".join(f"{1e3 * streamed.time(dev):.3f} ms ({dev.name})"
                              for dev in devs))
        if op == "fused_unitsface_loss" and not extra:
            for kind in ("0", *_persistent_configs(d, dt)):
                kept = count(b, d, c, dtype=dt, form=args.form, rate=rate, total_classes=total,
                             g_in_hbm=args.g_in_hbm, config=_config(d, dt, kind),
                             saved_exps=True)
                print(f"with stored exponentials (--saved-exps, saved_exp_bytes ≥ "
                      f"{b * c * dt.itemsize / 1e6:.0f} MB; --persistent {kind}): "
                      + ", ".join(f"{1e3 * kept.time(dev):.3f} ms ({dev.name})"
                                  for dev in devs))
        if rate < 1.0:
            sparse = count(b, d, c, dtype=dt, form=args.form, rate=rate, total_classes=total,
                           sparse_grad=True, g_in_hbm=args.g_in_hbm)
            print("with sparse_grad=True (no dense ∂W): " + ", ".join(
                f"{1e3 * sparse.time(dev):.3f} ms ({dev.name})" for dev in devs))
        print()


if __name__ == "__main__":
    main()
