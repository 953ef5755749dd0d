"""The implementations that the benchmark compares, the inputs they share, and a check that
the eager baseline computes the same numbers as :mod:`unitsface_kernels.reference`.

Two tasks (docs/design.md §1):

* ``objective`` — the UniTSFace objective: CosFace softmax (s = 64, m3 = 0.4) over the class
  centres W (which take a gradient) + 1 × the USS loss, "pairs" form, on a memory bank with a
  learnable scalar threshold b (bank row c holds class c);
* ``softmax``   — its softmax part alone.

With a sample rate < 1 every implementation uses the same partial-FC index S
(:func:`unitsface_kernels.sample_classes`): the eager ones gather ``W[S]`` (and ``bank[S]``)
and run the dense formulas on the gathered rows; ours take ``index=S``.

Implementations (``IMPLS``):

eager      the official head's formulas as users run them (CVI-SZU/UniTSFace ``head.py``:
           F.linear of F.normalize'd inputs, a one-hot margin, F.cross_entropy; USS with a
           clamp, log(1 + exp), one-hot masks, sum, mean)
compile    torch.compile (default mode) of ``eager``
partialfc  an insightface PartialFC_V2-style eager head (softmax only): gather W[S], normalise,
           fp32 logits, in-place CosFace margin and scale, a memory-saving softmax
           cross-entropy autograd function (softmax in place, grad = p − onehot in place)
cce        apple cut-cross-entropy on the plain normalised softmax (no margin), if importable
liger      Liger-Kernel's fused linear cross-entropy, likewise, if importable
pml        pytorch-metric-learning's CosFaceLoss (m = 0.4, s = 64; softmax only), if importable:
           the same loss, eager (its W is the case's centres, transposed: D × C)
triton     ours, backend="triton" (CUDA)
native     ours, backend="native" (wherever ``unitsface_kernels.native.has_family("unitsface")``)
triton-sparse, native-sparse
           ours under partial FC as the README recommends at a million classes: sparse_grad=True
           (∂W as a sparse tensor of the sampled rows, no dense C × D gradient) and a
           SparseSGD step (lr 0.1, momentum 0.9, weight decay 5e-4) of W and b after each
           backward — an optimizer step the other rows do not take
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import unitsface_kernels as uk
from unitsface_kernels import backends, native, reference

SCALE = 64.0
MARGIN_COS = 0.4      # CosFace m3, UniTSFace's choice
USS_MARGIN = 0.1      # USS positive margin m
USS_WEIGHT = 1.0      # λ
EPS = 1e-5            # F.normalize eps of the official code

TASKS = ("objective", "softmax")
GEMMS = {"objective": 5, "softmax": 3}
"""Reference GEMMs the maths needs (docs/design.md §7): objective = cos vs W, cos vs bank, ∂x via W,
∂x via bank, ∂W; softmax = cos vs W, ∂x, ∂W."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


# ----------------------------------------------------------------------------- cases & inputs

@dataclass(frozen=True)
class Case:
    """One benchmark configuration (JSON-serialisable: plain fields only)."""

    task: str
    classes: int
    batch: int
    dim: int
    dtype: str
    device: str
    sample_rate: float = 1.0
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def sampled(self) -> bool:
        return self.sample_rate < 1.0

    @property
    def num_sample(self) -> int:
        """int(rate·C) (sample_classes raises it to the number of positives if needed)."""
        return max(1, int(self.sample_rate * self.classes)) if self.sampled else self.classes

    @property
    def gemms(self) -> int:
        return GEMMS[self.task]

    def label(self) -> str:
        c = _si(self.classes)
        s = f" (rate {self.sample_rate:g})" if self.sampled else ""
        return f"{self.task} C={c}{s}"

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Case":
        return Case(**d)


