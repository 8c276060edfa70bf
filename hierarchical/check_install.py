#!/usr/bin/env python
"""Check the environment this project runs in, and say what to fix:

    python -m hierarchical.check_install

- the Python version;
- every package of `requirements.txt` installed, at a version in the range the project was tested with (the
  upper bounds of torch and torchvision are the versions tested); those of `requirements-dev.txt` (tests, figures,
  notebook) are listed too, but only reported, as they are needed only for tests and the notebook;
- torch and torchvision importable together (a torchvision built for another torch fails here, not in training);
- whether a GPU is visible to torch.

Exit status 0 when nothing needs fixing, 1 otherwise. Only the standard library is imported before the checks, so
the command answers whatever is broken.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS = PROJECT_DIR / "requirements.txt"
DEV_REQUIREMENTS = PROJECT_DIR / "requirements-dev.txt"
MIN_PYTHON = (3, 10)
REQUIREMENT_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")
CPU_TORCH_HINT = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"


def read_requirements(path: Path) -> dict[str, str]:
    """`{package: version specifier}` of a requirements file (`-r` includes, comments and blank lines skipped)."""
    requirements = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = REQUIREMENT_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}: cannot read the requirement {line!r}")
        requirements[match.group(1)] = match.group(2).replace(" ", "")
    return requirements


def version_problem(package: str, specifier: str) -> str | None:
    """Why the installed `package` does not meet `specifier` (not installed, or another version); None if it does."""
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
    if not specifier:
        return None
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return None  # without packaging (a dependency of transformers) the range cannot be read
    try:
        if Version(installed) in SpecifierSet(specifier, prereleases=True):
            return None
    except InvalidVersion:
        pass
    return f"{installed} installed, outside the tested range {specifier}"


def check_torch_pair(requirements: dict[str, str]) -> list[str]:
    """Problems of importing torch and torchvision together and running one torchvision operator (`requirements`:
    the tested ranges, for the fix)."""
    try:
        import torch
        import torchvision
        from torchvision.ops import nms

        nms(torch.zeros((1, 4)), torch.zeros(1), 0.5)  # fails when torchvision was built for another torch
    except Exception as error:  # any failure here is what the user must fix
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return [
            f"torch and torchvision do not work together ({type(error).__name__}: {first_line}); install a "
            f'matching pair: pip install "torch{requirements.get("torch", "")}" '
            f'"torchvision{requirements.get("torchvision", "")}" (CPU only: {CPU_TORCH_HINT})'
        ]
    print(f"ok       torch {torch.__version__} and torchvision {torchvision.__version__} work together")
    return []


def describe_devices() -> None:
    """Print whether torch sees a GPU (CUDA or Apple MPS) or runs on the CPU only."""
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        print(f"ok       {torch.cuda.device_count()} GPU(s) visible: {', '.join(names)} (CUDA {torch.version.cuda})")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        print("ok       Apple GPU (MPS) visible")
    else:
        gpu_hint = (
            f"torch is a CUDA {torch.version.cuda} build: check the GPU's driver with nvidia-smi"
            if torch.version.cuda
            else "torch is a CPU-only build: install a CUDA build of torch"
        )
        print(
            "note     no GPU visible to torch: training runs on the CPU, about 10 images/s at 224 px (recipes/ has CPU "
            f"settings). With a GPU: {gpu_hint}."
        )


def check_install() -> list[str]:
    """Run every check, print one line per check, and return the problems (each with what to do)."""
    problems = []
    if sys.version_info < MIN_PYTHON:
        problems.append(f"Python {sys.version.split()[0]} is too old: use Python {'.'.join(map(str, MIN_PYTHON))}+")
    else:
        print(f"ok       Python {sys.version.split()[0]}")
    requirements, broken = read_requirements(REQUIREMENTS), set()
    for package, specifier in requirements.items():
        problem = version_problem(package, specifier)
        if problem is None:
            print(f"ok       {package} {importlib.metadata.version(package)} (tested: {specifier or 'any'})")
        else:
            broken.add(package)
            problems.append(f'{package}: {problem}; pip install "{package}{specifier}"')
    missing_dev = []
    if DEV_REQUIREMENTS.is_file():
        for package, specifier in read_requirements(DEV_REQUIREMENTS).items():
            if version_problem(package, specifier) is not None:
                missing_dev.append(package)
    if missing_dev:
        print(
            f"note     for tests and the notebook only: {', '.join(missing_dev)}; pip install -r requirements-dev.txt"
        )
    if not broken & {"torch", "torchvision"}:  # versions in range: do they work together?
        torch_problems = check_torch_pair(requirements)
        problems += torch_problems
        if not torch_problems:
            describe_devices()
    return problems


def main() -> int:
    """Print the checks and what to fix; return the exit status (1 when something needs fixing)."""
    problems = check_install()
    for problem in problems:
        print(f"fix      {problem}")
    print("Everything needed is installed." if not problems else f"{len(problems)} problem(s) to fix, listed above.")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
