"""The package's shape, checked: no import cycles, arrows pointing down, and nothing
outside the unit tests leaning on private names.

Layers, top to bottom: the command line and demos; integrations (grpc, metrics, agent,
http, asgi, uvicorn, gunicorn); registry and discovery; the etcd client; its generated
protobuf modules. The public testing package sits beside the top layer: the library
never imports it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "etcdisco"

# Importers in these subpackages may use anything; nothing below them may use them.
TOP = ("etcdisco.__main__", "etcdisco.cli", "etcdisco.demo", "etcdisco.testing")
# The core: registry, discovery, sync facade, etcd client and what they stand on.
CORE_MUST_NOT_IMPORT = (
    *TOP,
    "etcdisco.grpc",
    "etcdisco.http",
    "etcdisco.asgi",
    "etcdisco.uvicorn",
    "etcdisco.gunicorn",
    "etcdisco.metrics",
    "etcdisco.agent",
)
CORE = (
    "etcdisco._async_client",
    "etcdisco.registry",
    "etcdisco.discovery",
    "etcdisco.sync",
    "etcdisco.etcd",
    "etcdisco.health",
    "etcdisco.balancing",
    "etcdisco.outlier",
    "etcdisco._routing",
    "etcdisco._drain",
    "etcdisco._advertise",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports at run time (not TYPE_CHECKING)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("etcdisco"):
                if node.module or not node.level:
                    found.add(target)  # "from . import x" runs x, not the package
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("etcdisco"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package's __init__ importing its own modules is not a cycle of concerns.
    real = [c for c in cycles if len({m.rsplit(".", 1)[0] for m in c}) > 1 or len(c) > 2]
    assert not real, "import cycles: " + "; ".join(" -> ".join(c) for c in real)


def test_arrows_point_down() -> None:
    problems = []
    for module, imported in _graph().items():
        if module.startswith(CORE):
            bad = sorted(m for m in imported if m.startswith(CORE_MUST_NOT_IMPORT))
            problems += [f"{module} imports {m}" for m in bad]
        elif not module.startswith(TOP):
            bad = sorted(m for m in imported if m.startswith(TOP))
            problems += [f"{module} imports {m}" for m in bad]
    assert not problems, problems


PRIVATE = re.compile(
    r"^\s*(?:from\s+(etcdisco(?:\.\w+)*)\s+import\s+(.+)|import\s+(etcdisco(?:\.\w+)*))", re.M
)


def test_only_unit_tests_use_private_names() -> None:
    """Tests of behaviour, the soak, benchmarks and examples use what users can use.
    (Unit tests are white-box tests of private modules, on purpose.)"""
    places = [
        *ROOT.joinpath("tests").glob("*.py"),
        *ROOT.joinpath("tests", "integration").rglob("*.py"),
        *ROOT.joinpath("tests", "soak").rglob("*.py"),
        *ROOT.joinpath("tests", "grpc_echo").rglob("*.py"),
        *ROOT.joinpath("benchmarks").rglob("*.py"),
        *ROOT.joinpath("examples").rglob("*.py"),
    ]
    problems = []
    for path in places:
        text = path.read_text()
        for match in PRIVATE.finditer(text):
            module = match.group(1) or match.group(3)
            names = match.group(2) or ""
            if any(part.startswith("_") for part in module.split(".")) or re.search(
                r"(?:^|[\s,(])_\w", names
            ):
                problems.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert not problems, "\n".join(problems)
