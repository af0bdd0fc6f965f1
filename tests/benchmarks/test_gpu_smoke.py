"""benchmarks/gpu_smoke.py run as the GPU machine runs it, but on the CPU at tiny sizes.

The main run gets a ``sitecustomize`` that makes Ray, MLflow, DVC and pycocotools
unimportable, as they are on the lent GPU machine: sections A-D must pass without them (C runs
the real training loop) and E must say it skipped, not fail. Section E itself (Ray Train and
Ray-sharded inference) runs only where Ray is installed, so it is run here too, on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_smoke.py"
ABSENT_ON_GPU_MACHINE = ("ray", "mlflow", "dvc", "pycocotools")
BLOCKER = f"""
import importlib.abc
import sys


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, _Absent())
"""


def run_smoke(
    args: list[str], tmp_path: Path, timeout: float, *, hide: bool = True
) -> subprocess.CompletedProcess[str]:
    """The script in a subprocess, from ``tmp_path``; ``hide``: without Ray, MLflow, DVC, pycocotools."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    if hide:
        (tmp_path / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = str(tmp_path)  # the script puts its own checkout first on sys.path
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=tmp_path,  # from anywhere, not only the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def result_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("PASS ", "FAIL ", "INFO "))]


@pytest.mark.slow
def test_cpu_small_run_passes_every_section_without_ray_or_mlflow(tmp_path: Path) -> None:
    proc = run_smoke(["--device", "cpu", "--small"], tmp_path, timeout=900)
    lines = result_lines(proc.stdout)
    shown = "\n".join(lines) + "\n--- stderr (end) ---\n" + proc.stderr[-4000:]
    assert proc.returncode == 0, shown
    assert not [line for line in lines if line.startswith("FAIL")], shown
    assert lines[0].startswith("INFO machine: CPU") and f"code from {REPO_ROOT}" in lines[0], shown
    for section in "ABCD":
        assert any(line.startswith(f"PASS {section} ") for line in lines), f"no PASS for {section}\n{shown}"
    expected = {
        "A": {"bf16-step", "gradients", "overfit", "fp16-scaler"},
        "B": {"kernel", "forward", "backward", "bf16-autocast", "torchvision-cpu"},
        "C": {"train", "resume", "resume-workers"},
        "D": {"ddp"},
    }
    for section, checks in expected.items():
        passed = {line.split(":")[0].split()[2] for line in lines if line.startswith(f"PASS {section} ")}
        assert passed == checks, shown
    assert any(line.startswith("INFO E: skipped (import ray failed") for line in lines), shown
    assert lines[-1].startswith("INFO summary: ") and " 0 FAIL " in lines[-1], shown


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_the_default_device_fails_at_once(tmp_path: Path) -> None:
    proc = run_smoke(["--sections", "A"], tmp_path, timeout=300)
    lines = result_lines(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("INFO machine: ")
    assert lines[1].startswith("FAIL machine: no CUDA device"), lines
    assert len(lines) == 2, lines


@pytest.mark.slow
def test_section_e_trains_on_ray_and_shards_inference_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    proc = run_smoke(["--device", "cpu", "--small", "--sections", "E"], tmp_path, timeout=600, hide=False)
    lines = result_lines(proc.stdout)
    shown = "\n".join(lines) + "\n--- stderr (end) ---\n" + proc.stderr[-4000:]
    assert proc.returncode == 0, shown
    assert not [line for line in lines if line.startswith("FAIL")], shown
    passed = {line.split(":")[0] for line in lines if line.startswith("PASS ")}
    assert passed == {"PASS E ray-train", "PASS E ray-inference"}, shown
