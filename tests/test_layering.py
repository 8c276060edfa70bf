"""The project's import graph: every module belongs to one layer, and imports point only down.

Layers, bottom to top:
- model: the five files saved with every model (configuration, modeling, prediction, pipeline, image processing);
  they import only each other, as `custom_object_save` copies them together.
- bottom: option fields and checks, Hub ids and reachability; they import nothing of the project.
- data (rows to batches) and evaluation (predictions to numbers, text and figures): the model files and the
  bottom layer, never each other, never training.
- training (the run): everything below it.
- entry points (the scripts): anything; nothing imports an entry point.

Every import counts: top-level, inside functions, under `TYPE_CHECKING` and in `try`/`except` blocks. Any cycle
fails, within a layer too.

A module's layer comes from its package path (`hierarchical/data/...` is data, `hierarchical/options.py` bottom);
the root keeps the model files and the entry points, named below (two entry points live in the package and run with
`python -m`). A module found nowhere fails the test, so every new module is given its layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT_DIR = Path(__file__).resolve().parents[1]
PACKAGE = "hierarchical"

MODEL = "model"
BOTTOM = "bottom"
DATA = "data"
EVALUATION = "evaluation"
TRAINING = "training"
ENTRY = "entry point"

# What each layer may import (its own layer included where allowed).
ALLOWED = {
    MODEL: {MODEL},
    BOTTOM: set(),
    DATA: {MODEL, BOTTOM, DATA},
    EVALUATION: {MODEL, BOTTOM, EVALUATION},
    TRAINING: {MODEL, BOTTOM, DATA, EVALUATION, TRAINING},
    ENTRY: {MODEL, BOTTOM, DATA, EVALUATION, TRAINING},
}

MODEL_FILES = {
    "configuration_hierarchical",
    "modeling_hierarchical",
    "prediction_hierarchical",
    "pipeline_hierarchical",
    "image_processing_hierarchical",
}
ENTRY_POINTS = {
    "run_classification",
    "data_utils",
    "eval_report",
    "hierarchical.export_onnx",
    "hierarchical.check_install",
}

# Sub-packages of PACKAGE, and its bottom-layer modules.
PACKAGE_LAYERS = {"data": DATA, "evaluation": EVALUATION, "training": TRAINING, "options": BOTTOM, "hub": BOTTOM}

# Arrows that break the rules, (importer, imported): none left. A new one must be fixed, not listed here.
EXCEPTIONS: set[tuple[str, str]] = set()


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name, or None when no rule classifies it."""
    if module in ENTRY_POINTS:
        return ENTRY
    parts = module.split(".")
    if parts[0] == PACKAGE:
        if len(parts) == 1:
            return BOTTOM  # the package's __init__ holds no code of its own
        return PACKAGE_LAYERS.get(parts[1])
    return MODEL if module in MODEL_FILES else None


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module at the root and in PACKAGE."""
    modules = {path.stem: path for path in PROJECT_DIR.glob("*.py")}
    for path in sorted((PROJECT_DIR / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(PROJECT_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The project module that importing `target` (a dotted name, maybe a name inside a module) runs, or None
    for a module outside the project."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                base_parts = package.split(".") if package else []
                base_parts = base_parts[: len(base_parts) - (node.level - 1)] if node.level > 1 else base_parts
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            imported = resolve(target, modules)
            if imported is not None and imported != module:
                found.add(imported)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor) :] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def broken_arrows(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {
        (importer, imported)
        for importer, targets in graph.items()
        for imported in targets
        if layer_of(imported) not in ALLOWED[layer_of(importer)]
    }


def test_every_module_has_a_layer():
    unclassified = sorted(module for module in project_modules() if layer_of(module) is None)
    assert not unclassified, (
        f"modules without a layer: {unclassified}; put each in its package, or name it in "
        "MODEL_FILES or ENTRY_POINTS of tests/test_layering.py"
    )


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_imports_point_down():
    graph = import_graph()
    if any(layer_of(module) is None for module in graph):
        pytest.skip("a module has no layer (test_every_module_has_a_layer)")
    broken = broken_arrows(graph)
    new = sorted(broken - EXCEPTIONS)
    assert not new, "imports against the layers: " + "; ".join(
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, b in new
    )
    stale = sorted(EXCEPTIONS - broken)
    assert not stale, f"EXCEPTIONS lists arrows that no longer exist, remove them: {stale}"


def test_exceptions_name_existing_modules():
    modules = project_modules()
    assert all(a in modules and b in modules for a, b in EXCEPTIONS)


# The graph reader itself, on a small project of its own.


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_reader_sees_every_kind_of_import(tmp_path, monkeypatch):
    write(
        tmp_path,
        {
            "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from b import X\n",
            "b.py": "def f():\n    import c\n",
            "c.py": "try:\n    from .d import Y\nexcept ImportError:\n    from d import Y\n",
            "d.py": "import os\n",
            f"{PACKAGE}/__init__.py": "",
            f"{PACKAGE}/data/__init__.py": "",
            f"{PACKAGE}/data/rows.py": "from ..options import option\nfrom . import batches\n",
            f"{PACKAGE}/data/batches.py": f"from {PACKAGE}.evaluation import metrics\n",
            f"{PACKAGE}/options.py": "",
            f"{PACKAGE}/evaluation/metrics.py": "import configuration_hierarchical\n",
            "configuration_hierarchical.py": "",
        },
    )
    monkeypatch.setitem(globals(), "PROJECT_DIR", tmp_path)
    graph = import_graph()
    assert graph["a"] == {"b"} and graph["b"] == {"c"} and graph["c"] == {"d"} and graph["d"] == set()
    assert graph[f"{PACKAGE}.data.rows"] == {f"{PACKAGE}.options", f"{PACKAGE}.data.batches"}
    assert graph[f"{PACKAGE}.data.batches"] == {f"{PACKAGE}.evaluation.metrics"}
    assert layer_of(f"{PACKAGE}.data.rows") == DATA and layer_of(f"{PACKAGE}.options") == BOTTOM
    broken = broken_arrows({m: t for m, t in graph.items() if m.startswith(PACKAGE)})
    assert broken == {(f"{PACKAGE}.data.batches", f"{PACKAGE}.evaluation.metrics")}
    assert find_cycle(graph) is None
    write(tmp_path, {"d.py": "import a\n"})
    assert find_cycle(import_graph()) == ["a", "b", "c", "d", "a"]
