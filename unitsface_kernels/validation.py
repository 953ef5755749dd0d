"""Input checks (docs/design.md §5): every bad input is a TypeError or ValueError that names the
argument as the caller wrote it, raised before any kernel runs or any state changes.

Two kinds of check:

* Shape, dtype, device and setting checks read no tensor data: they run everywhere, also on
  meta and fake tensors (shape inference) and while torch.compile traces.
* Checks of tensor *values* (label ranges, the order of a partial-FC index, labels missing
  from it) are collected in a :class:`ValueChecks` and evaluated together: one small summary
  tensor read back with one ``tolist()``, so a call costs at most one host synchronisation on
  CUDA tensors whatever it checks. They are skipped on meta/fake tensors and while
  torch.compile traces (where reading a value would break the graph).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
"""Labels and indices may have any of these dtypes; they are used as int64."""


# ----------------------------------------------------------------------------- settings

def choice(value, choices, name: str):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def finite(value, name: str) -> float:
    """A finite real number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def scale(value, name: str = "scale") -> float:
    """s: finite and > 0."""
    value = finite(value, name)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def cos_margin(value, name: str) -> float:
    """A margin in cosine units: finite, in [−1, 1] (a cosine lies in [−1, 1])."""
    value = finite(value, name)
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [-1, 1] (a margin in cosine units), got {value!r}")
    return value


def non_negative(value, name: str) -> float:
    value = finite(value, name)
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value!r}")
    return value


def norm_eps(value, name: str = "eps") -> float:
    """The normalisation eps of max(‖x‖, eps): finite, in (0, 1]."""
    value = finite(value, name)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return value


def rate(value, name: str = "sample_rate") -> float:
    """A sampling rate in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return float(value)


def flag(value, name: str) -> bool:
    if not isinstance(value, (bool, int)) or isinstance(value, float):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def count(value, name: str) -> int:
    """A positive integer (a size or a count): not a float, not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- tensors

def tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def embeddings(x, name: str = "x") -> torch.Tensor:
    """A (B × D) floating matrix with B ≥ 1 and D ≥ 1, made contiguous."""
    x = tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows × embedding size), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: the batch needs at least one row")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has embedding size 0")
    return x.contiguous()


NARROW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def reads_as(ref_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """Reference rows may come in another 16/32-bit float dtype than x (fp32 master weights
    with half embeddings, a half bank with fp32 ones): the kernels read them rounded to x's
    dtype. float64 mixes with nothing."""
    return ref_dtype == x_dtype or (ref_dtype in NARROW_DTYPES and x_dtype in NARROW_DTYPES)


def reference_rows(ref, x: torch.Tensor, name: str, x_name: str = "x") -> torch.Tensor:
    """A (N × D) float matrix matching x in D and device, in a dtype x can read
    (:func:`reads_as`), with N ≥ 1, made contiguous."""
    ref = tensor(ref, name)
    if ref.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows × embedding size), "
                         f"got shape {tuple(ref.shape)}")
    if ref.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if ref.shape[1] != x.shape[1]:
        raise ValueError(f"{name} has embedding size {ref.shape[1]} but {x_name} has {x.shape[1]}")
    if ref.device != x.device:
        raise ValueError(f"{name} is on {ref.device} but {x_name} is on {x.device}")
    if ref.dtype not in FLOAT_DTYPES or not reads_as(ref.dtype, x.dtype):
        raise TypeError(f"{name} has dtype {ref.dtype} but {x_name} has {x.dtype}; cast one of "
                        "them (only float16, bfloat16 and float32 mix)")
    return ref.contiguous()


def labels(lab, n: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    """A length-n integer vector on `device`, returned as contiguous int64."""
    lab = tensor(lab, name)
    if lab.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int8, int16, int32, int64 or uint8), "
                        f"got {lab.dtype}")
    if lab.dim() != 1 or lab.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(lab.shape)}")
    if lab.device != device:
        raise ValueError(f"{name} is on {lab.device} but x is on {device}")
    return lab.to(torch.int64).contiguous()


def mask(valid, n: int, device: torch.device, name: str) -> torch.Tensor:
    valid = tensor(valid, name)
    if valid.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {valid.dtype}")
    if valid.dim() != 1 or valid.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(valid.shape)}")
    if valid.device != device:
        raise ValueError(f"{name} is on {valid.device} but x is on {device}")
    return valid.contiguous()


