"""The layout's rules, checked: no import cycles in dcgan_dist/ and tuning/, no module over 400
lines, no function over 60 lines without a comment saying why, and the layers that must not
load MLflow (the data reader's processes) or Ray/MLflow/boto3 (models, step) do not."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dcgan_dist", "tuning")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
LONG_FUNCTION_MARK = "# long:"  # a comment in a longer function's body saying why it stays one function


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of our packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that `name` imports, at module level or inside functions."""
    targets = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets |= {f"{base}.{alias.name}" for alias in node.names}
    return {target for target in targets if target in known and target != name}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    graph = {name: imported(name, path, set(found)) for name, path in found.items()}
    # a package's __init__ runs before its submodules: importing a.b imports a
    for name in found:
        parent = name.rpartition(".")[0]
        if parent in found:
            graph[name].discard(parent)  # the submodule needs its package, never the reverse by itself
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "dcgan_dist.loop" in graph and "dcgan_dist.champion" in graph["dcgan_dist.loop"]  # the graph sees our imports
    assert find_cycle(graph) == []


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in modules().items():
        source = path.read_text()
        if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                body = "\n".join(source.splitlines()[node.lineno - 1 : node.end_lineno])
                if length > MAX_FUNCTION_LINES and LONG_FUNCTION_MARK not in body:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


def loaded_packages(module: str) -> set[str]:
    """Top-level packages that `module` and every one of our modules it reaches import (at
    module level or in functions: a DataLoader process may call any of them)."""
    found = modules()
    graph = import_graph()
    reached, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph[name])
            parent = name.rpartition(".")[0]
            if parent in found:
                todo.append(parent)  # importing a.b runs a/__init__.py
    packages = set()
    for name in reached:
        for node in ast.walk(ast.parse(found[name].read_text())):
            if isinstance(node, ast.Import):
                packages |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                packages.add(node.module.split(".")[0])
    return packages


def test_the_data_layer_loads_no_mlflow_and_the_model_no_cluster_libraries():
    for module in ("dcgan_dist.data.stream", "dcgan_dist.data.pack", "dcgan_dist.data.preview"):
        assert "webdataset" in loaded_packages(module) or module == "dcgan_dist.data.preview"
        assert "mlflow" not in loaded_packages(module), module
    for module in ("dcgan_dist.models", "dcgan_dist.step"):
        assert "torch" in loaded_packages(module)
        assert not loaded_packages(module) & {"ray", "mlflow", "boto3"}, module
