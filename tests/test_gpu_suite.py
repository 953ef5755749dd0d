"""benchmarks/gpu_suite.sh without a GPU: its dry run (DRY_RUN=1) plans every step with the
limit it gets if every step before it ran to its limit, and parses every step's command
(benchmarks/dryrun.py). The plan proves the order (the headline before the cost models, the
tests and the sweeps), that the limits add up to at most 8 minutes, and that the suite's files
are at most 8, flat, in $OUT."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")


def _var(name: str) -> str:
    with open(SCRIPT) as f:
        return re.search(rf"^{name}=(.*?)\s*(#.*)?$", f.read(), re.M).group(1)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), PYTHON=sys.executable)
    env.pop("SUITE_SECONDS", None)
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, out


def _steps(stdout: str) -> list[tuple[str, int]]:
    """(name, limit) in the order planned; a step skipped in the worst case has limit 0."""
    steps = []
    for line in stdout.splitlines():
        m = re.match(r"== (\w+) \(limit (\d+)s\) -> ", line) or \
            re.match(r"== (\w+): skipped, no time left", line)
        if m:
            steps.append((m.group(1), int(m.group(2)) if m.lastindex == 2 else 0))
    return steps


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_every_command_parses(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = re.findall(r"^dry-run (\w+): (.*)$", proc.stdout, re.M)
    assert [name for name, _ in checked] == [name for name, _ in _steps(proc.stdout)]
    assert all(what == "ok" for _, what in checked), checked


def test_headline_first_then_cost_models_then_the_rest(dry_run):
    names = [name for name, _ in _steps(dry_run[0].stdout)]
    assert names[:4] == ["env", "build", "extension", "headline"]
    order = ["headline", "ceilings", "cost_triton", "cost_native", "tests", "accuracy",
             "capture_triton", "capture_native", "cost_persistent", "cost_resident",
             "cost_saved_exps", "curve", "sweep", "fusion", "head_step"]
    assert [n for n in names if n in order] == order
    # the summary prints the benchmark's table before the step records
    with open(SCRIPT) as f:
        text = f.read()
    summary = text[text.index("gpu_suite summary"):]
    assert summary.index("benchmarks.report") < summary.index("for line in")


def test_limits_add_up_to_eight_minutes(dry_run):
    steps = _steps(dry_run[0].stdout)
    total, grace, reserve = int(_var("SUITE_SECONDS").split("-")[-1].strip("}\"")), \
        int(_var("GRACE")), int(_var("RESERVE"))
    assert total == 480
    planned = [limit for _, limit in steps if limit]
    assert sum(limit + grace for limit in planned) + reserve <= total
    # in that worst case the headline, the cost models and the tests still get their limits
    limits = dict(steps)
    assert limits["headline"] == 140 and limits["ceilings"] > 0 and limits["tests"] > 0
    assert limits["cost_triton"] > 0 and limits["cost_native"] > 0


def test_at_most_eight_flat_files(dry_run):
    proc, out = dry_run
    files = _var("FILES").strip("()").split()
    assert len(files) <= 8 and len(set(files)) == len(files)
    written = os.listdir(out)
    assert set(written) <= set(files), written
    assert all(os.path.isfile(os.path.join(out, f)) for f in written)
    logs = set(re.findall(r"^== \w+ \(limit \d+s\) -> (\S+)$", proc.stdout, re.M))
    assert logs <= set(files)
    with open(SCRIPT) as f:
        text = f.read()
    # the benchmark writes <stem>.json/.md/.png, the ceilings their JSON: all among FILES
    for stem in re.findall(r"--stem (\w+)", text):
        assert {f"{stem}.json", f"{stem}.md", f"{stem}.png"} <= set(files)
    for path in re.findall(r"--json \"\$OUT/([\w.]+)\"", text):
        assert path in files


def test_benchmark_times_ours_first_and_compile_last():
    from benchmarks.__main__ import RUN_ORDER
    from benchmarks.impls import IMPLS, OURS
    assert sorted(RUN_ORDER) == sorted(IMPLS)
    assert RUN_ORDER[:len(OURS)] == list(OURS)
    assert RUN_ORDER[-2:] == ["eager", "compile"]


def test_impl_budget_cuts_the_timed_steps():
    """A measurement with no time left after its first step still times one step, says so,
    and keeps its peak memory."""
    from benchmarks import measure
    from benchmarks.impls import Case
    case = Case("softmax", 300, 16, 32, "float32", "cpu")
    res = measure.measure_impl(case, "eager", warmup=3, repeats=50, budget_s=0.0)
    assert res["status"] == "ok", res
    assert len(res["times_s"]) == 1 and "1 of 50 timed steps" in res["note"]
    assert res["peak_bytes"] >= 0 and "mm" not in res


def test_sparse_rows_at_partial_fc_only():
    """native-sparse: sparse_grad=True and a SparseSGD step; its gradient is counted by the
    bytes it holds (the sampled rows), not as a C × D matrix."""
    from benchmarks import impls, measure
    from benchmarks.impls import Case
    from unitsface_kernels import native
    dense = Case("objective", 400, 16, 32, "float32", "cpu")
    assert "partial FC" in impls.unavailable("native-sparse", dense)
    if not native.has_family("unitsface"):
        pytest.skip("the native extension is not built")
    case = Case("objective", 400, 16, 32, "float32", "cpu", sample_rate=0.25)
    inp = impls.make_inputs(case)
    impls.build("native-sparse", inp, case)().backward()
    g = inp.centres.grad
    assert g.is_sparse and impls._nbytes(g) < case.classes * case.dim * 4
    res = measure.measure_impl(case, "native-sparse", warmup=2, repeats=2)
    assert res["status"] == "ok", res
    assert res["grad_bytes"] < case.classes * case.dim * 4


def test_plot_puts_each_point_at_its_class_count(tmp_path, monkeypatch):
    """The class axis is to scale: logarithmic, each point at its C (not a category index)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from benchmarks import report
    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: seen.append(self))
    rows = [dict(task="objective", classes=c, sample_rate=r, impl=i, status="ok",
                 time_ms=1.0 + k, peak_mib=10.0 + k)
            for k, (c, r, i) in enumerate([(10_000, 1.0, "native"), (50_000, 1.0, "native"),
                                           (1_000_000, 0.1, "native"),
                                           (1_000_000, 0.1, "native-sparse")])]
    assert report.plot(str(tmp_path / "p.png"), rows, "t") is None
    ax = seen[0].axes[0]
    assert ax.get_xscale() == "log"
    xs = {line.get_label(): list(line.get_xdata()) for line in ax.get_lines()}
    assert xs["native"] == [10_000, 50_000, 1_000_000]
    assert xs["native-sparse"] == [1_000_000]


