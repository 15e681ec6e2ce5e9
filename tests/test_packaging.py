"""The pack as the registry and ComfyUI-Manager see it: comfy-cli validates it, `comfy node pack` builds a zip with
everything the pack needs to run (and no test or benchmark code), and ruff's lint and format are clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFY = [sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry"]
RUNTIME_FILES = ("__init__.py", "pyproject.toml", "requirements.txt", "README.md", "js/whetstone.js")
RUNTIME_FOLDERS = ("nodes/", "training/model/", "training/data/", "training/hardware/tiers/", "training/engine/")


def comfy_cli_available() -> bool:
    try:
        import comfy_cli  # noqa: F401
    except ImportError:
        return False
    return shutil.which("git") is not None


needs_comfy_cli = pytest.mark.skipif(
    not comfy_cli_available(), reason="comfy-cli (requirements-test.txt) or git missing"
)


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A clone of the working tree's tracked files (what a user's git clone or the registry would get)."""
    target = tmp_path_factory.mktemp("pack") / "ComfyUI-Whetstone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run(["git", "add", "-A"], cwd=target, check=True)
    return target


@needs_comfy_cli
def test_comfy_node_validate_reports_no_error(clone):
    done = subprocess.run([*COMFY, "node", "validate"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All validation checks passed" in done.stdout + done.stderr


@needs_comfy_cli
def test_comfy_node_pack_holds_what_the_pack_needs(clone):
    done = subprocess.run([*COMFY, "node", "pack"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    names = zipfile.ZipFile(clone / "node.zip").namelist()
    for required in RUNTIME_FILES:
        assert required in names, required
    for folder in RUNTIME_FOLDERS:
        assert any(n.startswith(folder) for n in names), folder
    assert any(n.startswith("workflows/") and n.endswith(".json") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "tools/", ".ci/")) for n in names)


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff (requirements-test.txt) is not installed")
    done = subprocess.run([ruff, *command, "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
