"""The import graph of ``src/torchslim`` runs one way: no cycles, no import from a lower layer to a higher one.

The graph is read with ``ast`` from the source (imports inside functions and under ``TYPE_CHECKING`` count: they
are dependencies too, only deferred). ``LAYERS`` is the layer diagram of ``docs/design.md``; a module in a layer
may import modules of its own component (``torchslim.quantize.*`` inside ``quantize``) and of any layer below it,
never one above it nor another component of its own layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "torchslim"
PACKAGE = "torchslim"

# top to bottom; a component is the first name under torchslim (a subpackage or a module), "torchslim" the package
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("torchslim", "cli", "testing"),
    ("pipeline", "coverage"),
    ("deployment", "benchmarking"),
    ("export",),
    ("hf",),
    ("quantize", "prune", "distill"),
    ("train",),
    ("measure", "progress"),
    ("distributed",),
    ("artifact", "kernels"),
    ("config", "data", "models", "onload"),
    ("onnx",),
    ("fileio", "_utils", "_callable_module"),
    ("errors", "_version"),
)


def module_name(path: Path, root: Path) -> str:
    """``src/torchslim/quantize/api.py`` -> ``torchslim.quantize.api`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # ``from torchslim import progress`` imports the module torchslim.progress
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the ``torchslim`` modules it imports anywhere in its file (top level, functions, TYPE_CHECKING).

    Args:
        root: the package folder (``src/torchslim``).

    Returns:
        Every module of the package, mapped to the set of package modules it imports.
    """
    files = sorted(root.rglob("*.py"))
    known = {module_name(path, root) for path in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        module = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target.split(".")[0] == root.name and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def component(module: str) -> str:
    """``torchslim.quantize.api`` -> ``quantize``; the package itself -> ``torchslim``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted; [] when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def layering_violations(
    graph: Mapping[str, Iterable[str]], layers: tuple[tuple[str, ...], ...] = LAYERS
) -> list[str]:
    """Imports that break the layer order, one line each (``a -> b: why``); [] when there are none.

    Args:
        graph: module -> imported modules (as :func:`import_graph` returns).
        layers: components, top layer first.

    Returns:
        Imports of a higher layer, of another component of the same layer, and modules whose component has no layer.
    """
    level = {name: depth for depth, names in enumerate(layers) for name in names}
    problems = []
    for source in sorted(graph):
        for target in sorted(graph[source]):
            src, dst = component(source), component(target)
            if src == dst:
                continue
            if src not in level or dst not in level:
                missing = src if src not in level else dst
                problems.append(f"{source} -> {target}: component {missing!r} has no layer in LAYERS")
            elif level[dst] < level[src]:
                problems.append(f"{source} -> {target}: {dst!r} is in a higher layer than {src!r}")
            elif level[dst] == level[src]:
                problems.append(
                    f"{source} -> {target}: {src!r} and {dst!r} share a layer and must not import each other"
                )
    return problems


# optional heavy dependencies: imported inside the functions that need them, never when a module is imported
# (triton is left out: torch's inductor, which quantize's CPU kernels use, imports it when it is installed)
HEAVY = ("onnxruntime", "onnx", "openvino", "transformers", "nncf", "compressed_tensors", "matplotlib", "sklearn")


def test_the_package_has_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_no_import_runs_up_the_layers():
    assert layering_violations(import_graph()) == []


def test_imports_stay_light():
    modules = sorted(m for m in import_graph() if component(m) not in ("cli", "__main__"))
    code = (
        "import sys, importlib, torchslim\n"
        "light = sorted(m for m in sys.modules if m.startswith('torchslim'))\n"
        f"for name in {modules!r}:\n    importlib.import_module(name)\n"
        f"print(light, [m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['torchslim', 'torchslim._version'] []"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    layers = (("cli",), ("quantize", "prune"), ("models",))
    clean = {
        "torchslim.cli.main": {"torchslim.quantize.api", "torchslim.models"},
        "torchslim.quantize.api": {"torchslim.quantize.layers", "torchslim.models.registry"},
        "torchslim.quantize.layers": set(),
        "torchslim.prune.api": {"torchslim.models.registry"},
        "torchslim.models.registry": set(),
    }
    assert find_cycles(clean) == []
    assert layering_violations(clean, layers) == []

    cyclic = {**clean, "torchslim.quantize.layers": {"torchslim.quantize.api"}}
    assert find_cycles(cyclic) == [["torchslim.quantize.api", "torchslim.quantize.layers"]]

    upward = {**clean, "torchslim.models.registry": {"torchslim.cli.main"}}
    assert layering_violations(upward, layers) == [
        "torchslim.models.registry -> torchslim.cli.main: 'cli' is in a higher layer than 'models'"
    ]
    sideways = {**clean, "torchslim.prune.api": {"torchslim.quantize.api"}}
    assert layering_violations(sideways, layers) == [
        "torchslim.prune.api -> torchslim.quantize.api: 'prune' and 'quantize' share a layer and must not import "
        "each other"
    ]
    unmapped = {**clean, "torchslim.newthing": {"torchslim.models"}}
    assert layering_violations(unmapped, layers) == [
        "torchslim.newthing -> torchslim.models: component 'newthing' has no layer in LAYERS"
    ]


def test_the_graph_is_read_from_the_source_including_imports_inside_functions(tmp_path):
    package = tmp_path / "torchslim"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .mod import f\n")
    (package / "sub" / "mod.py").write_text(
        "import os\nfrom torchslim import low\n\ndef f():\n    from torchslim.sub import f\n"
        "    import torchslim.low as other\n"
    )
    assert import_graph(package) == {
        "torchslim": set(),
        "torchslim.low": set(),
        "torchslim.sub": {"torchslim.sub.mod"},
        "torchslim.sub.mod": {"torchslim.low", "torchslim.sub"},
    }
