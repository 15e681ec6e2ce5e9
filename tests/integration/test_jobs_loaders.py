"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH) and headless Chromium: the jobs panel's loader buttons.

A full fine-tune (mode full) that finished while the page was open gets "Load Model": it adds ComfyUI's Load
Diffusion Model (UNETLoader) with the model's diffusion_models name, in the middle of the visible canvas, and the
graph the frontend makes of it (graphToPrompt, as Queue does) loads the model in ComfyUI. A LoRA run still gets
"Load LoRA" (LoraLoaderModelOnly, at the same place). A run that kept an EMA of its weights also gets "Load EMA
Model" or "Load EMA LoRA" (the same node with the ``_ema`` twin its summary names). Each file is saved after the page
loaded, yet the added node's dropdown lists it (the panel refreshes ComfyUI's combo lists, as the R key does). The
screenshot is kept (see the "Whetstone integration artifacts" section of the pytest output).

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


def finished_run(runs: Path, name: str, config: dict, save, ema_file: Path | None = None) -> None:
    """A run folder as the Train node leaves it: config.json, then its result (``save()``), with EMA the summary
    naming the EMA file, then the end's status."""
    run_dir = runs / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    save()
    if ema_file is not None:
        (run_dir / "summary.json").write_text(json.dumps({"state": "completed", "ema_file": str(ema_file)}))
    write_status(run_dir, "completed", "completed at step 2 of 2")


def ema_run(runs: Path, name: str, mode: str, result: Path) -> None:
    """A finished run that kept an EMA: its result and the ``_ema`` twin its summary names (no weights: not loaded)."""
    twin = result.with_name(f"{result.stem}_ema{result.suffix}")

    def save():
        result.write_bytes(b"the trained weights")
        twin.write_bytes(b"their EMA")

    field = "model_path" if mode == "full" else "lora_path"
    finished_run(runs, name, {"mode": mode, "run": {"steps": 2, field: str(result)}}, save, ema_file=twin)


def wait_for_buttons(browser: Browser, run: str) -> list[str]:
    """The card's buttons once the panel lists the run (it polls every 2 s)."""
    return browser.wait_for(f"(({BUTTONS % run}).length && {BUTTONS % run})", timeout_s=30)


def click_loader(browser: Browser, run: str, label: str, widget: str) -> tuple:
    """Click a card's loader button; the node it added once the panel says so: (type, widget values, place, id).
    Its file widget's value is in its dropdown's options (the file was saved after the page loaded)."""
    node_type, values, place, node_id = browser.evaluate(CLICK % (run, label))
    browser.wait_for(f"{NOTE} === 'added {node_type} with {values[widget]}'", timeout_s=30)
    value, options = browser.evaluate(WIDGET % (node_id, widget))
    assert value == values[widget] and value in options, f"{label}: saved after the page loaded, yet listed"
    return node_type, values, place, node_id


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
    tag = uuid.uuid4().hex[:6]
    full, lora, ema_full, ema_lora = (f"loaders_{tag}_{kind}" for kind in ("full", "lora", "emafull", "emalora"))
    model_name = f"whetstone/{full}.safetensors"
    comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    with Browser(executable, tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
        browser.navigate(comfy_server.url + "/")
        browser.wait_for("!!(window.app && app.graph && app.extensionManager)", timeout_s=90)
        browser.wait_for("app.extensions.some((e) => e.name === 'whetstone.JobsPanel')", timeout_s=30)
        browser.evaluate("app.extensionManager.sidebarTab.toggleSidebarTab('whetstone-jobs')")
        browser.evaluate("app.graph.clear()")
        # Each run ends while the page is open, after the previous click refreshed the lists: its file is in none of
        # them until its own click refreshes them again.
        lora_file = models / "loras" / f"{lora}.safetensors"
        lora_file.parent.mkdir(parents=True, exist_ok=True)
        lora_config = {"run": {"steps": 2, "lora_path": str(lora_file)}}
        finished_run(runs, lora, lora_config, lambda: lora_file.write_bytes(b"a LoRA (not loaded here)"))
        assert wait_for_buttons(browser, lora) == ["Load LoRA"], "a LoRA run keeps its button, and only it"
        lora_type, lora_values, lora_place, lora_id = click_loader(browser, lora, "Load LoRA", "lora_name")
        assert (lora_type, lora_values["lora_name"]) == ("LoraLoaderModelOnly", f"{lora}.safetensors")
        browser.evaluate(f"app.graph.remove(app.graph.getNodeById({lora_id}))")  # it has no model to patch here

        model_file = models / "diffusion_models" / model_name
        config = {"mode": "full", "run": {"steps": 2, "model_path": str(model_file)}}
        finished_run(runs, full, config, lambda: save_copy(dit_folder() / DIT_FILE, model_file))
        listed = wait_for_job(comfy_server, full, lambda j: j["state"] == "completed", "the finished fine-tune")
        assert (listed["model_name"], listed["lora_name"]) == (model_name, None)
        assert wait_for_buttons(browser, full) == ["Load Model"]
        node_type, values, place, model_id = click_loader(browser, full, "Load Model", "unet_name")
        assert (node_type, values) == ("UNETLoader", {"unet_name": model_name, "weight_dtype": "default"})
        assert place == lora_place and all(0.3 < fraction < 0.7 for fraction in place), "mid-canvas, as Load LoRA"

        ema_runs = (
            (ema_lora, "lora", lora_file.parent, "Load LoRA", "Load EMA LoRA", "LoraLoaderModelOnly", "lora_name"),
            (ema_full, "full", model_file.parent, "Load Model", "Load EMA Model", "UNETLoader", "unet_name"),
        )
        for run, mode, folder, raw_label, label, expected_type, widget in ema_runs:
            ema_run(runs, run, mode, folder / f"{run}.safetensors")
            assert wait_for_buttons(browser, run) == [raw_label, label], "the EMA beside the raw result"
            ema_type, ema_values, ema_place, ema_id = click_loader(browser, run, label, widget)
            ema_name = f"{run}_ema.safetensors" if mode == "lora" else f"whetstone/{run}_ema.safetensors"
            assert (ema_type, ema_values[widget], ema_place) == (expected_type, ema_name, place)
            browser.evaluate(f"app.graph.remove(app.graph.getNodeById({ema_id}))")  # a file of no real weights
        shot = keep_artifact(browser.screenshot(tmp_path / "whetstone-jobs-panel-load-model.png"))
        print(f"jobs panel with Load Model: {shot}")
        prompt, preview_id = browser.evaluate(PROMPT_OF_GRAPH % model_id)
    assert prompt[str(model_id)]["inputs"] == {"unet_name": model_name, "weight_dtype": "default"}
    outputs = comfy_server.run(prompt, TIMEOUT_S)["outputs"]
    (shown,) = outputs[str(preview_id)]["text"]
    assert "ModelPatcher" in shown, shown
    errors = [line for line in browser.console if line.startswith("exception:")]
    assert not errors, errors
