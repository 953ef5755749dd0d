"""``python -m benchmarks``: time and memory of the UniTSFace objective and of its softmax part,
ours (triton / native) against eager PyTorch, torch.compile, a PartialFC-style head and, when
installed, cut-cross-entropy and Liger. See benchmarks/README.md.

Defaults: GPU → bf16, B=512, D=512, C ∈ {10k, 100k, 1M (sample rate 0.1)};
CPU → fp32, B=256, D=512, C ∈ {10k, 50k (the headline), 1M (sample rate 0.1)}: every
implementation at the headline, eager, partialfc and native (one timed step each) at the
other class counts, and native-sparse (sparse_grad=True + SparseSGD) at 1M, so that the
curve takes about 3 minutes on 2 cores. Partial-FC points time ours both ways: the dense
default and sparse_grad (the rows ``triton-sparse``, ``native-sparse``);
``--quick`` → a CPU smoke run of tiny shapes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import signal
import sys
import time

import torch

from . import impls, measure, report
from .impls import IMPLS, Case

GPU_CLASSES = [10_000, 100_000, 1_000_000]
CPU_CLASSES = [10_000, 50_000, 1_000_000]
QUICK_CLASSES = [1_000, 4_000]
CPU_CURVE_IMPLS = ["eager", "partialfc", "native", "native-sparse"]
"""On the CPU, the implementations timed at class counts other than the headline's (torch.compile
recompiles per shape for 10–40 s there, longer than the steps it times)."""
RUN_ORDER = [*impls.OURS, *(n for n in IMPLS if n not in impls.OURS + ("eager", "compile")),
             "eager", "compile"]
"""The order of the measurements of a case: ours first, then the other fused or memory-saving
heads, then eager and torch.compile, so that a slow compilation cannot starve ours."""
DEFERRED = ("compile",)
"""Measured in a second pass, after every other implementation on every case."""
DENSE_LIMIT = 200_000
"""With no --sample-rate, classes above this use partial FC with rate 0.1, the rest are dense."""


def _count(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 50000, 50k, 1M)")
    mult = {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()]
    return int(round(float(m.group(1)) * mult))


def _names(values, flag: str) -> list[str]:
    out = []
    for v in values or []:
        out += [s for s in v.split(",") if s]
    bad = [n for n in out if n not in IMPLS]
    if bad:
        raise SystemExit(f"{flag}: unknown implementation(s) {bad}; known: {', '.join(IMPLS)}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(impls.DTYPES),
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batch", type=_count, help="B (default 512 GPU, 256 CPU)")
    p.add_argument("--dim", type=_count, help="D (default 512)")
    p.add_argument("--classes", type=_count, nargs="+",
                   help="numbers of classes C (default GPU: 10k 100k 1M, CPU: 10k 50k 1M)")
    p.add_argument("--sample-rate", type=float,
                   help=f"partial-FC sample rate for every C (default: 0.1 above "
                        f"{DENSE_LIMIT:,} classes, else 1 = all classes)")
    p.add_argument("--tasks", nargs="+", choices=impls.TASKS, default=list(impls.TASKS))
    p.add_argument("--repeats", type=int, help="timed steps per measurement (median reported; "
                   "default 10 GPU, 3 CPU, 2 quick)")
    p.add_argument("--curve-impls", nargs="+", metavar="IMPL",
                   help="implementations timed at the class counts other than the headline's "
                        f"(default: all on GPU, {' '.join(CPU_CURVE_IMPLS)} on CPU)")
    p.add_argument("--curve-repeats", type=int,
                   help="timed steps for the cases other than the headline (default: --repeats "
                        "on GPU, 1 on CPU, where a step at 1M classes takes seconds)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3 GPU, 1 CPU)")
    p.add_argument("--only", nargs="+", metavar="IMPL",
                   help=f"implementations to run (of: {', '.join(IMPLS)}; default all)")
    p.add_argument("--out", default=os.path.join(measure.ROOT, "benchmarks", "results"),
                   help="output folder (default benchmarks/results)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (< 1 minute)")
    p.add_argument("--isolate", choices=("auto", "subprocess", "inprocess"), default="auto",
                   help="measure each implementation in a fresh subprocess (default on CPU: "
                        "honest RSS peaks) or in this process (default on GPU and --quick)")
    p.add_argument("--budget", type=float,
                   help="seconds: after this, remaining measurements are skipped (the results "
                        "so far are written)")
    p.add_argument("--impl-budget", type=float, metavar="SECONDS",
                   help="seconds per measurement: after the first step (compilation), the "
                        "warm-up and the timed steps are cut to fit (at least one timed step)")
    p.add_argument("--stem", help="output file name without extension (default "
                                  "<device>-<date>)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier run in --out/<stem>.json (same device) and "
                        "measure only what it lacks")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds per subprocess measurement (default 900)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the start-up correctness checks against the reference")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.only = _names(args.only, "--only")
    args.curve_impls = _names(args.curve_impls, "--curve-impls") or None

    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
    if dev.type == "cuda" and dev.index is None:
        args.device = f"cuda:{torch.cuda.current_device()}"
    gpu = dev.type == "cuda"
    if args.quick:
        args.batch = args.batch or 64
        args.dim = args.dim or 128
        args.classes = args.classes or QUICK_CLASSES
        args.repeats = args.repeats or 2
        args.warmup = args.warmup or 1
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.batch = args.batch or (512 if gpu else 256)
    args.dim = args.dim or 512
    args.classes = args.classes or (GPU_CLASSES if gpu else CPU_CLASSES)
    args.repeats = max(1, args.repeats or (10 if gpu else 3))
    args.curve_repeats = max(1, args.curve_repeats or (args.repeats if gpu else 1))
    if args.curve_impls is None and not gpu:
        args.curve_impls = CPU_CURVE_IMPLS
    args.warmup = max(1, args.warmup if args.warmup is not None else (3 if gpu else 1))
    if args.sample_rate is not None and not 0 < args.sample_rate <= 1:
        raise SystemExit("--sample-rate must lie in (0, 1]")
    if args.isolate == "auto":
        args.isolate = "inprocess" if gpu or args.quick else "subprocess"
    return args


def sample_rate_for(args, classes: int) -> float:
    if args.sample_rate is not None:
        return args.sample_rate
    return 0.1 if classes > DENSE_LIMIT else 1.0


def headline_classes(args) -> int:
    """GPU: 100k classes; CPU: 50k (when run), else the largest dense C run, else the first."""
    want = 100_000 if args.device.startswith("cuda") else 50_000
    if want in args.classes:
        return want
    dense = [c for c in args.classes if sample_rate_for(args, c) >= 1.0]
    return max(dense) if dense else args.classes[0]


def make_cases(args) -> tuple[list[Case], Case]:
    def case(task, c):
        return Case(task, c, args.batch, args.dim, args.dtype, args.device,
                    sample_rate_for(args, c), args.seed)

    head_c = headline_classes(args)
    task0 = "objective" if "objective" in args.tasks else args.tasks[0]
    order = [(task0, head_c)] + [(t, head_c) for t in args.tasks if t != task0]
    order += [(t, c) for c in args.classes if c != head_c for t in args.tasks]
    seen, cases = set(), []
    for t, c in order:
        if (t, c) not in seen:
            seen.add((t, c))
            cases.append(case(t, c))
    return cases, case(task0, head_c)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if m:
            model = m.group(1).strip()
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} logical cores, {torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    text = re.sub(r"\(.*?\)", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "device"


def _versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    from unitsface_kernels import native
    return {"torch": torch.__version__, "triton": tv, "python": platform.python_version(),
            "cuda": torch.version.cuda, "native": native.has_family("unitsface")}


def _setup(case: Case, args, notes: list) -> tuple[dict, float | None]:
    """torch.mm's rate on the case's shape and the reference loss of the case's inputs."""
    mm = measure.measure_mm(case, max(args.warmup, 3),
                            max(args.repeats, 5) * (5 if case.device.startswith("cuda") else 1))
    ref_loss = None
    try:
        ref_loss = impls.reference_loss(impls.make_inputs(case), case)
    except Exception as e:  # noqa: BLE001
        notes.append(
            f"{case.label()}: reference loss not computed ({measure._short(e, 160)})")
    measure._release(torch.device(case.device), False)
    return mm, ref_loss


