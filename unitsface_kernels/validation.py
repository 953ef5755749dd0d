"""Input checks (docs/design.md §5): every bad input is a TypeError or ValueError that names the
argument as the caller wrote it, raised before any kernel runs or any state changes.

Two kinds of check:

* Shape, dtype, device and setting checks read no tensor data: they run everywhere, also on
  meta and fake tensors (shape inference) and while torch.compile traces.
* Checks of tensor *values* (label ranges, the order of a partial-FC index, labels missing
  from it) are collected in a :class:`ValueChecks` and evaluated together, in one of two
  modes (:class:`checks`):

  - ``"eager"`` (the default): one small summary tensor read back with one ``tolist()``, so
    a call costs at most one host synchronisation on CUDA tensors whatever it checks, and a
    bad value raises a ValueError before anything changes;
  - ``"async"`` (chosen with :class:`checks`, and always while the current CUDA stream is
    being captured into a graph): no read-back at all; each check becomes a
    ``torch._assert_async`` on the device, which fails the stream later (on CUDA a
    device-side assert: the process's CUDA context is lost) instead of raising before the
    call changes state.

  They are skipped on meta/fake tensors and while torch.compile traces (where reading a
  value would break the graph).
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


def byte_budget(value, name: str) -> int:
    """A memory budget in bytes: an integer ≥ 0 (0: none), not a float, not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer number of bytes, got "
                        f"{type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be ≥ 0, got {value!r}")
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
        # a fill, not torch.tensor: no host-to-device copy (which waits for the stream)
        return torch.full((), finite(b, name), dtype=torch.float32, device=x.device)
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

CHECK_MODES = ("eager", "async")
_check_mode = "eager"


class checks:
    """How the checks of tensor values report (docs/design.md §5), for the whole process:

    * ``"eager"`` (default): read back once per call; a bad value raises a ValueError that
      shows it, before the call changes any state. Partial FC samples
      max(#classes of the batch, num_sample) classes.
    * ``"async"``: never synchronise with the host. Each check runs on the device as
      ``torch._assert_async(ok, message)``: on CPU tensors it raises a RuntimeError at once,
      on CUDA tensors it fails the stream later (a device-side assert, after which the CUDA
      context is unusable) — a bad value is no longer reported before state changes, and the
      message may not reach the user. Partial FC samples exactly num_sample classes
      (:func:`~unitsface_kernels.sample_classes` with ``fixed_size``), and the modules'
      threshold initialisation computes its candidate b₀ at every training call (see
      ``nn.parts.Threshold``).

    While the current CUDA stream is being captured into a graph the async mode applies
    whatever was chosen (a read-back cannot be captured). ``checks(mode)`` sets the mode at
    once; used as a context manager it restores the previous mode on exit::

        unitsface_kernels.checks("async")          # from now on
        with unitsface_kernels.checks("async"):    # for this block
            ...
    """

    def __init__(self, mode: str):
        global _check_mode
        self.previous = _check_mode
        _check_mode = choice(mode, CHECK_MODES, "mode")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _check_mode
        _check_mode = self.previous


def check_mode() -> str:
    """The mode the value checks of a call made now run in (:class:`checks`)."""
    return "async" if _check_mode == "async" or capturing() else "eager"


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def values_readable(*tensors: torch.Tensor) -> bool:
    """False on meta/fake tensors and while torch.compile traces: no value can be read."""
    if torch.compiler.is_compiling():
        return False
    return not any(t.device.type == "meta" or isinstance(t, FakeTensor) for t in tensors)


