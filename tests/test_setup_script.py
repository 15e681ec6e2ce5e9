"""scripts/setup.sh picks the torch build from the machine: CUDA with an NVIDIA GPU, the CPU build without one.

The branch logic runs in SETUP_DRY_RUN=1 mode (prints the pip commands, no network), with a fake `nvidia-smi`
on PATH; one test runs the real CPU fallback against an unreachable index and checks it fails fast and clearly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("bash", "dirname", "grep", "uname")
GPU_LISTING = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0f3c)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-9a1b)\n"


def _bin_dir(tmp_path: Path, nvidia_smi: str | None) -> Path:
    """A PATH holding only the tools the script needs, plus a fake nvidia-smi when given its body."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!{shutil.which('bash')}\n{nvidia_smi}\n", encoding="utf-8")
        fake.chmod(0o755)
    return bin_dir


def _setup(tmp_path: Path, nvidia_smi: str | None, root: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    environment = {"PATH": str(_bin_dir(tmp_path, nvidia_smi)), "HOME": str(tmp_path), "SETUP_DRY_RUN": "1"}
    environment.update(env)
    return subprocess.run(
        ["bash", str(root / "scripts" / "setup.sh"), "--test"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _pip_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if "pip install" in line]


def test_gpu_machine_gets_the_pypi_cuda_build(tmp_path):
    result = _setup(tmp_path, f"printf '{GPU_LISTING}'")
    lines = _pip_lines(result)
    assert lines[0].endswith("pip install -q torch==2.13.0")
    assert "download.pytorch.org" not in result.stdout
    assert "nvidia-smi lists 2 NVIDIA GPU(s)" in result.stderr
    assert lines[1:] == [
        "+ .venv/bin/python -m pip install -q -r requirements.txt",
        "+ .venv/bin/python -m pip install -q -r requirements-test.txt",
    ]
    assert all(line.startswith("+ ") for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    ("nvidia_smi", "reason"),
    [
        (None, "no nvidia-smi on PATH"),
        (
            "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver' >&2; exit 9",
            "nvidia-smi -L failed",
        ),
        ("exit 0", "nvidia-smi lists no GPU"),
    ],
)
def test_machine_without_a_gpu_gets_the_cpu_build(tmp_path, nvidia_smi, reason):
    result = _setup(tmp_path, nvidia_smi)
    lines = _pip_lines(result)
    assert f"the CPU build, torch==2.13.0+cpu ({reason}" in result.stderr
    local, deps, index = lines[:3]
    assert local.endswith("pip install -q --no-index --no-deps torch==2.13.0+cpu")
    assert deps.endswith("pip install -q torch==2.13.0+cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu" in index
    assert "--timeout 30 --retries 1" in index
    assert not any(line.endswith("torch==2.13.0") for line in lines), "never the unqualified (CUDA on PyPI) torch"


def test_torch_spec_overrides_the_choice(tmp_path):
    lines = _pip_lines(_setup(tmp_path, None, TORCH_SPEC="torch==2.12.0"))
    assert lines[0].endswith("pip install -q torch==2.12.0")
    assert not any("+cpu" in line for line in lines)


def test_cpu_build_from_the_local_wheel_resolves_without_network():
    """The first CPU command, as setup.sh runs it, finds torch+cpu among this machine's wheels (where there are any)."""
    probe = [sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--no-index", "--no-deps", "torch==2.13.0+cpu"]
    result = subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0 and "No matching distribution" in result.stderr:
        pytest.skip("no torch 2.13.0+cpu wheel among this machine's pip find-links")
    assert result.returncode == 0, result.stderr


def test_unreachable_cpu_index_fails_fast_with_the_fix(tmp_path):
    """No local wheel of the asked version and an index that refuses connections: exit 1 in seconds, naming the fix."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
    for name in ("requirements.txt", "requirements-test.txt"):
        (root / name).write_text("", encoding="utf-8")
    venv_python = root / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!{shutil.which("bash")}\nexec {sys.executable} "$@"\n', encoding="utf-8")
    venv_python.chmod(0o755)
    start = time.monotonic()
    result = _setup(
        tmp_path,
        None,
        root=root,
        SETUP_DRY_RUN="0",
        TORCH_VERSION="0.0.1",
        TORCH_CPU_INDEX="http://127.0.0.1:9/whl/cpu",
        TORCH_INDEX_TIMEOUT="5",
        PIP_CONFIG_FILE=os.devnull,
    )
    assert time.monotonic() - start < 90
    assert result.returncode == 1
    assert "no torch==0.0.1+cpu wheel on this machine" in result.stderr
    assert "could not install torch==0.0.1+cpu from http://127.0.0.1:9/whl/cpu" in result.stderr
    assert "fix: set TORCH_CPU_INDEX" in result.stderr
