"""Timing and peak memory of one implementation on one case, in this process or in a fresh
subprocess (``python -m benchmarks.measure '<json>'``).

Time: the median of `repeats` fwd+bwd steps after `warmup` steps (the first of which also
compiles: torch.compile, Triton JIT). One step = ``zero_grad(set_to_none) → loss → backward``
(→ the SparseSGD step, for the sparse_grad rows: impls.after_backward). A time budget per
measurement cuts the warm-up and the timed steps after the first step (``measure_impl``).
On CUDA each step is timed with a pair of CUDA events; on the CPU with time.perf_counter.

Peak memory: one extra step, after the warm-up, with the gradients set to None first.
  * CUDA: ``torch.cuda.max_memory_allocated() − memory_allocated()`` over that step: the peak
    on top of the inputs (exact; the caching allocator's reserve is not counted).
  * CPU: the process's resident-set high-water mark over that step: freed heap is returned
    to the OS first (``malloc_trim``), the mark is reset (``/proc/self/clear_refs`` ← 5) and
    ``VmHWM − VmRSS(before)`` is read from ``/proc/self/status``. Where the mark cannot be
    reset, a thread samples the RSS every 0.5 ms instead (``mem_method`` says which).
Both peaks include the gradients the step produces (∂x, ∂W: C×D, ∂b), which every
implementation must write; ``work`` memory is the peak minus those gradients.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Optional

import torch

from . import impls
from .procmem import malloc_trim, reset_hwm, status_kb
from .impls import Case

RESULT_TAG = "@@BENCH_RESULT@@ "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- helpers

def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    if oom_types and isinstance(exc, oom_types):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate" in msg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(exc: BaseException, limit: int = 300) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[:limit] + "…"


# ----------------------------------------------------------------------------- timing

def time_steps(step: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of `step`, `repeats` times (no warm-up here)."""
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        torch.cuda.synchronize(device)
        for s, e in zip(starts, ends):
            s.record()
            step()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
    return times


def median_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds per call of fn() on the current CUDA device, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_steps(fn, reps, torch.device("cuda"))) * 1e3


# ----------------------------------------------------------------------------- CPU memory

def _rss_bytes() -> int:
    (kb,) = status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _RssSampler(threading.Thread):
    def __init__(self, period: float = 5e-4):
        super().__init__(daemon=True)
        self.period, self.peak, self._halt = period, _rss_bytes(), threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, _rss_bytes())


def peak_memory(step: Callable[[], object], inp: impls.Inputs,
                device: torch.device) -> tuple[int, int, str]:
    """(peak bytes over the inputs during one step, gradient bytes it left, method)."""
    inp.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, inp.grad_bytes(), "cuda-allocator"
    malloc_trim()
    if reset_hwm():
        (base,) = status_kb("VmRSS")
        step()
        (hwm,) = status_kb("VmHWM")
        return max(0, (hwm - base) * 1024), inp.grad_bytes(), "rss-hwm"
    sampler = _RssSampler()
    base = _rss_bytes()
    sampler.start()
    try:
        step()
    finally:
        peak = sampler.stop()
    return max(0, peak - base), inp.grad_bytes(), "rss-sampled"


# ----------------------------------------------------------------------------- one measurement