class ValueChecks:
    """Checks of tensor values, run together by :meth:`run`, in the mode of :func:`check_mode`
    at construction.

    Each check contributes a failure flag (a bool scalar computed on the tensors' device, no
    sync), a message for the async mode, and for the eager mode a few details and a verdict
    that turns them into an error message. Eager: :meth:`run` concatenates the flags and
    details (and the numbers asked for with :meth:`read`), reads them back once and raises the
    first failure, in the order the checks were added. Async: :meth:`run` asserts on the
    device that no flag is set."""

    def __init__(self):
        self.asynchronous = check_mode() == "async"
        self._numbers: list[torch.Tensor] = []
        self._verdicts: list[tuple[int, Callable[[list[int]], None] | None]] = []
        self._asserts: list[tuple[torch.Tensor, str]] = []

    def _add(self, failed: torch.Tensor, message: str, details: list[torch.Tensor],
             verdict: Callable[[list[int]], None]) -> None:
        if self.asynchronous:
            self._asserts.append((failed, message))
            return
        numbers = [failed] + details
        self._numbers += [n.reshape(-1).to(torch.int64) for n in numbers]
        self._verdicts.append((sum(n.numel() for n in numbers), verdict))

    def read(self, number: torch.Tensor) -> None:
        """Read back an integer scalar with the summary (eager mode only): :meth:`run` returns
        these numbers, in the order asked."""
        if self.asynchronous:
            raise RuntimeError("a value cannot be read back in the async checks mode")
        self._numbers.append(number.reshape(1).to(torch.int64))
        self._verdicts.append((1, None))

    def at_most(self, value: torch.Tensor, bound: int, message: str,
                verdict: Callable[[int], None]) -> None:
        """An integer scalar ≤ bound; `verdict(value)` raises the eager error."""
        self._add(value > bound, message, [value], lambda v: verdict(v[0]))

    def label_range(self, lab: torch.Tensor, num: int, name: str, what: str) -> None:
        """Every entry of `lab` in [0, num); `what` says what num counts."""
        if lab.numel() == 0 or not values_readable(lab):
            return
        bad = (lab < 0) | (lab >= num)
        message = f"{name} must lie in [0, {num}) ({what})"
        if self.asynchronous:
            self._add(bad.any(), message, [], None)
            return
        first = torch.argmax(bad.to(torch.int8))

        def verdict(v):
            raise ValueError(f"{message}; got {name}[{v[0]}] = {v[1]}")

        # a 1-element index: lab[first] with a 0-d tensor would read `first` back
        self._add(bad.any(), message, [first, lab.index_select(0, first.reshape(1))], verdict)

    def index(self, index: torch.Tensor, num_classes: int, lab: torch.Tensor,
              name: str = "index", labels_name: str = "labels") -> None:
        """A partial-FC index: sorted, unique classes in [0, num_classes) holding every label."""
        if not values_readable(index, lab):
            return
        steps = index[1:] - index[:-1]
        dup, unsorted = (steps == 0).any(), (steps < 0).any()
        self._add(dup | unsorted, f"{name} must be sorted (ascending) and unique",
                  [dup, unsorted], lambda v: _index_order(v, name))
        self.label_range(index, num_classes, name, "class ids of the centres")
        at = torch.searchsorted(index, lab).clamp_max(index.shape[0] - 1)
        missing = index[at] != lab
        message = (f"{labels_name} must all be in {name}: partial FC must sample every class "
                   "present in the batch")
        if self.asynchronous:
            self._add(missing.any(), message, [], None)
            return
        # the first 8 missing labels, sorted (a fixed-size summary: no data-dependent shape)
        big = torch.iinfo(torch.int64).max
        first = torch.sort(torch.where(missing, lab, big)).values[:8]

        def verdict(v):
            shown = sorted({x for x in v if x != big})
            raise ValueError(f"{labels_name} {shown} are missing from {name}: partial FC "
                             "must sample every class present in the batch")

        self._add(missing.any(), message, [first], verdict)

    def run(self) -> list[int]:
        """Raise the first failure (eager) or assert on the device (async); returns the
        numbers asked for with :meth:`read` (eager)."""
        for failed, message in self._asserts:
            torch._assert_async(~failed, message)
        if not self._numbers:
            return []
        values = torch.cat(self._numbers).tolist()
        at, read = 0, []
        for size, verdict in self._verdicts:
            if verdict is None:
                read.append(values[at])
            elif values[at]:
                verdict(values[at + 1:at + size])
            at += size
        return read


def _index_order(v, name):
    if v[0]:
        raise ValueError(f"{name} has duplicated classes: it must be sorted and unique")
    raise ValueError(f"{name} is not sorted: it must be sorted (ascending) and unique")


def label_range(lab: torch.Tensor, num: int, name: str, what: str) -> None:
    """One :meth:`ValueChecks.label_range`, run at once."""
    values = ValueChecks()
    values.label_range(lab, num, name, what)
    values.run()
