"""Rows, derived metrics, the summary, and the outputs: a table on stdout, a JSON file, a
markdown table and a PNG plot (time and memory vs number of classes, per implementation)."""

from __future__ import annotations

import json
import math
import os
from typing import Iterable, Optional

from .impls import IMPLS, OURS, Case, _si

MIB = 1024.0 * 1024.0

# docs/design.md §7 targets, for the summary.
TARGETS = {
    "cuda": {"speedup_vs_eager": 8.0, "speedup_vs_compile": 2.0, "gemm_efficiency": 0.5},
    "cpu": {"speedup_vs_eager": 1.5, "gemm_efficiency": 1 / 1.3, "work_memory_vs_eager": 0.1},
}


def make_row(case: Case, impl: str, res: dict, mm: dict, ref_loss: Optional[float]) -> dict:
    """One JSON row: the case, the measurement and the metrics derived from it."""
    n = res.get("num_used") or (case.num_sample if case.sampled else case.classes)
    flops = 2.0 * case.gemms * case.batch * n * case.dim
    row = {"task": case.task, "classes": case.classes, "num_used": n,
           "sample_rate": case.sample_rate, "batch": case.batch, "dim": case.dim,
           "dtype": case.dtype, "device": case.device, "impl": impl,
           "ours": IMPLS[impl].ours, "same_math": IMPLS[impl].same_math,
           "status": res.get("status", "error"), "note": res.get("note", ""),
           "useful_gflop": flops / 1e9}
    if row["status"] != "ok":
        return row
    t = res["time_s"]
    row.update(time_ms=t * 1e3, min_time_ms=res.get("min_time_s", t) * 1e3,
               times_ms=[v * 1e3 for v in res.get("times_s", [])],
               first_step_s=res.get("first_step_s"),
               peak_mib=res["peak_bytes"] / MIB, work_mib=res["work_bytes"] / MIB,
               grad_mib=res["grad_bytes"] / MIB, mem_method=res.get("mem_method"),
               tflops=flops / t / 1e12, loss=res.get("loss"))
    mm = res.get("mm") if (res.get("mm") or {}).get("status") == "ok" else mm
    if mm.get("status") == "ok":
        row["mm_tflops"] = mm["tflops"]
        row["gemm_efficiency"] = row["tflops"] / mm["tflops"]
    if ref_loss is not None and row["same_math"] and row.get("loss") is not None:
        row["loss_rel_err"] = abs(row["loss"] - ref_loss) / max(abs(ref_loss), 1e-30)
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<peer> = time(peer) / time(ours), for our rows, within each case."""
    def key(r):
        return (r["task"], r["classes"], r["sample_rate"], r["batch"], r["dim"], r["dtype"])

    by_case: dict = {}
    for r in rows:
        by_case.setdefault(key(r), []).append(r)
    for group in by_case.values():
        ok = {r["impl"]: r for r in group if r["status"] == "ok"}
        for r in group:
            if r["impl"] in OURS and r["impl"] in ok:
                r["speedup"] = {p: ok[p]["time_ms"] / r["time_ms"] for p in ok if p != r["impl"]}


def _pick(rows, task, classes, sample_rate, impl):
    for r in rows:
        if (r["task"], r["classes"], r["sample_rate"], r["impl"]) == (task, classes, sample_rate,
                                                                       impl):
            return r
    return None


def summary(rows: list[dict], headline: Case) -> dict:
    """The headline numbers (docs/design.md §7) for the headline case, with the targets."""
    kind = "cuda" if headline.device.startswith("cuda") else "cpu"
    out = {"case": headline.label(), "task": headline.task, "classes": headline.classes,
           "sample_rate": headline.sample_rate, "ours": None, "speedup_vs_eager": None,
           "speedup_vs_compile": None, "gemm_efficiency": None, "memory_vs_eager": None,
           "work_memory_vs_eager": None, "targets": TARGETS[kind]}
    pick = lambda impl: _pick(rows, headline.task, headline.classes, headline.sample_rate, impl)  # noqa: E731
    prefer = ("triton", "native") if kind == "cuda" else ("native", "triton")
    cands = [pick(n) for n in prefer]
    ours = next((r for r in cands if r is not None and r["status"] == "ok"), None)
    if ours is None:
        notes = [f"{n}: {r['status']} {r.get('note', '')}".strip() for n, r in zip(prefer, cands)
                 if r is not None]
        out["note"] = "no fused backend ran on the headline case" + (
            " (" + "; ".join(notes) + ")" if notes else "")
        return out
    out["ours"] = ours["impl"]
    sp = ours.get("speedup", {})
    out["speedup_vs_eager"] = sp.get("eager")
    out["speedup_vs_compile"] = sp.get("compile")
    out["gemm_efficiency"] = ours.get("gemm_efficiency")
    out["speedup_vs_peers"] = sp
    eager = pick("eager")
    if eager is not None and eager["status"] == "ok":
        out["memory_vs_eager"] = ours["peak_mib"] / max(eager["peak_mib"], 1e-9)
        out["work_memory_vs_eager"] = ours["work_mib"] / max(eager["work_mib"], 1e-9)
    meets = {}
    for k, target in TARGETS[kind].items():
        v = out.get(k)
        if v is not None:
            meets[k] = bool(v <= target) if k.endswith("memory_vs_eager") else bool(v >= target)
    out["meets_targets"] = meets
    return out


# ----------------------------------------------------------------------------- formatting

def _fmt(v, spec: str, missing: str = "-") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return missing
    return format(v, spec)


COLUMNS = [  # header, width, row -> text
    ("impl", 14, lambda r: r["impl"] + ("*" if r["ours"] else "")),
    ("time ms", 9, lambda r: _fmt(r.get("time_ms"), ".2f")),
    ("peak MiB", 9, lambda r: _fmt(r.get("peak_mib"), ".1f")),
    ("work MiB", 9, lambda r: _fmt(r.get("work_mib"), ".1f")),
    ("TFLOP/s", 8, lambda r: _fmt(r.get("tflops"), ".3g")),
    ("% of mm", 7, lambda r: _fmt(None if r.get("gemm_efficiency") is None
                                 else 100 * r["gemm_efficiency"], ".0f")),
    ("vs eager", 8, lambda r: _fmt((r.get("speedup") or {}).get("eager"), ".2f", "")),
    ("vs compile", 10, lambda r: _fmt((r.get("speedup") or {}).get("compile"), ".2f", "")),
    ("loss err", 8, lambda r: _fmt(r.get("loss_rel_err"), ".1e", "")),
    ("status", 0, lambda r: r["status"] if r["status"] == "ok"
     else f"{r['status']}: {r.get('note', '')}"),
]


def _case_title(r: dict) -> str:
    s = f", |S|={r['num_used']} (rate {r['sample_rate']:g})" if r["sample_rate"] < 1 else ""
    return (f"{r['task']}  B={r['batch']} D={r['dim']} C={r['classes']}{s} {r['dtype']} "
            f"[{r['useful_gflop']:.1f} useful GFLOP]")


def _groups(rows: list[dict]) -> list[list[dict]]:
    out, seen = [], {}
    for r in rows:
        k = (r["task"], r["classes"], r["sample_rate"], r["batch"], r["dim"], r["dtype"])
        if k not in seen:
            seen[k] = []
            out.append(seen[k])
        seen[k].append(r)
    return out


def text_table(rows: list[dict]) -> str:
    lines = []
    for group in _groups(rows):
        lines.append("")
        lines.append(_case_title(group[0]))
        lines.append("  ".join(h.ljust(w) if w else h for h, w, _ in COLUMNS))
        for r in group:
            lines.append("  ".join(f(r).ljust(w) if w else f(r) for _, w, f in COLUMNS))
    lines.append("(* = ours; work = peak − gradients; % of mm = useful FLOP rate / torch.mm's "
                 "rate on the same shape)")
    return "\n".join(lines)


def summary_text(summ: dict) -> str:
    if summ.get("ours") is None:
        return f"summary ({summ['case']}): {summ.get('note', 'no fused backend ran')}"
    parts = [f"summary ({summ['case']}, ours = {summ['ours']}):"]
    for k in ("speedup_vs_eager", "speedup_vs_compile", "gemm_efficiency", "memory_vs_eager",
              "work_memory_vs_eager"):
        v = summ.get(k)
        tgt = summ["targets"].get(k)
        mark = ""
        if k in summ.get("meets_targets", {}):
            mark = f" (target {'≤' if k.endswith('memory_vs_eager') else '≥'} {tgt:.2f}: " + (
                "met)" if summ["meets_targets"][k] else "NOT met)")
        parts.append(f"  {k} = {_fmt(v, '.3f')}{mark}")
    return "\n".join(parts)


def markdown(doc: dict) -> str:
    env = doc
    lines = [f"# unitsface_kernels benchmark — {env['device']}", "",
             f"{env['date']} · torch {env['torch']} · triton {env['triton']} · "
             f"native extension: {env.get('native', '?')} · {env.get('mode', '')}", "",
             "Median fwd+bwd time per step; peak = memory over the inputs during one step "
             "(gradients included), work = peak − gradients; TFLOP/s counts useful FLOPs only "
             "(2·B·N·D per GEMM the maths needs: 5 for the objective, 3 for the softmax); "
             "% of mm = that rate / torch.mm's on the same shape. `*` = ours.", ""]
    summ = doc.get("summary") or {}
    if summ:
        lines += ["## Summary", "", "```", summary_text(summ), "```", ""]
    heads = [h for h, _, _ in COLUMNS]
    for group in _groups(doc["rows"]):
        lines += [f"## {_case_title(group[0])}", "", "| " + " | ".join(heads) + " |",
                  "|" + "---|" * len(heads)]
        for r in group:
            lines.append("| " + " | ".join(f(r).replace("|", "/") for _, _, f in COLUMNS) + " |")
        lines.append("")
    if doc.get("checks"):
        lines += ["## Correctness checks (small fp32 cases vs unitsface_kernels.reference)", "",
                  "| impl | case | loss rel err | grad rel err | ok |", "|---|---|---|---|---|"]
        for c in doc["checks"]:
            lines.append(f"| {c['impl']} | {c['case']} | {_fmt(c.get('loss_rel_err'), '.1e')} | "
                         f"{_fmt(c.get('grad_rel_err'), '.1e')} | {c.get('ok')} |")
        lines.append("")
    if doc.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    return "\n".join(lines)


def write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot(path: str, rows: list[dict], title: str) -> Optional[str]:
    """Time and peak memory vs number of classes per implementation, one row of panels per
    task: both axes logarithmic, each point at its class count (the axis is to scale; a
    partial-FC point is labelled with its rate). The sparse_grad rows are dotted, in their
