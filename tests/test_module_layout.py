"""How the package is laid out (issue 12): no module over ~400 lines; no import cycle hidden
behind `TYPE_CHECKING`; no string comparison picks a secure mode or a round state; one
`ErrorBody` on the wire; the SecAgg+ messages imported from their one home.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import aipipe
from aipipe.wire import RoundState, SecureMode

PACKAGE = Path(aipipe.__file__).parent
MAX_LINES = 400

# Being split by other engineers while this landed; emptied as they merge.


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield str(path.relative_to(PACKAGE)), path


def test_no_module_over_400_lines() -> None:
    long = [
        f"{name}: {n} lines"
        for name, path in _modules()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert long == []


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str) -> Iterator[tuple[str, bool]]:
    """(module imported, whether only under TYPE_CHECKING) for every aipipe import."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join([*module.split(".")[: -node.level], node.module])
            names = [base]
        for name in names:
            if name.startswith("aipipe"):
                yield name, id(node) in guarded


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        here = todo.pop()
        if here == goal:
            return True
        if here in seen:
            continue
        seen.add(here)
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = here.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += graph.get(here, set())
    return False


def test_no_import_cycle_hides_behind_type_checking() -> None:
    """In the hub and the node, a module imported only for its types does not import the
    importer back (the cycle would only be hidden, not gone)."""
    runtime: dict[str, set[str]] = {}
    guarded: list[tuple[str, str]] = []
    for _, path in _modules():
        module = _module_name(path)
        for name, only_typing in _imports(ast.parse(path.read_text()), module):
            if only_typing:
                guarded.append((module, name))
            else:
                runtime.setdefault(module, set()).add(name)
    cycles = [
        f"{m} -> {n}"
        for m, n in guarded
        if m.startswith(("aipipe.hub", "aipipe.node")) and _reaches(runtime, n, m)
    ]
    assert cycles == []


def _string_constants(node: ast.expr) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for e in node.elts for s in _string_constants(e)]
    return []


def test_no_string_comparison_picks_a_secure_mode_or_round_state() -> None:
    values = {m.value for m in SecureMode} | {s.value for s in RoundState}
    found = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named = any(
                isinstance(s, ast.Attribute) and s.attr in ("secure", "state") for s in sides
            )
            if named and any(set(_string_constants(s)) & values for s in sides):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_one_error_body_names_the_error_class() -> None:
    from aipipe.hub import openapi
    from aipipe.wire.messages import ErrorBody

    assert ErrorBody(detail="gone", error="NotFoundError").error == "NotFoundError"
    assert ErrorBody(detail="too large").error is None
    assert not any(
        isinstance(n, ast.ClassDef) and n.name == "ErrorBody"
        for n in ast.walk(ast.parse(Path(openapi.__file__).read_text()))
    )


def test_secagg_messages_have_one_home() -> None:
    assert importlib.util.find_spec("aipipe.secure.secagg.messages") is None
    wire = importlib.import_module("aipipe.wire.secagg_messages")
    secagg = importlib.import_module("aipipe.secure.secagg")
    assert secagg.MaskedInput is wire.MaskedInput
