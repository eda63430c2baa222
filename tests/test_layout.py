"""The layout shows the architecture: the HKT method (flat in hkt_hf/) imports none of its applications (models,
task data, metrics, command line, demo); no module is long; the package's imports form no cycle; and every core
dependency that pyproject.toml declares is used by the package."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hkt_hf"
MAX_LINES = 400
LONG_MODULES: dict[str, str] = {}  # module -> why it may pass MAX_LINES; none today
# Core dependencies the package needs without importing them itself (none today).
INDIRECT: dict[str, tuple[str, str, str]] = {}
IMPORT_NAMES = {"huggingface-hub": "huggingface_hub", "pyyaml": "yaml", "pillow": "PIL", "scikit-learn": "sklearn"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
APPLICATIONS = "hkt_hf.apps"  # the applications: everything under hkt_hf/apps/


def is_application(name: str) -> bool:
    return name == APPLICATIONS or name.startswith(f"{APPLICATIONS}.")


# The method: the modules directly in hkt_hf/ (the folder shows the boundary; nothing is listed by hand).
METHOD = sorted(name.removeprefix("hkt_hf.") for name in MODULES if name.count(".") == 1 and not is_application(name))


def _runtime_nodes(tree: ast.AST):
    """Every node, in functions too, except under `if TYPE_CHECKING:` (those imports never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def imported_names(name: str) -> set[str]:
    """Absolute names of the modules that module `name` imports (`from package import submodule` names the
    submodule; `from module import attribute` names the module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:  # a submodule where there is one, else an attribute of `module`
                names.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module)
    return names


def internal_imports(name: str) -> set[str]:
    """The hkt_hf modules that module `name` imports."""
    return {n for n in imported_names(name) if n in MODULES and n != name}


GRAPH = {name: internal_imports(name) for name in MODULES}


def test_graph_sees_the_package():
    assert {"hkt_hf", "hkt_hf.trainer", "hkt_hf.apps.cli", "hkt_hf.apps.cli.train", "hkt_hf.apps.data.images"} <= set(MODULES)
    assert "hkt_hf.trainer" in GRAPH["hkt_hf"] and "hkt_hf.apps.metrics" in GRAPH["hkt_hf.apps.cli.evaluate"]  # inside `run`


def test_every_module_is_method_or_application():
    """No third kind of place: a module is flat in hkt_hf/ (the method) or under hkt_hf/apps/ (an application)."""
    other = sorted(n for n in MODULES if n != "hkt_hf" and n.count(".") > 1 and not is_application(n))
    assert not other, f"modules neither in hkt_hf/ nor under hkt_hf/apps/: {other}"
    assert {"trainer", "objective", "extraction", "transfer", "mixture"} <= set(METHOD)


@pytest.mark.parametrize("method", METHOD)
def test_method_imports_no_application(method):
    reachable, todo = set(), [f"hkt_hf.{method}"]
    while todo:  # everything it imports, directly or through other hkt_hf modules
        for name in GRAPH[todo.pop()] - reachable:
            reachable.add(name)
            todo.append(name)
    apps = sorted(n for n in reachable if n == "hkt_hf" or is_application(n))
    assert not apps, f"hkt_hf.{method} (a method module) imports applications: {apps}"


def test_no_module_is_longer_than_the_limit():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_MODULES}
    assert not long, f"modules over {MAX_LINES} lines: {long}; split them (or justify one in LONG_MODULES)"


def test_no_circular_imports():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join([*path, name, target])}"
            if target not in state:
                visit(target, [*path, name])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [])


def test_every_core_dependency_is_used():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    top_level = {n.split(".")[0] for name in MODULES for n in imported_names(name)}
    unused = []
    for requirement in declared:
        dist = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        if dist in INDIRECT:
            module, needle, _ = INDIRECT[dist]
            if needle not in MODULES[module].read_text():
                unused.append(f"{dist} (its use, {needle} in {module}, is gone)")
        elif IMPORT_NAMES.get(dist, dist.replace("-", "_")) not in top_level:
            unused.append(dist)
    assert not unused, f"pyproject.toml declares core dependencies hkt_hf never imports: {unused}"
