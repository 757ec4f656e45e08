"""The core is sans-IO: nothing reachable from ``pigeon._core`` does I/O.

The check reads the source (AST), so it sees every import, including those
under ``TYPE_CHECKING`` or inside functions, without running the package's
``__init__`` (which imports the whole API on purpose).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pigeon

PACKAGE = Path(pigeon.__file__).parent
CORE_ALLOWED = {"pigeon.errors", "pigeon.message"}  # besides pigeon._core.*
FORBIDDEN = {
    "asyncio",
    "sqlite3",
    "threading",
    "socket",
    "selectors",
    "ssl",
    "subprocess",
    "multiprocessing",
    "concurrent",
    "zmq",
    "nats",
    "aio_pika",
}


def _module_path(name: str) -> Path:
    parts = name.split(".")[1:]
    package = PACKAGE.joinpath(*parts)
    return package / "__init__.py" if package.is_dir() else package.with_suffix(".py")


def _imports(name: str) -> set[str]:
    """Absolute names of every module ``name``'s source imports."""
    path = _module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module or ""
            absolute = f"{base}.{module}".strip(".") if node.level else module
            found.add(absolute)
            for alias in node.names:  # ``from . import headers`` names a module
                candidate = f"{absolute}.{alias.name}"
                if candidate.startswith("pigeon.") and _module_path(candidate).exists():
                    found.add(candidate)
    return found


def _reachable(start: set[str]) -> dict[str, str]:
    """Every module reachable from ``start`` → the pigeon module that imports it."""
    seen: dict[str, str] = {}
    todo = sorted(start)
    while todo:
        name = todo.pop()
        for imported in _imports(name):
            if imported in seen:
                continue
            seen[imported] = name
            if imported.startswith("pigeon.") and _module_path(imported).exists():
                todo.append(imported)
    return seen


def _core_modules() -> set[str]:
    return {f"pigeon._core.{p.stem}" for p in (PACKAGE / "_core").glob("*.py")} | {"pigeon._core"}


def test_the_core_imports_nothing_with_io() -> None:
    reachable = _reachable(_core_modules() | CORE_ALLOWED)
    bad = {
        name: by
        for name, by in reachable.items()
        if name.split(".")[0] in FORBIDDEN
        or (
            name.startswith("pigeon.")
            and not name.startswith("pigeon._core")
            and name not in CORE_ALLOWED
        )
    }
    assert not bad, f"the core reaches modules with I/O (module: imported by): {bad}"


def test_the_check_sees_what_a_layer_breach_looks_like() -> None:
    # The store depends on the core; were the core to import the store,
    # sqlite3 and threading would be reachable. The walk must see that.
    reachable = _reachable({"pigeon.store"})
    assert "sqlite3" in reachable and "threading" in reachable
    assert "pigeon._core.ops" in reachable
