"""The test command installs every program the suite runs (issue 21 §1).

`./dev.sh test` once passed only on machines that already had Debian's
``notary`` package: tests/test_bench.py ran /usr/bin/notary-signer where it
existed, and nothing installed it. This guard finds the kind of gap, not that
one instance: it collects the string literals in signerd/, tests/ and bench/
that name a program (the first element of an argv list given to a process
runner or named like one, an argument of ``which``/``tool``, a ``*PROGRAMS*``
tuple) or a file under /usr, keeps those
that exist on this machine (``shutil.which``, or the path itself), asks dpkg
which package ships it, and fails unless that package is one that every Debian
system has (Essential or Priority required), one that `./dev.sh packages
test` lists, or a dependency of one. The programs a test runs are all spelt
as such literals here (``["swtpm", ...]``, ``"/usr/bin/notary-signer"``,
``tool("logrotate", ...)``).

A program not installed on the machine running this test cannot be looked up;
on a machine where it is installed by hand (CI's, for instance) the gap shows.
"""

from __future__ import annotations

import ast
import functools
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("signerd", "tests", "bench")
# Literals that name a program by coincidence (a word the code uses for something else)
# are harmless: they resolve to a package of their own, which is checked like any other.
NOT_PROGRAMS = frozenset({"", ".", "..", "-"})


_RUNNERS = frozenset({"run", "Popen", "check_output", "check_call", "call", "_run", "run_cmd",
                      "execvp", "execv", "spawn", "spawn_daemon"})


def _name_of(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _program_position(node: ast.AST, parent: ast.AST | None, grand: ast.AST | None) -> bool:
    """Whether a str constant stands where a program is named: the first element
    (after any ``*prefix``) of an argv list or tuple that is passed to a process
    runner (``subprocess.run([...])``) or assigned to an argv-like or constant
    name (``cmd = [...]``, ``DIE_WITH_PARENT = (...)``); an argument of
    ``which(...)``, ``tool(...)`` or ``program(...)``; or any element of a
    ``*PROGRAMS*`` tuple. Lists and tuples of other data (``for d in ("opt",
    ...)``) are not argv."""
    if isinstance(parent, ast.Call):
        return _name_of(parent.func) in {"which", "tool", "program"}
    if not isinstance(parent, (ast.List, ast.Tuple)):
        return False
    targets: list[ast.expr] = []
    if isinstance(grand, ast.Assign):
        targets = list(grand.targets)
    elif isinstance(grand, ast.AnnAssign):
        targets = [grand.target]
    names = [_name_of(t) for t in targets]
    if any("PROGRAM" in n for n in names):
        return True
    first = next((e for e in parent.elts if not isinstance(e, ast.Starred)), None)
    if first is not node:
        return False
    if isinstance(grand, ast.Call) and parent in grand.args:
        return _name_of(grand.func) in _RUNNERS
    return any(n.isupper() or any(w in n.lower() for w in ("cmd", "argv", "command"))
               for n in names)


def _literals() -> dict[str, set[str]]:
    """The str constants of the Python sources that name a program (in a program's
    position, see _program_position) or an absolute path under /usr: value -> files."""
    found: dict[str, set[str]] = {}
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            tree = ast.parse(path.read_text(), str(path))
            parents: dict[ast.AST, ast.AST] = {
                child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                    continue
                parent = parents.get(node)
                grand = parents.get(parent) if parent is not None else None
                if node.value.startswith("/usr/") or _program_position(node, parent, grand):
                    found.setdefault(node.value, set()).add(str(path.relative_to(ROOT)))
    return found


def _resolve(literal: str) -> Path | None:
    """The file a literal names on this machine: a program on PATH, or an existing
    absolute path under /usr; None for anything else."""
    if literal in NOT_PROGRAMS or "\n" in literal or " " in literal:
        return None
    if literal.startswith("/usr/"):
        path = Path(literal)
        return path if path.is_file() else None
    if "/" in literal or len(literal) > 64:
        return None
    found = shutil.which(literal)
    if found is None:
        return None
    path = Path(found)
    venv = Path(sys.prefix)
    if venv in path.parents or Path(sys.base_prefix) in path.parents and \
            not str(path).startswith("/usr/"):
        return None  # the Python environment's own scripts (pip installs them)
    return path


@functools.cache
def _package(path: Path) -> str | None:
    """The Debian package that ships ``path`` (dpkg -S), trying the /usr-merged
    spellings too; None when dpkg knows no package for it."""
    real = path.resolve()
    candidates = {str(path), str(real)}
    for p in list(candidates):
        if p.startswith("/usr/"):
            candidates.add(p[4:])  # /usr/bin/x shipped as /bin/x before usrmerge
        else:
            candidates.add("/usr" + p)
    for candidate in sorted(candidates):
        out = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.split(":", 1)[0].split(",")[0].strip()
    return None


@functools.cache
def _always_installed(package: str) -> bool:
    """Essential or Priority required: on every Debian system, installed or not by us."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Essential} ${Priority}", package],
                         capture_output=True, text=True)
    return out.returncode == 0 and (out.stdout.startswith("yes") or "required" in out.stdout)


def _test_packages() -> set[str]:
    """What `./dev.sh test` names for apt-get."""
    out = subprocess.run([str(ROOT / "dev.sh"), "packages", "test"], capture_output=True,
                         text=True, check=True)
    return set(out.stdout.split())


def _with_dependencies(packages: set[str]) -> set[str]:
    """``packages`` and every installed package they depend on, recursively
    (Depends and Pre-Depends; each alternative counts): what apt-get installs along."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package}\t${Depends}, ${Pre-Depends}\n"],
                         capture_output=True, text=True, check=True).stdout
    depends: dict[str, set[str]] = {}
    for line in out.splitlines():
        name, _, deps = line.partition("\t")
        names = {alt.split()[0].split(":")[0] for dep in deps.split(",") for alt in dep.split("|")
                 if alt.split()}
        depends.setdefault(name, set()).update(names)
    seen, todo = set(), list(packages)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(depends.get(name, ()))
    return seen


def test_every_program_the_suite_runs_comes_from_the_test_commands_packages() -> None:
    listed = _with_dependencies(_test_packages())
    missing: dict[str, list[str]] = {}
    resolved = 0
    for literal, files in sorted(_literals().items()):
        path = _resolve(literal)
        if path is None:
            continue
        resolved += 1
        package = _package(path)
        if package is None:
            continue  # a file no package ships (made by a test, or installed by pip)
        name = package.split(":")[0]
        if name in listed or _always_installed(name):
            continue
        missing.setdefault(name, []).append(f"{literal} ({', '.join(sorted(files))})")
    # The scan itself must see the suite's programs, or it proves nothing.
    assert resolved >= 5, f"only {resolved} program literals resolved: the scan is broken"
    assert not missing, "; ".join(
        f"Debian package {pkg} is not installed by ./dev.sh test but ships "
        f"{', '.join(uses)}: add it to APT_TEST_PACKAGES in dev.sh"
        for pkg, uses in sorted(missing.items()))


def test_the_scan_finds_the_example_that_once_slipped_through() -> None:
    """The literal that caused issue 21 §1 is seen by the scan, and its package is
    one the test command installs."""
    literals = _literals()
    assert "/usr/bin/notary-signer" in literals
    assert "notary" in _test_packages()


def test_dev_sh_packages_lists_serve_inside_test() -> None:
    serve = subprocess.run([str(ROOT / "dev.sh"), "packages", "serve"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert "softhsm2" in serve and set(serve) <= _test_packages()
    bad = subprocess.run([str(ROOT / "dev.sh"), "packages", "nope"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
