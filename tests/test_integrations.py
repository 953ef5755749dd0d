"""Other libraries' users: PartialFC.from_pml against the installed pytorch-metric-learning
(CosFaceLoss, ArcFaceLoss: loss and gradients, on every backend), and class-parallel training
under PyTorch Lightning's DDP strategy (examples/lightning_train.py, in one process and in two)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import all_backends
from unitsface_kernels.distributed import ClassShard
from unitsface_kernels.nn import PartialFC, UniTSFaceHead
from unitsface_kernels.nn.ddp import ignore_shards_in_ddp, slice_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "lightning_train.py")
B, C, D = 24, 60, 32


# ------------------------------------------------------------------------ pytorch-metric-learning

def _pml():
    return pytest.importorskip("pytorch_metric_learning.losses")


def _batch(pml_loss, dtype, beyond_pi: int = 0):
    """Embeddings and labels; the first `beyond_pi` rows point away from their class's column
    of W, so that θ > π − m there (ArcFace's fallback region)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    w = pml_loss.W.detach()
    x[:beyond_pi] = (-3 * w.t()[labels[:beyond_pi]]
                     + 0.2 * torch.randn(beyond_pi, D, generator=g, dtype=dtype))
    return x, labels


def _pml_and_ours(pml_loss, head, x, labels):
    """(loss, ∂x, ∂W) of PML's loss and of the PartialFC built from it (∂W transposed back to
    PML's D × C layout)."""
    out = []
    for fn, weight in ((pml_loss, lambda: pml_loss.W), (head, lambda: head.weight)):
        xl = x.clone().requires_grad_()
        loss = fn(xl, labels)
        gx, gw = torch.autograd.grad(loss, [xl, weight()])
        out.append((loss.detach(), gx, gw if fn is pml_loss else gw.t()))
    return out


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["CosFaceLoss", "ArcFaceLoss"])
def test_from_pml_matches_pml(backend, dtype, kind):
    """PML's default CosFace (m = 0.35, s = 64) and ArcFace (m = 28.6°, s = 64; a third of the
    rows at θ > π − m, where it falls back to cos θ − m·sin m): the same loss and the same
    gradients for the embeddings and for W."""
    losses = _pml()
    torch.manual_seed(0)
    pml_loss = getattr(losses, kind)(num_classes=C, embedding_size=D).to(dtype)
    head = PartialFC.from_pml(pml_loss, backend=backend)
    assert head.weight.dtype == dtype and head.weight.shape == (C, D)
    assert head.scale == 64 and head.sample_rate == 1.0
    x, labels = _batch(pml_loss, dtype, beyond_pi=8 if kind == "ArcFaceLoss" else 0)
    if kind == "ArcFaceLoss":
        assert head.arcface_grad == "exact" and head.margin_arc == pytest.approx(0.4991641)
        cos = F.normalize(x) @ F.normalize(pml_loss.W.detach(), dim=0)
        target = cos[torch.arange(B), labels]
        beyond = torch.arccos(target) > math.pi - pml_loss.margin
        assert beyond[:8].all() and not beyond[8:].any()  # both branches are exercised
    else:
        assert (head.margin_cos, head.margin_arc) == (0.35, 0.0)
    (loss, gx, gw), (ours, ox, ow) = _pml_and_ours(pml_loss, head, x, labels)
    assert ours.dtype == loss.dtype
    torch.testing.assert_close(ours, loss)
    torch.testing.assert_close(ox, gx)
    torch.testing.assert_close(ow, gw)


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_from_pml_subcenter_matches_pml(backend, dtype):
    """PML's SubCenterArcFaceLoss (K = 3, m = 28.6°, s = 64): the class cosine is the max over
    its K columns of W (column c·K + k, our row c·K + k); the same loss and gradients for the
    embeddings and for W (zero on every sub-centre that is no row's arg-max), with partial FC
    off; with sample_rate < 1 the head samples classes, all K rows of each."""
    losses = _pml()
    torch.manual_seed(0)
    pml_loss = losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D,
                                           sub_centers=3).to(dtype)
    head = PartialFC.from_pml(pml_loss, backend=backend)
    assert head.weight.shape == (3 * C, D) and head.margin.sub_centers == 3
    assert head.margin.m == pytest.approx(math.radians(28.6))
    x, labels = _batch(pml_loss, dtype)
    (loss, gx, gw), (ours, ox, ow) = _pml_and_ours(pml_loss, head, x, labels)
    torch.testing.assert_close(ours, loss)
    torch.testing.assert_close(ox, gx)
    torch.testing.assert_close(ow, gw)
    (_, _, gw1), (_, _, ow1) = _pml_and_ours(pml_loss, head, x[:1], labels[:1])
    torch.testing.assert_close(ow1, gw1)  # one row: one sub-centre per class takes a gradient
    assert ((ow1.abs().sum(0).reshape(C, 3) > 0).sum(1) == 1).all()
    sampled = PartialFC.from_pml(pml_loss, sample_rate=0.5, backend=backend)
    xl = x.clone().requires_grad_()
    sampled(xl, labels).backward()
    rows = sampled.weight.grad.abs().sum(1).reshape(C, 3) > 0
    assert rows.any(1).sum() <= int(0.5 * C) + labels.unique().numel()


