"""Mutation testing of the test suite (not part of CI): each mutant is a small realistic bug
planted in the source; the suite must catch it (a mutant is *killed* when the tests that cover
its code fail). A survivor is a blind spot: kill it with a new test, or explain in docs/mutation.md
why it is equivalent. The mutants are listed in scripts/mutants.toml.

    .venv/bin/python scripts/mutate.py --write         # every mutant (about 20 minutes)
    .venv/bin/python scripts/mutate.py --only c-clamp  # some, by id prefix
    .venv/bin/python scripts/mutate.py --list

Each mutant replaces one exact snippet of one file (the script checks that it occurs exactly
once, so a mutant that no longer applies is reported, not silently skipped), rebuilds the
extension when the file is C++/CUDA (incremental, CPU-only: UNITSFACE_NO_CUDA=1), runs its
tests with -x, and restores the file (and the build) whatever happens. The CUDA sweep's
mutants run through its CPU emulation (tests/test_cuda_emu.py rebuilds it); other CUDA-only
code cannot be killed on a machine without a GPU and is not mutated here. The result table goes to stdout
and, with --write, into docs/mutation.md's table (the rows of the mutants run; the others keep
their verdicts).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
"""The interpreter running this script (.venv/bin/python) runs the builds and the tests, with
this checkout first on the path (a git worktree has no .venv of its own, and the venv's
editable install may point at another checkout)."""


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


def load_mutants(path: Path = ROOT / "scripts" / "mutants.toml") -> list[Mutant]:
    """The mutants, kept as data in scripts/mutants.toml."""
    with open(path, "rb") as f:
        table = tomllib.load(f)["mutant"]
    return [Mutant(**{**m, "tests": tuple(m["tests"])}) for m in table]


def _replace(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise SystemExit(f"{path}: the snippet occurs {count} times (expected once): {old!r}")
    path.write_text(text.replace(old, new))
    return text


def _build() -> bool:
    env = dict(os.environ, UNITSFACE_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
               PYTHONPATH=str(ROOT))
    done = subprocess.run([PY, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return done.returncode == 0


def _run_tests(tests) -> str:
    """The verdict of the mutant's tests: "SURVIVED" when they pass, "killed" when one fails;
    anything else (no test selected: pytest's exit code 5, a usage error) is not a kill."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          timeout=1800)
    return {0: "SURVIVED", 1: "killed"}.get(done.returncode,
                                            f"ERROR (pytest exit code {done.returncode})")


def run(mutant: Mutant) -> tuple[str, float]:
    path = ROOT / mutant.file
    native = path.suffix in (".cpp", ".h", ".cu", ".cuh")
    t = time.perf_counter()
    original = _replace(path, mutant.old, mutant.new)
    try:
        if native and not _build():
            return "killed (does not compile)", time.perf_counter() - t
        return _run_tests(mutant.tests), time.perf_counter() - t
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
    mutants = load_mutants()
    chosen = [m for m in mutants
              if not args.only or any(m.id.startswith(o) for o in args.only)]
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
        _write_table(ROOT / "docs" / "mutation.md", mutants, {m.id: v for m, v, _ in rows})
    sys.exit(0 if killed == len(rows) else 1)


def _write_table(doc: Path, mutants: list[Mutant], verdicts: dict[str, str]) -> None:
    """docs/mutation.md's table with these verdicts: the mutants run now replace their rows,
    the others keep the verdict the table had (so --only updates a part), in mutants.toml's
    order; a mutant no longer in mutants.toml drops out."""
    text = doc.read_text()
    start, end = text.index("<!-- table -->"), text.index("<!-- /table -->")
    kept = {}
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("mutant", "---"):
            kept[cells[0]] = cells[3]
    kept.update(verdicts)
    table = ["| mutant | file | bug | verdict |", "|---|---|---|---|"]
    listed = [(m, kept[m.id]) for m in mutants if m.id in kept]
    table += [f"| {m.id} | `{m.file}` | {m.what} | {v} |" for m, v in listed]
    killed = sum(v.startswith("killed") for _, v in listed)
    doc.write_text(text[:start] + "<!-- table -->\n" + "\n".join(table) + "\n"
                   + f"\nScore: {killed}/{len(listed)} killed.\n" + text[end:])


if __name__ == "__main__":
    main()
