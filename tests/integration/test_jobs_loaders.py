"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH) and headless Chromium: the jobs panel's loader buttons.

A full fine-tune (mode full) that finished while the page was open gets "Load Model": it adds ComfyUI's Load
Diffusion Model (UNETLoader) with the model's diffusion_models name, in the middle of the visible canvas, and the
graph the frontend makes of it (graphToPrompt, as Queue does) loads the model in ComfyUI. A LoRA run still gets
"Load LoRA" (LoraLoaderModelOnly, at the same place). Each file is saved after the page loaded, yet the added
node's dropdown lists it (the panel refreshes ComfyUI's combo lists, as the R key does). The screenshot is kept (see
the "Whetstone integration artifacts" section of the pytest output).

The fine-tune's file is the suite's one-layer Z-Image (training one for real needs ~16 GB of fp32 state on the CPU,
see test_full_model.py); its run folder is what the Train node leaves: config.json naming the file, then the file,
then the end's status.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
from integration.browser import Browser, chromium_path
from integration.model_fixtures import DIT_FILE, dit_folder
from integration.test_jobs import wait_for_job

from training.run.events import write_status

pytestmark = pytest.mark.comfyui

TIMEOUT_S = 300

#: The card's buttons of a run, by label.
BUTTONS = "[...document.querySelectorAll('.whetstone-job[data-run=\"%s\"] button')].map((b) => b.textContent)"

#: Click a card's button; then the node it added (the graph's newest) as [type, widget values, position on screen].
CLICK = """(() => {
  const before = new Set(app.graph._nodes.map((n) => n.id));
  [...document.querySelectorAll('.whetstone-job[data-run="%s"] button')].find((b) => b.textContent === "%s").click();
  const node = app.graph._nodes.find((n) => !before.has(n.id));
  const rect = app.canvas.canvas.getBoundingClientRect();
  const onScreen = app.canvas.ds.convertOffsetToCanvas(node.pos);
  const values = Object.fromEntries(node.widgets.map((w) => [w.name, w.value]));
  return [node.type, values, [onScreen[0] / rect.width, onScreen[1] / rect.height], node.id];
})()"""

#: The panel's note (what the last action did).
NOTE = "document.querySelector('.whetstone-jobs').previousSibling.textContent"

#: A node's file widget: [its value, the options of its dropdown].
WIDGET = (
    "(({ value, options }) => [value, options.values])(app.graph.getNodeById(%d).widgets.find((w) => w.name === '%s'))"
)

#: Link the model node to a Preview as Text (an output, so the graph runs) and return the prompt Queue would send.
PROMPT_OF_GRAPH = """(async (modelId) => {
  const preview = LiteGraph.createNode("PreviewAny");
  app.graph.add(preview);
  app.graph.getNodeById(modelId).connect(0, preview, 0);
  return [(await app.graphToPrompt()).output, preview.id];
})(%d)"""


def finished_run(runs: Path, name: str, config: dict, save) -> None:
    """A run folder as the Train node leaves it: config.json, then its result (``save()``), then the end's status."""
    run_dir = runs / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    save()
    write_status(run_dir, "completed", "completed at step 2 of 2")


def save_copy(source: Path, target: Path) -> None:
    """A new file (a copy, not a link: the jobs route offers only a plain file written after the run started)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def test_a_finished_full_fine_tune_gets_load_model_and_its_node_loads(
    comfy_server, zimage_models, tmp_path, keep_artifact
):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (set CHROMIUM)")
    pytest.importorskip("websocket", reason="the websocket-client package drives Chromium")
    models = comfy_server.base / "models"
    runs = models / "whetstone_runs"
    full, lora = (f"loaders_{uuid.uuid4().hex[:6]}_{kind}" for kind in ("full", "lora"))
    model_name = f"whetstone/{full}.safetensors"
    comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    with Browser(executable, tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
        browser.navigate(comfy_server.url + "/")
        browser.wait_for("!!(window.app && app.graph && app.extensionManager)", timeout_s=90)
        browser.wait_for("app.extensions.some((e) => e.name === 'whetstone.JobsPanel')", timeout_s=30)
        # The runs end while the page is open: the model is in no list the page fetched.
        model_file = models / "diffusion_models" / model_name
        config = {"mode": "full", "run": {"steps": 2, "model_path": str(model_file)}}
        finished_run(runs, full, config, lambda: save_copy(dit_folder() / DIT_FILE, model_file))
        lora_file = models / "loras" / f"{lora}.safetensors"
        lora_file.parent.mkdir(parents=True, exist_ok=True)
        lora_config = {"run": {"steps": 2, "lora_path": str(lora_file)}}
        finished_run(runs, lora, lora_config, lambda: lora_file.write_bytes(b"a LoRA (not loaded here)"))
        listed = wait_for_job(comfy_server, full, lambda j: j["state"] == "completed", "the finished fine-tune")
        assert (listed["model_name"], listed["lora_name"]) == (model_name, None)

        browser.evaluate("app.extensionManager.sidebarTab.toggleSidebarTab('whetstone-jobs')")
        browser.wait_for(f"{BUTTONS % full}.includes('Load Model')", timeout_s=30)
        browser.wait_for(f"{BUTTONS % lora}.length > 0", timeout_s=30)
        assert browser.evaluate(BUTTONS % full) == ["Load Model"]
        assert browser.evaluate(BUTTONS % lora) == ["Load LoRA"], "a LoRA run keeps its button, and only it"
        browser.evaluate("app.graph.clear()")
        lora_type, lora_values, lora_place, lora_id = browser.evaluate(CLICK % (lora, "Load LoRA"))
        assert (lora_type, lora_values["lora_name"]) == ("LoraLoaderModelOnly", f"{lora}.safetensors")
        browser.wait_for(f"{NOTE} === 'added LoraLoaderModelOnly with {lora}.safetensors'", timeout_s=30)
        value, options = browser.evaluate(WIDGET % (lora_id, "lora_name"))
        assert value == f"{lora}.safetensors" and value in options, "saved after the page loaded, yet listed"
        browser.evaluate(f"app.graph.remove(app.graph.getNodeById({lora_id}))")  # it has no model to patch here
        node_type, values, place, model_id = browser.evaluate(CLICK % (full, "Load Model"))
        assert (node_type, values) == ("UNETLoader", {"unet_name": model_name, "weight_dtype": "default"})
        assert place == lora_place and all(0.3 < fraction < 0.7 for fraction in place), "mid-canvas, as Load LoRA"
        browser.wait_for(f"{NOTE} === 'added UNETLoader with {model_name}'", timeout_s=30)
        value, options = browser.evaluate(WIDGET % (model_id, "unet_name"))
        assert value == model_name and value in options, "saved after the page loaded, yet listed"
        shot = keep_artifact(browser.screenshot(tmp_path / "whetstone-jobs-panel-load-model.png"))
        print(f"jobs panel with Load Model: {shot}")
        prompt, preview_id = browser.evaluate(PROMPT_OF_GRAPH % model_id)
    assert prompt[str(model_id)]["inputs"] == {"unet_name": model_name, "weight_dtype": "default"}
    outputs = comfy_server.run(prompt, TIMEOUT_S)["outputs"]
    (shown,) = outputs[str(preview_id)]["text"]
    assert "ModelPatcher" in shown, shown
    errors = [line for line in browser.console if line.startswith("exception:")]
    assert not errors, errors
