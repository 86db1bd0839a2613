"""DESIGN.md's architecture, checked from the source with `ast` (nothing is imported).

Layers: a module imports only modules of its own layer or below. Within one layer,
importing across packages is allowed (rlpost.data -> rlpost.model, rewards -> algorithms).
    L6 rlpost.cli   L5 rlpost.jobs rlpost.sweeps   L4 rlpost.workers rlpost.engines
    L3 rlpost.data rlpost.model rlpost.tracking    L2 rlpost.config
    L1 rlpost.algorithms (algorithms/) rlpost.rewards (rewards/)
    L0 rlpost.errors rlpost.files rlpost (the package's __init__)
A module in no layer fails the layer check: a new package gets its layer here first.

Every import statement counts, wherever it is: at the top, inside a function (a deferred
import is still a dependency) and under `if TYPE_CHECKING:`. One exemption: the circle
check leaves out TYPE_CHECKING imports (they never run, and they are how a module names a
type from a module that imports it). The layer and algorithm checks do not exempt them:
naming a type couples a module to its home as much as calling it does.

Files map to module names through pyproject's [tool.setuptools] package-dir. Each check is
a function of a source tree; the tests at the bottom plant violations in a tree under
tmp_path and show each check reports them.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import NamedTuple

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
LAYERS = {
    "rlpost.cli": 6,
    "rlpost.jobs": 5,
    "rlpost.sweeps": 5,
    "rlpost.workers": 4,
    "rlpost.engines": 4,
    "rlpost.data": 3,
    "rlpost.model": 3,
    "rlpost.tracking": 3,
    "rlpost.config": 2,
    "rlpost.algorithms": 1,
    "rlpost.rewards": 1,
    "rlpost.errors": 0,
    "rlpost.files": 0,
}
ALGORITHMS_ALLOWED = {"rlpost.algorithms", "rlpost.algorithms.base"}  # the registry and the protocols
ALGORITHMS_FREE = ("rlpost.cli", "rlpost.jobs")  # may import a specific algorithm
TWIN_ROOTS = {"algorithms": "algorithms", "rewards": "rewards", "launch": "launch"}  # else rlpost/<name>
TIERS = {"exactness", "runs", "gpu"}
MAX_FILE, MAX_CLASS = 400, 250
_spec = importlib.util.spec_from_file_location("code_map", ROOT / "docs" / "code_map.py")
code_map = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_map)


class Import(NamedTuple):
    source: str  # the importing module
    target: str  # the imported module (the nearest module for `from m import name`)
    where: str  # path:line
    type_checking: bool


def modules(root: Path, package_dir: dict = PACKAGE_DIR) -> dict[str, Path]:
    """Module name -> file, for every .py file in the package-dir folders."""
    found = {}
    for package, folder in package_dir.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def imports(root: Path, package_dir: dict = PACKAGE_DIR) -> list[Import]:
    """Every import of an rlpost module, by every module under root."""
    mods, found = modules(root, package_dir), []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        guarded = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
            for stmt in node.body
            for n in ast.walk(stmt)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            where = f"{path.relative_to(root).as_posix()}:{node.lineno}"
            found += [
                Import(name, t, where, id(node) in guarded)
                for t in dict.fromkeys(targets)
                if t == "rlpost" or t.startswith("rlpost.")
            ]
    return found


def within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def layer(module: str) -> int | None:
    """The layer of the longest entry of LAYERS that holds the module; the bare package is L0."""
    held = [p for p in LAYERS if within(module, p)]
    return LAYERS[max(held, key=len)] if held else (0 if module == "rlpost" else None)


def upward_imports(root: Path, package_dir: dict = PACKAGE_DIR) -> list[str]:
    bad = []
    for imp in imports(root, package_dir):
        src, dst = layer(imp.source), layer(imp.target)
        if src is None or dst is None:
            outside = imp.source if src is None else imp.target
            bad.append(f"{imp.where}: {outside} is in no layer (see LAYERS)")
        elif dst > src:
            bad.append(f"{imp.where}: {imp.source} (L{src}) imports {imp.target} (L{dst})")
    return sorted(set(bad))


def import_circles(root: Path, package_dir: dict = PACKAGE_DIR) -> list[str]:
    """One path per circle found by a depth-first search, as 'a -> b -> a'."""
    graph: dict[str, set[str]] = {m: set() for m in modules(root, package_dir)}
    for imp in imports(root, package_dir):
        if not imp.type_checking and imp.target in graph and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    circles, done, stack = {}, set(), []

    def visit(node: str) -> None:
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycle = stack[stack.index(nxt) :] + [nxt]
                circles.setdefault(frozenset(cycle), " -> ".join(cycle))
            elif nxt not in done:
                visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return sorted(circles.values())


def specific_algorithm_imports(root: Path, package_dir: dict = PACKAGE_DIR) -> list[str]:
    """Imports of a specific algorithm module by the runtime (rlpost/) outside cli.py and jobs/."""
    elsewhere = [p for p in package_dir if p != "rlpost"]  # algorithms/, rewards/: not the runtime
    return sorted(
        f"{i.where}: {i.source} imports {i.target}"
        for i in set(imports(root, package_dir))
        if not within(i.source, *elsewhere, *ALGORITHMS_FREE)
        and within(i.target, "rlpost.algorithms")
        and i.target not in ALGORITHMS_ALLOWED
    )


def misplaced_tests(root: Path) -> list[str]:
    bad = set()
    for test in (root / "tests").rglob("test_*.py"):
        rel = test.parent.relative_to(root / "tests")
        if not rel.parts:
            if test.name != "test_architecture.py":
                bad.add(f"tests/{test.name}: directly under tests/ (move it to its package's folder)")
        elif rel.parts[0] not in TIERS:
            twin = Path(TWIN_ROOTS.get(rel.parts[0], f"rlpost/{rel.parts[0]}"), *rel.parts[1:])
            if not (root / twin).is_dir():
                bad.add(f"tests/{rel.as_posix()}/: no package twin {twin.as_posix()}/, not a tier")
    return sorted(bad)


def over_budget(root: Path, folders=("rlpost", "algorithms", "rewards")) -> list[str]:
    bad = []
    for path in sorted(p for f in folders for p in (root / f).rglob("*.py")):
        text, rel = path.read_text(encoding="utf-8"), path.relative_to(root).as_posix()
        if len(text.splitlines()) > MAX_FILE:
            bad.append(f"{rel}: {len(text.splitlines())} lines (budget {MAX_FILE})")
        for node in ast.walk(ast.parse(text, rel)):
            size = node.end_lineno - node.lineno + 1 if isinstance(node, ast.ClassDef) else 0
            if size > MAX_CLASS:
                bad.append(f"{rel}:{node.lineno}: class {node.name}: {size} lines (budget {MAX_CLASS})")
    return bad


# ---- the real tree ----


def test_no_upward_imports():
    assert not (bad := upward_imports(ROOT)), "imports from a higher layer:\n" + "\n".join(bad)


def test_no_import_circles():
    assert not (bad := import_circles(ROOT)), "import circles:\n" + "\n".join(bad)


def test_runtime_imports_only_the_algorithm_registry_and_base():
    assert not (bad := specific_algorithm_imports(ROOT)), (
        "outside rlpost/jobs/ and cli.py, import only rlpost.algorithms and rlpost.algorithms.base:\n"
        + "\n".join(bad)
    )


def test_tests_mirror_the_packages():
    assert not (bad := misplaced_tests(ROOT)), "\n".join(bad)


def test_size_budget():
    bad = over_budget(ROOT)
    print("\n".join(bad))
    assert not bad, "over budget:\n" + "\n".join(bad)


def test_readme_code_map_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if code_map.START not in readme:
        pytest.skip(
            f"README.md has no code map yet: add a line {code_map.START} and a line {code_map.END}, "
            "then run `python docs/code_map.py --write README.md`"
        )
    assert code_map.splice(readme, code_map.code_map(ROOT)) == readme, (
        "README.md's map of the code is stale: run `python docs/code_map.py --write README.md`"
    )


# ---- each check reports a planted violation ----


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_upward_import_is_reported(tmp_path):
    tree(
        tmp_path,
        {
            "rlpost/config/a.py": "def f():\n    from rlpost.jobs.rl import train\n",
            "rlpost/config/b.py": "if TYPE_CHECKING:\n    import rlpost.workers.learner\n",
            "rlpost/data/c.py": "from rlpost.model import load\nfrom rlpost.errors import E\n",
            "rlpost/model/load.py": "",
            "rlpost/newpkg/d.py": "from ..errors import E\n",
        },
    )
    assert upward_imports(tmp_path) == [
        "rlpost/config/a.py:2: rlpost.config.a (L2) imports rlpost.jobs.rl (L5)",
        "rlpost/config/b.py:2: rlpost.config.b (L2) imports rlpost.workers.learner (L4)",
        "rlpost/newpkg/d.py:1: rlpost.newpkg.d is in no layer (see LAYERS)",
    ]


def test_import_circle_is_reported_with_its_path(tmp_path):
    tree(
        tmp_path,
        {
            "rlpost/data/a.py": "from rlpost.data.b import x\n",
            "rlpost/data/b.py": "def f():\n    from rlpost.data import c\n",
            "rlpost/data/c.py": "import rlpost.data.a\n",
            "rlpost/data/d.py": "from rlpost.data.e import y\n",
            "rlpost/data/e.py": "if TYPE_CHECKING:\n    from rlpost.data.d import z\n",
        },
    )
    assert import_circles(tmp_path) == ["rlpost.data.a -> rlpost.data.b -> rlpost.data.c -> rlpost.data.a"]


def test_runtime_import_of_a_specific_algorithm_is_reported(tmp_path):
    tree(
        tmp_path,
        {
            "algorithms/__init__.py": "",
            "algorithms/base.py": "",
            "algorithms/hapo.py": "",
            "rlpost/engines/a.py": "from rlpost.algorithms.hapo import TemperatureRule\n",
            "rlpost/workers/b.py": "from ..algorithms import hapo\nfrom rlpost.algorithms import base, f\n",
            "rlpost/jobs/rl.py": "from rlpost.algorithms.hapo import TemperatureRule\n",
            "rewards/shaping.py": "from rlpost.algorithms.hapo import x\n",
        },
    )
    assert specific_algorithm_imports(tmp_path) == [
        "rlpost/engines/a.py:1: rlpost.engines.a imports rlpost.algorithms.hapo",
        "rlpost/workers/b.py:1: rlpost.workers.b imports rlpost.algorithms.hapo",
    ]


def test_test_folder_without_twin_is_reported(tmp_path):
    tree(
        tmp_path,
        {
            "rlpost/data/__init__.py": "",
            "rewards/tasks/a.py": "",
            "tests/data/test_a.py": "",
            "tests/rewards/tasks/test_b.py": "",
            "tests/runs/test_c.py": "",
            "tests/conftest.py": "",
            "tests/test_architecture.py": "",
            "tests/stuff/test_d.py": "",
            "tests/test_e.py": "",
        },
    )
    assert misplaced_tests(tmp_path) == [
        "tests/stuff/: no package twin rlpost/stuff/, not a tier",
        "tests/test_e.py: directly under tests/ (move it to its package's folder)",
    ]


def test_over_budget_is_reported(tmp_path):
    big_class = "class Big:\n" + "    x = 1\n" * MAX_CLASS
    tree(
        tmp_path,
        {
            "rlpost/a.py": "x = 1\n" * (MAX_FILE + 1),
            "algorithms/b.py": big_class,
            "rewards/c.py": "x = 1\n" * MAX_FILE,
        },
    )
    assert over_budget(tmp_path) == [
        f"algorithms/b.py:1: class Big: {MAX_CLASS + 1} lines (budget {MAX_CLASS})",
        f"rlpost/a.py: {MAX_FILE + 1} lines (budget {MAX_FILE})",
    ]


def test_stale_code_map_is_caught(tmp_path):
    tree(tmp_path, {"rlpost/__init__.py": '"""The runtime."""\n', "rlpost/a.py": '"""Does A.\n\nMore."""\n'})
    readme = code_map.splice(f"intro\n{code_map.START}\n{code_map.END}\nrest\n", code_map.code_map(tmp_path))
    assert "- **`rlpost/`** — The runtime.\n  - `rlpost/a.py` — Does A.\n" in readme
    assert "`rlpost/a.py` (3 lines) — Does A." in code_map.code_map(tmp_path, counts=True)
    assert code_map.splice(readme, code_map.code_map(tmp_path)) == readme
    tree(tmp_path, {"rlpost/b.py": "x = 1\n"})
    assert code_map.splice(readme, code_map.code_map(tmp_path)) != readme
    with pytest.raises(ValueError, match="markers"):
        code_map.splice("no markers\n", code_map.code_map(tmp_path))
