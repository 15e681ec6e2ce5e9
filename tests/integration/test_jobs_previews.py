"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH) and headless Chromium: Preview Settings linked to a background Train,
and Wait for Run on that run shows the run's previews (decoded with the wired VAE) in its strip, as the foreground
Train node does, and writes them into the run folder, where Training Report draws them. The screenshot is kept (see
the "Whetstone integration artifacts" section of the pytest output). The Train node's own chart and status line follow
the background job (its child process sends no events: the page polls the run's history) while and after it trains."""

from __future__ import annotations

import json
import time

import pytest
from integration.browser import Browser, chromium_path
from integration.test_browser_chart import numbered
from integration.test_browser_previews import LOADED_IMAGES, SHOW_NODE, STEPS, preview_prompt

pytestmark = pytest.mark.comfyui

RUN = "background_previews"
TIMEOUT_S = 600


def background_preview_prompt(models: dict[str, str]) -> dict:
    """Preview Settings -> Train (background) -> Wait for Run (until the end) -> Training Report -> Preview Image."""
    prompt = preview_prompt(models)
    prompt["train"]["inputs"] |= {"run_name": RUN, "background": True, "gpus": "auto"}
    prompt["pack"]["inputs"]["dataset_name"] = "patterns_background_previews"
    prompt["wait"] = {
        "class_type": "WhetstoneWaitForRun",
        "inputs": {"run": ["train", 0], "until": "end", "timeout_minutes": 10},
    }
    prompt["report"] = {
        "class_type": "WhetstoneTrainingReport",
        "inputs": {"run_name": "", "smoothing": 20, "run": ["wait", 0]},
    }
    prompt["show"] = {"class_type": "PreviewImage", "inputs": {"images": ["report", 0]}}
    return prompt


def history_of(comfy_server, run: str) -> dict:
    """The history entry of the prompt whose Train node trained ``run`` (the session's server ran other prompts)."""
    for entry in comfy_server.get_json("/history").values():
        nodes = entry["prompt"][2].values()
        if any(n["class_type"] == "WhetstoneTrain" and n["inputs"].get("run_name") == run for n in nodes):
            return entry
    pytest.fail(f"no prompt trained {run} in the history:\n{comfy_server.log()[-3000:]}")


def statuses_until_idle(browser, comfy_server, chart: str, timeout_s: float) -> list[str]:
    """The chart's status lines seen (in order, each once) until the queue is empty."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = browser.evaluate(f"{chart}.status.textContent")
        if not seen or seen[-1] != status:
            seen.append(status)
        queue = comfy_server.get_json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return seen
        time.sleep(0.5)
    pytest.fail(f"the queue did not empty within {timeout_s} s (statuses {seen}):\n{comfy_server.log()[-4000:]}")


def test_wait_for_run_shows_a_background_runs_previews(comfy_server, zimage_models, tmp_path, keep_artifact):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (set CHROMIUM)")
    pytest.importorskip("websocket", reason="the websocket-client package drives Chromium")
    from integration.workflows import make_images

    make_images(comfy_server.base / "input")
    comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    prompt, ids = numbered(background_preview_prompt(zimage_models))
    wait_id = ids["wait"]
    node = f"app.graph.getNodeById({wait_id})"
    chart = f"app.graph.getNodeById({ids['train']}).whetstoneChart"

    with Browser(executable, tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
        browser.navigate(comfy_server.url + "/")
        browser.wait_for("!!(window.app && app.graph && app.canvas && app.loadApiJson)", timeout_s=90)
        browser.wait_for("app.extensions.some((e) => e.name === 'whetstone.TrainingUI')", timeout_s=30)
        browser.evaluate(f"app.loadApiJson({json.dumps(prompt)}, 'whetstone-background-previews.json')")
        assert browser.evaluate(f"!!{node}.whetstonePreviews"), browser.console
        browser.evaluate("app.queuePrompt(0)")
        statuses = statuses_until_idle(browser, comfy_server, chart, TIMEOUT_S)
        finished = f"(background job {RUN}: step {STEPS} of {STEPS})"
        final_status = browser.wait_for(
            f"{chart}.status.textContent.includes({json.dumps(finished)}) && {chart}.status.textContent",
            timeout_s=30,
        )
        chart_steps = browser.evaluate(f"{chart}.points.map((p) => p[0])")
        steps_seen = browser.evaluate(f"{node}.whetstonePreviews.steps.map((s) => s.step)")
        browser.wait_for(f"{LOADED_IMAGES % wait_id} === 2", timeout_s=30, poll_s=0.5)
        label = browser.evaluate(f"{node}.whetstonePreviews.label.textContent")
        browser.evaluate(SHOW_NODE % wait_id)
        time.sleep(1.0)  # a frame to redraw
        shot = keep_artifact(browser.screenshot(tmp_path / "whetstone-wait-previews.png"))
        print(f"Wait for Run's previews of a background run: {shot} ({label!r}, steps {steps_seen})")
    print(f"the background Train node's statuses: {statuses}; at the end {final_status!r}, chart steps {chart_steps}")
    assert chart_steps == list(range(1, STEPS + 1)), (chart_steps, statuses)
    assert final_status.startswith("completed"), final_status
    while_training = [s for s in statuses if f"(running in the background: job {RUN})" in s]
    assert while_training and all(s.startswith("step ") for s in while_training), statuses
    entry = history_of(comfy_server, RUN)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert steps_seen == [0, 2, 4], (steps_seen, comfy_server.log()[-3000:])
    assert label.startswith("previews at step 4"), label
    run_dir = comfy_server.base / "models" / "whetstone_runs" / RUN
    decoded = sorted(path.name for path in (run_dir / "previews").glob("*.png"))
    assert len(decoded) == 6, decoded  # 3 preview steps x 2 prompts, in the run folder for Training Report
    assert entry["outputs"][str(ids["show"])]["images"], "Training Report drew the run"
    errors = [line for line in browser.console if line.startswith("exception:") or "whetstone" in line.lower()]
    assert not [e for e in errors if "error" in e.lower() or e.startswith("exception:")], errors
