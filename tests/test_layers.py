"""The house: fedmm's packages import only downwards, with no circle (read from the source with ``ast``).

Floors, from the ground up (``fedmm/__init__.py`` says what each is for):
config/errors/protocol -> data -> models -> privacy -> secure -> plan -> site -> federation
-> runtime -> cli. A module may import its own floor and the floors below it; nothing in
``fedmm`` imports the top-level Flower apps (``server/``, ``clients/``). Function-level
(lazy) imports count: a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = (
    ("ground", ("fedmm", "fedmm._moved", "fedmm._lazy", "fedmm.config", "fedmm.errors", "fedmm.protocol")),
    ("data", ("fedmm.data",)),
    ("models", ("fedmm.models",)),
    ("privacy", ("fedmm.privacy",)),
    ("secure", ("fedmm.secure",)),
    ("plan", ("fedmm.plan",)),
    ("site", ("fedmm.site",)),
    ("federation", ("fedmm.federation",)),
    ("runtime", ("fedmm.runtime",)),
    ("cli", ("fedmm.cli",)),
)
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / "fedmm").rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Every fedmm module ``path`` imports (at any depth of the file), with a line number."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from fedmm import protocol`` imports the module fedmm.protocol.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import; fedmm writes absolute ones")
        for name in names:
            while name and name not in modules:  # ``import fedmm.site.io`` -> that module
                name = name.rpartition(".")[0]
            if name.startswith("fedmm") or name.split(".")[0] in ("server", "clients"):
                out.setdefault(name or "fedmm", node.lineno)
        for name in names:
            if name.split(".")[0] in ("server", "clients"):
                out[name] = node.lineno
    return out


def _floor(module: str) -> int:
    best = (-1, -1)  # (length of the matching prefix, floor)
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), index)
    if best[1] < 0:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__} (and to fedmm/__init__.py's list)")
    return best[1]


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_every_import_goes_down_or_stays_on_its_floor() -> None:
    upward = []
    for module, deps in _graph().items():
        for dep, line in deps.items():
            if dep.split(".")[0] in ("server", "clients"):
                upward.append(f"{module}:{line} imports the Flower app {dep}")
            elif module != "fedmm" and _floor(dep) > _floor(module):
                upward.append(f"{module}:{line} ({FLOORS[_floor(module)][0]}) imports {dep} ({FLOORS[_floor(dep)][0]})")
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    # A package's __init__ that re-exports its submodules is not a circle with them.
    graph = {m: {d for d in deps if d in _modules() and not (m.startswith(d + ".") and d != m)} for m, deps in _graph().items()}
    assert _circles(graph) == []


def test_the_checks_catch_a_circle_and_an_upward_import() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _floor("fedmm.config") < _floor("fedmm.data.schema") < _floor("fedmm.site.round") < _floor("fedmm.runtime.deploy")


@pytest.mark.parametrize("module", sorted(m for m, p in _modules().items() if p.name == "__init__.py"))
def test_each_package_says_what_it_is_for(module: str) -> None:
    tree = ast.parse(_modules()[module].read_text())
    doc = ast.get_docstring(tree)
    assert doc and len(doc) > 80, f"{module}/__init__.py needs a docstring that names the package's role"
    if module != "fedmm":
        assert "import" in doc, f"{module}/__init__.py: say which floors the package may import"


@pytest.mark.parametrize("module", sorted(m for m, p in _modules().items() if p.name == "__init__.py"))
def test_every_name_a_package_exports_resolves(module: str) -> None:
    """Review finding: fedmm.federation still pointed check_update at book.py after it moved to checks.py."""
    import importlib

    package = importlib.import_module(module)
    missing = [name for name in getattr(package, "__all__", ()) if not hasattr(package, name)]
    assert not missing, f"{module}.__all__ names what it cannot give: {missing}"


def test_no_module_is_too_long_to_read() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_old_module_paths_still_import_with_a_warning() -> None:
    import importlib
    import sys

    sys.modules.pop("fedmm.training", None)
    with pytest.warns(DeprecationWarning, match="fedmm.site.training"):
        old = importlib.import_module("fedmm.training")
    from fedmm.site.training import train

    assert old.train is train


def test_the_cli_and_the_ledger_load_without_pytorch() -> None:
    """`fedmm status`, `fedmm ledger init` and `fedmm --help` took 2-5 s each, most of it loading
    PyTorch and Opacus they never use (an operator polls status; the deployment guide runs the
    ledger commands per site). Checked in a fresh interpreter, as a command starts."""
    import subprocess
    import sys

    probe = "import sys, fedmm.cli, fedmm.privacy.ledger, fedmm.cli.status; print(sorted(m for m in ('torch', 'opacus', 'flwr') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"the CLI loads {loaded} on start"
