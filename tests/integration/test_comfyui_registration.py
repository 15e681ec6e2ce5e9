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
    "WhetstoneLoadTrainedModel",
    "WhetstoneTrainingReport",
    "WhetstoneMultiNode",
    "WhetstonePreviewSettings",
    "WhetstoneWaitForRun",
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


def test_templates_are_listed_in_tier_order_with_thumbnails(comfy_server):
    """Workflow → Browse Templates: the frontend lists GET /workflow_templates and fetches <name>.json and .jpg."""
    import urllib.parse
    import urllib.request

    from tools.make_workflows import template_name, templates

    listed = comfy_server.get_json("/workflow_templates")["ComfyUI-Whetstone"]
    expected = [template_name(tier, job) for tier, job in templates()]  # one per tier, then the full fine-tunes
    assert sorted(listed) == expected, listed  # the browser's alphabetical order is the numbered order
    for name in expected:
        base = f"{comfy_server.url}/api/workflow_templates/ComfyUI-Whetstone/{urllib.parse.quote(name)}"
        workflow = comfy_server.get_json(base.removeprefix(comfy_server.url) + ".json")
        assert workflow["version"] == 0.4 and workflow["nodes"], name
        with urllib.request.urlopen(base + ".jpg", timeout=30) as response:
            assert response.headers["Content-Type"] == "image/jpeg" and response.read(3) == b"\xff\xd8\xff", name


def test_run_history_route_answers(comfy_server):
    import urllib.error
    import urllib.request

    assert comfy_server.get_json("/whetstone/run_history?run=never_ran")["points"] == []
    try:
        urllib.request.urlopen(f"{comfy_server.url}/whetstone/run_history?run=..%2F..%2Fetc", timeout=30)
    except urllib.error.HTTPError as error:
        assert error.code == 400 and "run" in error.read().decode()
    else:
        raise AssertionError("a path as run name was answered")