@pytest.mark.parametrize("backend", all_backends("cpu", "unitsface"))
@pytest.mark.parametrize("kind", ["CosFaceLoss", "ArcFaceLoss"])
def test_from_pml_carries_its_normalisation_eps(kind, backend):
    """Embeddings of norm 2e-7: PML normalises with F.normalize's 1e-12, and so does the head
    from_pml builds (eps=1e-12 in its settings): the same loss and gradients, where the
    official heads' 1e-5 would read those rows as x / 1e-5."""
    losses = _pml()
    torch.manual_seed(0)
    pml_loss = getattr(losses, kind)(num_classes=C, embedding_size=D).to(torch.float64)
    head = PartialFC.from_pml(pml_loss, backend=backend)
    assert head.eps == 1e-12
    x, labels = _batch(pml_loss, torch.float64)
    x[::2] = 2e-7 * F.normalize(x[::2])
    (loss, gx, gw), (ours, ox, ow) = _pml_and_ours(pml_loss, head, x, labels)
    torch.testing.assert_close(ours, loss)
    torch.testing.assert_close(ox, gx)
    torch.testing.assert_close(ow, gw)
    official = PartialFC.from_pml(pml_loss, backend=backend, eps=1e-5)
    (_, _, _), (other, _, _) = _pml_and_ours(pml_loss, official, x, labels)
    assert abs(float(other - loss)) > 1e-2 * abs(float(loss))


def test_from_pml_settings_and_state():
    """Non-default scale and margins are carried over; W is copied (not shared); extra keyword
    arguments reach the constructor; collect_stats changes no number."""
    losses = _pml()
    cos = losses.CosFaceLoss(C, D, margin=0.2, scale=30, collect_stats=True)
    head = PartialFC.from_pml(cos, sample_rate=0.5, backend="reference")
    assert (head.scale, head.margin_cos, head.sample_rate, head.backend) == (30, 0.2, 0.5,
                                                                            "reference")
    torch.testing.assert_close(head.weight.detach(), cos.W.detach().t())
    assert head.weight.data_ptr() != cos.W.data_ptr()
    head.eval()  # all classes: PML's loss
    x, labels = _batch(cos, torch.float32)
    (loss, gx, gw), (ours, ox, ow) = _pml_and_ours(cos, head, x, labels)
    torch.testing.assert_close(ours, loss)
    torch.testing.assert_close(ox, gx)
    arc = losses.ArcFaceLoss(C, D, margin=10.0, scale=16)
    head = PartialFC.from_pml(arc)
    assert head.margin_arc == pytest.approx(math.radians(10.0)) and head.scale == 16
    head = PartialFC.from_pml(arc, arcface_grad="straight_through")  # an explicit choice wins
    assert head.arcface_grad == "straight_through"


def test_from_pml_refuses_what_it_cannot_compute():
    losses = _pml()
    from pytorch_metric_learning import distances, reducers, regularizers

    sizes = dict(num_classes=C, embedding_size=D)
    for other in (losses.SphereFaceLoss(**sizes), losses.NormalizedSoftmaxLoss(**sizes),
                  losses.LargeMarginSoftmaxLoss(**sizes)):
        with pytest.raises(TypeError, match=type(other).__name__):
            PartialFC.from_pml(other)
    with pytest.raises(TypeError, match="CosFaceLoss, ArcFaceLoss or SubCenterArcFaceLoss"):
        PartialFC.from_pml(torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="reducer is SumReducer"):
        PartialFC.from_pml(losses.CosFaceLoss(C, D, reducer=reducers.SumReducer()))
    with pytest.raises(ValueError, match="reducer is AvgNonZeroReducer"):
        PartialFC.from_pml(losses.ArcFaceLoss(C, D, reducer=reducers.AvgNonZeroReducer()))
    with pytest.raises(ValueError, match="loss.weight_regularizer"):
        PartialFC.from_pml(losses.CosFaceLoss(
            C, D, weight_regularizer=regularizers.RegularFaceRegularizer()))
    with pytest.raises(ValueError, match="loss.embedding_regularizer"):
        PartialFC.from_pml(losses.ArcFaceLoss(
            C, D, embedding_regularizer=regularizers.LpRegularizer()))
    with pytest.raises(ValueError, match="loss.distance"):
        PartialFC.from_pml(losses.CosFaceLoss(C, D, distance=distances.CosineSimilarity(power=2)))
    with pytest.raises(ValueError, match=r"loss.margin must lie in \[-1, 1\]"):
        PartialFC.from_pml(losses.CosFaceLoss(C, D, margin=1.5))
    with pytest.raises(ValueError, match="loss.margin = .* rad"):
        PartialFC.from_pml(losses.ArcFaceLoss(C, D, margin=-5.0))
    with pytest.raises(ValueError, match="loss.scale must be positive"):
        PartialFC.from_pml(losses.CosFaceLoss(C, D, scale=0))
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC.from_pml(losses.CosFaceLoss(C, D), sample_rate=0.0)


