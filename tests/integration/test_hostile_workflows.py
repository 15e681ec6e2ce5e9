"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH): hostile workflows are refused with a message naming the input, and
nothing is written outside the allowed roots.

Every path-like input of every node is tried with traversal ('..'), absolute paths outside the allowed roots, shell
metacharacters (which would create a marker file if anything ever ran them through a shell) and a symlink leading out
of the input folder; numeric inputs with absurd, negative, infinite and NaN values. A refusal happens either in
ComfyUI's own validation (HTTP 400, or the node listed in node_errors) or in the node before it touches the disk
(an execution error naming the input). After each case the server's base folder holds exactly the files it held
before, apart from ComfyUI's own user/ and temp/ folders, and nothing exists outside it.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
from integration.workflows import RESOLUTION, make_images, plan_node

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.comfyui

TIMEOUT_S = 120
#: ComfyUI writes here itself (settings, previews, its log); the allowed roots are checked like everything else.
COMFYUI_OWN = ("user", "temp", "comfyui.log")


def _pack(**overrides) -> dict:
    inputs = {
        "image_folder": "whetstone_images",
        "dataset_name": "hostile_raw",
        "resolution": RESOLUTION,
        "samples_per_shard": 100,
        "too_small": "skip",
        "missing_caption": "empty",
        "store_images": True,
    }
    return {"class_type": "WhetstonePackDataset", "inputs": {**inputs, **overrides}}


def pack_prompt(models, **overrides) -> dict:
    return {"pack": _pack(**overrides)}


def plan_prompt(models, **overrides) -> dict:
    return {"plan": plan_node(models["diffusion_models"], **overrides)}


def train_prompt(models, **overrides) -> dict:
    inputs = {
        "plan": ["plan", 0],
        "dataset": ["pack", 0],
        "model_name": models["diffusion_models"],
        "run_name": "hostile_run",
        "steps": 1,
        "save_every": 0,
        "warmup_steps": 0,
        "schedule": "constant",
        "caption_dropout": 0.0,
        "seed": 0,
        "resume": False,
    }
    train = {"class_type": "WhetstoneTrain", "inputs": {**inputs, **overrides}}
    return {"pack": _pack(), "plan": plan_node(models["diffusion_models"]), "train": train}


#: A file in the loras folder (made by the `hostile` fixture): Load Trained LoRA refuses a name not in the list at
#: queue time, so the cases that test its other inputs need one that is.
PLACEHOLDER_LORA = "hostile_placeholder.safetensors"


def lora_prompt(models, **overrides) -> dict:
    inputs = {"model": ["unet", 0], "lora_name": PLACEHOLDER_LORA, "strength": 1.0, **overrides}
    return {
        "unet": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": models["diffusion_models"], "weight_dtype": "default"},
        },
        "lora": {"class_type": "WhetstoneLoadTrainedLoRA", "inputs": inputs},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["lora", 1]}},
    }


def report_prompt(models, **overrides) -> dict:
    inputs = {"run_name": "hostile_run", "smoothing": 5, **overrides}
    return {
        "report": {"class_type": "WhetstoneTrainingReport", "inputs": inputs},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["report", 0]}},
    }


BUILDERS = {
    "pack": pack_prompt,
    "plan": plan_prompt,
    "train": train_prompt,
    "lora": lora_prompt,
    "report": report_prompt,
}

# (node, input, value). {outside}: a folder outside every allowed root; {marker}: a file there that only a shell would
# create; {short}: a short relative file name a shell would create in its working folder (names have 64 characters).
PATH_CASES = [
    ("pack", "image_folder", "../../../etc"),
    ("pack", "image_folder", "whetstone_images/../../.."),
    ("pack", "image_folder", "/etc"),
    ("pack", "image_folder", "{outside}"),
    ("pack", "image_folder", "{input}/../models"),
    ("pack", "image_folder", "~/"),
    ("pack", "image_folder", "escape_link"),
    ("pack", "image_folder", "$(touch {marker})"),
    ("pack", "image_folder", "`touch {marker}`"),
    ("pack", "image_folder", "whetstone_images; touch {marker}"),
    ("pack", "dataset_name", "../escaped"),
    ("pack", "dataset_name", ".."),
    ("pack", "dataset_name", "a/b"),
    ("pack", "dataset_name", "{outside}/dataset"),
    ("pack", "dataset_name", "x|touch {short}"),
    ("pack", "dataset_name", "x$(touch {short})"),
    ("pack", "dataset_name", "x" * 300),
    ("train", "run_name", "../../escaped"),
    ("train", "run_name", "{outside}/run"),
    ("train", "run_name", "run&&touch {short}"),
    ("train", "run_name", "run name"),
    ("train", "run_name", ".hidden"),
    ("report", "run_name", "../../.."),
    ("report", "run_name", "/etc"),
    ("report", "run_name", "$(touch {short})"),
]

