"""Mutation testing of the test suite (not part of CI): each mutant is a small realistic bug
planted in the source; the suite must catch it (a mutant is *killed* when the tests that cover
its code fail). A survivor is a blind spot: kill it with a new test, or explain in MUTANTS why
it is equivalent.

    .venv/bin/python scripts/mutate.py                 # every mutant (about 40 minutes)
    .venv/bin/python scripts/mutate.py --only c-clamp  # some, by id prefix
    .venv/bin/python scripts/mutate.py --list

Each mutant replaces one exact snippet of one file (the script checks that it occurs exactly
once, so a mutant that no longer applies is reported, not silently skipped), rebuilds the
extension when the file is C++/CUDA (incremental, CPU-only: UNITSFACE_NO_CUDA=1), runs its
tests with -x, and restores the file (and the build) whatever happens. CUDA-only code cannot
be killed on a machine without a GPU and is not mutated here. The result table goes to stdout
and to docs/mutation.md's table when --write is given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = str(ROOT / ".venv" / "bin" / "python")


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


T_USS = "tests/test_uss.py"
T_SOFT = "tests/test_margin_softmax.py"
T_UF = "tests/test_unitsface.py"
T_NAT = "tests/test_native.py"

MUTANTS = [
    # ------------------------------------------------------------------ Python
    Mutant("py-label-bound", "unitsface_kernels/validation.py",
           "bad = (lab < 0) | (lab >= num)", "bad = (lab < 0) | (lab > num)",
           (T_USS, "-k", "label_bound and reference"), "label range off by one"),
    Mutant("py-index-dup", "unitsface_kernels/validation.py",
           "self._add([(steps == 0).any(), (steps < 0).any()]",
           "self._add([(steps < 0).any(), (steps < 0).any()]",
           (T_SOFT, "-k", "bad_inputs"), "duplicated index classes accepted"),
    Mutant("py-weight-range", "unitsface_kernels/options.py",
           'check.non_negative(uss_weight, "uss_weight")', 'check.finite(uss_weight, "uss_weight")',
           (T_UF, "-k", "bad_options"), "negative λ accepted"),
    Mutant("py-fallback", "unitsface_kernels/reference.py",
           "f = torch.where(cos > -math.cos(margin_arc), f,",
           "f = torch.where(cos > math.cos(margin_arc), f,",
           (T_SOFT, "-k", "insightface"), "ArcFace fallback on the wrong side"),
    Mutant("py-lse-clamp-factor", "unitsface_kernels/reference.py",
           "inside = (stat >= -scale) & (stat <= scale) if clamp else ~empty",
           "inside = ~empty",
           (T_USS, "-k", "clamp_both_bounds and reference"), "clamped lse keeps its gradient"),
    Mutant("py-bank-rule", "unitsface_kernels/reference.py",
           "return torch.where(norm >= EPS, xc / norm, xc)",
           "return torch.where(norm > 0, xc / norm, xc)",
           ("tests/test_validation.py", "-k", "bank_rule", "tests/test_nn.py", "-k",
            "bank_rule"), "a tiny feature renormalised to unit norm"),
    Mutant("py-sampling", "unitsface_kernels/sampling.py",
           "scores[positives] = 2.0", "scores[positives] = 0.999",
           (T_SOFT, "-k", "sample_classes"), "partial FC may drop a positive"),
    Mutant("py-shard-rate", "unitsface_kernels/nn/parts.py",
           "module.num_sample = max(1, int(module.sample_rate * module.num_local))",
           "module.num_sample = max(1, int(module.sample_rate * module.num_classes))",
           ("tests/test_distributed.py", "-k", "head_partial_fc"),
           "a shard samples int(rate·C) instead of int(rate·num_local)"),
    Mutant("py-deferred-update", "unitsface_kernels/nn/parts.py",
           "                self._flush_bank(after_backward=True)",
           "                pass",
           ("tests/test_nn.py", "-k", "waits_for_the_backward"),
           "the bank update never lands after the backward"),
    Mutant("py-nesterov", "unitsface_kernels/optim.py",
           "d_w, d_v = (lam + mu * v_w, mu * v_v) if nesterov else (v_w, v_v)",
           "d_w, d_v = (lam, mu * v_v) if nesterov else (v_w, v_v)",
           ("tests/test_optim.py",), "Nesterov's lazy step drops a term"),
    # ------------------------------------------------------------------ distributed
    Mutant("dist-gather-scale", "unitsface_kernels/distributed/collectives.py",
           "return out * ctx.world, None, None, None", "return out, None, None, None",
           ("tests/test_distributed.py", "-k", "matches_single_process and reference"),
           "embeddings' gradient not scaled by w"),
    Mutant("dist-lse-combine", "unitsface_kernels/distributed/statistics.py",
           "lse = list(top + torch.log(flat[:k]))", "lse = list(torch.log(flat[:k]))",
           ("tests/test_distributed.py", "-k", "matches_single_process and reference"),
           "log-sum-exps combined without their max"),
    Mutant("dist-bias-allreduce", "unitsface_kernels/distributed/losses.py",
           "        if need_db and spec.replicated_bias:",
           "        if need_db and not spec.replicated_bias:",
           ("tests/test_distributed.py", "-k", "matches_single_process and reference"),
           "a replicated b keeps a rank's partial gradient"),
    # ------------------------------------------------------------------ Triton
    Mutant("tr-online-lse", "unitsface_kernels/triton/common.py",
           "s_new = s * tl.exp(m - m_new)", "s_new = s",
           (T_SOFT, "-k", "shapes_fp32 and triton and 1000"), "running sum-exp not rescaled"),
    Mutant("tr-target-grad", "unitsface_kernels/triton/margin_softmax.py",
           "(p - 1.0)", "(p + 1.0)",
           (T_SOFT, "-k", "dtypes and triton and float32"), "target gradient sign"),
    Mutant("tr-norm", "unitsface_kernels/triton/norms.py",
           "tl.sqrt(acc)", "acc",
           (T_USS, "-k", "shapes_fp32 and triton"), "squared norms"),
    Mutant("tr-uss-clamp", "unitsface_kernels/triton/common.py",
           "        z = clamp(z, -scale, scale)", "        z = clamp(z, -scale, 2 * scale)",
           (T_USS, "-k", "clamp_both_bounds and triton"), "pairs clamp upper bound"),
    # ------------------------------------------------------------------ C++ (CPU)
    Mutant("c-clamp-upper", "csrc/epilogue.h",
           "return z < -s ? -s : (z > s ? s : z);", "return z < -s ? -s : (z > s ? -s : z);",
           (T_USS, "-k", "clamp_both_bounds and native"),
           "the official clamp maps z > s to −s (the issue's planted bug)"),
    Mutant("c-slope", "csrc/epilogue.h",
           "p.cos_m2 + p.sin_m2 * c / sin_t", "p.cos_m2 - p.sin_m2 * c / sin_t",
           (T_SOFT, "-k", "gradcheck and native and arcface"), "ArcFace slope sign"),
    Mutant("c-split-merge", "csrc/chunking.cpp",
           "const at::Tensor f = at::exp(m - top.unsqueeze(0));",
           "const at::Tensor f = at::ones_like(m);",
           (T_NAT, "-k", "threads"), "per-thread splits merged without rescaling"),
    Mutant("c-bank-last-wins", "csrc/bank_update.cpp",
           "if (k + 1 < B && sorted[k + 1] == c) continue;",
           "if (k > 0 && sorted[k - 1] == c) continue;",
           ("tests/test_bank_update.py", "-k", "last_occurrence"), "first occurrence wins"),
    Mutant("c-bias-sign", "csrc/chunking.h",
           "return colsum * norms.clamp_min(kNormEps) * (-1.0 / scale);",
           "return colsum * norms.clamp_min(kNormEps) * (1.0 / scale);",
           (T_NAT, "-k", "chunks_and_isas"), "per-class ∂b sign"),
    Mutant("c-inbatch-self", "csrc/rows.h",
           "return (a.valid[j] != T(0)) & (a.l[j] == yi) & (j != self);",
           "return (a.valid[j] != T(0)) & (a.l[j] == yi);",
           (T_NAT, "-k", "uss_chunks_and_isas and inbatch"), "in-batch pairs include i = i"),
    Mutant("c-invalid-rows", "csrc/chunking.cpp",
           "if (valid.defined() && (rows.is_cuda() || !valid.all().item<bool>())) {",
           "if (false) {",
           ("tests/test_validation.py", "tests/test_native.py", "-k", "random_draws or invalid"),
           "invalid rows read as they are (a NaN slot poisons ∂x)"),
    Mutant("c-normalised-grad", "csrc/chunking.h",
           "const at::Tensor proj = at::where(norms >= kNormEps, h, at::zeros_like(h));",
           "const at::Tensor proj = h;",
           (T_USS, "-k", "zero_embeddings and native"), "projection below the eps"),
]


def _replace(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise SystemExit(f"{path}: the snippet occurs {count} times (expected once): {old!r}")
    path.write_text(text.replace(old, new))
    return text


def _build() -> bool:
    env = dict(os.environ, UNITSFACE_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    done = subprocess.run([PY, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return done.returncode == 0


def _run_tests(tests) -> bool:
    """True when the tests pass (the mutant survives)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=1800)
    return done.returncode == 0


