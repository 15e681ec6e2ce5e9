"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH) and headless Chromium: every template loads with no two node
rectangles overlapping (title bars included, as litegraph measures them), the same after the text panels are filled,
and the CPU template, run from the browser, still has no overlap and its plan table is not cut.

GPU templates cannot run here: their panels are filled with the text their nodes would show (the plan's own panel
for the tier, reports of the length the layout reserves) through the nodes' real onExecuted, so the frontend grows
them exactly as after a run. The CPU template runs for real, with the suite's small models put in place of the files
this machine lacks (as test_smoke_workflow.py does), replaced in the page before queueing.
"""

from __future__ import annotations

import json
import time

import pytest
from integration.browser import Browser, chromium_path
from integration.test_browser_chart import wait_until_idle
from integration.workflows import make_images

from tools.make_workflows import JOBS, TIER_ORDER, plan_for, workflow_path
from tools.workflow_graph import REPORT_LINES
from training.hardware.panel import plan_panel
from training.hardware.tiers import load_tiers

pytestmark = pytest.mark.comfyui

TIMEOUT_S = 400
TRAIN_STEPS = 2

#: [id, type, left, top, right, bottom] of every node, from litegraph's own bounding box (title bar included).
RECTANGLES = """app.graph._nodes.map((n) => {
  const b = n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
    n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT];
  return [n.id, n.type, b[0], b[1], b[0] + b[2], b[1] + b[3]];
})"""

#: Fill each text panel as its node's onExecuted does after a run.
FILL_PANELS = """((texts) => {
  for (const n of app.graph._nodes) {
    if (texts[n.type] != null && n.onExecuted) n.onExecuted({ text: [texts[n.type]] });
  }
  app.graph.setDirtyCanvas(true, true);
  return true;
})(%s)"""

#: Swap the stock CLIPLoader for the suite's small text-encoder loader (same place, size and links); set widgets.
SUBSTITUTE = """((models, steps) => {
  const old = app.graph._nodes.find((n) => n.type === "CLIPLoader");
  const node = LiteGraph.createNode("WhetstoneTestSmallQwen3Loader");
  app.graph.add(node);
  node.pos = [...old.pos];
  node.size = [...old.size];
  node.widgets.find((w) => w.name === "clip_name").value = models.text_encoders;
  for (const linkId of [...(old.outputs[0].links || [])]) {
    const link = app.graph.links.get ? app.graph.links.get(linkId) : app.graph.links[linkId];
    node.connect(0, app.graph.getNodeById(link.target_id), link.target_slot);
  }
  app.graph.remove(old);
  const set = (type, name, value) => {
    app.graph._nodes.filter((n) => n.type === type)
      .forEach((n) => { n.widgets.find((w) => w.name === name).value = value; });
  };
  set("UNETLoader", "unet_name", models.diffusion_models);
  set("WhetstoneTrainingPlan", "model_name", models.diffusion_models);
  set("WhetstoneTrain", "model_name", models.diffusion_models);
  set("WhetstoneTrain", "steps", steps);
  set("KSampler", "steps", 1);
  return true;
})(%s, %d)"""

PLAN_TEXT_CUT = """(() => {
  const pre = app.graph._nodes.find((n) => n.type === "WhetstoneTrainingPlan").whetstoneText;
  return [pre.textContent.length, pre.scrollWidth, pre.clientWidth];
})()"""


def overlaps(rectangles: list) -> list[str]:
    found = []
    for index, (a, type_a, l1, t1, r1, b1) in enumerate(rectangles):
        for b, type_b, l2, t2, r2, b2 in rectangles[index + 1 :]:
            if not (r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1):
                found.append(f"{type_a} #{a} and {type_b} #{b}")
    return found


def panel_texts(tier_name: str) -> dict[str, str]:
    plan = plan_for(load_tiers()[tier_name], JOBS[tier_name])
    path = "/a/long/path/to/ComfyUI/models/whetstone_runs/" + "my_lora_" * 12  # wraps, as run folders do
    report = "\n".join(f"report line {index}: {path}" for index in range(REPORT_LINES))
    return {
        "WhetstoneTrainingPlan": plan_panel(plan),
        "WhetstonePackDataset": report,
        "WhetstoneTrain": report,
        "WhetstoneLoadTrainedLoRA": f"{'my_lora_' * 8}.safetensors: 210 weights patched at strength 1, 0 unmatched keys",
    }


def load_template(browser: Browser, tier_name: str) -> None:
    workflow = json.loads(workflow_path(tier_name).read_text(encoding="utf-8"))
    browser.evaluate(f"app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(tier_name)})")
    browser.wait_for(f"app.graph._nodes.length === {len(workflow['nodes'])}", timeout_s=30)
    browser.evaluate("document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click()) || true")


@pytest.fixture
def page(comfy_server, tmp_path):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (set CHROMIUM)")
    pytest.importorskip("websocket", reason="the websocket-client package drives Chromium")
    comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    with Browser(executable, tmp_path / "chromium-profile", tmp_path / "chromium.log", 1600, 1000) as browser:
        browser.navigate(comfy_server.url + "/")
        browser.wait_for("!!(window.app && app.graph && app.canvas && app.loadGraphData)", timeout_s=90)
        browser.wait_for("app.extensions.some((e) => e.name === 'whetstone.TrainingUI')", timeout_s=30)
        yield browser


def test_templates_do_not_overlap_before_or_after_their_panels_fill(page):
    for tier_name in TIER_ORDER:
        load_template(page, tier_name)
        before = page.evaluate(RECTANGLES)
        assert not overlaps(before), f"{tier_name} as loaded: {overlaps(before)}"
        page.evaluate(FILL_PANELS % json.dumps(panel_texts(tier_name)))
        after = page.evaluate(RECTANGLES)
        grown = [(a[1], a[4] - a[2], a[5] - a[3], b[4] - b[2], b[5] - b[3]) for a, b in zip(before, after) if a != b]
        print(f"{tier_name}: {len(before)} nodes; grown by their panels (w, h before -> after): {grown}")
        assert not overlaps(after), f"{tier_name} with filled panels: {overlaps(after)}"
        length, scroll_width, client_width = page.evaluate(PLAN_TEXT_CUT)
        assert length and scroll_width <= client_width, f"{tier_name}: the plan table is cut ({scroll_width} px)"


def test_cpu_template_runs_from_the_browser_without_overlap(comfy_server, zimage_models, page, tmp_path, keep_artifact):
    make_images(comfy_server.base / "input", folder_name="whetstone_smoke_images")
    load_template(page, "cpu")
    assert not overlaps(page.evaluate(RECTANGLES))
    page.evaluate(SUBSTITUTE % (json.dumps(zimage_models), TRAIN_STEPS))
    page.evaluate("app.queuePrompt(0)")
    train = "app.graph._nodes.find((n) => n.type === 'WhetstoneTrain')"
    page.wait_for(f"{train}.whetstoneChart.points.length >= {TRAIN_STEPS}", timeout_s=TIMEOUT_S, poll_s=2)
    wait_until_idle(comfy_server, TIMEOUT_S)
    page.wait_for(f"{train}.whetstoneText.textContent", timeout_s=60)
    errors = page.evaluate("(app.lastExecutionError && JSON.stringify(app.lastExecutionError)) || ''")
    assert not errors, errors
    shot = keep_artifact(page.screenshot(tmp_path / "whetstone-cpu-template-after-run.png"))
    after = page.evaluate(RECTANGLES)
    print(f"after the run: {shot}")
    assert not overlaps(after), f"after the run: {overlaps(after)}"
    length, scroll_width, client_width = page.evaluate(PLAN_TEXT_CUT)
    assert length and scroll_width <= client_width, f"the plan table is cut ({scroll_width} > {client_width} px)"
    status = page.evaluate(f"{train}.whetstoneChart.status.textContent")
    assert status.startswith(f"completed at step {TRAIN_STEPS} of {TRAIN_STEPS}; LoRA "), status
    assert page.evaluate(f"{train}.whetstoneChart.points.length") == TRAIN_STEPS, "every step's point is on the chart"
    # A websocket reconnect after the end re-reads the history; the status keeps what was saved (it was replaced by
    # the history's shorter message, "completed at step 2 of 2", when a reconnect came late on a loaded machine).
    page.evaluate("(window.comfyAPI?.api?.api ?? app.api).dispatchEvent(new CustomEvent('reconnected'))")
    time.sleep(3)
    kept = page.evaluate(f"{train}.whetstoneChart.status.textContent")
    assert kept == status, kept

    # A browser reload: the chart reads the run's history back from its folder (GET /whetstone/run_history).
    page.navigate(comfy_server.url + "/")
    page.wait_for("!!(window.app && app.graph && app.canvas && app.loadGraphData)", timeout_s=90)
    page.wait_for("app.extensions.some((e) => e.name === 'whetstone.TrainingUI')", timeout_s=30)
    load_template(page, "cpu")
    page.wait_for(f"{train}.whetstoneChart.points.length === {TRAIN_STEPS}", timeout_s=30)
    reloaded = page.evaluate(f"{train}.whetstoneChart.status.textContent")
    assert reloaded == f"completed at step {TRAIN_STEPS} of {TRAIN_STEPS}", reloaded