def _si(n: int) -> str:
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % (div // 10 or 1) == 0:
            v = n / div
            return f"{v:g}{unit}"
    return str(n)


@dataclass
class Inputs:
    """The tensors of one case. ``x``, ``centres`` and ``bias`` are leaves with gradients
    (the embeddings come from a backbone; W and b are parameters); ``bank`` is a buffer."""

    x: torch.Tensor
    labels: torch.Tensor
    centres: torch.Tensor
    bank: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    index: Optional[torch.Tensor]
    num_used: int                     # N = |S| (or C)

    def leaves(self):
        return [t for t in (self.x, self.centres, self.bias) if t is not None]

    def zero_grad(self) -> None:
        """set_to_none, as optimizer.zero_grad() does by default."""
        for t in self.leaves():
            t.grad = None

    def grad_bytes(self) -> int:
        return sum(_nbytes(t.grad) for t in self.leaves() if t.grad is not None)

    def input_bytes(self) -> int:
        ts = [self.x, self.labels, self.centres, self.bank, self.bias, self.index]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds (a sparse COO one: its indices and values)."""
    if t.is_sparse:
        return _nbytes(t._indices()) + _nbytes(t._values())
    return t.numel() * t.element_size()


def make_inputs(case: Case) -> Inputs:
    """Deterministic (seeded) inputs on the case's device, generated in place there. Under
    partial FC only the sampled rows of W and the bank are random: no implementation reads
    the others in a step, and drawing 2 × 2 GB of normals at 1M classes takes longer on a
    CPU than the steps timed. The others hold a constant unit-norm row, written, so that
    their memory is resident as in training."""
    dev = torch.device(case.device)
    dtype = case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)
    b, d, c = case.batch, case.dim, case.classes
    x = torch.randn(b, d, generator=g, device=dev, dtype=dtype).requires_grad_()
    labels = torch.randint(0, c, (b,), generator=g, device=dev)
    index = None
    if case.sampled:
        cpu_gen = torch.Generator().manual_seed(case.seed + 1)
        index = uk.sample_classes(labels, c, case.num_sample, generator=cpu_gen)
    n = c if index is None else index.numel()

    def rows(unit: bool = False):  # c × d, random (normal, or normalised) where read
        r = torch.randn(n, d, generator=g, device=dev, dtype=dtype)
        r = F.normalize(r, dim=1, eps=EPS) if unit else r
        if index is None:
            return r
        return torch.full((c, d), d ** -0.5, device=dev, dtype=dtype).index_copy_(0, index, r)

    centres = rows().requires_grad_()
    bank = bias = None
    if case.task == "objective":
        bank = rows(unit=True)
        bias = torch.tensor([initial_threshold(x, labels, bank, index)], dtype=torch.float32,
                            device=dev).requires_grad_()
    return Inputs(x, labels, centres, bank, bias, index, n)


@torch.no_grad()
def initial_threshold(x, labels, bank, index, rows: int = 64) -> float:
    """The official data-dependent initial b (mean over rows of logsumexp_{negatives} s·cos),
    estimated on the first `rows` embeddings. It keeps every softplus argument of the
    benchmark data well inside the official clamp [−s, s], so the eager (clamped, official)
    and reference (unclamped) formulas agree."""
    classes = torch.arange(bank.shape[0], device=bank.device) if index is None else index
    rows_b = bank if index is None else bank[index]
    b0 = reference.eager_uss_bias_init(x[:rows].detach(), labels[:rows], rows_b, classes,
                                       scale=SCALE)
    return float(b0)


# ----------------------------------------------------------------------------- eager (official)

def _one_hot(labels: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    one_hot = torch.zeros(cos.shape, dtype=torch.bool, device=cos.device)
    return one_hot.scatter_(1, labels.view(-1, 1).long(), 1)


def eager_softmax_loss(x, w, labels, scale: float = SCALE, m: float = MARGIN_COS):
    """Official ``Normalized_Softmax_Loss.forward`` (CosFace): labels index the rows of w."""
    cos_theta = F.linear(F.normalize(x, eps=EPS), F.normalize(w, eps=EPS))
    one_hot = _one_hot(labels, cos_theta)
    d_theta = one_hot * m
    logits = scale * (cos_theta - d_theta)
    return F.cross_entropy(logits, labels)


def eager_uss_loss(x, bank, labels, bias, scale: float = SCALE, m: float = USS_MARGIN):
    """Official ``Unified_Threshold_Integrated_Sample_to_Sample_Loss.forward`` (without its
    first-call threshold initialisation; b is given): labels index the rows of the bank."""
    cos_theta = F.linear(F.normalize(x, eps=EPS), F.normalize(bank, eps=EPS))
    one_hot = _one_hot(labels, cos_theta)
    cos_m_theta_p = scale * (cos_theta - m) - bias
    cos_m_theta_n = scale * cos_theta - bias
    p_loss = torch.log(1 + torch.exp(-cos_m_theta_p.clamp(min=-scale, max=scale)))
    n_loss = torch.log(1 + torch.exp(cos_m_theta_n.clamp(min=-scale, max=scale)))
    loss = one_hot * p_loss + (~one_hot) * n_loss
    return loss.sum(dim=1).mean()


def _gather(index, labels, *tables):
    """Partial FC the eager way: gathered copies of the sampled rows, local labels."""
    if index is None:
        return (labels, *tables)
    local = torch.searchsorted(index, labels)
    return (local, *(t[index] if t is not None else None for t in tables))


def eager_objective(x, labels, centres, bank, bias, index=None):
    local, w, bk = _gather(index, labels, centres, bank)
    return eager_softmax_loss(x, w, local) + USS_WEIGHT * eager_uss_loss(x, bk, local, bias)


def eager_softmax(x, labels, centres, index=None):
    local, w = _gather(index, labels, centres)
    return eager_softmax_loss(x, w, local)


# ----------------------------------------------------------------------------- partialfc style

class _InplaceSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy that keeps one B×N buffer: the softmax is formed in place in the
    logits (which nothing else saved), and the backward turns it into p − onehot in place.
    The style of insightface's DistCrossEntropy, single-process, written from the maths."""

    @staticmethod
    def forward(ctx, logits, labels):
        rows = torch.arange(logits.shape[0], device=logits.device)
        logits.sub_(logits.max(dim=1, keepdim=True).values)
        logits.exp_()
        logits.div_(logits.sum(dim=1, keepdim=True))
        loss = -logits[rows, labels].clamp_min(1e-30).log().mean()
        ctx.save_for_backward(logits, labels)
        return loss

    @staticmethod
    def backward(ctx, grad):
        p, labels = ctx.saved_tensors
        rows = torch.arange(p.shape[0], device=p.device)
        p[rows, labels] -= 1.0
        p.mul_(grad / p.shape[0])
        return p, None


def partialfc_softmax(x, labels, centres, index=None, scale: float = SCALE,
                      m3: float = MARGIN_COS):
    """PartialFC_V2-style head: gather W[S], normalise, fp32 logits, clamp, CosFace margin on
    the target entries in place, scale, in-place softmax cross-entropy."""
    local, w = _gather(index, labels, centres)
    logits = F.linear(F.normalize(x), F.normalize(w)).float().clamp(-1, 1)
    rows = torch.arange(x.shape[0], device=x.device)
    logits[rows, local] -= m3
    logits = logits * scale
    return _InplaceSoftmaxCE.apply(logits, local)


# ----------------------------------------------------------------------------- third parties

def _plain_normalised(x, labels, centres, index):
    """(s·x̂, ŵ[S], local labels) for the plain normalised softmax (no margin)."""
    local, w = _gather(index, labels, centres)
    return F.normalize(x, eps=EPS) * SCALE, F.normalize(w, eps=EPS), local


def _import(module: str, attr: str):
    mod = importlib.import_module(module)
    return getattr(mod, attr)


def cce_softmax():
    """cut-cross-entropy's linear_cross_entropy on (s·x̂, ŵ[S]) (imported once, here)."""
    linear_cross_entropy = _import("cut_cross_entropy", "linear_cross_entropy")

    def loss(x, labels, centres, index=None):
        e, c, local = _plain_normalised(x, labels, centres, index)
        return linear_cross_entropy(e, c, local)
    return loss


def liger_softmax():
    """Liger's LigerFusedLinearCrossEntropyLoss on (s·x̂, ŵ[S]) (imported once, here)."""
    module = _import("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss")()

    def loss(x, labels, centres, index=None):
        e, c, local = _plain_normalised(x, labels, centres, index)
        out = module(c, e, local)                   # forward(lin_weight, _input, target)
        return out[0] if isinstance(out, (tuple, list)) else out
    return loss


def pml_softmax(num_classes: int, dim: int):
    """pytorch-metric-learning's CosFaceLoss over (x, W[S]) (imported once, here). The module
    is built for the N = |S| classes of the case; ``functional_call`` hands it the case's
    centres (transposed: PML stores W as D × N) in place of its own W, so the gradient reaches
    the same leaf as every other implementation's."""
    cosface = _import("pytorch_metric_learning.losses", "CosFaceLoss")(
        num_classes=num_classes, embedding_size=dim, margin=MARGIN_COS, scale=SCALE)
    cosface.W = torch.nn.Parameter(torch.empty(dim, 0))  # its own W is never used

    def loss(x, labels, centres, index=None):
        local, w = _gather(index, labels, centres)
        return torch.func.functional_call(cosface, {"W": w.t()}, (x, local))
    return loss


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Impl:
    name: str
    tasks: tuple
    ours: bool
    same_math: bool           # computes the case's loss exactly (cce/liger: no margin)
    description: str
    sparse: bool = False      # sparse_grad=True + a SparseSGD step (partial FC only)

    @property
    def backend(self) -> str:
        """Ours: the backend= it runs ("triton-sparse" → "triton")."""
        return self.name.split("-")[0]


IMPLS = {
    "eager": Impl("eager", TASKS, False, True, "official head formulas, eager PyTorch"),
    "compile": Impl("compile", TASKS, False, True, "torch.compile (default mode) of eager"),
    "partialfc": Impl("partialfc", ("softmax",), False, True,
                      "PartialFC_V2-style eager head (in-place margin and softmax CE)"),
    "cce": Impl("cce", ("softmax",), False, False,
                "cut-cross-entropy linear_cross_entropy, plain normalised softmax (no margin)"),
    "liger": Impl("liger", ("softmax",), False, False,
                  "Liger fused linear cross-entropy, plain normalised softmax (no margin)"),
    "pml": Impl("pml", ("softmax",), False, True,
                "pytorch-metric-learning CosFaceLoss (same loss), eager"),
    "triton": Impl("triton", TASKS, True, True, "ours, backend='triton'"),
    "native": Impl("native", TASKS, True, True, "ours, backend='native'"),
    "triton-sparse": Impl("triton-sparse", TASKS, True, True,
                          "ours, backend='triton', sparse_grad=True + SparseSGD step", True),
    "native-sparse": Impl("native-sparse", TASKS, True, True,
                          "ours, backend='native', sparse_grad=True + SparseSGD step", True),
}
OURS = tuple(n for n, i in IMPLS.items() if i.ours)


def unavailable(name: str, case: Case) -> Optional[str]:
    """None when `name` can run `case` here, else the reason it is skipped."""
    impl = IMPLS[name]
    if case.task not in impl.tasks:
        return f"{name} does not implement the {case.task} task"
    dev = torch.device(case.device)
    if impl.ours:
        try:
            backends.resolve(impl.backend, dev, "unitsface")
        except Exception as e:  # noqa: BLE001 - the reason is the message
            return re.split(r"\. |; | \(", str(e))[0]
        if impl.backend == "native" and not native.has_family("unitsface"):
            return "the native backend has no unitsface op in this build"
        if impl.sparse and not case.sampled:
            return "sparse_grad needs partial FC (a sample rate < 1)"
    if name in ("cce", "liger"):
        module = {"cce": "cut_cross_entropy", "liger": "liger_kernel"}[name]
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        if dev.type != "cuda":
            return f"{module} needs CUDA tensors"
    if name == "pml" and importlib.util.find_spec("pytorch_metric_learning") is None:
        return "pytorch_metric_learning is not installed"
    return None


def build(name: str, inp: Inputs, case: Case) -> Callable[[], torch.Tensor]:
    """A closure computing the case's loss with implementation `name` (forward only; the
    harness calls .backward() on what it returns)."""
    x, y, w, bank, b, idx = inp.x, inp.labels, inp.centres, inp.bank, inp.bias, inp.index
    obj = case.task == "objective"
    if name == "eager":
        if obj:
            return lambda: eager_objective(x, y, w, bank, b, idx)
        return lambda: eager_softmax(x, y, w, idx)
    if name == "compile":
        fn = torch.compile(eager_objective if obj else eager_softmax)
        if obj:
            return lambda: fn(x, y, w, bank, b, idx)
        return lambda: fn(x, y, w, idx)
    if name == "partialfc":
        return lambda: partialfc_softmax(x, y, w, idx)
    if name in ("cce", "liger"):
        fn = cce_softmax() if name == "cce" else liger_softmax()
        return lambda: fn(x, y, w, idx)
    if name == "pml":
        fn = pml_softmax(inp.num_used, case.dim)
        return lambda: fn(x, y, w, idx)
    if name in OURS:
        be, sparse = IMPLS[name].backend, IMPLS[name].sparse
        if obj:
            return lambda: uk.fused_unitsface_loss(
                x, y, w, bank, b, index=idx, scale=SCALE, margin_cos=MARGIN_COS,
                uss_margin=USS_MARGIN, uss_weight=USS_WEIGHT, sparse_grad=sparse, backend=be)
        return lambda: uk.fused_margin_softmax_loss(x, w, y, scale=SCALE, margin_cos=MARGIN_COS,
                                                    index=idx, sparse_grad=sparse, backend=be)
    raise KeyError(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}")


def after_backward(name: str, inp: Inputs) -> Optional[Callable[[], None]]:
    """What a step of `name` does after its backward: the SparseSGD step of the sparse rows
    (README, "Millions of identities"), nothing for the others. It moves W and b: the
    harness draws fresh inputs for whatever it measures next."""
    if not IMPLS[name].sparse:
        return None
    from unitsface_kernels.optim import SparseSGD
    params = [t for t in (inp.centres, inp.bias) if t is not None]
    return SparseSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4).step