def bias(b, n: int, x: torch.Tensor, name: str = "bias",
         per: str = "reference row") -> torch.Tensor:
    """The unified threshold: a finite number, a one-element tensor, or one value per `per`."""
    if isinstance(b, numbers.Real) and not isinstance(b, bool):
        return torch.tensor(finite(b, name), dtype=torch.float32, device=x.device)
    b = tensor(b, name)
    if b.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {b.dtype}")
    if b.numel() not in (1, n):
        raise ValueError(f"{name} must hold 1 value (a unified threshold) or {n} (one per "
                         f"{per}), got shape {tuple(b.shape)}")
    if b.device != x.device:
        raise ValueError(f"{name} is on {b.device} but x is on {x.device}")
    return b


def index_tensor(index, device: torch.device, name: str = "index") -> torch.Tensor:
    """The shape and dtype of a partial-FC index (its values: :meth:`ValueChecks.index`)."""
    index = tensor(index, name)
    if index.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {index.dtype}")
    if index.dim() != 1 or index.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but x is on {device}")
    return index.to(torch.int64).contiguous()


# ----------------------------------------------------------------------------- values

def values_readable(*tensors: torch.Tensor) -> bool:
    """False on meta/fake tensors and while torch.compile traces: no value can be read."""
    if torch.compiler.is_compiling():
        return False
    return not any(t.device.type == "meta" or isinstance(t, FakeTensor) for t in tensors)


class ValueChecks:
    """Checks of tensor values, run together by :meth:`run` with one host read-back.

    Each check contributes a few int64 numbers (computed on the tensors' device, no sync) and
    a verdict that turns them into an error message; :meth:`run` concatenates the numbers,
    reads them back once and raises the first failure, in the order the checks were added."""

    def __init__(self):
        self._numbers: list[torch.Tensor] = []
        self._verdicts: list[tuple[int, Callable[[list[int]], None]]] = []

    def _add(self, numbers: list[torch.Tensor], verdict: Callable[[list[int]], None]) -> None:
        self._numbers += [n.reshape(-1).to(torch.int64) for n in numbers]
        self._verdicts.append((sum(n.numel() for n in numbers), verdict))

    def label_range(self, lab: torch.Tensor, num: int, name: str, what: str) -> None:
        """Every entry of `lab` in [0, num); `what` says what num counts."""
        if lab.numel() == 0 or not values_readable(lab):
            return
        bad = (lab < 0) | (lab >= num)
        first = torch.argmax(bad.to(torch.int8))

        def verdict(v):
            if v[0]:
                raise ValueError(f"{name} must lie in [0, {num}) ({what}); got {name}[{v[1]}] = "
                                 f"{v[2]}")

        self._add([bad.any(), first, lab[first]], verdict)

    def index(self, index: torch.Tensor, num_classes: int, lab: torch.Tensor,
              name: str = "index", labels_name: str = "labels") -> None:
        """A partial-FC index: sorted, unique classes in [0, num_classes) holding every label."""
        if not values_readable(index, lab):
            return
        steps = index[1:] - index[:-1]
        self._add([(steps == 0).any(), (steps < 0).any()], lambda v: _index_order(v, name))
        self.label_range(index, num_classes, name, "class ids of the centres")
        at = torch.searchsorted(index, lab).clamp_max(index.shape[0] - 1)
        missing = index[at] != lab
        # the first 8 missing labels, sorted (a fixed-size summary: no data-dependent shape)
        big = torch.iinfo(torch.int64).max
        first = torch.sort(torch.where(missing, lab, big)).values[:8]

        def verdict(v):
            if v[0]:
                shown = sorted({x for x in v[1:] if x != big})
                raise ValueError(f"{labels_name} {shown} are missing from {name}: partial FC "
                                 "must sample every class present in the batch")

        self._add([missing.any(), first], verdict)

    def run(self) -> None:
        if not self._numbers:
            return
        values = torch.cat(self._numbers).tolist()
        at = 0
        for size, verdict in self._verdicts:
            verdict(values[at:at + size])
            at += size


def _index_order(v, name):
    if v[0]:
        raise ValueError(f"{name} has duplicated classes: it must be sorted and unique")
    if v[1]:
        raise ValueError(f"{name} is not sorted: it must be sorted (ascending) and unique")


def label_range(lab: torch.Tensor, num: int, name: str, what: str) -> None:
    """One :meth:`ValueChecks.label_range`, run at once."""
    checks = ValueChecks()
    checks.label_range(lab, num, name, what)
    checks.run()
