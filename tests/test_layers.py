"""Imports run one way (ARCHITECTURE.md): every slimformer module imports only its own
layer or the layers below it, local (function-level) imports included; there are no import
cycles; a technique never imports another technique; registries never import their plugins.

The rules are checked on the source (the AST), so a lazy import inside a function cannot
hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slimformer"

# Lower number = lower floor. Same rank may import each other (but not in a cycle).
RANKS = {
    "errors": 0, "util": 0, "_version": 0,
    "formats": 1,
    "kernels": 2,
    "nn": 3,
    "models": 4, "data": 4, "report": 4, "attention": 4,
    "train": 5,
    "core": 6,
    "runtime": 7,
    "eval": 8,
    "export": 9,
    "techniques": 10,
    "recipes": 11, "plugins": 11,
    "api": 12,
    "cli": 13,
    "__init__": 14, "__main__": 14,
}

# Registries live with their interface and never import what registers with them.
REGISTRIES = ("slimformer.core.transform", "slimformer.nn.registry", "slimformer.export")


def module_name(path: Path) -> str:
    parts = ["slimformer", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(imported slimformer module, line, at module level)`` for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue   # annotations only: never executed
            child_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "slimformer":
                        found.append((alias.name, child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base[:len(base) - child.level + (1 if is_package else 0)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "slimformer":
                    for alias in child.names:
                        sub = f"{target}.{alias.name}"
                        found.append((sub if sub in modules else target, child.lineno, top))
            visit(child, child_top)

    visit(tree, True)
    return found


def graph():
    modules = all_modules()
    return modules, {m: imports(m, p, modules) for m, p in modules.items()}


def upward_imports() -> list[str]:
    _, edges = graph()
    bad = []
    for module, targets in edges.items():
        for target, line, _ in targets:
            if RANKS[layer(target)] > RANKS[layer(module)]:
                bad.append(f"{module}:{line} imports {target} ({layer(module)} -> {layer(target)})")
    return bad


def import_cycles() -> list[list[str]]:
    """Strongly connected components (more than one module) of the import graph, local
    imports included: a cycle through a function-level import is still a cycle."""
    _, edges = graph()
    succ = {m: sorted({t for t, _, _ in ts if t != m and t in edges}) for m, ts in edges.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in succ:
        if v not in index:
            strongconnect(v)
    return out


def test_every_layer_is_ranked():
    unknown = sorted({layer(m) for m in all_modules()} - set(RANKS))
    assert not unknown, f"packages without a rank in RANKS (add them to ARCHITECTURE.md's order): {unknown}"


def test_no_import_runs_up_the_layers():
    bad = upward_imports()
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_a_technique_imports_no_other_technique():
    _, edges = graph()
    bad = [f"{m}:{line} imports {t}" for m, ts in edges.items() if m.startswith("slimformer.techniques.")
           for t, line, _ in ts if t.startswith("slimformer.techniques") and t != m]
    assert not bad, "what two techniques share belongs a floor below:\n" + "\n".join(bad)


@pytest.mark.parametrize("registry", REGISTRIES)
def test_registries_never_import_their_plugins(registry):
    modules, edges = graph()
    inside = [m for m in modules if m == registry or m.startswith(registry + ".")] if registry in modules else []
    for module in inside:
        if module.endswith(".builtin"):
            continue   # the built-in plugins of a registry, imported only by slimformer.plugins
        for target, line, _ in edges[module]:
            assert not target.startswith(("slimformer.techniques", "slimformer.plugins")), \
                f"{module}:{line} imports {target}"
            assert not target.endswith(".builtin"), f"{module}:{line} imports {target}"


def test_the_checker_sees_local_relative_and_submodule_imports(tmp_path):
    """The walker must catch the forms an upward import can take."""
    source = (
        "def f():\n"
        "    from slimformer import api\n"
        "    import slimformer.cli\n"
        "from . import primitives\n"
        "from slimformer.nn import registry\n"
    )
    path = PACKAGE / "formats" / "spec.py"
    modules = {"slimformer.api": None, "slimformer.cli": None, "slimformer.formats.primitives": None,
               "slimformer.nn.registry": None, "slimformer.formats.spec": None}
    fake = tmp_path / "spec.py"
    fake.write_text(source)
    found = imports("slimformer.formats.spec", fake, modules)
    assert [(t, top) for t, _, top in found] == [("slimformer.api", False), ("slimformer.cli", False),
                                                 ("slimformer.formats.primitives", True),
                                                 ("slimformer.nn.registry", True)]
    assert path.exists()
