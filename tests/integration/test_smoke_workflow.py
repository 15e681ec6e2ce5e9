"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH): the committed CPU smoke workflow (workflows/Whetstone 01 - cpu ...), runs
end to end (issue 7).

The UI-format file is converted to an API prompt with tools/workflow_api.py against the server's own /object_info
(as the frontend's graphToPrompt would) and queued with that tool's `queue`, the workflow going along as PNG metadata.
Only what this machine cannot provide is changed, in the API prompt, after conversion:

- the diffusion model's file name (UNETLoader, Training Plan and Train all name it) -> the suite's one-layer Z-Image
  (model_fixtures.py; the same shape as the z_image_smoke_bf16.safetensors the workflow expects);
- the VAE's file name (VAELoader) -> the suite's random Flux VAE (also named ae.safetensors, so unchanged in fact);
- CLIPLoader (the real Qwen3-4B is 8 GB) -> the test-only WhetstoneTestSmallQwen3Loader on the suite's few-layer
  Qwen3-4B-shaped file, keeping the node id and therefore every link from it;
- Train's steps (10 -> TRAIN_STEPS) and KSampler's steps (4 -> SAMPLE_STEPS), so it finishes in minutes on two cores;
- Train's run_name -> RUN_NAME: the browser tests run the same template on the same server (session fixture), and
  with the same inputs ComfyUI would answer from its cache (no Train output) or the run folder would exist already.

The image folder the Pack Dataset node reads (input/whetstone_smoke_images) is filled with a few captioned noise
images. Every other node, link and widget is as committed, and the test asserts so before queueing.
"""

from __future__ import annotations

import json
import time

import pytest
from integration.workflows import make_images
from PIL import Image

from tools import workflow_api
from tools.make_workflows import workflow_path

pytestmark = pytest.mark.comfyui

WORKFLOW = workflow_path("cpu")
IMAGE_FOLDER = "whetstone_smoke_images"  # the Pack Dataset node's image_folder in the committed file
FIXTURE_TEXT_ENCODER = "WhetstoneTestSmallQwen3Loader"
TRAIN_STEPS = 2
SAMPLE_STEPS = 1
RUN_NAME = "smoke_workflow_test"
TIMEOUT_S = 300


def _node_id(prompt: dict, class_type: str) -> str:
    (node_id,) = [key for key, node in prompt.items() if node["class_type"] == class_type]
    return node_id


def _substitute(committed: dict, models: dict[str, str]) -> tuple[dict, set[tuple[str, str]]]:
    """The prompt this machine can run, and the (node id, input) pairs changed: exactly the docstring's list."""
    prompt = json.loads(json.dumps(committed))
    changes = {
        ("UNETLoader", "unet_name"): models["diffusion_models"],
        ("WhetstoneTrainingPlan", "model_name"): models["diffusion_models"],
        ("WhetstoneTrain", "model_name"): models["diffusion_models"],
        ("VAELoader", "vae_name"): models["vae"],
        ("WhetstoneTrain", "steps"): TRAIN_STEPS,
        ("WhetstoneTrain", "run_name"): RUN_NAME,
        ("KSampler", "steps"): SAMPLE_STEPS,
    }
    changed = set()
    for (class_type, name), value in changes.items():
        node_id = _node_id(prompt, class_type)
        assert name in prompt[node_id]["inputs"], (class_type, name)
        if prompt[node_id]["inputs"][name] != value:  # the suite's VAE is ae.safetensors, as the workflow names it
            prompt[node_id]["inputs"][name] = value
            changed.add((node_id, name))
    clip_id = _node_id(prompt, "CLIPLoader")
    prompt[clip_id] = {
        "class_type": FIXTURE_TEXT_ENCODER,
        "inputs": {"clip_name": models["text_encoders"]},
        "_meta": {"title": "small Qwen3-4B-shaped text encoder (test fixture)"},
    }
    changed |= {(clip_id, name) for name in committed[clip_id]["inputs"]} | {(clip_id, "clip_name")}
    return prompt, changed


def _links(prompt: dict) -> set[tuple[str, int, str, str]]:
    return {
        (value[0], value[1], node_id, name)
        for node_id, node in prompt.items()
        for name, value in node["inputs"].items()
        if isinstance(value, list)
    }


def _file_links(workflow: dict) -> set[tuple[str, int, str, str]]:
    nodes = {node["id"]: node for node in workflow["nodes"]}
    return {
        (str(origin), origin_slot, str(target), nodes[target]["inputs"][target_slot]["name"])
        for _, origin, origin_slot, target, target_slot, _ in workflow["links"]
    }


def _differences(committed: dict, ran: dict) -> set[tuple[str, str]]:
    assert committed.keys() == ran.keys()
    differences = set()
    for node_id in committed:
        before, after = committed[node_id]["inputs"], ran[node_id]["inputs"]
        if committed[node_id]["class_type"] != ran[node_id]["class_type"]:
            differences |= {(node_id, name) for name in before.keys() | after.keys()}
            continue
        differences |= {(node_id, name) for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    return differences


def test_cpu_smoke_workflow_runs_end_to_end(comfy_server, zimage_models):
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    committed = workflow_api.to_api(workflow, comfy_server.get_json("/object_info"))
    prompt, changed = _substitute(committed, zimage_models)

    # Every node (notes aside), link and widget is the file's, apart from the named substitutions.
    file_types = {str(n["id"]): n["type"] for n in workflow["nodes"] if n["type"] not in workflow_api.FRONTEND_ONLY}
    clip_id = _node_id(committed, "CLIPLoader")
    assert {key: node["class_type"] for key, node in prompt.items()} == {**file_types, clip_id: FIXTURE_TEXT_ENCODER}
    assert _links(prompt) == _links(committed) == _file_links(workflow)
    assert _differences(committed, prompt) == changed
    pack_id = _node_id(prompt, "WhetstonePackDataset")
    assert prompt[pack_id]["inputs"]["image_folder"] == IMAGE_FOLDER
    make_images(comfy_server.base / "input", folder_name=IMAGE_FOLDER)

    started = time.monotonic()
    status, answer = workflow_api.queue(comfy_server.url, workflow, prompt)
    assert status == 200, json.dumps(answer, indent=1)[:4000]
    entry = comfy_server.wait(answer["prompt_id"], TIMEOUT_S)
    print(f"CPU smoke workflow: {time.monotonic() - started:.0f} s")
    assert entry["status"]["status_str"] == "success", (
        f"{comfy_server.error_message(entry)}\n--- ComfyUI log ---\n{comfy_server.log()[-4000:]}"
    )
    outputs = entry["outputs"]

    train_report = outputs[_node_id(prompt, "WhetstoneTrain")]["text"][0]
    assert train_report.startswith("completed"), train_report
    run_name = prompt[_node_id(prompt, "WhetstoneTrain")]["inputs"]["run_name"]
    lora_report = outputs[_node_id(prompt, "WhetstoneLoadTrainedLoRA")]["text"][0]
    assert "0 unmatched keys" in lora_report and f"{run_name}.safetensors" in lora_report, lora_report
    assert (comfy_server.base / "models" / "loras" / f"{run_name}.safetensors").is_file()

    images = outputs[_node_id(prompt, "SaveImage")]["images"]
    assert len(images) == 1
    latent = prompt[_node_id(prompt, "EmptySD3LatentImage")]["inputs"]
    with Image.open(comfy_server.base / "output" / images[0]["subfolder"] / images[0]["filename"]) as image:
        assert image.size == (latent["width"], latent["height"])
        assert json.loads(image.info["workflow"])["nodes"] == workflow["nodes"]  # the UI workflow rides along

    report_id = _node_id(prompt, "WhetstoneTrainingReport")
    chart_preview = [target for source, _, target, _ in _links(prompt) if source == report_id]
    assert [prompt[key]["class_type"] for key in chart_preview] == ["PreviewImage"]
    assert len(outputs[chart_preview[0]]["images"]) == 1  # the Training Report's loss chart
