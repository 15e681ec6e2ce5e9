"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH) and headless Chromium: Preview Settings linked to Train, and the
Train node shows the previews mid-run (a strip of the latest step's images and a slider over the steps), decoded
with the wired VAE. The screenshot is kept (see the "Whetstone integration artifacts" section of the pytest output)."""

from __future__ import annotations

import json
import time

import pytest
from integration.browser import Browser, chromium_path
from integration.test_browser_chart import numbered, wait_until_idle
from integration.workflows import make_images, train_prompt

pytestmark = pytest.mark.comfyui

RUN = "browser_previews"
STEPS = 4
TIMEOUT_S = 600
PROMPTS = "a red square on a blue background\na green circle"

#: Scroll the canvas to the Train node (loadApiJson lays the graph out wider than the window).
SHOW_NODE = """(() => {
  const node = app.graph.getNodeById(%d);
  app.canvas.centerOnNode(node);
  app.canvas.setDirty(true, true);
  return true;
})()"""

#: The strip's images that the browser loaded and decoded (naturalWidth > 0) at the step on show.
LOADED_IMAGES = """(() => {
  const strip = app.graph.getNodeById(%d).whetstonePreviews.strip;
  return [...strip.querySelectorAll("img")].filter((img) => img.complete && img.naturalWidth > 0).length;
})()"""


def preview_prompt(models: dict[str, str]) -> dict:
    prompt = train_prompt(models, run_name=RUN, dataset_name="patterns_previews", steps=STEPS)
    prompt["previews"] = {
        "class_type": "WhetstonePreviewSettings",
        "inputs": {
            "clip": ["clip", 0],
            "vae": ["vae", 0],
            "validation_prompts": PROMPTS,
            "negative_prompt": "",
            "every": 2,
            "steps": 2,
            "cfg": 1.0,
            "seed": 0,
            "width": 64,
            "height": 64,
        },
    }
    prompt["train"]["inputs"]["preview_settings"] = ["previews", 0]
    return prompt


def test_train_node_shows_previews_mid_run(comfy_server, zimage_models, tmp_path, keep_artifact):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (set CHROMIUM)")
    pytest.importorskip("websocket", reason="the websocket-client package drives Chromium")
    make_images(comfy_server.base / "input")
    comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    prompt, ids = numbered(preview_prompt(zimage_models))
    train_id = ids["train"]
    node = f"app.graph.getNodeById({train_id})"

    with Browser(executable, tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
        browser.navigate(comfy_server.url + "/")
        browser.wait_for("!!(window.app && app.graph && app.canvas && app.loadApiJson)", timeout_s=90)
        browser.wait_for("app.extensions.some((e) => e.name === 'whetstone.TrainingUI')", timeout_s=30)
        browser.evaluate(f"app.loadApiJson({json.dumps(prompt)}, 'whetstone-previews.json')")
        assert browser.evaluate(f"!!{node}.whetstonePreviews"), browser.console
        browser.evaluate("app.queuePrompt(0)")

        browser.wait_for(f"{node}.whetstonePreviews.steps.length >= 2", timeout_s=TIMEOUT_S, poll_s=1)
        browser.wait_for(f"{LOADED_IMAGES % train_id} === 2", timeout_s=30, poll_s=0.5)
        label = browser.evaluate(f"{node}.whetstonePreviews.label.textContent")
        steps_seen = browser.evaluate(f"{node}.whetstonePreviews.steps.map((s) => s.step)")
        running = comfy_server.get_json("/queue")["queue_running"]
        browser.evaluate(SHOW_NODE % train_id)
        time.sleep(1.0)  # a frame to redraw
        shot = keep_artifact(browser.screenshot(tmp_path / "whetstone-train-previews-live.png"))
        print(f"previews mid-run: {shot} ({label!r}, steps {steps_seen}, queue running: {bool(running)})")
        assert steps_seen[:2] == [0, 2], steps_seen
        assert label.startswith(f"previews at step {steps_seen[-1]}"), label
        wait_until_idle(comfy_server, TIMEOUT_S)
        final_steps = browser.evaluate(f"{node}.whetstonePreviews.steps.map((s) => s.step)")
        browser.evaluate(SHOW_NODE % train_id)
        time.sleep(1.0)
        final = keep_artifact(browser.screenshot(tmp_path / "whetstone-train-previews-final.png"))
        print(f"previews at the end: {final} (steps {final_steps})")
    assert final_steps == [0, 2, 4], final_steps
    errors = [line for line in browser.console if line.startswith("exception:") or "whetstone" in line.lower()]
    assert not [e for e in errors if "error" in e.lower() or e.startswith("exception:")], errors
