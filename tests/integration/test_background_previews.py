"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH) and headless Chromium: Preview Settings linked to a background Train
and NO Wait for Run. The prompt ends while the run trains (the queue is free); the run's previews still appear, in
its card of the Whetstone jobs panel and in the Train node's preview strip, decoded by this ComfyUI on request. Each
decoded preview equals ComfyUI's own decode of the same latents (LoadLatent -> VAEDecode -> SaveImage on the same
server, with the same VAELoader file), pixel for pixel within one level of 255. Screenshots are kept (see the
"Whetstone integration artifacts" section of the pytest output)."""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest
import torch
from integration.browser import Browser, chromium_path
from integration.test_browser_chart import numbered
from integration.test_browser_previews import LOADED_IMAGES, SHOW_NODE, preview_prompt
from PIL import Image
from safetensors.torch import load_file, save_file

from training.model.sampling import to_comfy_latent

pytestmark = pytest.mark.comfyui

RUN = "background_previews_no_wait"
TIMEOUT_S = 600
STEPS_SAMPLED = [0, 2, 4]

#: The loaded preview images of the run's card in the jobs panel, and its label.
CARD = f"document.querySelector('.whetstone-job[data-run=\"{RUN}\"]')"
CARD_IMAGES = f"""(() => {{
  const card = {CARD};
  if (!card) return -1;
  return [...card.querySelectorAll("img.whetstone-job-preview")].filter((i) => i.complete && i.naturalWidth > 0).length;
}})()"""
CARD_LABEL = f"({CARD}?.querySelector('.whetstone-job-previews')?.textContent ?? '')"


def background_prompt(models: dict[str, str]) -> dict:
    """Preview Settings -> Train (background), nothing after it."""
    prompt = preview_prompt(models)
    prompt["train"]["inputs"] |= {"run_name": RUN, "background": True, "gpus": "auto"}
    prompt["pack"]["inputs"]["dataset_name"] = "patterns_background_no_wait"
    return prompt


def queue_idle(comfy_server) -> bool:
    queue = comfy_server.get_json("/queue")
    return not queue["queue_running"] and not queue["queue_pending"]


def job_of(comfy_server) -> dict:
    return next((j for j in comfy_server.get_json("/whetstone/jobs")["jobs"] if j["run"] == RUN), {})


def served_png(comfy_server, url: str) -> np.ndarray:
    with urllib.request.urlopen(comfy_server.url + url, timeout=30) as response:
        assert response.headers["Content-Type"] == "image/png"
        with Image.open(response) as image:
            return np.asarray(image.convert("RGB"))


def comfy_decode(comfy_server, models: dict[str, str], run_dir, step: int) -> list[np.ndarray]:
    """ComfyUI's own pixels for one preview step: its latents as a .latent file -> LoadLatent -> VAEDecode with the
    VAELoader's file -> SaveImage (PNG, the same rounding as the previews)."""
    latents = load_file(str(run_dir / "previews" / f"step_{step:07d}.safetensors"))
    batch = torch.stack([latents[key] for key in sorted(latents)])
    name = f"whetstone_{RUN}_{step}.latent"
    save_file(
        {"latent_tensor": to_comfy_latent(batch).contiguous(), "latent_format_version_0": torch.tensor([])},
        str(comfy_server.base / "input" / name),
    )
    prompt = {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": name}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"{RUN}_{step}"}},
    }
    entry = comfy_server.wait(comfy_server.queue(prompt), timeout_s=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    pixels = []
    for image in entry["outputs"]["4"]["images"]:
        with Image.open(comfy_server.base / "output" / image["subfolder"] / image["filename"]) as png:
            pixels.append(np.asarray(png.convert("RGB")))
    return pixels


def test_a_background_runs_previews_appear_with_no_wait_for_run(comfy_server, zimage_models, tmp_path, keep_artifact):
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (set CHROMIUM)")
    pytest.importorskip("websocket", reason="the websocket-client package drives Chromium")
    from integration.workflows import make_images

    make_images(comfy_server.base / "input")
    comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    prompt, ids = numbered(background_prompt(zimage_models))
    assert not any(node["class_type"] == "WhetstoneWaitForRun" for node in prompt.values())
    train = ids["train"]
    node = f"app.graph.getNodeById({train})"

    with Browser(executable, tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
        browser.navigate(comfy_server.url + "/")
        browser.wait_for("!!(window.app && app.graph && app.canvas && app.loadApiJson)", timeout_s=90)
        browser.wait_for("app.extensions.some((e) => e.name === 'whetstone.JobsPanel')", timeout_s=30)
        browser.evaluate(f"app.loadApiJson({json.dumps(prompt)}, 'whetstone-background-no-wait.json')")
        browser.evaluate("app.queuePrompt(0)")
        deadline = time.monotonic() + TIMEOUT_S
        while not (job_of(comfy_server) and queue_idle(comfy_server)):
            assert time.monotonic() < deadline, comfy_server.log()[-3000:]
            time.sleep(0.3)
        state_when_free = job_of(comfy_server)["state"]
        browser.evaluate("app.extensionManager.sidebarTab.toggleSidebarTab('whetstone-jobs')")
        browser.wait_for(f"{CARD_LABEL}.includes('previews at step')", timeout_s=TIMEOUT_S, poll_s=1)
        mid_run = (browser.evaluate(CARD_LABEL), job_of(comfy_server)["state"])
        last = STEPS_SAMPLED[-1]
        browser.wait_for(
            f"{CARD_LABEL}.startsWith('previews at step {last}') && {CARD_IMAGES} === 2", timeout_s=TIMEOUT_S, poll_s=1
        )
        card_label = browser.evaluate(CARD_LABEL)
        panel = keep_artifact(browser.screenshot(tmp_path / "whetstone-jobs-panel-previews.png"))
        browser.wait_for(
            f"JSON.stringify({node}.whetstonePreviews.steps.map((s) => s.step)) === '{json.dumps(STEPS_SAMPLED, separators=(',', ':'))}'",
            timeout_s=120,
            poll_s=1,
        )
        browser.wait_for(f"{LOADED_IMAGES % train} === 2", timeout_s=30, poll_s=0.5)
        node_label = browser.evaluate(f"{node}.whetstonePreviews.label.textContent")
        browser.evaluate(SHOW_NODE % train)
        time.sleep(1.0)  # a frame to redraw
        strip = keep_artifact(browser.screenshot(tmp_path / "whetstone-background-train-previews.png"))
    print(f"jobs panel: {panel} ({card_label!r}); Train node: {strip} ({node_label!r})")
    print(f"the job was {state_when_free} when the queue was free; the first preview showed while it was {mid_run}")
    assert state_when_free in ("queued", "starting", "running"), "the prompt ended while the run trained"
    assert node_label.startswith(f"previews at step {last}"), node_label

    run_dir = comfy_server.base / "models" / "whetstone_runs" / RUN
    record = json.loads((run_dir / "preview_vae.json").read_text())
    assert record["vae_name"] == zimage_models["vae"] and record["dtype"] == "float32", record
    body = comfy_server.get_json(f"/whetstone/jobs/previews?run={RUN}")
    assert [(s["step"], s["state"]) for s in body["steps"]] == [(s, "decoded") for s in STEPS_SAMPLED], body
    for entry in body["steps"][:: len(STEPS_SAMPLED) - 1]:  # the first and the last step
        theirs = comfy_decode(comfy_server, zimage_models, run_dir, entry["step"])
        ours = [served_png(comfy_server, url) for url in entry["images"]]
        assert len(ours) == len(theirs) == 2
        for index, (mine, comfy) in enumerate(zip(ours, theirs, strict=True)):
            difference = np.abs(mine.astype(int) - comfy.astype(int))
            print(
                f"step {entry['step']} prompt {index}: {mine.shape}, max |ours - ComfyUI's VAEDecode| = "
                f"{difference.max()}, mean {difference.mean():.4f}, image std {mine.std():.1f}"
            )
            assert mine.shape == comfy.shape == (64, 64, 3)
            assert difference.max() <= 1 and difference.mean() < 0.05
            assert mine.std() > 1, "an image, not a constant"
    errors = [line for line in browser.console if line.startswith("exception:") or "whetstone" in line.lower()]
    assert not [e for e in errors if "error" in e.lower() or e.startswith("exception:")], errors