@torch.no_grad()
def reference_loss(inp: Inputs, case: Case) -> float:
    """The loss of :mod:`unitsface_kernels.reference` (computed in fp32 or wider)."""
    if case.task == "objective":
        out = reference.unitsface_loss(inp.x, inp.labels, inp.centres, inp.bank, inp.bias,
                                       index=inp.index, scale=SCALE, margin_cos=MARGIN_COS,
                                       uss_margin=USS_MARGIN, uss_weight=USS_WEIGHT)
    else:
        out = reference.margin_softmax_loss(inp.x, inp.centres, inp.labels, scale=SCALE,
                                            margin_cos=MARGIN_COS, index=inp.index)
    return float(out)


# ----------------------------------------------------------------------------- correctness

def _grads(loss_fn, inp: Inputs):
    inp.zero_grad()
    loss = loss_fn()
    loss.backward()
    grads = [None if t.grad is None else t.grad.detach().clone() for t in inp.leaves()]
    inp.zero_grad()
    return loss.detach().double(), grads


def _ref_fn(inp: Inputs, case: Case):
    if case.task == "objective":
        return lambda: reference.unitsface_loss(
            inp.x, inp.labels, inp.centres, inp.bank, inp.bias, index=inp.index, scale=SCALE,
            margin_cos=MARGIN_COS, uss_margin=USS_MARGIN, uss_weight=USS_WEIGHT)
    return lambda: reference.margin_softmax_loss(inp.x, inp.centres, inp.labels, scale=SCALE,
                                                 margin_cos=MARGIN_COS, index=inp.index)


