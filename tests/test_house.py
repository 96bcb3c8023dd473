"""The house: the measured targets of the tree's shape. Folders of at most 15 modules, modules of at most 400 lines,
a short service.py and README, no import circle between the project's modules, and ruff clean."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

MAX_MODULES_PER_FOLDER = 15
MAX_MODULE_LINES = 400
MAX_SERVICE_LINES = 250
MAX_README_LINES = 250


def python_files() -> list[Path]:
    """Every .py file of the checkout, outside hidden folders (.venv, .git), build output and caches."""
    def ours(path: Path) -> bool:
        parts = path.relative_to(REPO).parts[:-1]
        return not any(p.startswith(".") or p in ("build", "__pycache__") or p.endswith(".egg-info") for p in parts)

    return sorted(p for p in REPO.rglob("*.py") if ours(p))


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_folder_holds_more_than_15_modules():
    per_folder: dict[Path, int] = {}
    for path in python_files():
        per_folder[path.parent] = per_folder.get(path.parent, 0) + 1
    crowded = {str(f.relative_to(REPO)) or ".": n for f, n in per_folder.items() if n > MAX_MODULES_PER_FOLDER}
    assert not crowded, f"folders with more than {MAX_MODULES_PER_FOLDER} .py modules: {crowded}"


@pytest.mark.parametrize("tree", ["project", "tests"])
def test_no_module_is_over_400_lines(tree):
    files = [p for p in python_files() if (p.relative_to(REPO).parts[0] == "tests") == (tree == "tests")]
    assert files
    long = {str(p.relative_to(REPO)): n for p in files if (n := lines(p)) > MAX_MODULE_LINES}
    assert not long, f"{tree} modules over {MAX_MODULE_LINES} lines: {long}"


def test_service_and_readme_stay_short_and_the_readme_gives_the_two_commands():
    assert lines(REPO / "service.py") <= MAX_SERVICE_LINES
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    assert "make demo" in readme and "make test" in readme


# ---- import circles -------------------------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class Modules:
    """The project's modules by dotted name, and what each imports (at the top, inside functions, under
    TYPE_CHECKING: every import statement). A name imported from a package whose __init__ only re-exports it
    (`from .sub import name`) counts as an import of the module that defines it."""

    def __init__(self, files: list[Path], root: Path = REPO):
        self.files = {module_name(p, root): p for p in files}
        self.trees = {name: ast.parse(path.read_text(), str(path)) for name, path in self.files.items()}
        self.packages = {name for name, path in self.files.items() if path.name == "__init__.py"}

    def absolute(self, importer: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = importer if importer in self.packages else importer.rpartition(".")[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        return f"{base}.{node.module}" if node.module else base

    def reexports(self, package: str) -> dict[str, tuple[str, str]]:
        """name -> (module, name there) for each module-level `from X import name` in a package's __init__."""
        found = {}
        for node in self.trees[package].body:
            if isinstance(node, ast.ImportFrom):
                source = self.absolute(package, node)
                for alias in node.names:
                    found[alias.asname or alias.name] = (source, alias.name)
        return found

    def defining_module(self, module: str, name: str, seen: frozenset = frozenset()) -> str | None:
        """The project module `from module import name` reaches: the submodule, the module that defines a
        re-exported name, else the module itself; None outside the project."""
        if f"{module}.{name}" in self.files:
            return f"{module}.{name}"
        if module in self.packages and name in (exports := self.reexports(module)) and module not in seen:
            source, original = exports[name]
            if source in self.files:
                return self.defining_module(source, original, seen | {module})
        return module if module in self.files else None

    def imports(self, importer: str) -> list[tuple[str, int]]:
        """(imported project module, line) for every import statement of the module."""
        edges = []
        for node in ast.walk(self.trees[importer]):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1)
                                   if ".".join(parts[:n]) in self.files), None)
                    edges.append((target, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = self.absolute(importer, node)
                edges += [(self.defining_module(source, a.name), node.lineno) for a in node.names]
        return [(target, line) for target, line in edges if target and target != importer]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node, iteratively (no recursion limit)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_circle_finder_sees_imports_inside_functions_and_through_an_init_that_defines_names(tmp_path):
    files = {
        "pkg/__init__.py": "from pkg.a import run\n",  # a plain re-export: importing run from pkg means pkg.a
        "pkg/a.py": "from pkg.b import helper\n\ndef run():\n    return helper()\n",
        "pkg/b.py": "def helper():\n    from pkg import run\n    return run\n",  # inside a function: counts
        "pkg/c.py": "import pkg.a\n",
        "other/__init__.py": "from .x import f\nLIMIT = 3\n",
        "other/x.py": "from other import LIMIT\n\ndef f():\n    return LIMIT\n",  # LIMIT is defined in __init__
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = Modules(sorted(tmp_path.rglob("*.py")), root=tmp_path)
    graph = {name: {target for target, _ in modules.imports(name)} for name in modules.files}
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert sorted(strongly_connected(graph)) == [["other", "other.x"], ["pkg.a", "pkg.b"]]


def test_no_import_circle_between_the_projects_modules():
    modules = Modules(python_files())
    edges = {name: modules.imports(name) for name in modules.files}
    graph = {name: {target for target, _ in targets} for name, targets in edges.items()}
    circles = strongly_connected(graph)
    described = ["\n".join(f"  {name}:{line} imports {target}" for name in circle
                           for target, line in edges[name] if target in circle) for circle in circles]
    assert not circles, "import circles (each import inside the circle, with its line):\n" + "\n\n".join(described)


def test_ruff_check_is_clean():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.is_file():
        pytest.fail(f"{ruff} is missing: `make setup` installs ruff with the dev extras")
    result = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"`make lint` finds:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
