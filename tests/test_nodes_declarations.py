"""Every node class imports without ComfyUI and declares what ComfyUI and the frontend need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_nodes_support import REPO_ROOT, load_pack, pack_module

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
HIDDEN_INPUTS = {"UNIQUE_ID", "PROMPT", "EXTRA_PNGINFO", "DYNPROMPT"}


def node_items():
    return sorted(load_pack().NODE_CLASS_MAPPINGS.items())


def test_root_package_registers_every_node_and_the_web_directory():
    pack = load_pack()
    assert set(pack.NODE_CLASS_MAPPINGS) == EXPECTED_NODES
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_NODES
    assert pack.WEB_DIRECTORY == "./js"
    assert (REPO_ROOT / "js" / "whetstone.js").is_file()


@pytest.mark.parametrize("node_id, node_class", node_items())
def test_node_declares_category_description_and_outputs(node_id, node_class):
    assert node_class.CATEGORY == "Whetstone"
    assert isinstance(node_class.DESCRIPTION, str) and len(node_class.DESCRIPTION) > 40
    assert callable(getattr(node_class, node_class.FUNCTION))
    outputs = len(node_class.RETURN_TYPES)
    assert len(node_class.RETURN_NAMES) == outputs
    assert len(node_class.OUTPUT_TOOLTIPS) == outputs
    assert all(isinstance(t, str) and t for t in node_class.OUTPUT_TOOLTIPS)


@pytest.mark.parametrize("node_id, node_class", node_items())
def test_every_input_has_a_tooltip(node_id, node_class):
    inputs = node_class.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert set(inputs.get("hidden", {}).values()) <= HIDDEN_INPUTS


@pytest.mark.parametrize("node_id, node_class", node_items())
def test_function_accepts_every_declared_input(node_id, node_class):
    import inspect

    signature = inspect.signature(getattr(node_class, node_class.FUNCTION))
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    inputs = node_class.INPUT_TYPES()
    for section in inputs.values():
        for name in section:
            assert takes_kwargs or name in signature.parameters, f"{node_id}.{node_class.FUNCTION} lacks {name}"


def test_importing_the_pack_changes_no_global_state_and_imports_no_comfyui():
    """In a fresh interpreter: sys.path and os.environ unchanged, no ComfyUI module loaded, import from elsewhere."""
    script = textwrap.dedent(
        f"""
        import importlib.util, json, os, sys
        path_before, env_before = list(sys.path), dict(os.environ)
        spec = importlib.util.spec_from_file_location(
            "custom_nodes_x_pack", {str(REPO_ROOT / "__init__.py")!r},
            submodule_search_locations=[{str(REPO_ROOT)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        comfy = sorted(m for m in sys.modules if m in ("folder_paths", "server", "nodes") or m.startswith("comfy."))
        print(json.dumps({{"path_same": sys.path == path_before, "env_same": dict(os.environ) == env_before,
                          "comfy": comfy, "nodes": sorted(module.NODE_CLASS_MAPPINGS)}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT.parent, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"path_same": True, "env_same": True, "comfy": [], "nodes": sorted(EXPECTED_NODES)}


def test_bridge_outside_comfyui_is_inert():
    bridge = pack_module("nodes.comfy_bridge")
    assert bridge.comfyui_present() is ("folder_paths" in sys.modules)
    if not bridge.comfyui_present():
        bridge.register_folders()
        assert bridge.list_files("loras") == []
        assert bridge.interrupt_requested() is False
        bridge.progress_bar(3).update_absolute(1)
        with pytest.raises(bridge.ComfyUIUnavailable):
            bridge.folder_roots("loras")
