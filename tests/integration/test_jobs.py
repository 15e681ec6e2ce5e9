"""Background jobs in a real ComfyUI 0.8 (opt-in: COMFYUI_PATH):

* a job started by Train (background on) outlives ComfyUI: after a restart the jobs route lists it running, and stop
  and resume through the route act on it;
* the jobs panel (a sidebar tab) in headless Chromium shows two running jobs; its Stop button saves and stops one.
  Screenshots are kept (see the "Whetstone integration artifacts" section at the end of the pytest output).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from integration.browser import Browser, chromium_path
from integration.conftest import FIXTURE_NODES, PACK_FOLDER, REPO_ROOT, ComfyServer, _free_port, _python, _wait_until_up
from integration.workflows import make_images, train_prompt

pytestmark = pytest.mark.comfyui

TIMEOUT_S = 300
REPO = Path(__file__).resolve().parents[2]


def start_comfyui(base: Path, comfy_path: Path, log_name: str) -> tuple[ComfyServer, subprocess.Popen]:
    """ComfyUI on a base folder that outlives it (a restart starts it again on the same folder)."""
    port = _free_port()
    python = _python(comfy_path)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, base / log_name, comfy_path, python)
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    command += ["--base-directory", str(base), "--disable-auto-launch"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(server.log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    _wait_until_up(server, process)
    return server, process


def stop_comfyui(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def jobs_of(server: ComfyServer) -> dict[str, dict]:
    return {job["run"]: job for job in server.get_json("/whetstone/jobs")["jobs"]}


def wait_for_job(server: ComfyServer, run: str, predicate, what: str, timeout_s: float = TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = jobs_of(server).get(run)
        if job is not None and predicate(job):
            return job
        time.sleep(1)
    pytest.fail(f"job {run}: timed out waiting for {what}: {jobs_of(server).get(run)}\n{server.log()[-3000:]}")


def test_a_background_job_survives_a_comfyui_restart(tmp_path):
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH is not set")
    from integration.model_fixtures import install_models

    comfy_path = Path(comfy_path)
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "custom_nodes" / "whetstone_test_fixtures").symlink_to(FIXTURE_NODES, target_is_directory=True)
    server, process = start_comfyui(base, comfy_path, "comfyui-1.log")
    try:
        models = install_models(base / "models", server.python, comfy_path)
        make_images(base / "input")
        prompt = train_prompt(models, run_name="survivor", dataset_name="patterns", steps=1_000_000)
        prompt["train"]["inputs"] |= {"background": True, "gpus": "auto"}
        started = time.monotonic()
        entry = server.run(prompt, timeout_s=TIMEOUT_S)
        assert entry["status"]["status_str"] == "success"
        print(f"the prompt with a background Train ended after {time.monotonic() - started:.0f} s")
        assert server.get_json("/queue")["queue_running"] == [], "the queue is free while the job trains"
        first = wait_for_job(server, "survivor", lambda j: j["state"] == "running" and (j["step"] or 0) >= 1, "a step")
    finally:
        stop_comfyui(process)
    run_dir = base / "models" / "whetstone_runs" / "survivor"
    events_before = (run_dir / "events.jsonl").stat().st_size

    server, process = start_comfyui(base, comfy_path, "comfyui-2.log")
    try:
        job = wait_for_job(server, "survivor", lambda j: j["state"] == "running", "the reattached job")
        assert (run_dir / "events.jsonl").stat().st_size > events_before, "the job trained on without ComfyUI"
        assert job["step"] >= first["step"] and job["total_steps"] == 1_000_000
        status, answer = server.post_json("/whetstone/jobs/stop", {"run": "survivor"})
        assert status == 200 and answer["result"] == "stopping", answer
        stopped = wait_for_job(server, "survivor", lambda j: j["state"] == "stopped", "the stop")
        assert stopped["lora_name"] == "survivor.safetensors"
        status, answer = server.post_json("/whetstone/jobs/resume", {"run": "survivor"})
        assert status == 200 and answer["result"] == "queued", answer
        resumed = wait_for_job(server, "survivor", lambda j: (j["step"] or 0) > stopped["step"], "resumed steps")
        assert resumed["state"] in ("running", "stopping")
        status, _ = server.post_json("/whetstone/jobs/stop", {"run": "survivor"})
        assert status == 200
        wait_for_job(server, "survivor", lambda j: j["state"] == "stopped", "the second stop")
        for hostile in ("../survivor", "/etc", "survivor/../../x"):
            status, answer = server.post_json("/whetstone/jobs/stop", {"run": hostile})
            assert status == 400 and "not a run name" in answer["error"], answer
    finally:
        stop_comfyui(process)


def tiny_config(run_dir: Path) -> None:
    config = {
        "run": {"output_dir": str(run_dir), "steps": 1_000_000, "micro_batch": 1, "checkpoint_depth": 0},
        "model": {"preset": "tiny", "dtype": "fp32"},
        "lora": {"rank": 2},
        "data": {"synthetic": True, "resolution": 32, "caption_tokens": 8, "caption_dropout": 0.0},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config))


def test_the_jobs_panel_shows_two_running_jobs_and_stops_one(comfy_server, tmp_path, keep_artifact):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (set CHROMIUM)")
    pytest.importorskip("websocket", reason="the websocket-client package drives Chromium")
    from training.run.scheduler import Scheduler

    runs = comfy_server.base / "models" / "whetstone_runs"
    names = [f"panel_{uuid.uuid4().hex[:6]}_{n}" for n in ("a", "b")]
    for name in names:
        tiny_config(runs / name)
    # Another process of this machine queues into the same runs folder (the queue is shared through its file):
    # two tiny CPU trainings, so the panel has two running jobs without the heavy integration model.
    launcher = Scheduler(runs, machine_gpus=[], cwd=REPO)
    launcher.start_thread(0.5)  # reaps a job the panel stopped, so its folder is freed and it shows 'stopped'
    try:
        for name in names:
            launcher.submit(name, gpu_count=0, gpu_ids=None, world_size=1)
        for name in names:
            wait_for_job(comfy_server, name, lambda j: j["state"] == "running" and len(j["sparkline"]) >= 3, "steps")
        comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
        with Browser(executable, tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
            browser.navigate(comfy_server.url + "/")
            browser.wait_for("!!(window.app && app.graph && app.extensionManager)", timeout_s=90)
            browser.wait_for("app.extensions.some((e) => e.name === 'whetstone.JobsPanel')", timeout_s=30)
            browser.evaluate("app.extensionManager.sidebarTab.toggleSidebarTab('whetstone-jobs')")
            cards = " && ".join(
                f'document.querySelector(\'.whetstone-job[data-run="{n}"][data-state="running"]\')' for n in names
            )
            browser.wait_for(f"!!({cards})", timeout_s=30)
            sparks = browser.evaluate("document.querySelectorAll('.whetstone-job polyline').length")
            shot = keep_artifact(browser.screenshot(tmp_path / "whetstone-jobs-panel-two-running.png"))
            print(f"jobs panel: {shot}")
            assert sparks >= 2, "each running job draws its loss sparkline"
            stop_button = (
                f"[...document.querySelectorAll('.whetstone-job[data-run=\"{names[0]}\"] button')]"
                ".find((b) => b.textContent === 'Stop')"
            )
            browser.evaluate(f"{stop_button}.click()")
            browser.wait_for(
                f'!!document.querySelector(\'.whetstone-job[data-run="{names[0]}"][data-state="stopped"]\')', 120
            )
            keep_artifact(browser.screenshot(tmp_path / "whetstone-jobs-panel-one-stopped.png"))
        assert jobs_of(comfy_server)[names[1]]["state"] == "running"
    finally:
        launcher.stop_thread()
        for name in names:
            launcher.stop(name)
        deadline = time.monotonic() + 120
        while launcher.processes and time.monotonic() < deadline:
            launcher.tick()
            time.sleep(0.5)
    errors = [line for line in browser.console if line.startswith("exception:")]
    assert not errors, errors
