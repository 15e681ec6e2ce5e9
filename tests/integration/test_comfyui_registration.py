"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH): every node registers, the web extension is served, hostile input is
refused by ComfyUI's validation or by ours with a clear message."""

from __future__ import annotations

import time
import uuid

import pytest

pytestmark = pytest.mark.comfyui

EXPECTED_NODES = {
    "WhetstonePackDataset",
    "WhetstoneHardwareProfile",
    "WhetstoneTrainingPlan",
    "WhetstoneTrain",
    "WhetstoneLoadTrainedLoRA",
    "WhetstoneTrainingReport",
}


def test_pack_imports_without_errors(comfy_server):
    log = comfy_server.log()
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert "Cannot import" not in log, log[-4000:]


def test_object_info_lists_every_node_with_tooltips(comfy_server):
    info = comfy_server.get_json("/object_info")
    ours = {name: node for name, node in info.items() if node.get("category") == "Whetstone"}
    assert set(ours) == EXPECTED_NODES
    for name, node in ours.items():
        assert node["description"], name
        assert len(node["output_tooltips"]) == len(node["output"]), name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name}"


def test_web_extension_is_served(comfy_server):
    extensions = comfy_server.get_json("/extensions")
    assert any(path.endswith("/whetstone.js") and "ComfyUI-Whetstone" in path for path in extensions), extensions


def _pack_prompt(**overrides) -> dict:
    inputs = {
        "image_folder": "my_images",
        "dataset_name": "set",
        "resolution": 512,
        "samples_per_shard": 100,
        "too_small": "skip",
        "missing_caption": "empty",
        "store_images": True,
    }
    inputs.update(overrides)
    return {"1": {"class_type": "WhetstonePackDataset", "inputs": inputs}}


def test_absurd_numbers_are_refused_by_validation(comfy_server):
    status, body = comfy_server.post_json("/prompt", {"prompt": _pack_prompt(resolution=10**9)})
    assert status == 400
    assert "resolution" in str(body)


@pytest.mark.parametrize("image_folder", ["../../../etc", "/etc", "$(touch /tmp/pwned)"])
def test_hostile_paths_fail_with_a_clear_message(comfy_server, image_folder):
    client_id = uuid.uuid4().hex
    status, body = comfy_server.post_json(
        "/prompt", {"prompt": _pack_prompt(image_folder=image_folder), "client_id": client_id}
    )
    assert status == 200, body
    prompt_id = body["prompt_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        history = comfy_server.get_json(f"/history/{prompt_id}")
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            break
        time.sleep(0.5)
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "error"
    messages = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert messages and "image_folder" in messages[0][1]["exception_message"]
    assert not list(comfy_server.base.rglob("set"))  # nothing was written