def test_resume_keeps_ok_rows_and_remeasures_the_rest(tmp_path):
    """--resume (the suite's curve after its headline): an earlier run's ok rows stay and are
    not measured again; its failed rows of this run's cases are dropped (measured again);
    another device's file is not used."""
    import json

    from benchmarks.__main__ import _resume
    from benchmarks.impls import Case
    head = Case("objective", 100_000, 512, 512, "bfloat16", "cuda:0")
    curve = Case("objective", 10_000, 512, 512, "bfloat16", "cuda:0")

    def row(case, impl, status):
        return dict(task=case.task, classes=case.classes, sample_rate=case.sample_rate,
                    batch=case.batch, dim=case.dim, dtype=case.dtype, impl=impl, status=status)

    old = {"device": "GPU X", "datetime": "then", "checks": [{"ok": True}],
           "rows": [row(head, "triton", "ok"), row(head, "eager", "error"),
                    row(Case("softmax", 7, 1, 1, "float32", "cpu"), "eager", "skip")]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(old))
    doc, notes = {"rows": [], "checks": []}, []
    done = _resume(doc, str(path), [head, curve], "GPU X", notes)
    assert done == {(head, "triton")}
    assert [r["impl"] for r in doc["rows"]] == ["triton", "eager"]  # + the other case's row
    assert doc["rows"][1]["classes"] == 7 and doc["checks"] == [{"ok": True}]
    doc, notes = {"rows": [], "checks": []}, []
    assert _resume(doc, str(path), [head], "GPU Y", notes) == set() and not doc["rows"]
    assert "not this device" in notes[0]
