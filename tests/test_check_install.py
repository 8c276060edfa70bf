"""`python -m hierarchical.check_install`: one line per check, and a `fix` line naming the command for each problem."""

from __future__ import annotations

import pytest
import torch
import torchvision.ops

from hierarchical import check_install


def run_checks(capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    status = check_install.main()
    return status, capsys.readouterr().out.splitlines()


def test_this_environment_passes_and_says_whether_a_gpu_is_visible(capsys):
    status, lines = run_checks(capsys)
    assert status == 0 and lines[-1] == "Everything needed is installed."
    for package in check_install.read_requirements(check_install.REQUIREMENTS):
        assert any(line.startswith(f"ok       {package} ") for line in lines), package
    assert any("torch" in line and "work together" in line for line in lines)
    gpu = "GPU(s) visible" if torch.cuda.is_available() else "no GPU visible to torch"
    assert any(gpu in line for line in lines)


def test_a_version_outside_the_tested_range_or_missing_is_named_with_its_fix(capsys, tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# tested with\ntorch>=99.0  # too new for any install\nno-such-package-here>=1.0\n")
    monkeypatch.setattr(check_install, "REQUIREMENTS", requirements)
    status, lines = run_checks(capsys)
    assert status == 1 and lines[-1] == "2 problem(s) to fix, listed above."
    installed = check_install.importlib.metadata.version("torch")
    assert f'fix      torch: {installed} installed, outside the tested range >=99.0; pip install "torch>=99.0"' in lines
    assert 'fix      no-such-package-here: not installed; pip install "no-such-package-here>=1.0"' in lines
    assert not any("work together" in line for line in lines), "no pair check with a torch out of range"


def test_a_torchvision_built_for_another_torch_is_caught(capsys, monkeypatch):
    def nms(*args):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torchvision.ops, "nms", nms)
    status, lines = run_checks(capsys)
    assert status == 1
    fix = [line for line in lines if line.startswith("fix      torch and torchvision do not work together")]
    assert len(fix) == 1 and "(RuntimeError: operator torchvision::nms does not exist)" in fix[0]
    tested = check_install.read_requirements(check_install.REQUIREMENTS)
    assert f'pip install "torch{tested["torch"]}" "torchvision{tested["torchvision"]}"' in fix[0]


def test_without_a_gpu_it_says_how_training_runs(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    check_install.describe_devices()
    line = capsys.readouterr().out.strip()
    assert line.startswith("note     no GPU visible to torch: training runs on the CPU")
