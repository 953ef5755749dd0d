"""Checks that every command of a gpu_suite.sh plan parses, without running any of them.

    DRY_RUN=1 OUT=/tmp/x bash benchmarks/gpu_suite.sh   # writes the plan, then runs this on it

The plan (``--plan FILE``) has one step a line: ``NAME<TAB>LIMIT<TAB>LOG<TAB>command`` (the
command shell-quoted, as bash's ``printf %q`` writes it). In this one process:

- ``python -m MODULE ARGS``: the module's own argument parser takes ARGS (its first
  ``parse_args`` call is stopped right after parsing: nothing runs, no GPU is asked for);
- ``python -m pytest ARGS``: pytest parses ARGS (collecting nothing: ``--ignore`` of the
  test folder);
- ``python setup.py ARGS``: setuptools parses the command line (``--help`` appended);
- ``python SCRIPT.py ARGS`` (an example): as a module, its parser takes ARGS;
- ``python -c CODE``: CODE compiles;
- ``env VAR=value ... command``: the variables are checked for form, then the command;
- ``bash -c SCRIPT``: bash already checked its syntax (``bash -n``) when it wrote the plan.

Prints one line per step and exits 1 if any command does not parse.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import runpy
import shlex
import sys


class _Parsed(Exception):
    """Raised by the patched parse_args once a module's arguments parsed."""


def _module_args(module: str, args: list[str], script: bool = False) -> str:
    """A module's (or with `script`, a script file's) argument parser on ARGS."""
    real = argparse.ArgumentParser.parse_args

    def stop(self, a=None, namespace=None):
        real(self, a, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = stop
    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if script:
                runpy.run_path(module, run_name="__main__")
            else:
                runpy.run_module(module, run_name="__main__", alter_sys=False)
    except _Parsed:
        return "ok"
    except SystemExit as e:
        return f"argument error (exit {e.code})"
    finally:
        argparse.ArgumentParser.parse_args = real
        sys.argv = argv
    return "its main ran without parsing arguments"


def _pytest_args(args: list[str]) -> str:
    import pytest

    with contextlib.redirect_stdout(io.StringIO()):
        rc = pytest.main([*args, "--collect-only", "-q", "--ignore=tests", "-p",
                          "no:cacheprovider"])
    return "ok" if rc in (0, 5) else f"pytest exit {int(rc)}"  # 5: no tests collected


def _setup_args(script: str, args: list[str]) -> str:
    argv = sys.argv
    sys.argv = [script, *args, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            return f"setup.py: {e.code}"
    finally:
        sys.argv = argv
    return "ok"


def check(argv: list[str]) -> str:
    """'ok', or why the command does not parse."""
    while argv and argv[0] == "env":
        argv = argv[1:]
        while argv and "=" in argv[0]:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                return f"env: not a variable assignment: {argv[0]!r}"
            argv = argv[1:]
    if not argv:
        return "no command"
    prog, rest = os.path.basename(argv[0]), argv[1:]
    if prog == "bash" and rest[:1] == ["-c"]:
        return "ok"
    if not prog.startswith("python"):
        return f"not a python or bash command: {argv[0]!r}"
    if rest[:1] == ["-c"] and len(rest) > 1:
        try:
            compile(rest[1], "<python -c>", "exec")
        except SyntaxError as e:
            return f"python -c: {e}"
        return "ok"
    if rest[:1] == ["-m"] and len(rest) > 1:
        if rest[1] == "pytest":
            return _pytest_args(rest[2:])
        return _module_args(rest[1], rest[2:])
    if rest and os.path.basename(rest[0]) == "setup.py":
        return _setup_args(rest[0], rest[1:])
    if rest and rest[0].endswith(".py"):
        return _module_args(rest[0], rest[1:], script=True)
    return f"cannot check {shlex.join(argv)!r}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, help="the plan gpu_suite.sh wrote under DRY_RUN=1")
    args = ap.parse_args(argv)
    bad = 0
    with open(args.plan) as f:
        for line in f:
            name, limit, log, cmd = line.rstrip("\n").split("\t", 3)
            what = check(shlex.split(cmd))
            bad += what != "ok"
            print(f"dry-run {name}: {what}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