def compare(name: str, case: Case, rtol: float) -> dict:
    """Loss and gradients of `name` vs the reference on `case`: {'loss_rel_err',
    'grad_rel_err' (max over x, W, b), 'ok'}."""
    inp = make_inputs(case)
    ref_loss, ref_grads = _grads(_ref_fn(inp, case), inp)
    loss, grads = _grads(build(name, inp, case), inp)
    loss_err = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30))
    grad_err = 0.0
    for g, r in zip(grads, ref_grads):
        if r is None:
            continue
        if g is None:
            grad_err = math.inf
            continue
        g, r = g.double(), r.double()
        grad_err = max(grad_err, float((g - r).norm() / r.norm().clamp_min(1e-30)))
    return {"impl": name, "case": case.label(), "loss_rel_err": loss_err,
            "grad_rel_err": grad_err, "ok": loss_err <= rtol and grad_err <= rtol}


def check_case(task: str, device: str, rate: float) -> Case:
    """A small fp32 case for the start-up checks. D = 256 keeps every USS softplus argument
    far inside the official clamp [−s, s] (the eager formulas clamp, the reference does not)."""
    return Case(task, 2000, 64, 256, "float32", device, sample_rate=rate, seed=123)


def check_eager_matches_reference(device: str) -> list[dict]:
    """Assert once, on small fp32 cases (dense and partial FC), that the eager baseline and
    the package reference agree in loss and gradients: the comparison is apples to apples."""
    results = []
    for task in TASKS:
        for rate in (1.0, 0.25):
            r = compare("eager", check_case(task, device, rate), rtol=1e-4)
            results.append(r)
            assert r["ok"], f"eager baseline disagrees with unitsface_kernels.reference: {r}"
    return results
