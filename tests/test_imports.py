"""The package's imports go one way (DESIGN.md section 4, README "Architecture"), read from the source with ``ast``.

* No import of a ``nemo_entropy`` module hides inside a function: such an import dodges a circle instead of
  removing it. Imports inside functions are allowed only for the optional outside packages below.
* No circle among ``nemo_entropy`` modules, drawn from every import (at the top or inside a function: both are
  dependencies). Importing ``a.b.c`` runs the ``__init__`` of every package on the way, so it counts as an import
  of those packages too (except the importer's own packages, which are already being imported). Imports under
  ``if TYPE_CHECKING:`` run only in a type checker (annotations): they are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "nemo_entropy"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

OPTIONAL_OUTSIDE = (
    "nemo_rl", "megatron", "triton", "transformer_engine",  # the frameworks we plug into, and Triton
    "transformers", "matplotlib", "tensorboard", "torch.utils.tensorboard", "tqdm",  # the engine's extras
    "hydra", "omegaconf",  # the run entry's config composition (the core needs only torch)
    "torch.utils.cpp_extension",  # the kernel build (setuptools, ninja)
)
"""Outside packages that may be imported inside a function: optional extras, or heavy ones only some commands
need. Everything else (the standard library, torch, every ``nemo_entropy`` module) is imported at module top."""

OPTIONAL_INSIDE = ("nemo_entropy.entropy.triton_kernels",)
"""``nemo_entropy`` modules that import an optional outside package at their top (Triton), so that importing them
is itself optional: loaded inside the function that picks their backend."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.stmt) -> list[str]:
    """The absolute names an import statement loads (a ``from X import y`` of a submodule ``y`` loads ``X.y``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    source = _absolute(module, node)
    return [source] + [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES]


def _sources(module: str, node: ast.stmt) -> list[str]:
    """The modules an import statement names (``from X import y``: ``X``)."""
    return _targets(module, node) if isinstance(node, ast.Import) else [_absolute(module, node)]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str):
    """``(statement, inside a function)`` for every import of ``module`` outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    yield from walk(other, in_function)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.Lambda)))

    yield from walk(tree, False)


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _allowed_inside_function(name: str) -> bool:
    if _ours(name):
        return name in OPTIONAL_INSIDE
    return any(name == p or name.startswith(p + ".") for p in OPTIONAL_OUTSIDE)


def _edges(module: str) -> set[str]:
    """The ``nemo_entropy`` modules that ``module`` imports, at its top or inside a function (a dependency either
    way), with the packages on their way."""
    parts = module.split(".")
    own = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # its packages, already being imported
    out = set()
    for node, _ in _imports(module):
        for name in _targets(module, node):
            steps = name.split(".")
            out.update(p for p in (".".join(steps[:i]) for i in range(1, len(steps) + 1))
                       if p in MODULES and p not in own)
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_read():
    assert len(MODULES) > 50 and "nemo_entropy.plan" in MODULES and "nemo_entropy.controls" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_inside_a_function(module):
    hidden = [f"{MODULES[module].relative_to(ROOT.parent)}:{node.lineno} imports {name}"
              for node, in_function in _imports(module) if in_function
              for name in _sources(module, node) if not _allowed_inside_function(name)]
    assert not hidden, "imports inside functions (move them to the module top):\n" + "\n".join(hidden)


def test_no_import_circle():
    graph = {module: _edges(module) for module in MODULES}
    circles = _circles(graph)
    described = []
    for component in circles:
        members = set(component)
        arrows = sorted(f"{a} -> {b}" for a in component for b in graph[a] if b in members)
        described.append(f"{len(component)} modules: " + "; ".join(arrows))
    assert not circles, "import circles:\n" + "\n".join(described)


def test_the_checker_finds_a_circle_and_a_hidden_import():
    # The checks themselves, on a made-up graph and source: a circle of three and a function-level import.
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
    assert not _allowed_inside_function("nemo_entropy.plan")
    assert not _allowed_inside_function("os")
    assert _allowed_inside_function("megatron.core") and _allowed_inside_function("nemo_entropy.entropy.triton_kernels")
