"""The parts the modules share: checks of a call's batch in the module user's words, the
class shard and partial-FC sampling, the learnable threshold, and the memory bank with its
deferred update."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from .. import backends, distributed, reference
from .. import validation as check
from ..bank import write_rows_
from ..distributed import ClassShard
from ..options import EPS
from ..sampling import sample_classes

BANK_DTYPES = check.FLOAT_DTYPES


# ----------------------------------------------------------------------------- the batch

def flat_labels(labels) -> Tensor:
    """(B,) or (B, 1) labels, as insightface accepts them."""
    labels = check.tensor(labels, "labels")
    return labels.reshape(-1) if labels.dim() == 2 and labels.shape[1] == 1 else labels


def checked_batch(module, x, labels, x_name: str = "x") -> tuple[Tensor, Tensor]:
    """The embeddings and int64 labels of a module call, checked in the module user's words
    (the module's embedding_size and num_classes, the forward's argument names) before the
    module changes any state. Labels are global class ids in [0, num_classes)."""
    x = check.embeddings(x, x_name)
    if x.shape[1] != module.embedding_size:
        raise ValueError(f"{x_name} has embedding size {x.shape[1]} but this "
                         f"{type(module).__name__} has embedding_size={module.embedding_size}")
    labels = check.labels(flat_labels(labels), x.shape[0], x.device)
    if module.num_classes is not None:
        check.label_range(labels, module.num_classes, "labels",
                          f"class ids: num_classes={module.num_classes}")
    return x, labels


def no_autocast(device: torch.device):
    """The modules choose the compute dtype themselves (see the package docstring)."""
    return torch.autocast(device_type=device.type, enabled=False)


def readable(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A parameter or buffer as the loss reads it for embeddings of `dtype`: in place when the
    dtypes mix (float32 masters with half embeddings, a half bank with float32 ones: the
    kernels round the rows as they read them, no copy), else cast (float64 mixes with
    nothing; a differentiable cast, so the master still gets the gradient)."""
    return t if check.reads_as(t.dtype, dtype) else t.to(dtype)


def fresh_rows(param: Tensor, index: Optional[Tensor]) -> None:
    """Before a forward reads rows of `param` (those of `index`; all when None): rows that a
    lazy optimizer (:class:`~unitsface_kernels.optim.SparseSGD`) left behind are brought up to
    date."""
    lazy = getattr(param, "_unitsface_lazy", None)
    if lazy is not None:
        lazy.catch_up(index)