# ----------------------------------------------------------------------------- DDP helpers

class _Shard(torch.nn.Module):
    """A stand-in for a class-parallel head holding rows [start, stop) of `num_classes`."""

    def __init__(self, start, stop, num_classes):
        super().__init__()
        self.shard = ClassShard(start, stop, num_classes)
        self.num_classes, self.num_local = num_classes, stop - start
        self.weight = torch.nn.Parameter(torch.zeros(self.num_local, 4))
        self.bias = torch.nn.Parameter(torch.zeros(1))           # a unified threshold
        self.register_buffer("bank_valid", torch.zeros(self.num_local, dtype=torch.bool))


def test_ddp_helpers_in_one_process():
    """ignore_shards_in_ddp names every tensor of the class-parallel modules (and only those)
    for DDP to leave alone; slice_shards cuts full tensors to the rank's rows."""
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 4)
    model.head = _Shard(5, 10, 12)
    model._ddp_params_and_buffers_to_ignore = ["backbone.bias"]
    names = ignore_shards_in_ddp(model)
    assert sorted(names) == ["head.bank_valid", "head.bias", "head.weight"]
    assert sorted(model._ddp_params_and_buffers_to_ignore) == ["backbone.bias"] + sorted(names)
    state = {"head.weight": torch.arange(48.0).reshape(12, 4), "head.bias": torch.ones(1),
             "head.bank_valid": torch.ones(5, dtype=torch.bool),
             "backbone.weight": torch.zeros(4, 3)}
    slice_shards(model, state)
    torch.testing.assert_close(state["head.weight"], torch.arange(20.0, 40.0).reshape(5, 4))
    assert state["head.bias"].shape == (1,) and state["head.bank_valid"].shape == (5,)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), UniTSFaceHead(4, 10))  # one process
    assert ignore_shards_in_ddp(plain) == []
    assert not hasattr(plain, "_ddp_params_and_buffers_to_ignore")


# ----------------------------------------------------------------------------- Lightning

def _example():
    pytest.importorskip("lightning")
    spec = importlib.util.spec_from_file_location("lightning_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _went_down(losses, softmax_steps):
    """The loss fell over the run, and within the USS phase too."""
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    assert losses[-1] < losses[softmax_steps], losses


RUN = ["--steps", "30", "--softmax-steps", "10", "--train-ids", "300", "--dim", "64"]


def test_lightning_one_process():
    example = _example()
    threads = torch.get_num_threads()
    try:
        model, checks = example.main(["--devices", "1"] + RUN)
    finally:
        torch.set_num_threads(threads)
    assert model.head.shard is None and model.head.weight.shape == (300, 64)
    assert len(model.losses) == 30
    _went_down(model.losses, 10)
    assert checks == {"grad_change_by_ddp": {"backbone": 0.0, "head": 0.0}}


def test_lightning_ddp_two_processes_class_parallel(tmp_path):
    """Two processes, Lightning's DDP strategy over gloo, the head class-parallel: each rank
    keeps its own shard (DDP neither broadcast nor averaged it), the backbone is the same on
    both ranks (DDP did average it), the loss went down, and the checkpoint holds the whole
    head (gathered from the ranks), loadable in one process."""
    _example()
    report, ckpt = tmp_path / "report.json", tmp_path / "last.ckpt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("MASTER_PORT", None)
    cmd = [sys.executable, EXAMPLE, "--devices", "2", *RUN, "--report", str(report),
           "--save", str(ckpt)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its rank-1 child
        out, _ = proc.communicate()
        pytest.fail(f"the two-process run did not finish in 150 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    rep = json.loads(report.read_text())
    checks = rep["checks"]
    assert rep["world_size"] == 2 and checks["head_shards"] == [[0, 150], [150, 300]]
    assert rep["head_shape"] == [150, 64]
    assert checks["head_shard_min_diff"] > 1e-3          # rank 1's shard is not rank 0's
    assert checks["backbone_max_diff"] == 0.0            # the backbone is a replica
    assert checks["grad_change_by_ddp"]["head"] == 0.0   # DDP left the shards' gradients
    assert checks["grad_change_by_ddp"]["backbone"] > 0  # and averaged the backbone's
    _went_down(rep["losses"], rep["softmax_steps"])

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    weight = state["head.weight"].double()
    assert weight.shape == (300, 64) and state["head.bank"].shape == (300, 64)
    for (start, stop), total in zip(checks["head_shards"], checks["head_shard_sums"]):
        assert float(weight[start:stop].sum()) == pytest.approx(total, rel=1e-9, abs=1e-9)
    head = UniTSFaceHead(64, 300)
    head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})
    assert bool(head.bank_valid.all())
