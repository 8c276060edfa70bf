"""Move the flat root modules into the `hierarchical` package with `git mv` and rewrite every reference to them.

Run from the repository root on a clean tree:  python tools_move/move.py [--dry-run]

- Refuses (exit 1, listing them) when a root module is neither kept at the root (KEEP) nor in MOVES, or when a
  module of MOVES no longer exists: add it to the table and run again.
- `git mv` each module, writes the package `__init__.py` files, then rewrites in every tracked .py, .ipynb, .md
  and .toml file: import statements (`from X import`, `import X`, `import X as Y`, also indented and inside
  strings and notebook cells), `python X.py` commands (to `python -m`), `X.py` paths, backticked `X.name` references in Markdown and notebooks, and the
  quoted module names in tests/test_layering.py. Moved modules log under their own `__name__` (which now starts
  with the package name) instead of `f"{PROJECT_LOGGER}.{__name__}"`.
- Prints every file it changed; nothing is committed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "hierarchical"

# Root modules that stay: the four files saved with every model, and the entry points.
KEEP = {
    "configuration_hierarchical",
    "modeling_hierarchical",
    "prediction_hierarchical",
    "pipeline_hierarchical",
    "image_processing_hierarchical",
    "run_classification",
    "data_utils",
    "eval_report",
}

# root module -> its path in the package (without .py)
MOVES = {
    "option_fields": "options",
    "data_arguments": "data/arguments",
    "augmentation": "data/augmentation",
    "collation": "data/collation",
    "data_checks": "data/checks",
    "data_sources": "data/sources",
    "device_preprocess": "data/device_preprocess",
    "download_data": "data/download",
    "hierarchy_data": "data/hierarchy",
    "hierarchy_files": "data/hierarchy_files",
    "image_decoding": "data/decoding",
    "label_columns": "data/label_columns",
    "provenance": "data/provenance",
    "calibration": "evaluation/calibration",
    "hierarchy_metrics": "evaluation/metrics",
    "report_data": "evaluation/report_data",
    "report_figures": "evaluation/report_figures",
    "report_markdown": "evaluation/report_markdown",
    "selective_threshold": "evaluation/selective_threshold",
    "temperature_scaling": "evaluation/temperature_scaling",
    "callbacks": "training/callbacks",
    "checkpoints": "training/checkpoints",
    "model_card": "training/model_card",
    "model_loading": "training/model_loading",
    "remote_resources": "training/remote_resources",
    "run_summary": "training/run_summary",
    "trainer": "training/trainer",
    "training_args": "training/arguments",
    "training_run": "training/run",
    "onnx_export": "training/onnx_export",
    "export_onnx": "export_onnx",
    "check_install": "check_install",
}

PACKAGE_DOCS = {
    "": "The hierarchical classifier's library: option fields (`options`), data, evaluation and training.",
    "data": "Rows to batches: arguments, sources, label rules, checks, hierarchy readers, decoding, augmentation, "
    "collation, device preprocessing, download.",
    "evaluation": "Predictions to numbers, text and figures: metrics, temperature scaling, selective threshold, "
    "calibration, report data, markdown and figures.",
    "training": "The run: arguments, model loading and head surgery, trainer, callbacks, checkpoints, remote "
    "resources, run summary, model card, the run itself, ONNX export.",
}

TEXT_SUFFIXES = (".py", ".ipynb", ".md", ".toml")
LOGGER_OLD = re.compile(r'(logging\.get_?[lL]ogger)\(f"\{PROJECT_LOGGER\}\.\{__name__\}"\)')


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def dotted(target: str) -> str:
    return f"{PACKAGE}.{target.replace('/', '.')}"


def check_table(root: Path) -> list[str]:
    """Problems with the table: root modules it does not place, moves whose module is gone."""
    modules = {path.stem for path in root.glob("*.py")}
    problems = [f"root module {name}.py is in neither KEEP nor MOVES" for name in sorted(modules - KEEP - set(MOVES))]
    problems += [f"MOVES names {name}.py, which is not at the root" for name in sorted(set(MOVES) - modules)]
    return problems


def multi_imports(text: str) -> set[str]:
    """The moved modules named in an `import a, b` statement, which `rewrite_imports` cannot rewrite."""
    found = set()
    for names in re.findall(r'(?m)^[ \t]*"?import ([\w.]+(?:, *[\w.]+)+)', text):
        found |= {name.strip() for name in names.split(",")} & set(MOVES)
    return found


def rewrite_imports(text: str) -> str:
    for old, target in MOVES.items():
        new = dotted(target)
        parent, _, leaf = new.rpartition(".")
        text = re.sub(rf"(?<![\w.])from {old} import ", f"from {new} import ", text)
        # import X as Y -> from parent import leaf as Y
        # at a line's start (or a notebook line's opening quote): `import X as Y`, `import X`
        text = re.sub(rf'(?m)^([ \t]*"?)import {old} as (\w+)', rf"\1from {parent} import {leaf} as \2", text)
        alias = "" if leaf == old else f" as {old}"
        text = re.sub(
            rf'(?m)^([ \t]*"?)import {old}(?=[ \t]*(?:#|\\n|"|$))', rf"\1from {parent} import {leaf}{alias}", text
        )
    return text


def rewrite_paths(text: str) -> str:
    for old, target in MOVES.items():
        text = re.sub(rf"(?<![\w/.-])python {old}\.py\b", f"python -m {dotted(target)}", text)  # a module now
        text = re.sub(rf"(?<![\w/.-]){old}\.py\b", f"{PACKAGE}/{target}.py", text)
    return text


def rewrite_backticked(text: str) -> str:
    for old, target in MOVES.items():
        text = re.sub(rf"`{old}\.(?=[A-Za-z_])", f"`{dotted(target)}.", text)
        text = re.sub(rf"`{old}`", f"`{dotted(target)}`", text)
    return text


def rewrite_logger(text: str) -> str:
    text, count = LOGGER_OLD.subn(r"\1(__name__)", text)
    if count and text.count("PROJECT_LOGGER") == 1:  # only its import is left
        text = re.sub(r"from hierarchical\.options import PROJECT_LOGGER\n", "", text)
        text = re.sub(r"(from hierarchical\.options import [^\n]*?)PROJECT_LOGGER, ", r"\1", text)
        text = re.sub(r"(from hierarchical\.options import [^\n]*?), PROJECT_LOGGER\b", r"\1", text)
    return text


def rewrite_layering_test(text: str) -> str:
    for old, target in MOVES.items():
        text = text.replace(f'"{old}"', f'"{dotted(target)}"')
    return text


def rewrite_pyproject(text: str) -> str:
    return text.replace('known-first-party = ["conftest"]', f'known-first-party = ["conftest", "{PACKAGE}"]')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="Check the table and list the moves only.")
    args = parser.parse_args()
    root = Path(git("rev-parse", "--show-toplevel").strip())
    problems = check_table(root)
    if problems:
        print("error: the move table does not fit the tree:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if git("status", "--porcelain", "--untracked-files=no").strip() and not args.dry_run:
        print("error: the tree has uncommitted changes; commit or stash them first", file=sys.stderr)
        return 1
    for old, target in MOVES.items():
        print(f"{old}.py -> {PACKAGE}/{target}.py")
    if args.dry_run:
        return 0
    os.chdir(root)
    new_texts = {}
    moved_files = {f"{PACKAGE}/{target}.py" for target in MOVES.values()}
    for name in git("ls-files").splitlines():
        path = Path(name)
        if path.suffix not in TEXT_SUFFIXES or not path.is_file() or name.startswith("tools_move/"):
            continue
        text = original = path.read_text(encoding="utf-8")
        if path.stem in MOVES and path.parent == Path("."):
            name = f"{PACKAGE}/{MOVES[path.stem]}.py"  # where its text goes
        if path.suffix in (".py", ".ipynb"):
            if multi := multi_imports(text):
                problems.append(f"{name}: an `import a, b` statement names {sorted(multi)}; split it")
            text = rewrite_imports(text)
        if name in moved_files:
            text = rewrite_logger(text)
        text = rewrite_paths(text)
        if path.suffix in (".md", ".ipynb"):
            text = rewrite_backticked(text)
        if name == "tests/test_layering.py":
            text = rewrite_layering_test(text)
        if name == "pyproject.toml":
            text = rewrite_pyproject(text)
        if text != original:
            new_texts[name] = text
    if problems:
        print("error: cannot rewrite:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    for old, target in MOVES.items():
        destination = Path(PACKAGE) / f"{target}.py"
        destination.parent.mkdir(parents=True, exist_ok=True)
        git("mv", f"{old}.py", str(destination))
    for sub, doc in PACKAGE_DOCS.items():
        init = Path(PACKAGE, sub, "__init__.py")
        init.write_text(f'"""{doc}"""\n')
        git("add", str(init))
    for name, text in sorted(new_texts.items()):
        Path(name).write_text(text, encoding="utf-8")
        print(f"rewrote {name}")
    if new_texts and shutil.which("ruff"):
        subprocess.run(["ruff", "check", "--fix", "--quiet", "--select", "I", *sorted(new_texts)], check=False)
    print("done: review `git diff --staged -M` and `git diff`, run ruff and the tests, then commit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
