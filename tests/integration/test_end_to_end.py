"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH): pack -> plan -> train -> load LoRA -> sample, in one prompt, on the
smallest Z-Image ComfyUI recognises (dim 3840, one main layer, random weights)."""

from __future__ import annotations

import time

import pytest
from integration.workflows import end_to_end_prompt, make_images
from PIL import Image

pytestmark = pytest.mark.comfyui

TRAIN_STEPS = 2
TIMEOUT_S = 420


def test_pack_plan_train_load_lora_and_sample(comfy_server, zimage_models):
    make_images(comfy_server.base / "input")
    started = time.monotonic()
    entry = comfy_server.run(end_to_end_prompt(zimage_models, run_name="e2e", steps=TRAIN_STEPS), TIMEOUT_S)
    print(f"end-to-end prompt: {time.monotonic() - started:.0f} s")
    outputs = entry["outputs"]

    pack_report = outputs["pack"]["text"][0]
    assert "Packed 4 samples" in pack_report, pack_report
    assert "micro-batch per GPU" in outputs["plan"]["text"][0]  # the plan panel's human labels
    assert outputs["train"]["text"][0].startswith("completed"), outputs["train"]["text"][0]

    lora_report = outputs["lora_report"]["text"][0]
    assert "0 unmatched keys" in lora_report and "e2e.safetensors" in lora_report, lora_report
    patched = int(lora_report.split(": ", 1)[1].split(" weights patched")[0])
    assert patched > 0

    lora_file = comfy_server.base / "models" / "loras" / "e2e.safetensors"
    assert lora_file.is_file()
    images = outputs["save"]["images"]
    assert len(images) == 1
    image_path = comfy_server.base / "output" / images[0]["subfolder"] / images[0]["filename"]
    with Image.open(image_path) as image:
        assert image.size == (64, 64)
    assert len(outputs["report_image"]["images"]) == 1  # the Training Report chart
