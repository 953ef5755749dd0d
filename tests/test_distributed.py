"""Class-parallel training (unitsface_kernels.distributed) on CPU with gloo, 2 and 3 ranks.

One spawn per world size runs every scenario on every backend in the workers (spawning is the
slow part); each rank saves what it computed and the tests compare it, in float64, with the
single-process eager reference of the same global objective:

* the loss on every rank equals the single-process loss over the global batch;
* ∂W of the shards, concatenated, equals the single-process ∂W (exactly zero outside the
  partial-FC index);
* ∂b (scalar, replicated) is the full single-process ∂b on every rank; a per-class b is
  sharded like W;
* the gradient reaching rank r's own embeddings is w·∂L/∂x_r (insightface's convention);
* the modules sample partial FC per shard (every positive, nothing else gets a gradient),
  initialise b identically on every rank, and update their bank shard from the global batch;
* mismatched batch or embedding sizes, and a bad input on one rank only, raise on every rank
  (nobody is left waiting in a collective).

C = 23 is divisible by neither 2 nor 3, so the shards are uneven (insightface's split).
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unitsface_kernels import (contract, fused_margin_softmax_loss, fused_unitsface_loss,
                               fused_uss_loss, native, options, reference)
from unitsface_kernels.distributed import ClassShard, split_classes
from unitsface_kernels.layouts import UnitsfaceStat
from unitsface_kernels.nn import PartialFC, SampleToSampleBCE, UniTSFaceHead, USSLoss
from unitsface_kernels.optim import SparseSGD

from helpers import INTERPRETING, LargestAllocation

B, C, D = 6, 23, 8  # rows per rank, classes, embedding size
TOL = dict(rtol=1e-8, atol=1e-8)
WORLDS = (2, 3)


def _backends() -> list[str]:
    """Fused backends that run on the CPU here, and the eager per-shard reference."""
    out = ["triton"] if INTERPRETING else []
    if native.has_family("unitsface") and native.has_family("uss"):
        out.append("native")
    return out + ["reference"]


def _fused_backend() -> str:
    return _backends()[0]


# ----------------------------------------------------------------------------- data

def make_data(world: int) -> dict:
    """The global problem, identical in every process."""
    g = torch.Generator().manual_seed(1234 + world)
    n = world * B
    labels = torch.randint(0, C, (n,), generator=g)
    labels[1::3] = labels[0::3][: len(labels[1::3])].flip(0)  # repeated classes, across ranks
    valid = torch.rand(C, generator=g) < 0.8
    extra = torch.randperm(C, generator=g)[:5]
    index = torch.unique(torch.cat([labels, extra]))  # global partial-FC index
    return dict(
        x=torch.randn(n, D, generator=g, dtype=torch.float64),
        labels=labels,
        centres=torch.randn(C, D, generator=g, dtype=torch.float64),
        bank=torch.nn.functional.normalize(torch.randn(C, D, generator=g, dtype=torch.float64)),
        valid=valid,
        index=index,
        bias_vec=3.0 + torch.randn(C, generator=g, dtype=torch.float64),
    )


# name: (loss, options). The bias is a scalar b unless "vec" (one b per class).
SCENARIOS = {
    "softmax_cosface": ("softmax", dict(scale=64.0, margin_arc=0.0, margin_cos=0.4)),
    "softmax_arcface_pfc": ("softmax", dict(scale=64.0, margin_arc=0.5, margin_cos=0.0,
                                            pfc=True)),
    "uss_pairs": ("uss", dict(scale=64.0, margin=0.1, form="pairs", b=20.0)),
    "uss_pairs_clamp_vec": ("uss", dict(scale=8.0, margin=0.1, form="pairs",
                                        official_clamp=True, vec=True)),
    "uss_lse": ("uss", dict(scale=64.0, margin=0.1, form="lse", b=20.0)),
    "uss_lse_clamp": ("uss", dict(scale=8.0, margin=0.1, form="lse", official_clamp=True,
                                  b=9.0)),
    "unitsface_pairs_arc_pfc": ("unitsface", dict(scale=64.0, margin_arc=0.5, margin_cos=0.0,
                                                  uss_form="pairs", uss_weight=0.7, b=20.0,
                                                  pfc=True)),
    "unitsface_lse": ("unitsface", dict(scale=64.0, margin_arc=0.0, margin_cos=0.4,
                                        uss_form="lse", b=20.0)),
    "unitsface_lse_vec_pfc": ("unitsface", dict(scale=32.0, uss_form="lse", vec=True,
                                                pfc=True)),
    # the official clamp (active at s = 8) and arcface_torch's straight-through ArcFace
    "unitsface_official_st_pfc": ("unitsface", dict(scale=8.0, margin_arc=0.5, margin_cos=0.0,
                                                    arcface_grad="straight_through",
                                                    uss_form="pairs", official_clamp=True,
                                                    b=9.0, pfc=True)),
    "unitsface_official_easy_lse": ("unitsface", dict(scale=8.0, margin_arc=0.5,
                                                      margin_cos=0.0, easy_margin=True,
                                                      uss_form="lse", official_clamp=True,
                                                      b=9.0)),
    # F.normalize's eps (from_insightface's) with a third of the rows at norm ~1e-7: every
    # backend's kernels read it from the options
    "unitsface_eps_tiny_pfc": ("unitsface", dict(scale=64.0, uss_form="pairs", b=20.0,
                                                 eps=1e-12, tiny=True, pfc=True)),
    # each rank's forward keeps its shard's exponentials (triton), read with the global lse
    "unitsface_arc_pfc_saved_exps": ("unitsface", dict(scale=64.0, margin_arc=0.5,
                                                       margin_cos=0.0, uss_form="pairs",
                                                       b=20.0, pfc=True, saved_exps=True)),
}
_OBJECTIVE_KEYS = ("arcface_grad", "easy_margin", "official_clamp", "eps")


def _objective_options(opts):
    return dict(scale=opts["scale"], margin_arc=opts.get("margin_arc", 0.0),
                margin_cos=opts.get("margin_cos", 0.4), uss_form=opts["uss_form"],
                uss_weight=opts.get("uss_weight", 1.0),
                **{k: opts[k] for k in _OBJECTIVE_KEYS if k in opts})


def _bias(opts, data, sl=slice(None)):
    if opts.get("vec"):
        return data["bias_vec"][sl].clone().requires_grad_()
    return torch.tensor([opts["b"]], dtype=torch.float64, requires_grad=True)


def _x(data, opts):
    """The global embeddings of a scenario: with "tiny", every third row at norm ~1e-7."""
    x = data["x"].clone()
    if opts.get("tiny"):
        x[::3] *= 1e-7
    return x


def _run_shard(kind, opts, data, shard, rank, backend):
    """Loss and gradients of one rank through the public API with shard=."""
    sl = slice(shard.start, shard.stop)
    x = _x(data, opts)[rank * B:(rank + 1) * B].requires_grad_()
    labels = data["labels"][rank * B:(rank + 1) * B]
    index = None
    if opts.get("pfc"):
        index = data["index"][(data["index"] >= shard.start) & (data["index"] < shard.stop)]
        index = index - shard.start
    out = {}
    if kind == "softmax":
        w = data["centres"][sl].clone().requires_grad_()
        loss = fused_margin_softmax_loss(x, w, labels, scale=opts["scale"],
                                         margin_arc=opts["margin_arc"],
                                         margin_cos=opts["margin_cos"], index=index,
                                         backend=backend, shard=shard)
        loss.backward()
        out.update(dw=w.grad)
    elif kind == "uss":
        b = _bias(opts, data, sl)
        loss = fused_uss_loss(x, labels, b, data["bank"][sl], None, data["valid"][sl],
                              scale=opts["scale"], margin=opts["margin"], form=opts["form"],
                              official_clamp=opts.get("official_clamp", False),
                              backend=backend, shard=shard)
        loss.backward()
        out.update(db=b.grad)
    else:
        w = data["centres"][sl].clone().requires_grad_()
        b = _bias(opts, data, sl)
        loss = fused_unitsface_loss(x, labels, w, data["bank"][sl], b,
                                    bank_valid=data["valid"][sl], index=index, backend=backend,
                                    shard=shard, **_objective_options(opts),
                                    saved_exp_bytes=(1 << 30) if opts.get("saved_exps") else 0)
        loss.backward()
        out.update(dw=w.grad, db=b.grad)
    out.update(loss=loss.detach(), dx=x.grad)
    return out


def _oracle(kind, opts, data):
    """The single-process objective over the global batch (eager reference, float64)."""
    x = _x(data, opts).requires_grad_()
    labels = data["labels"]
    index = data["index"] if opts.get("pfc") else None
    out = {}
    if kind == "softmax":
        w = data["centres"].clone().requires_grad_()
        loss = reference.margin_softmax_loss(x, w, labels, scale=opts["scale"],
                                             margin_arc=opts["margin_arc"],
                                             margin_cos=opts["margin_cos"], index=index)
        loss.backward()
        out.update(dw=w.grad)
    elif kind == "uss":
        b = _bias(opts, data)
        loss = reference.uss_loss(x, labels, b, data["bank"], None, data["valid"],
                                  scale=opts["scale"], margin=opts["margin"], form=opts["form"],
                                  official_clamp=opts.get("official_clamp", False))
        loss.backward()
        out.update(db=b.grad)
    else:
        w = data["centres"].clone().requires_grad_()
        b = _bias(opts, data)
        loss = reference.unitsface_loss(x, labels, w, data["bank"], b, bank_valid=data["valid"],
                                        index=index, **_objective_options(opts))
        loss.backward()
        out.update(dw=w.grad, db=b.grad)
    out.update(loss=loss.detach(), dx=x.grad)
    return out


# ----------------------------------------------------------------------------- modules

def _load_head(head, data, shard, bias):
    with torch.no_grad():
        sl = slice(shard.start, shard.stop)
        head.weight.copy_(data["centres"][sl])
        head.bank.copy_(data["bank"][sl])
        head.bank_valid.copy_(data["valid"][sl])
        head.bias.fill_(bias)


def _run_modules(data, rank, world, backend):
    out = {}
    x = data["x"][rank * B:(rank + 1) * B].clone().requires_grad_()
    labels = data["labels"][rank * B:(rank + 1) * B]

    # UniTSFaceHead with partial FC; b starts at 0, so the first call initialises it
    head = UniTSFaceHead(D, C, sample_rate=0.3, margin_arc=0.5, margin_cos=0.0,
                         backend=backend).double()
    assert head.shard is not None and head.num_local == head.weight.shape[0]
    _load_head(head, data, head.shard, 0.0)
    labels_all = data["labels"]
    torch.manual_seed(100 + rank)
    index = head.shard.sample(labels_all, head.num_sample)  # replay the module's draw
    torch.manual_seed(100 + rank)
    loss = head(x, labels)
    loss.backward()
    out["head"] = dict(loss=loss.detach(), dx=x.grad, dw=head.weight.grad, db=head.bias.grad,
                       b0=head.bias.detach().clone(), index=index + head.shard.start,
                       num_sample=head.num_sample, bank=head.bank.clone(),
                       valid=head.bank_valid.clone(), start=head.shard.start)

    # PartialFC, all classes
    x.grad = None
    pfc = PartialFC(D, C, margin_cos=0.4, backend=backend).double()
    with torch.no_grad():
        pfc.weight.copy_(data["centres"][pfc.shard.start:pfc.shard.stop])
    loss = pfc(x, labels.reshape(-1, 1))
    loss.backward()
    out["partial_fc"] = dict(loss=loss.detach(), dx=x.grad, dw=pfc.weight.grad)

    # USSLoss on a sharded bank
    x.grad = None
    uss = USSLoss(D, C, form="lse", official_clamp=False, backend=backend).double()
    with torch.no_grad():
        sl = slice(uss.shard.start, uss.shard.stop)
        uss.bank.copy_(data["bank"][sl])
        uss.bank_valid.copy_(data["valid"][sl])
        uss.bias.fill_(20.0)
    loss = uss(x, labels)
    loss.backward()
    out["uss_module"] = dict(loss=loss.detach(), dx=x.grad, db=uss.bias.grad,
                             bank=uss.bank.clone(), valid=uss.bank_valid.clone())

    # SampleToSampleBCE: per-row thresholds sharded like the bank, shifted by the global b₀
    s2s = SampleToSampleBCE(D, C, backend=backend).double()
    with torch.no_grad():
        sl = slice(s2s.shard.start, s2s.shard.stop)
        s2s.bank.copy_(data["bank"][sl])
        s2s.bank_valid.copy_(data["valid"][sl])
    loss = s2s(x.detach(), labels)
    out["s2s_bce"] = dict(loss=loss.detach(), bias=s2s.bias.detach().clone())

    # sparse gradients and SparseSGD on the shards: the same training as dense SGD
    out["sparse_sgd"] = _sparse_sgd_steps(data, rank, backend)

    # the official checkpoint holds all C rows: a sharded head keeps its own
    head = UniTSFaceHead(D, C, backend=backend).double()
    head.load_official({"sample_to_class_loss.weight": data["centres"],
                        "sample_to_sample_loss.feat_mem": 3.0 * data["bank"],
                        "sample_to_sample_loss.bias": torch.tensor([2.5])})
    out["load_official"] = dict(weight=head.weight.detach().clone(), bank=head.bank.clone(),
                                bias=head.bias.detach().clone())
    return out


def _sparse_sgd_steps(data, rank, backend, steps=6):
    """Two sharded heads, one with sparse gradients stepped by SparseSGD, one dense with
    torch.optim.SGD: per step the losses, at the end the shard's weights (brought up to date
    by state_dict) and momentum."""
    heads, opts = [], []
    for sparse in (True, False):
        torch.manual_seed(7)
        head = UniTSFaceHead(D, C, sample_rate=0.3, sparse_grad=sparse, backend=backend).double()
        heads.append(head)
        cls = SparseSGD if sparse else torch.optim.SGD
        opts.append(cls(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
    losses = [[], []]
    for step in range(steps):
        x = data["x"][rank * B:(rank + 1) * B] * (1 + 0.1 * step)
        labels = data["labels"][rank * B:(rank + 1) * B]
        for k, (head, opt) in enumerate(zip(heads, opts)):
            torch.manual_seed(1000 * step + rank)  # the same partial-FC draw on this shard
            loss = head(x, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[k].append(loss.detach())
    states = [h.state_dict() for h in heads]
    return dict(losses=losses, weights=[st["weight"] for st in states],
                momentum=[o.state_dict()["state"][1]["momentum_buffer"] for o in opts],
                sparse=heads[0].weight.grad.is_sparse)


# ----------------------------------------------------------------------------- errors

def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _run_errors(data, rank, world, shard, backend):
    x = data["x"][rank * B:(rank + 1) * B]
    labels = data["labels"][rank * B:(rank + 1) * B]
    w = data["centres"][shard.start:shard.stop]
    last = rank == world - 1
    call = lambda x, w, y, **kw: fused_margin_softmax_loss(  # noqa: E731
        x, w, y, backend=backend, shard=shard, **kw)
    return {
        "batch": _error(lambda: call(x[:-1] if last else x, w, labels[:-1] if last else labels)),
        "dim": _error(lambda: call(torch.cat([x, x[:, :1]], 1) if last else x,
                                   torch.cat([w, w[:, :1]], 1) if last else w, labels)),
        "label": _error(lambda: call(x, w, torch.where(
            torch.arange(B) == 0, torch.full_like(labels, C), labels) if last else labels)),
        "centres_rows": _error(lambda: call(x, w[:-1] if last else w, labels)),
        "index": _error(lambda: call(x, w, labels, index=torch.tensor([0]) if last else None)),
    }


# ----------------------------------------------------------------------------- memory

def _run_memory(rank, world, shard_of, backend):
    """Largest tensor created by a fused class-parallel step (forward and backward) with
    B = 16 per rank and C = 50: it must stay below B_global × C_local."""
    g = torch.Generator().manual_seed(7)
    c, b = 50, 16
    shard = shard_of(c)
    x = torch.randn(world * b, D, generator=g)[rank * b:(rank + 1) * b].requires_grad_()
    labels = torch.randint(0, c, (world * b,), generator=g)[rank * b:(rank + 1) * b]
    w = torch.randn(shard.num_local, D).requires_grad_()
    bank = torch.nn.functional.normalize(torch.randn(shard.num_local, D))
    bias = torch.tensor([5.0], requires_grad=True)
    with LargestAllocation() as seen:
        fused_unitsface_loss(x, labels, w, bank, bias, uss_form="lse", backend=backend,
                             shard=shard).backward()
    return dict(largest=seen.largest, where=seen.where, limit=world * b * shard.num_local)


# ----------------------------------------------------------------------------- workers

def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        data = make_data(world)
        shard = ClassShard.from_group(C)
        results = {"shard": (shard.start, shard.stop), "times": {}}
        results["errors"] = _run_errors(data, rank, world, shard, _fused_backend())
        results["memory"] = _run_memory(rank, world, ClassShard.from_group, _fused_backend())
        for backend in _backends():
            for name, (kind, opts) in SCENARIOS.items():
                t = time.perf_counter()
                results[(backend, name)] = _run_shard(kind, opts, data, shard, rank, backend)
                results["times"][(backend, name)] = time.perf_counter() - t
        t = time.perf_counter()
        results["modules"] = _run_modules(data, rank, world, _fused_backend())
        results["times"]["modules"] = time.perf_counter() - t
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def run(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return world, make_data(world), ranks


# ----------------------------------------------------------------------------- tests

def test_split_matches_insightface():
    for c, w in ((23, 2), (23, 3), (7, 7), (100, 8)):
        bounds = [split_classes(c, w, r) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == c
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        for r, (start, stop) in enumerate(bounds):  # insightface's PartialFC_V2 formulas
            assert stop - start == c // w + (r < c % w)
            assert start == c // w * r + min(r, c % w)
    with pytest.raises(ValueError, match="at least one class"):
        split_classes(2, 3, 0)
    with pytest.raises(ValueError, match="start < stop"):
        ClassShard(5, 5, 10)


def test_shards_tile_the_classes(run):
    world, _, ranks = run
    assert [r["shard"] for r in ranks] == [split_classes(C, world, r) for r in range(world)]


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_single_process(run, name, backend):
    if backend not in _backends():
        pytest.skip(f"backend {backend!r} does not run on this machine")
    world, data, ranks = run
    kind, opts = SCENARIOS[name]
    want = _oracle(kind, opts, data)
    for r, res in enumerate(ranks):
        got = res[(backend, name)]
        torch.testing.assert_close(got["loss"], want["loss"], **TOL)  # global mean, every rank
        torch.testing.assert_close(got["dx"], world * want["dx"][r * B:(r + 1) * B], **TOL)
        if "db" in want and not opts.get("vec"):
            torch.testing.assert_close(got["db"], want["db"], **TOL)  # full ∂b on every rank
    if "dw" in want:
        dw = torch.cat([res[(backend, name)]["dw"] for res in ranks])
        torch.testing.assert_close(dw, want["dw"], **TOL)
        if opts.get("pfc"):
            outside = torch.ones(C, dtype=torch.bool)
            outside[data["index"]] = False
            assert bool((dw[outside] == 0).all())
    if opts.get("vec"):  # a per-class threshold is sharded like W
        db = torch.cat([res[(backend, name)]["db"] for res in ranks])
        torch.testing.assert_close(db, want["db"], **TOL)


def test_head_partial_fc_bias_init_and_bank(run):
    world, data, ranks = run
    heads = [res["modules"]["head"] for res in ranks]
    labels = data["labels"]
    # each shard samples max(int(0.3·num_local), #positives) classes including its positives
    for h, (start, stop) in zip(heads, (res["shard"] for res in ranks)):
        positives = torch.unique(labels[(labels >= start) & (labels < stop)])
        assert set(positives.tolist()) <= set(h["index"].tolist())
        # insightface's PartialFC_V2: the rate applies to the shard, int(rate·num_local)
        assert h["num_sample"] == int(0.3 * (stop - start))
        assert len(h["index"]) == min(stop - start, max(int(0.3 * (stop - start)),
                                                        len(positives)))
        sampled = torch.zeros(stop - start, dtype=torch.bool)
        sampled[h["index"] - start] = True
        assert bool((h["dw"][~sampled] == 0).all())       # unsampled rows: no gradient
        assert bool((h["dw"][sampled].abs().sum(1) > 0).all())
    index = torch.cat([h["index"] for h in heads])
    # b was initialised from the data, identically on every rank
    b0 = reference.eager_uss_bias_init(data["x"], labels, data["bank"][index], index,
                                       data["valid"][index], scale=64.0)
    for h in heads:
        torch.testing.assert_close(h["b0"], b0.reshape(1), **TOL)
    x = data["x"].clone().requires_grad_()
    w = data["centres"].clone().requires_grad_()
    b = b0.reshape(1).clone().requires_grad_()
    loss = reference.unitsface_loss(x, labels, w, data["bank"], b, bank_valid=data["valid"],
                                    index=index, scale=64.0, margin_arc=0.5, margin_cos=0.0,
                                    official_clamp=True)  # the module default
    loss.backward()
    for r, h in enumerate(heads):
        torch.testing.assert_close(h["loss"], loss.detach(), **TOL)
        torch.testing.assert_close(h["dx"], world * x.grad[r * B:(r + 1) * B], **TOL)
        torch.testing.assert_close(h["db"], b.grad, **TOL)
    torch.testing.assert_close(torch.cat([h["dw"] for h in heads]), w.grad, **TOL)
    # every shard wrote its rows of the bank from the gathered batch (last occurrence wins)
    bank, valid = data["bank"].clone(), data["valid"].clone()
    reference.eager_bank_update_(bank, valid, data["x"], labels)
    torch.testing.assert_close(torch.cat([h["bank"] for h in heads]), bank, **TOL)
    assert torch.equal(torch.cat([h["valid"] for h in heads]), valid)


def test_partial_fc_and_uss_modules(run):
    world, data, ranks = run
    want = _oracle(*SCENARIOS["softmax_cosface"], data)
    for r, res in enumerate(ranks):
        got = res["modules"]["partial_fc"]
        torch.testing.assert_close(got["loss"], want["loss"], **TOL)
        torch.testing.assert_close(got["dx"], world * want["dx"][r * B:(r + 1) * B], **TOL)
    torch.testing.assert_close(torch.cat([res["modules"]["partial_fc"]["dw"] for res in ranks]),
                               want["dw"], **TOL)
    want = _oracle(*SCENARIOS["uss_lse"], data)
    for r, res in enumerate(ranks):
        got = res["modules"]["uss_module"]
        torch.testing.assert_close(got["loss"], want["loss"], **TOL)
        torch.testing.assert_close(got["dx"], world * want["dx"][r * B:(r + 1) * B], **TOL)
        torch.testing.assert_close(got["db"], want["db"], **TOL)
    bank, valid = data["bank"].clone(), data["valid"].clone()
    reference.eager_bank_update_(bank, valid, data["x"], data["labels"])
    torch.testing.assert_close(torch.cat([res["modules"]["uss_module"]["bank"] for res in ranks]),
                               bank, **TOL)


def test_sample_to_sample_bce_module(run):
    """Every rank shifts its rows' thresholds by the same global b₀ and reports the global loss
    of the official per-row-threshold BCE."""
    _, data, ranks = run
    b0 = reference.eager_uss_bias_init(data["x"], data["labels"], data["bank"], None, data["valid"])
    bias = torch.cat([res["modules"]["s2s_bce"]["bias"] for res in ranks])
    torch.testing.assert_close(bias, torch.full((C,), float(b0), dtype=torch.float64), **TOL)
    want = reference.uss_loss(data["x"], data["labels"], bias, data["bank"], None, data["valid"],
                              margin=0.1, official_clamp=True)
    for res in ranks:
        torch.testing.assert_close(res["modules"]["s2s_bce"]["loss"], want, **TOL)


def test_sparse_sgd_on_shards_trains_like_dense_sgd(run):
    """Class-parallel: each rank's shard with sparse gradients and SparseSGD follows dense
    torch.optim.SGD step for step (loss, weights, momentum)."""
    _, _, ranks = run
    for res in ranks:
        got = res["modules"]["sparse_sgd"]
        assert got["sparse"]
        for a, b in zip(*got["losses"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got["weights"][0], got["weights"][1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got["momentum"][0], got["momentum"][1], rtol=1e-9,
                                   atol=1e-9)


def test_no_global_batch_by_local_classes_tensor(run):
    _, _, ranks = run
    for res in ranks:
        mem = res["memory"]
        assert mem["largest"] < mem["limit"], mem


def test_load_official_keeps_the_shard(run):
    _, data, ranks = run
    got = [res["modules"]["load_official"] for res in ranks]
    torch.testing.assert_close(torch.cat([g["weight"] for g in got]), data["centres"])
    torch.testing.assert_close(torch.cat([g["bank"] for g in got]), data["bank"])
    assert all(float(g["bias"]) == 2.5 for g in got)


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
def test_label_of_another_shard_has_no_target(backend):
    """The per-shard op with label −1 (a class of another shard): no target logit, every
    column a negative; statistics equal to the eager formulas (no process group needed)."""
    if backend not in _backends():
        pytest.skip(f"backend {backend!r} does not run on this machine")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, D, generator=g, dtype=torch.float64)
    w = torch.randn(37, D, generator=g, dtype=torch.float64)  # 37: a partial last tile
    bank = torch.randn(37, D, generator=g, dtype=torch.float64)
    labels = torch.tensor([-1, 3, -1, 36, 0, -1, 3])
    opts = options.unitsface_options(scale=16.0, margin_arc=0.0, margin_cos=0.4,
                                     arcface_grad="exact", easy_margin=False, uss_margin=0.1,
                                     uss_form="lse", uss_weight=1.0, official_clamp=False)
    S = UnitsfaceStat
    fwd = contract.forward_op("unitsface", backend)
    rows, stats, *_ = fwd(x, w, bank, labels, None, None, torch.tensor(5.0, dtype=x.dtype),
                          None, opts.pack(), False)
    cos = reference.normalize(x) @ reference.normalize(w).T
    z = 16.0 * torch.where(labels[:, None] == torch.arange(37), cos - 0.4, cos)
    torch.testing.assert_close(stats[S.LSE], torch.logsumexp(z, 1), **TOL)
    target = torch.where(labels >= 0, z.gather(1, labels.clamp_min(0)[:, None])[:, 0], 0.0)
    torch.testing.assert_close(stats[S.TARGET], target, **TOL)
    cos_b = reference.normalize(x) @ reference.normalize(bank).T
    neg = torch.logsumexp(torch.where(labels[:, None] == torch.arange(37), -torch.inf,
                                      16.0 * cos_b - 5.0), 1)
    torch.testing.assert_close(stats[S.USS_B], neg, **TOL)
    assert bool((stats[S.USS_A][labels < 0] == -torch.inf).all())  # no positive


def test_mismatched_inputs_raise_on_every_rank(run):
    world, _, ranks = run
    errors = [res["errors"] for res in ranks]
    for e in errors:
        assert "same batch size on every rank" in e["batch"] and str([B] * (world - 1) + [B - 1]) \
            in e["batch"]
        assert "embedding sizes differ across ranks" in e["dim"]
    for r, e in enumerate(errors):
        mine = r == world - 1  # the rank with the bad input names it; the others stop too
        for case, text in (("label", "labels must lie in [0, 23)"),
                           ("centres_rows", "centres has"),
                           ("index", "missing from index")):
            assert (text in e[case]) if mine else ("rejected its inputs" in e[case]), \
                (case, r, e[case])


# ----------------------------------------------------------------------------- margin family

MARGIN_SCENARIOS = {
    # name: (margin kind, its settings, with the bank (the objective), partial FC)
    "curricular_k2_pfc": ("curricular", dict(sub_centers=2), False, True),
    "adaface_objective": ("adaface", dict(momentum=0.5), True, False),
    "magface": ("magface", {}, False, False),
    "magface_objective_pfc": ("magface", dict(easy_margin=False), True, True),
    "elastic_arc_generator": ("elastic_arc", dict(std=0.05), False, False),
    "elastic_cos_plus_drawn": ("elastic_cos", dict(plus=True), False, True),
    "filter_k3_objective": ("arcface", dict(m=0.5, sub_centers=3, interclass_threshold=0.2),
                            True, True),
}


def _margin_call(name, data, x, labels, centres, bank, bias, valid, index, backend, shard):
    """One margin step through the public function (shard=None: the single process over the
    global batch); returns the loss and the moving statistics after it."""
    from unitsface_kernels import margins as M

    kind, settings, with_bank, _ = MARGIN_SCENARIOS[name]
    mg = M.margin(kind, **settings)
    state = M.MarginState(torch.tensor(0.3, dtype=torch.float64),
                          torch.tensor(2.0, dtype=torch.float64),
                          torch.tensor(1.0, dtype=torch.float64))
    kw = dict(scale=16.0, index=index, backend=backend, shard=shard, margin=mg,
              margin_state=state)
    if name.endswith("_generator"):
        kw["generator"] = torch.Generator().manual_seed(11)   # seeded alike on every rank
    if name.endswith("_drawn"):
        kw["margin_drawn"] = 0.35 + 0.05 * torch.randn(
            len(data["labels"]), generator=torch.Generator().manual_seed(12),
            dtype=torch.float64)
    if with_bank:
        loss = fused_unitsface_loss(x, labels, centres, bank, bias, bank_valid=valid,
                                    uss_form="lse", uss_weight=0.5, **kw)
    else:
        loss = fused_margin_softmax_loss(x, centres, labels, **kw)
    return loss, state


def _margin_centres(name, data):
    """W with K rows per class (the global one; shard r holds rows [start·K, stop·K))."""
    kind, settings, _, _ = MARGIN_SCENARIOS[name]
    k = settings.get("sub_centers", 1)
    g = torch.Generator().manual_seed(99)
    w = data["centres"].repeat_interleave(k, 0)
    return w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64), k


def _run_margin_shard(name, data, shard, rank, backend):
    w, k = _margin_centres(name, data)
    sl = slice(shard.start, shard.stop)
    x = data["x"][rank * B:(rank + 1) * B].clone().mul_(3.0).requires_grad_()
    labels = data["labels"][rank * B:(rank + 1) * B]
    index = None
    if MARGIN_SCENARIOS[name][3]:
        index = data["index"][(data["index"] >= shard.start) & (data["index"] < shard.stop)]
        index = index - shard.start
    centres = w[shard.start * k:shard.stop * k].clone().requires_grad_()
    bias = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    try:
        loss, state = _margin_call(name, data, x, labels, centres, data["bank"][sl], bias,
                                   data["valid"][sl], index, backend, shard)
        loss.backward()
    except NotImplementedError as e:  # a fused backend without the margin family
        return dict(error=str(e))
    return dict(loss=loss.detach(), dx=x.grad, dw=centres.grad, db=bias.grad,
                state=(state.t, state.norm_mean, state.norm_std))


def _margin_oracle(name, data):
    w, _ = _margin_centres(name, data)
    x = data["x"].clone().mul_(3.0).requires_grad_()
    centres = w.clone().requires_grad_()
    bias = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    index = data["index"] if MARGIN_SCENARIOS[name][3] else None
    loss, state = _margin_call(name, data, x, data["labels"], centres, data["bank"], bias,
                               data["valid"], index, "reference", None)
    loss.backward()
    return dict(loss=loss.detach(), dx=x.grad, dw=centres.grad, db=bias.grad,
                state=(state.t, state.norm_mean, state.norm_std))


def _margin_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        data = make_data(world)
        shard = ClassShard.from_group(C)
        results = {(backend, name): _run_margin_shard(name, data, shard, rank, backend)
                   for backend in _backends() for name in MARGIN_SCENARIOS}
        results["shard"] = (shard.start, shard.stop)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def margin_run(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp("margin_dist")
    mp.spawn(_margin_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world,
             join=True)
    return world, make_data(world), [torch.load(tmp / f"rank{r}.pt", weights_only=False)
                                     for r in range(world)]


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
@pytest.mark.parametrize("name", list(MARGIN_SCENARIOS))
def test_margin_step_matches_single_process(margin_run, name, backend):
    """A sharded margin step (2 and 3 ranks) equals the single-process one over the global batch:
    the loss and the moving statistics on every rank, w·∂L/∂x of each rank's rows (MagFace's
    gradient into the norm counted once), ∂W of the shards' K rows per class, ∂b."""
    if backend not in _backends():
        pytest.skip(f"backend {backend!r} does not run on this machine")
    world, data, ranks = margin_run
    want = _margin_oracle(name, data)
    for r, res in enumerate(ranks):
        got = res[(backend, name)]
        assert "error" not in got, got.get("error")
        torch.testing.assert_close(got["loss"], want["loss"], **TOL)
        torch.testing.assert_close(got["dx"], world * want["dx"][r * B:(r + 1) * B], **TOL)
        for a, b in zip(got["state"], want["state"]):
            torch.testing.assert_close(a, b, **TOL)
        if MARGIN_SCENARIOS[name][2]:
            torch.testing.assert_close(got["db"], want["db"], **TOL)
    dw = torch.cat([res[(backend, name)]["dw"] for res in ranks])
    torch.testing.assert_close(dw, want["dw"], **TOL)
