"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH) and headless Chromium: the web extension draws the live loss chart
and status line on the Train node while a workflow loaded into the page trains. Screenshots are kept (see the
"Whetstone integration artifacts" section at the end of the pytest output)."""

from __future__ import annotations

import json
import time

import pytest
from integration.browser import Browser, chromium_path
from integration.workflows import make_images, train_prompt

pytestmark = pytest.mark.comfyui

RUN = "browser_chart"
STEPS = 6
POINTS_BEFORE_SCREENSHOT = 3
TIMEOUT_S = 300

#: Pixels of the chart canvas in the moving-average colour (#fb923c, drawn over the raw loss line).
COUNT_CURVE_PIXELS = """(() => {
  const canvas = app.graph.getNodeById(%d).whetstoneChart.canvas;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let count = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] > 200 && data[i + 1] > 110 && data[i + 1] < 180 && data[i + 2] < 100) count++;
  }
  return count;
})()"""


def numbered(prompt: dict) -> tuple[dict, dict[str, int]]:
    """The prompt with node ids 1..n (the frontend's ids are numbers) and the map from the names used here."""
    ids = {name: index for index, name in enumerate(prompt, start=1)}

    def link(value):
        return [str(ids[value[0]]), value[1]] if isinstance(value, list) else value

    renamed = {
        str(ids[name]): {"class_type": node["class_type"], "inputs": {k: link(v) for k, v in node["inputs"].items()}}
        for name, node in prompt.items()
    }
    return renamed, ids


def wait_until_idle(comfy_server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queue = comfy_server.get_json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(1)
    pytest.fail(f"the queue did not empty within {timeout_s} s:\n{comfy_server.log()[-4000:]}")


def test_train_node_shows_the_live_loss_chart(comfy_server, zimage_models, tmp_path, keep_artifact):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (set CHROMIUM)")
    pytest.importorskip("websocket", reason="the websocket-client package drives Chromium")
    make_images(comfy_server.base / "input")
    comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)  # no template browser on a fresh user
    prompt, ids = numbered(train_prompt(zimage_models, run_name=RUN, dataset_name="patterns", steps=STEPS))
    train_id = ids["train"]

    with Browser(executable, tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
        browser.navigate(comfy_server.url + "/")
        browser.wait_for("!!(window.app && app.graph && app.canvas && app.loadApiJson)", timeout_s=90)
        browser.wait_for("app.extensions.some((e) => e.name === 'whetstone.TrainingUI')", timeout_s=30)
        browser.evaluate(f"app.loadApiJson({json.dumps(prompt)}, 'whetstone-chart.json')")
        assert browser.evaluate(f"!!app.graph.getNodeById({train_id}).whetstoneChart"), browser.console
        widgets = browser.evaluate(f"app.graph.getNodeById({train_id}).widgets.map((w) => w.name)")
        assert "seed" in widgets and not any("control" in w for w in widgets), widgets  # no seed randomizing
        browser.evaluate("app.queuePrompt(0)")

        points = f"app.graph.getNodeById({train_id}).whetstoneChart.points.length >= {POINTS_BEFORE_SCREENSHOT}"
        browser.wait_for(points, timeout_s=TIMEOUT_S, poll_s=1)
        status = browser.evaluate(f"app.graph.getNodeById({train_id}).whetstoneChart.status.textContent")
        curve_pixels = browser.evaluate(COUNT_CURVE_PIXELS % train_id)
        live = keep_artifact(browser.screenshot(tmp_path / "whetstone-train-chart-live.png"))
        print(f"live chart: {live} ({status!r}, {curve_pixels} curve pixels)")
        assert status.startswith("step ") and " · loss " in status and "img/s" in status, status
        assert curve_pixels > 50, "the loss curve is not drawn on the chart canvas"

        wait_until_idle(comfy_server, TIMEOUT_S)
        report = f"app.graph.getNodeById({train_id}).whetstoneText.textContent"
        final_report = browser.wait_for(report, timeout_s=30)
        final_status = browser.evaluate(f"app.graph.getNodeById({train_id}).whetstoneChart.status.textContent")
        report_height = browser.evaluate(f"app.graph.getNodeById({train_id}).whetstoneText.clientHeight")
        seed = browser.evaluate(f"app.graph.getNodeById({train_id}).widgets.find((w) => w.name === 'seed').value")
        final = keep_artifact(browser.screenshot(tmp_path / "whetstone-train-chart-final.png"))
        print(f"final chart: {final} ({final_status!r})")
    assert final_status.startswith("completed at step 6 of 6; LoRA "), final_status
    assert final_report.startswith("completed"), final_report
    assert report_height >= 3 * 13, f"the report panel is {report_height} px high: its 3 lines are hidden"
    assert seed == 0
    errors = [line for line in browser.console if line.startswith("exception:") or "whetstone" in line.lower()]
    assert not [e for e in errors if "error" in e.lower() or e.startswith("exception:")], errors
