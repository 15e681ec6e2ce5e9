"""A real ComfyUI for the opt-in integration suite (skipped unless COMFYUI_PATH names a ComfyUI checkout).

The server runs `main.py --cpu` on 127.0.0.1 with a free port and `--base-directory` set to a temporary folder whose
custom_nodes/ComfyUI-Whetstone is a symlink to this repository, so the suite never touches the checkout's own models,
outputs or custom nodes. Beside the pack sits a test-only node (comfyui_fixture_nodes: a small Qwen3-4B-shaped text
encoder loader). Python: COMFYUI_PYTHON, else <COMFYUI_PATH>/venv/bin/python, else this interpreter.

`zimage_models` links the smallest files ComfyUI loads as Z-Image (model_fixtures.py, cached across runs) into the
server's models folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "ComfyUI-Whetstone"
FIXTURE_NODES = Path(__file__).resolve().parent / "comfyui_fixture_nodes"
START_TIMEOUT_S = 240
#: Files the suite keeps for people to look at (screenshots), listed at the end of the pytest output.
SAVED_ARTIFACTS: list[Path] = []


class PromptFailed(AssertionError):
    """A prompt ended in error (or did not end in time); the message has ComfyUI's error and the log tail."""


@dataclass
class ComfyServer:
    url: str
    base: Path
    log_path: Path
    comfy_path: Path
    python: str

    def get_json(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def post_json(self, path: str, data: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id (fails the test with ComfyUI's validation errors otherwise)."""
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if status != 200:
            raise PromptFailed(f"ComfyUI refused the prompt ({status}): {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout_s: float) -> dict:
        """The prompt's /history entry once it finished (successfully or not)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None:
                return entry
            time.sleep(0.5)
        raise PromptFailed(f"prompt {prompt_id} did not finish within {timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout_s: float, client_id: str | None = None) -> dict:
        """Queue, wait, and require success; returns the history entry."""
        entry = self.wait(self.queue(prompt, client_id), timeout_s)
        if entry["status"]["status_str"] != "success":
            errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
            detail = "\n".join(f"{e.get('node_type')}: {e.get('exception_message')}" for e in errors)
            raise PromptFailed(f"prompt failed:\n{detail}\n--- ComfyUI log ---\n{self.log()[-4000:]}")
        return entry

    def open_events(self, client_id: str, timeout_s: float = 5.0):
        """A websocket on /ws for this client id (websocket-client); read it with next_event."""
        websocket = pytest.importorskip("websocket", reason="the websocket-client package reads ComfyUI's events")
        return websocket.create_connection(f"{self.url.replace('http', 'ws', 1)}/ws?clientId={client_id}", timeout_s)

    @staticmethod
    def next_event(connection, deadline: float) -> dict | None:
        """The next JSON message before the deadline (binary previews skipped); None when the time is up."""
        import websocket

        while time.monotonic() < deadline:
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                message = connection.recv()
            except websocket.WebSocketTimeoutException:
                return None
            if isinstance(message, str):
                return json.loads(message)
        return None

    def error_message(self, entry: dict) -> str:
        """The exception message of a failed prompt's history entry ('' when it did not fail)."""
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        return errors[0]["exception_message"] if errors else ""


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
    (base / "custom_nodes" / "whetstone_test_fixtures").symlink_to(FIXTURE_NODES, target_is_directory=True)
    port = _free_port()
    log_path = base / "comfyui.log"
    python = _python(comfy_path)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log_path, comfy_path, python)
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
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


@pytest.fixture(scope="session")
def zimage_models(comfy_server) -> dict[str, str]:
    """{folder name: file name} of the dim-3840 one-layer Z-Image, the Flux VAE and the small text encoder."""
    from integration.model_fixtures import install_models

    return install_models(comfy_server.base / "models", comfy_server.python, comfy_server.comfy_path)


def _keep_artifact(path: Path) -> Path:
    """Copy a file out of pytest's tmp_path to WHETSTONE_TEST_ARTIFACTS (default <tmp>/whetstone-integration-artifacts),
    outside the repository, and list it in the summary at the end of the run."""
    folder = Path(
        os.environ.get("WHETSTONE_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "whetstone-integration-artifacts"
    )
    folder.mkdir(parents=True, exist_ok=True)
    kept = Path(shutil.copy2(path, folder / path.name))
    SAVED_ARTIFACTS.append(kept)
    return kept


@pytest.fixture
def keep_artifact():
    """keep_artifact(path) -> the copy's path (see _keep_artifact)."""
    return _keep_artifact


def pytest_terminal_summary(terminalreporter):
    if SAVED_ARTIFACTS:
        terminalreporter.section("Whetstone integration artifacts")
        for path in SAVED_ARTIFACTS:
            terminalreporter.write_line(str(path))