def run(mutant: Mutant) -> tuple[str, float]:
    path = ROOT / mutant.file
    native = path.suffix in (".cpp", ".h", ".cu", ".cuh")
    t = time.perf_counter()
    original = _replace(path, mutant.old, mutant.new)
    try:
        if native and not _build():
            return "killed (does not compile)", time.perf_counter() - t
        return ("SURVIVED" if _run_tests(mutant.tests) else "killed"), time.perf_counter() - t
    finally:
        path.write_text(original)
        if native:
            _build()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="mutant id prefixes")
    p.add_argument("--list", action="store_true")
    p.add_argument("--write", action="store_true", help="update docs/mutation.md's table")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(m.id.startswith(o) for o in args.only)]
    if args.list:
        for m in chosen:
            print(f"{m.id:22s} {m.file:42s} {m.what}")
        return
    rows = []
    for m in chosen:
        verdict, seconds = run(m)
        rows.append((m, verdict, seconds))
        print(f"{m.id:22s} {verdict:28s} {seconds:6.0f} s  {m.what}", flush=True)
    killed = sum(v.startswith("killed") for _, v, _ in rows)
    print(f"\n{killed}/{len(rows)} killed")
    if args.write:
        table = ["| mutant | file | bug | verdict |", "|---|---|---|---|"]
        table += [f"| {m.id} | `{m.file}` | {m.what} | {v} |" for m, v, _ in rows]
        doc = ROOT / "docs" / "mutation.md"
        text = doc.read_text()
        start, end = text.index("<!-- table -->"), text.index("<!-- /table -->")
        doc.write_text(text[:start] + "<!-- table -->\n" + "\n".join(table) + "\n"
                       + f"\nScore: {killed}/{len(rows)} killed.\n" + text[end:])
    sys.exit(0 if killed == len(rows) else 1)


if __name__ == "__main__":
    main()