def _release(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if compiled:
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001 - best effort
            pass


def measure_impl(case: Case, name: str, warmup: int, repeats: int,
                 inp: Optional[impls.Inputs] = None, mm: bool = True,
                 budget_s: Optional[float] = None) -> dict:
    """Measure `name` on `case` in this process. Never raises for the implementation's own
    failures: the returned dict's ``status`` is ok / skip / OOM / error (with ``note``).

    `budget_s`: the seconds this measurement may take. The first step (compilation) cannot be
    cut; after it, the warm-up stops and the timed steps are as many as fit in what is left
    (at least one; ``note`` says so), and with the budget spent torch.mm's rate is not
    measured again (the case's, measured before, stands)."""
    res = {"status": "ok", "note": ""}
    reason = impls.unavailable(name, case)
    if reason:
        return {"status": "skip", "note": reason}
    device = torch.device(case.device)
    own = inp is None
    fn = None
    compiled_once = False
    start = time.perf_counter()
    deadline = None if budget_s is None else start + budget_s
    try:
        if own:
            inp = impls.make_inputs(case)
        res["num_used"] = inp.num_used
        fn = impls.build(name, inp, case)
        after = impls.after_backward(name, inp)

        def step():
            inp.zero_grad()
            loss = fn()
            loss.backward()
            if after is not None:
                after()
            return loss

        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        res["first_step_s"] = time.perf_counter() - t0       # includes compilation
        compiled_once = True
        res["loss"] = float(loss.detach())
        del loss
        one = res["first_step_s"]
        for _ in range(max(0, warmup - 1)):
            if deadline is not None and time.perf_counter() > deadline:
                break
            t0 = time.perf_counter()
            step()
            sync(device)
            one = time.perf_counter() - t0
        peak, grads, method = peak_memory(step, inp, device)
        res.update(peak_bytes=int(peak), grad_bytes=int(grads),
                   work_bytes=int(max(0, peak - grads)),
                   mem_method=method)
        if deadline is not None:
            fit = max(1, int((deadline - time.perf_counter()) / max(one, 1e-6)))
            if fit < repeats:
                res["note"] = f"time budget ({budget_s:g} s): {fit} of {repeats} timed steps"
                repeats = fit
        times = time_steps(step, repeats, device)
        res.update(time_s=statistics.median(times), min_time_s=min(times), times_s=times)
        if mm and (deadline is None or time.perf_counter() < deadline):
            # torch.mm's rate right after, in the same process: on a shared machine the load
            # drifts, and the ratio is only meaningful within one time window
            res["mm"] = measure_mm(case, 2, max(5, repeats) * (5 if device.type == "cuda" else 1))
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        if is_oom(e):
            res = {"status": "OOM", "note": _short(e, 160)}
        elif name == "compile" and not compiled_once:
            res = {"status": "skip", "note": "torch.compile failed: " + _short(e)}
        else:
            res = {"status": "error", "note": _short(e)}
    finally:
        fn = None
        if inp is not None:
            inp.zero_grad()
        if own:
            inp = None
        _release(device, name == "compile")
    return res


def measure_mm(case: Case, warmup: int, repeats: int) -> dict:
    """torch.mm's rate on the case's GEMM shape: (B×D) @ (D×N), the case's dtype."""
    device = torch.device(case.device)
    n = case.num_sample if case.sampled else case.classes
    try:
        g = torch.Generator(device=device).manual_seed(7)
        a = torch.randn(case.batch, case.dim, generator=g, device=device, dtype=case.torch_dtype)
        b = torch.randn(n, case.dim, generator=g, device=device, dtype=case.torch_dtype)
        bt = b.t()

        def step():
            return torch.mm(a, bt)

        for _ in range(warmup):
            step()
        sync(device)
        t = statistics.median(time_steps(step, repeats, device))
        return {"status": "ok", "time_s": t, "tflops": 2.0 * case.batch * case.dim * n / t / 1e12,
                "n": n}
    except Exception as e:  # noqa: BLE001
        return {"status": "OOM" if is_oom(e) else "error", "note": _short(e), "n": n}
    finally:
        _release(device, False)


# ----------------------------------------------------------------------------- subprocess

def measure_isolated(case: Case, name: str, warmup: int, repeats: int,
                     timeout: float, budget_s: Optional[float] = None) -> dict:
    """measure_impl in a fresh Python process (honest CPU peaks, crash isolation)."""
    reason = impls.unavailable(name, case)
    if reason:
        return {"status": "skip", "note": reason}
    payload = json.dumps({"case": case.to_dict(), "impl": name, "warmup": warmup,
                          "repeats": repeats, "budget_s": budget_s})
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.measure", payload], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "note": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode in (-9, 137):
        return {"status": "OOM", "note": "killed (SIGKILL, likely the OOM killer)"}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error", "note": f"worker exited {proc.returncode}: " + " | ".join(tail)}


def _worker(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    res = measure_impl(Case.from_dict(spec["case"]), spec["impl"], int(spec["warmup"]),
                       int(spec["repeats"]), budget_s=spec.get("budget_s"))
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
