"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH): every node registers with its tooltips and the web extension is
served (hostile input: test_hostile_workflows.py)."""

from __future__ import annotations

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