class FreshWeights(nn.Module):
    """A module whose ``weight`` a lazy optimizer may leave partly behind: its state_dict
    brings every row up to date first."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        fresh_rows(self.weight, None)
        super()._save_to_state_dict(destination, prefix, keep_vars)


def pair_cosine(a, b, eps: float = EPS) -> Tensor:
    """cos(a_i, b_i) row-wise in float32 (float64 for float64 inputs), with the eps rule of
    the losses: x̂ = x / max(||x||, eps). Lists and arrays are taken as tensors."""
    a = reference.normalize(torch.as_tensor(a), eps)
    b = reference.normalize(torch.as_tensor(b), eps)
    return (a * b).sum(-1)


# ----------------------------------------------------------------------------- classes

def class_shard(num_classes: int, class_parallel: Optional[bool], group) -> Optional[ClassShard]:
    """This rank's ClassShard when class-parallel (None: auto, i.e. torch.distributed is
    initialised with more than one rank in ``group``), else None (one process holds all)."""
    if class_parallel is not None:
        check.flag(class_parallel, "class_parallel")
    else:
        class_parallel = (torch.distributed.is_available() and torch.distributed.is_initialized()
                          and torch.distributed.get_world_size(group) > 1)
    return ClassShard.from_group(num_classes, group) if class_parallel else None


def setup_classes(module, embedding_size, num_classes, class_parallel, process_group,
                  sample_rate=None) -> None:
    """The per-class heads' attributes: sizes, this rank's shard [class_start,
    class_start + num_local), and for the class-centre heads the sample rate and the
    partial-FC sample size int(sample_rate·num_local) (insightface's PartialFC_V2: the rate
    applies to the shard)."""
    module.embedding_size = check.count(embedding_size, "embedding_size")
    module.num_classes = check.count(num_classes, "num_classes")
    if sample_rate is not None:
        module.sample_rate = check.rate(sample_rate, "sample_rate")
    module.shard = class_shard(module.num_classes, class_parallel, process_group)
    module.class_start = module.shard.start if module.shard is not None else 0
    module.num_local = module.shard.num_local if module.shard is not None else module.num_classes
    if sample_rate is not None:
        module.num_sample = max(1, int(module.sample_rate * module.num_local))


@torch.compiler.disable  # random sampling with a data-dependent size: a clean graph break
def partial_fc_index(module, labels: Tensor) -> Optional[Tensor]:
    """Partial FC in training mode with num_sample < num_local: every class of the batch plus
    random others, sorted — LOCAL class ids of the shard when class-parallel (``labels`` is
    then the gathered global batch). None (all classes) otherwise. Its size follows the
    checks mode (:func:`~unitsface_kernels.sample_classes`): max(#classes of the batch,
    num_sample) in the eager mode, exactly num_sample in the async one."""
    if not module.training or module.num_sample >= module.num_local:
        return None
    if module.shard is not None:
        return module.shard.sample(labels, module.num_sample)
    return sample_classes(labels, module.num_local, module.num_sample)


def shard_repr(module) -> str:
    shard = getattr(module, "shard", None)
    return "" if shard is None else f", shard=[{shard.start}, {shard.stop})"


# ----------------------------------------------------------------------------- threshold

class Threshold(nn.Module):
    """A learnable threshold ``bias``: the unified threshold b (one value; its cosine threshold
    b/s verifies pairs), or one value per class (the official per-class BCE heads)."""

    scale: float
    eps: float
    backend: str

    def _init_threshold(self, size: int = 1, init: float = 0.0) -> None:
        self.bias = nn.Parameter(torch.full((size,), float(init)))

    @property
    def threshold(self) -> float:
        """The learned cosine threshold t = b / s (the mean b for per-class thresholds): the
        same identity when cos(a, b) > t."""
        return float(self.bias.detach().mean()) / self.scale

    @torch.no_grad()
    def verify(self, a, b) -> Tensor:
        """Face verification at the learned threshold: a bool tensor, cos(a_i, b_i) > t.
        a and b are embeddings of shape (..., embedding_size) (broadcastable; lists and
        arrays are taken as tensors)."""
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        for name, t in (("a", a), ("b", b)):
            if not t.is_floating_point() or t.dim() == 0:
                raise TypeError(f"{name} must hold floating embeddings of shape (..., D), got "
                                f"dtype {t.dtype} and shape {tuple(t.shape)}")
            size = getattr(self, "embedding_size", None)
            if size is not None and t.shape[-1] != size:
                raise ValueError(f"{name} has embedding size {t.shape[-1]} but this "
                                 f"{type(self).__name__} has embedding_size={size}")
        cos = pair_cosine(a, b, self.eps)
        # t as a tensor (float64, as the float `threshold` computes it): no read-back
        return cos > (self.bias.detach().mean().double() / self.scale).to(cos.device)

    def _mean_threshold(self) -> Tensor:
        """The mean b over all classes: per-class thresholds of a class-parallel module are
        shards, whose ranks must all take the same decision (b₀ is a collective)."""
        b = self.bias.detach()
        shard = getattr(self, "shard", None)
        if shard is None or b.numel() == 1:
            return b.mean()
        total = b.sum(dtype=torch.float64).reshape(1)
        torch.distributed.all_reduce(total, group=shard.group)
        return total[0] / shard.num_classes

    @torch.compiler.disable  # data-dependent (b ≤ 0?): a clean graph break under compile
    @torch.no_grad()
    def _maybe_init_threshold(self, init, add: bool = False) -> None:
        """The official data-dependent start: while the mean b ≤ 0 in training mode, b ← b₀
        (the unified threshold's head) or b ← b + b₀ (``add``: the sample-to-sample BCE
        head's per-row thresholds), where init() gives the official
        b₀ = mean_i lse_{N_i}(s·cos_ij) over the reference rows the loss uses — NaN when there
        is no negative yet: b is left alone and the next call tries again.

        In the eager checks mode the test b ≤ 0 is read on the host (one synchronisation) and
        b₀ is computed only while it holds. In the async mode (:class:`unitsface_kernels.checks`,
        CUDA graph capture) nothing is read: b₀ is computed at every training call (one more
        forward pass over the reference rows) and chosen on the device, b ← where(mean b ≤ 0
        and b₀ finite, b₀ (or b + b₀), b) — the same values."""
        if not self.training:
            return
        if check.check_mode() == "async":
            start = self._mean_threshold() <= 0
            b0 = init().to(self.bias.dtype)
            new = self.bias + b0 if add else b0.expand_as(self.bias)
            self.bias.copy_(torch.where(start & torch.isfinite(b0), new, self.bias))
            return
        if not bool(self._mean_threshold() <= 0):
            return
        b0 = init().to(self.bias.dtype)
        if bool(torch.isfinite(b0)):
            if add:
                self.bias.add_(b0)
            else:
                self.bias.copy_(b0.expand_as(self.bias))


# ----------------------------------------------------------------------------- memory bank

class _GraphProbe(torch.autograd.Function):
    """Identity on the loss that keeps `probe` alive exactly as long as the loss's autograd
    graph (its ctx holds it): a weak reference to `probe` then says whether a graph that may
    still run its backward exists."""

    @staticmethod
    def forward(ctx, loss, probe):
        ctx.probe = probe
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Probe:
    pass


class MemoryBank(nn.Module):
    """Buffers ``bank`` (one row per class of this module, as ``bank_update_`` stores it) and
    ``bank_valid``, and the training-mode update with the batch *after* the loss (the official
    order; the last occurrence of a label wins).

    The fused backends read the bank in place and keep it for their backward pass, so the
    update of a training step is deferred, with no copy of the bank: it is applied right
    after that step's backward has used the bank (a gradient hook), or, if the step never
    runs a backward, when the bank is next needed — the next call, or any read from outside:
    ``module.bank`` / ``module.bank_valid``, ``state_dict``, ``train()``/``eval()``, moving
    the module, ``reset_bank``, ``load_official``. The bank is copied only when a second call
    comes while the first call's graph still waits for its backward (two forwards before one
    backward): that graph keeps the old rows and the module continues with a copy.
    """

    shard: Optional[ClassShard]

    def _init_bank(self, num_rows: int, embedding_size: int, dtype) -> None:
        if dtype not in BANK_DTYPES:
            raise TypeError(f"bank_dtype must be one of {BANK_DTYPES}, got {dtype!r}")
        self.register_buffer("bank", torch.zeros(num_rows, embedding_size, dtype=dtype))
        self.register_buffer("bank_valid", torch.zeros(num_rows, dtype=torch.bool))
        self._pending = None

    # -- reads from outside flush the deferred update
    def __getattr__(self, name):
        if name in ("bank", "bank_valid") and self.__dict__.get("_pending") is not None:
            self._flush_bank()
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._flush_bank()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self._flush_bank()
        super()._load_from_state_dict(*args, **kwargs)

    def train(self, mode: bool = True):
        self._flush_bank()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._flush_bank()
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def reset_bank(self) -> None:
        """Forget every stored feature (all rows invalid), a deferred update included."""
        pending = self.__dict__.get("_pending")
        if pending is not None:
            pending[3].remove()
            self._pending = None
        self._buffers["bank"].zero_()
        self._buffers["bank_valid"].zero_()

    # -- what the loss reads
    def _bank_for_loss(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The bank and its validity as the loss reads them for embeddings of `dtype`: up to
        date (a pending update is applied first), read in place (see :func:`readable`)."""
        self._flush_bank()
        return readable(self._buffers["bank"], dtype), self._buffers["bank_valid"]

    # -- the update
    @torch.compiler.disable
    def _update_bank(self, x: Tensor, labels: Tensor, loss: Tensor,
                     inputs: tuple[Optional[Tensor], ...]) -> Tensor:
        """bank[y_i] ← x_i (training mode only; class-parallel: x, labels are the gathered
        batch and this rank writes its shard's rows). `inputs`: the tensors of the loss op that
        may take a gradient. Returns the loss to hand to the caller (the same value)."""
        if not self.training:
            return loss
        x, labels = x.detach(), labels.detach()
        grads = [t for t in inputs if t is not None and t.requires_grad]
        if not (torch.is_grad_enabled() and loss.requires_grad and grads):
            with torch.no_grad():
                self._write_bank(self._buffers["bank"], self._buffers["bank_valid"], x, labels)
            return loss
        probe = _Probe()
        pending = [x, labels, weakref.ref(probe), None]  # the hook holds no strong reference

        def after_backward(_):
            if self._pending is pending:
                self._flush_bank(after_backward=True)

        pending[3] = torch.autograd.graph.register_multi_grad_hook(grads, after_backward,
                                                                   mode="any")
        self._pending = pending
        return _GraphProbe.apply(loss, probe)

    @torch.no_grad()
    def _flush_bank(self, after_backward: bool = False) -> None:
        pending = self.__dict__.get("_pending")
        if pending is None:
            return
        self._pending = None
        x, labels, probe, hook = pending
        hook.remove()
        bank, valid = self._buffers["bank"], self._buffers["bank_valid"]
        if not after_backward and probe() is not None:
            # that call's graph may still run its backward, which needs the old rows
            bank, valid = bank.clone(), valid.clone()
            self._buffers["bank"], self._buffers["bank_valid"] = bank, valid
        self._write_bank(bank, valid, x, labels)

    def _write_bank(self, bank, valid, x, labels) -> None:
        # x and labels are the batch the call checked: the update checks nothing again
        if self.shard is not None:
            distributed.shard_bank_update_(bank, valid, x, labels, self.shard)
        else:
            write_rows_(bank, valid, x, labels)


def resolve_backend(module, device: torch.device, family: str) -> str:
    """The module's backend for this call, resolved before the module changes any state."""
    return backends.resolve(module.backend, device, family)