class _Progress:
    def __init__(self, total: int):
        self.n, self.total, self.bar = 0, total, None
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            print(f"[{self.n + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _on_sigterm(signum, frame):  # timeout(1) sends SIGTERM: stop and write what we have
    raise KeyboardInterrupt(f"signal {signum}")


def run(args) -> dict:
    start = time.monotonic()
    cases, headline = make_cases(args)
    names = args.only or list(IMPLS)
    skipped_notes = []
    if args.quick and not args.only:
        names.remove("compile")
        skipped_notes.append("compile: not run by --quick (compiling takes longer than the smoke "
                             "run's minute); add --only ... compile to include it")
    if args.curve_impls is not None and len(args.classes) > 1:
        skipped_notes.append(f"class counts other than the headline's: only "
                             f"{', '.join(args.curve_impls)} (--curve-impls), "
                             f"{args.curve_repeats} timed step(s) (--curve-repeats)")
    os.makedirs(args.out, exist_ok=True)
    dev_name = device_name(args.device)
    now = _dt.datetime.now()
    stem = args.stem or f"{slug(dev_name)}-{now:%Y-%m-%d}" + ("-quick" if args.quick else "")
    paths = {ext: os.path.join(args.out, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    doc = {"device": dev_name, "device_slug": slug(dev_name), **_versions(),
           "date": now.strftime("%Y-%m-%d"), "datetime": now.isoformat(timespec="seconds"),
           "mode": f"{args.isolate}, warmup {args.warmup}, repeats {args.repeats}"
                   + (f" (other class counts: {args.curve_repeats})"
                      if args.curve_repeats != args.repeats else ""),
           "args": {k: v for k, v in vars(args).items()}, "checks": [], "rows": [],
           "summary": None, "notes": []}
    extra_notes = skipped_notes     # run-level notes (rows carry their own)
    done = set()                    # (case, impl) kept from the earlier run (--resume)
    if args.resume and os.path.exists(paths["json"]):
        done = _resume(doc, paths["json"], cases, dev_name, extra_notes)

    print(f"device: {dev_name} | torch {doc['torch']} | triton {doc['triton']} | native "
          f"unitsface op: {doc['native']} | {doc['mode']}", flush=True)

    order = {(c.task, c.classes): k for k, c in enumerate(cases)}
    impl_order = {n: k for k, n in enumerate(IMPLS)}

    def save(final: bool = False):
        doc["rows"].sort(key=lambda r: (order.get((r["task"], r["classes"]), 1 << 30),
                                        impl_order.get(r["impl"], 99)))
        report.add_speedups(doc["rows"])
        doc["summary"] = report.summary(doc["rows"], headline)
        doc["notes"] = report.iter_notes(doc["rows"]) + extra_notes
        report.write_json(paths["json"], doc)
        report.write_text(paths["md"], report.markdown(doc))
        if final and not args.no_plot:
            why = report.plot(paths["png"], doc["rows"],
                              f"{dev_name} · {args.dtype} · B={args.batch} D={args.dim}")
            if why:
                extra_notes.append(why)
                doc["notes"].append(why)
                report.write_json(paths["json"], doc)

    old = signal.signal(signal.SIGTERM, _on_sigterm)
    progress = None
    try:
        if not args.no_check:
            doc["checks"] += impls.check_eager_matches_reference(args.device)
            for name in impls.OURS:
                if name in names and not IMPLS[name].sparse:
                    probe = impls.check_case("objective", args.device, 0.25)
                    if impls.unavailable(name, probe) is None:
                        for task in args.tasks:
                            for rate in (1.0, 0.25):
                                c = impls.check_case(task, args.device, rate)
                                try:
                                    doc["checks"].append(impls.compare(name, c, rtol=1e-4))
                                except Exception as e:  # noqa: BLE001
                                    doc["checks"].append({"impl": name, "case": c.label(),
                                                          "ok": False, "error": str(e)[:300]})
            bad = [c for c in doc["checks"] if not c.get("ok")]
            print(f"checks vs reference: {len(doc['checks']) - len(bad)}/{len(doc['checks'])} "
                  "ok" + "".join(f"\n  MISMATCH {c}" for c in bad), flush=True)

        # Pass 1: the headline case with every implementation (its summary needs compile),
        # then everything but torch.compile case by case; pass 2: torch.compile on the other
        # cases, whose compilation dominates the run time, as far as --budget allows.
        def at_headline(c):  # the headline's class count: every implementation, --repeats
            return c.classes == headline.classes

        def wanted(c, n):
            return c.task in IMPLS[n].tasks and (not IMPLS[n].sparse or c.sampled) and (
                at_headline(c) or args.curve_impls is None or n in args.curve_impls) \
                and (c, n) not in done

        names = [n for n in RUN_ORDER if n in names]
        jobs = [(c, n) for c in cases for n in names
                if (n not in DEFERRED or c == headline) and wanted(c, n)]
        jobs += [(c, n) for n in DEFERRED if n in names for c in cases
                 if c != headline and wanted(c, n)]
        setups: dict = {}
        current = (None, None)          # (case, inputs) kept for in-process measurements
        progress = _Progress(len(jobs))
        for i, (case, name) in enumerate(jobs):
            if args.budget is not None and time.monotonic() - start > args.budget:
                res = {"status": "skip",
                       "note": impls.unavailable(name, case) or "time budget exhausted"}
                mm, ref_loss = setups.get(case, ({"status": "skip"}, None))
            else:
                if case not in setups:
                    progress.describe(f"{case.label()}: setup")
                    setups[case] = _setup(case, args, extra_notes)
                mm, ref_loss = setups[case]
                inp = None
                if args.isolate == "inprocess":
                    if current[0] != case:
                        current = (None, None)
                        measure._release(torch.device(case.device), False)
                        try:
                            current = (case, impls.make_inputs(case))
                        except Exception as e:  # noqa: BLE001 - measure_impl reports it
                            extra_notes.append(
                                f"{case.label()}: inputs failed ({measure._short(e, 160)})")
                    inp = current[1]
                progress.describe(f"{case.label()}: {name}")
                reps = args.repeats if at_headline(case) else args.curve_repeats
                if args.isolate == "subprocess":
                    res = measure.measure_isolated(case, name, args.warmup, reps, args.timeout,
                                                   args.impl_budget)
                else:
                    res = measure.measure_impl(case, name, args.warmup, reps, inp=inp,
                                               budget_s=args.impl_budget)
                    if IMPLS[name].sparse:  # its optimizer moved W and b: fresh inputs next
                        current = (None, None)
            doc["rows"].append(report.make_row(case, name, res, mm, ref_loss))
            progress.update()
            save()
        current = (None, None)
    except KeyboardInterrupt as e:
        extra_notes.append(f"interrupted ({e}); results are partial")
        print(f"\ninterrupted ({e}): writing partial results", file=sys.stderr, flush=True)
    finally:
        if progress is not None:
            progress.close()
        signal.signal(signal.SIGTERM, old)
        save(final=True)

    print(report.text_table(doc["rows"]))
    print()
    print(report.summary_text(doc["summary"]))
    written = [p for p in paths.values() if os.path.exists(p)]
    print("wrote " + ", ".join(written) + f"  ({time.monotonic() - start:.0f} s)")
    return doc


def _resume(doc: dict, path: str, cases: list, dev_name: str, notes: list) -> set:
    """Rows and checks of the earlier run in `path` into `doc`; the (case, impl) pairs with
    an ok row there, which this run does not measure again."""
    import json
    with open(path) as f:
        old = json.load(f)
    if old.get("device") != dev_name:
        notes.append(f"--resume: {path} is of {old.get('device')!r}, not this device: not kept")
        return set()
    by_key = {(c.task, c.classes, c.sample_rate, c.batch, c.dim, c.dtype): c for c in cases}
    done = set()
    for r in old.get("rows", []):
        case = by_key.get((r["task"], r["classes"], r["sample_rate"], r["batch"], r["dim"],
                           r["dtype"]))
        if r["status"] == "ok" or case is None:
            doc["rows"].append(r)
            if case is not None:
                done.add((case, r["impl"]))
    doc["checks"] += old.get("checks", [])
    notes.append(f"--resume: {len(doc['rows'])} rows kept from the run of {old.get('datetime')}")
    return done


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