backend's colour. Returns
    None on success, else why no plot was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"no plot: matplotlib unavailable ({e})"
    tasks = [t for t in ("objective", "softmax") if any(r["task"] == t for r in rows)]
    if not tasks:
        return "no plot: no rows"
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.2 * len(tasks)), squeeze=False)
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)
    markers = dict(zip(IMPLS, "osD^v<>*PXh"))
    colors = dict(zip(IMPLS, plt.get_cmap("tab10").colors))
    for name, impl in IMPLS.items():  # a sparse_grad row takes its backend's colour
        if impl.sparse:
            colors[name] = colors[impl.backend]
    for i, task in enumerate(tasks):
        for j, (key, label) in enumerate((("time_ms", "fwd+bwd time (ms)"),
                                          ("peak_mib", "peak memory over inputs (MiB)"))):
            ax = axes[i][j]
            for impl in IMPLS:
                pts = sorted((r["classes"], r[key], r) for r in rows
                             if r["task"] == task and r["impl"] == impl and r["status"] == "ok"
                             and r.get(key) is not None)
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts],
                        marker=markers.get(impl, "o"), color=colors.get(impl),
                        linestyle=(":" if IMPLS[impl].sparse else "-") if IMPLS[impl].ours
                        else "--",
                        linewidth=2.2 if IMPLS[impl].ours else 1.2, label=impl)
                for c, _, r in pts:
                    if r["sample_rate"] < 1:
                        ax.annotate(f"rate {r['sample_rate']:g}", (c, max(r[key], 1e-3)),
                                    fontsize=7, textcoords="offset points", xytext=(3, 3))
            ax.set_xscale("log")
            ax.set_yscale("log")
            cs = sorted({r["classes"] for r in rows if r["task"] == task})
            ax.set_xticks(cs)
            ax.set_xticklabels([_si(c) for c in cs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel("number of classes C (log scale)")
            ax.set_ylabel(label)
            ax.set_title(f"{task}: {label.split(' (')[0]}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def iter_notes(rows: Iterable[dict]) -> list[str]:
    return sorted({f"{r['impl']}: {r['note']}" for r in rows if r["status"] == "skip"})


def main(argv=None) -> int:
    """``python -m benchmarks.report FILE.json``: the tables and the summary of a run."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("json", help="a benchmark run's JSON file")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        doc = json.load(f)
    print(f"{doc['device']} · {doc['date']} · torch {doc['torch']} · triton {doc['triton']} · "
          f"CUDA {doc.get('cuda')} · {doc.get('mode', '')}")
    print(text_table(doc["rows"]))
    print()
    if doc.get("summary"):
        print(summary_text(doc["summary"]))
    for n in doc.get("notes", []):
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