# Refused by ComfyUI's validation (declared ranges and lists, and Load Trained LoRA's VALIDATE_INPUTS).
VALIDATION_CASES = [
    ("pack", "resolution", 10**9),
    ("pack", "samples_per_shard", -1),
    ("plan", "lora_rank", 10**6),
    ("plan", "learning_rate", math.inf),
    ("plan", "model_name", "../../../etc/passwd"),
    ("train", "steps", 10**12),
    ("train", "caption_dropout", -0.5),
    ("train", "model_name", "/etc/passwd"),
    ("lora", "strength", 1e9),
    ("lora", "lora_name", "../../../etc/passwd"),
    ("lora", "lora_name", "/etc/passwd"),
    ("report", "smoothing", 0),
]

# Pass ComfyUI's range checks (NaN compares false) and are refused by the node.
NODE_NUMBER_CASES = [
    ("plan", "learning_rate", math.nan),
    ("train", "caption_dropout", math.nan),
    ("lora", "strength", math.nan),
]


def _files(base: Path) -> set[str]:
    return {
        str(p.relative_to(base))
        for p in base.rglob("*")
        if p.relative_to(base).parts[0] not in COMFYUI_OWN and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def hostile(comfy_server, zimage_models, tmp_path_factory):
    """Images to pack, a symlink out of the input folder, and the upstream nodes of Train executed once (cached)."""
    input_dir = comfy_server.base / "input"
    make_images(input_dir)
    loras = comfy_server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / PLACEHOLDER_LORA).write_bytes(b"")
    outside = tmp_path_factory.mktemp("outside-the-roots")
    make_images(outside)
    link = input_dir / "escape_link"
    if not link.exists():
        link.symlink_to(outside / "whetstone_images", target_is_directory=True)
    comfy_server.run({"pack": _pack(), "plan": plan_node(zimage_models["diffusion_models"])}, TIMEOUT_S)
    return outside


def _fill(value, outside: Path, marker: Path, short: str, input_dir: Path):
    if not isinstance(value, str):
        return value
    return value.format(outside=outside, marker=marker, short=short, input=input_dir)


def _refusal(comfy_server, prompt: dict) -> tuple[str, str]:
    """('validation' | 'execution', message) for a prompt that must be refused; fails if it is not."""
    status, body = comfy_server.post_json("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    if status == 400:
        return "validation", str(body)
    assert status == 200, body
    entry = comfy_server.wait(body["prompt_id"], TIMEOUT_S)
    if body.get("node_errors"):  # other outputs were valid and ran; the refused node did not
        return "validation", str(body["node_errors"])
    assert entry["status"]["status_str"] == "error", f"the hostile prompt ran: {entry['status']}"
    return "execution", comfy_server.error_message(entry)


@pytest.mark.parametrize(("node", "field", "value"), PATH_CASES + VALIDATION_CASES + NODE_NUMBER_CASES)
def test_hostile_input_is_refused_and_nothing_is_written(comfy_server, zimage_models, hostile, node, field, value):
    marker = hostile / f"pwned-{uuid.uuid4().hex[:8]}"
    short = f"pw{uuid.uuid4().hex[:6]}"
    value = _fill(value, hostile, marker, short, comfy_server.base / "input")
    before = _files(comfy_server.base)
    outside_before = set(hostile.rglob("*"))

    stage, message = _refusal(comfy_server, BUILDERS[node](zimage_models, **{field: value}))

    print(f"{node}.{field}={str(value)[:60]!r} -> {stage}: {message[:300]}")
    assert field in message, f"{stage} refusal does not name {field!r}: {message[:600]}"
    if (node, field, value) in VALIDATION_CASES:
        assert stage == "validation", message
    assert _files(comfy_server.base) == before, f"files changed under {comfy_server.base}"
    assert set(hostile.rglob("*")) == outside_before and not marker.exists()
    assert not any((folder / short).exists() for folder in (comfy_server.comfy_path, REPO_ROOT, Path.cwd()))
