"""A real ComfyUI for the opt-in integration suite (skipped unless COMFYUI_PATH names a ComfyUI checkout).

The server runs `main.py --cpu` on 127.0.0.1 with a free port and `--base-directory` set to a temporary folder whose
custom_nodes/ComfyUI-Whetstone is a symlink to this repository, so the suite never touches the checkout's own models,
outputs or custom nodes. Python: COMFYUI_PYTHON, else <COMFYUI_PATH>/venv/bin/python, else this interpreter.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-Whetstone"
START_TIMEOUT_S = 240


@dataclass
class ComfyServer:
    url: str
    base: Path
    log_path: Path

    def get_json(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def post_json(self, path: str, data: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _python(comfy_path: Path) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv_python = comfy_path / "venv" / "bin" / "python"
    return str(venv_python) if venv_python.is_file() else sys.executable


def _wait_until_up(server: ComfyServer, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ComfyUI exited with code {process.returncode}:\n{server.log()[-4000:]}")
        try:
            server.get_json("/system_stats")
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT_S} s:\n{server.log()[-4000:]}")


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH is not set (see ../shared/docs/comfyui.md, 'Running a real ComfyUI')")
    comfy_path = Path(comfy_path)
    if not (comfy_path / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={comfy_path} holds no main.py")
    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
    port = _free_port()
    log_path = base / "comfyui.log"
    server = ComfyServer(url=f"http://127.0.0.1:{port}", base=base, log_path=log_path)
    command = [_python(comfy_path), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    command += ["--base-directory", str(base), "--disable-auto-launch"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # load the pack exactly as a user's ComfyUI
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_up(server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
