"""The mutation table (scripts/mutants.toml) still applies to the source: a refactor that moves
a mutant's snippet would otherwise only show when somebody next runs scripts/mutate.py, and
docs/mutation.md would keep calling a mutant that no longer exists killed."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutate_module():
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "scripts" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


MUTANTS = _mutate_module().load_mutants()


def test_every_snippet_occurs_once_and_changes_its_file():
    stale = []
    for m in MUTANTS:
        text = (ROOT / m.file).read_text()
        if text.count(m.old) != 1 or m.old == m.new:
            stale.append(f"{m.id}: {text.count(m.old)} occurrences in {m.file}")
    assert not stale, stale


def test_ids_are_unique_and_their_tests_exist():
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids))
    for m in MUTANTS:
        files = [t.split("::")[0] for t in m.tests if t.startswith("tests/")]
        assert files and all((ROOT / f).is_file() for f in files), (m.id, m.tests)


def test_the_docs_table_lists_exactly_the_mutants():
    rows = re.findall(r"^\| ([\w-]+) \| `([^`]+)` \|", (ROOT / "docs" / "mutation.md").read_text(),
                      re.MULTILINE)
    assert sorted(rows) == sorted((m.id, m.file) for m in MUTANTS)
