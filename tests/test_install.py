"""The engine as pip installs it: a wheel / --target install and an editable install of a clean copy of the tracked
files, each run as ``python -m training`` from an empty folder (not the checkout) with no PYTHONPATH to the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_engine_runs import tiny_config

REPO = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
OFFLINE = ["--no-deps", "--no-build-isolation", "--no-index"]

pytest.importorskip("setuptools")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tracked files of the working tree, as a clone would have them (builds write build/ into it, not the repo)."""
    target = tmp_path_factory.mktemp("source") / "ComfyUI-Whetstone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


@pytest.fixture(scope="module")
def site(source, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run([*PIP, "install", *OFFLINE, "--target", str(target), str(source)], capture_output=True)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    return target


def python_in(folder: Path, *args: str, path: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_the_engine_and_its_data_only(source, tmp_path):
    done = subprocess.run([*PIP, "wheel", *OFFLINE, "-w", str(tmp_path), str(source)], capture_output=True)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    (wheel,) = tmp_path.glob("comfyui_whetstone-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "training/__main__.py" in names and "training/hardware/tiers/cpu.json" in names
    assert {n.split("/")[0] for n in names} == {"training", wheel.name.split("-py3")[0] + ".dist-info"}


def test_installed_cli_runs_from_any_folder(site, tmp_path):
    where = python_in(tmp_path, "-c", "import training; print(training.__file__)", path=str(site))
    assert where.stdout.strip() == str(site / "training" / "__init__.py"), where.stderr
    done = python_in(
        tmp_path, "-m", "training", "plan", "--tier", "cpu", "--json", "--log-level", "ERROR", path=str(site)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tier"] == "cpu" and done.stderr == ""


def test_editable_install_runs_the_source(source, tmp_path):
    prefix = tmp_path / "prefix"
    done = subprocess.run([*PIP, "install", *OFFLINE, "--prefix", str(prefix), "-e", str(source)], capture_output=True)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    (site_dir,) = prefix.glob("lib/python*/site-packages")
    run_module = (
        f"import site, runpy, sys; site.addsitedir({str(site_dir)!r}); import training; print(training.__file__); "
        "sys.argv = ['training', 'plan', '--help']; runpy.run_module('training', run_name='__main__')"
    )
    done = python_in(tmp_path, "-c", run_module, path="")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(source / "training" / "__init__.py")
    assert "--resolution" in done.stdout


def test_training_outside_the_checkout_shows_no_bitsandbytes_warning(site, tmp_path):
    """peft imports bitsandbytes for plain LoRA too; its CPU backend's 'kernels' warning must not reach the user."""
    config = tiny_config(tmp_path / "run", steps=1, micro_batch=1, grad_accum=1, save_state=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = python_in(tmp_path, "-m", "training", "train", "--config", "config.json", path=str(site), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bitsandbytes" not in done.stderr and "kernels" not in done.stderr, done.stderr
    assert (tmp_path / "run" / "lora.safetensors").is_file()
