"""The per-tier template workflows (workflows/*.json, *.jpg) and the README's tier table, checked without ComfyUI.

Structure: schema-0.4 UI workflows as the frontend saves them. Node types: our pack's (imported as ComfyUI imports
it) or ComfyUI core's, as pinned from ComfyUI 0.8's /object_info in tests/data/comfyui_object_info.json (rewrite it
with `python -m tools.pin_object_info <url>`). Links: each one recorded at both ends with matching types and valid
slots. Widgets: one value per widget input in the frontend's order (plus its `control_after_generate` value after a
seed), valid for the input. Plan: the Training Plan node's widgets, the note's table and the README table agree with
the planner for the tier's simulated hardware.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from test_nodes_support import REPO_ROOT, load_pack

from tools.make_workflows import (
    FULL_JOBS,
    TIER_ORDER,
    model_config,
    outputs,
    predicted_images_per_second,
    templates,
    tier_of_template,
    workflow_path,
)
from training.hardware.memory import GIB
from training.hardware.plan import PlanRequest, make_plan
from training.hardware.tiers import load_tiers, simulated_profile

WORKFLOWS_DIR = REPO_ROOT / "workflows"
PINNED = json.loads((REPO_ROOT / "tests" / "data" / "comfyui_object_info.json").read_text(encoding="utf-8"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
CONTROL = "control_after_generate"
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties", "widgets_values"}
TIERS = load_tiers()


@dataclass(frozen=True)
class NodeDef:
    inputs: tuple[tuple[str, list, bool], ...]  # (name, spec, required) in the frontend's order
    outputs: tuple[tuple[str, str], ...]  # (name, type)

    def widgets(self) -> list[tuple[str, list]]:
        """Widget inputs in order, with the frontend's extra control widget after seed-like INTs."""
        result = []
        for name, spec, _ in self.inputs:
            if not is_widget(spec):
                continue
            result.append((name, spec))
            options = spec[1] if len(spec) > 1 else {}
            if spec[0] == "INT" and options.get(CONTROL, name in ("seed", "noise_seed")):
                result.append((CONTROL, [sorted(CONTROL_VALUES)]))
        return result

    def sockets(self) -> dict[str, tuple[str, bool]]:
        return {name: (spec[0], required) for name, spec, required in self.inputs if not is_widget(spec)}


def is_widget(spec: list) -> bool:
    options = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not options.get("forceInput")


def core_defs() -> dict[str, NodeDef]:
    defs = {}
    for name, info in PINNED["nodes"].items():
        inputs = tuple(
            (input_name, info["input"][section][input_name], section == "required")
            for section in ("required", "optional")
            for input_name in info["input_order"].get(section, [])
        )
        defs[name] = NodeDef(inputs, tuple(zip(info["output_name"], info["output"], strict=True)))
    for name, widget_names in PINNED["frontend_only"].items():
        defs[name] = NodeDef(tuple((w, ["STRING"], True) for w in widget_names), ())
    return defs


def pack_defs() -> dict[str, NodeDef]:
    defs = {}
    for name, cls in load_pack().NODE_CLASS_MAPPINGS.items():
        declared = cls.INPUT_TYPES()
        inputs = tuple(
            (input_name, list(spec), section == "required")
            for section in ("required", "optional")
            for input_name, spec in declared.get(section, {}).items()
        )
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        defs[name] = NodeDef(inputs, tuple(zip(names, cls.RETURN_TYPES, strict=True)))
    return defs


DEFS = {**core_defs(), **pack_defs()}


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def tier_of(path: Path) -> str:
    return tier_of_template(path.stem)


def nodes_of(workflow: dict, type_: str) -> list[dict]:
    return [node for node in workflow["nodes"] if node["type"] == type_]


def only(workflow: dict, type_: str) -> dict:
    (node,) = nodes_of(workflow, type_)
    return node


def widget_map(node: dict) -> dict:
    names = [name for name, _ in DEFS[node["type"]].widgets()]
    return dict(zip(names, node["widgets_values"], strict=True))


def note_table(workflow: dict) -> dict[str, str]:
    (note,) = nodes_of(workflow, "MarkdownNote") + nodes_of(workflow, "Note")
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", note["widgets_values"][0], re.MULTILINE)
    return {key: value for key, value in rows if key not in ("setting", "---")}


def planned(workflow: dict, tier_name: str):
    """The plan the Training Plan node computes for the workflow's widgets (tier: simulated hardware)."""
    widgets = widget_map(only(workflow, "WhetstoneTrainingPlan"))
    tier = TIERS[tier_name]
    request = PlanRequest(
        mode=widgets["mode"],
        resolution=widgets["resolution"],
        caption_tokens=widgets["caption_tokens"],
        lora_rank=widgets["lora_rank"],
        lora_targets=widgets["lora_targets"],
        target_global_batch=widgets["target_batch"] or None,
        lr_base=widgets["learning_rate"],
        model=model_config(widgets["model_name"]),
    )
    return make_plan(request, simulated_profile(tier), tier=tier), widgets


WORKFLOW_PARAMS = pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.stem)


# ---------------------------------------------------------------------------------------------------------------------


def test_one_workflow_per_tier():
    assert {tier_of(path) for path in workflow_files()} == set(TIERS)


@WORKFLOW_PARAMS
def test_schema_0_4_structure(path):
    workflow = load(path)
    assert workflow["version"] == 0.4
    assert isinstance(workflow["groups"], list) and isinstance(workflow["config"], dict)
    assert isinstance(workflow["extra"], dict)
    node_ids = [node["id"] for node in workflow["nodes"]]
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(node_ids)) == len(node_ids) and len(set(link_ids)) == len(link_ids)
    assert workflow["last_node_id"] >= max(node_ids) and workflow["last_link_id"] >= max(link_ids, default=0)
    orders = sorted(node["order"] for node in workflow["nodes"])
    assert orders == list(range(len(node_ids)))
    for node in workflow["nodes"]:
        assert NODE_KEYS <= set(node), f"node {node.get('id')} lacks {NODE_KEYS - set(node)}"
        assert isinstance(node["id"], int) and isinstance(node["type"], str)
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
        assert all(isinstance(v, int | float) for v in node["pos"] + node["size"])
        assert node["mode"] == 0, f"node {node['id']} ({node['type']}) is muted or bypassed"
        for slot in node["inputs"]:
            assert {"name", "type", "link"} <= set(slot)
        for index, slot in enumerate(node["outputs"]):
            assert {"name", "type", "links"} <= set(slot) and slot.get("slot_index", index) == index
    for link in workflow["links"]:
        assert len(link) == 6 and all(isinstance(v, int) for v in link[:5]) and isinstance(link[5], str)


@WORKFLOW_PARAMS
def test_node_types_exist_in_the_pack_or_comfyui_core(path):
    unknown = {node["type"] for node in load(path)["nodes"]} - set(DEFS)
    assert not unknown, f"not in our pack nor in ComfyUI {PINNED['comfyui_version']} core: {unknown}"


@WORKFLOW_PARAMS
def test_links_are_consistent_with_slots_and_types(path):
    workflow = load(path)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        outputs, inputs = nodes[origin]["outputs"], nodes[target]["inputs"]
        assert 0 <= origin_slot < len(outputs) and 0 <= target_slot < len(inputs), f"link {link_id}: bad slot"
        assert link_id in outputs[origin_slot]["links"], f"link {link_id} missing from node {origin}'s outputs"
        assert inputs[target_slot]["link"] == link_id, f"link {link_id} missing from node {target}'s inputs"
        assert kind == outputs[origin_slot]["type"] == inputs[target_slot]["type"], f"link {link_id}: type mismatch"
    for node in workflow["nodes"]:
        definition = DEFS[node["type"]]
        declared_outputs = [(slot["name"], slot["type"]) for slot in node["outputs"]]
        assert declared_outputs == list(definition.outputs), f"node {node['id']} ({node['type']}) outputs"
        for slot_index, slot in enumerate(node["outputs"]):
            for link_id in slot["links"] or []:
                assert links[link_id][1:3] == [node["id"], slot_index]
        sockets = definition.sockets()
        for slot_index, slot in enumerate(node["inputs"]):
            assert slot["name"] in sockets, f"node {node['id']} ({node['type']}) has no socket {slot['name']!r}"
            assert slot["type"] == sockets[slot["name"]][0], f"node {node['id']} input {slot['name']} type"
            if slot["link"] is not None:
                assert links[slot["link"]][3:5] == [node["id"], slot_index]
        linked = {slot["name"] for slot in node["inputs"] if slot["link"] is not None}
        unlinked_required = {name for name, (_, required) in sockets.items() if required} - linked
        assert not unlinked_required, f"node {node['id']} ({node['type']}) needs {unlinked_required} linked"


def check_widget(where: str, spec: list, value) -> None:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    if isinstance(kind, list):
        assert isinstance(value, str), f"{where}={value!r} must be a string"
        assert not kind or value in kind, f"{where}={value!r} is not one of {kind}"  # empty: a file list
        return
    if kind in ("INT", "FLOAT"):
        allowed = int if kind == "INT" else int | float
        assert isinstance(value, allowed) and not isinstance(value, bool), f"{where}={value!r} must be {kind}"
        assert options.get("min", float("-inf")) <= value <= options.get("max", float("inf")), f"{where}={value}"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}={value!r} must be a string"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}={value!r} must be true or false"


@WORKFLOW_PARAMS
def test_widget_values_are_valid_for_their_inputs(path):
    for node in load(path)["nodes"]:
        widgets = DEFS[node["type"]].widgets()
        where = f"node {node['id']} ({node['type']})"
        assert len(node["widgets_values"]) == len(widgets), f"{where}: {[name for name, _ in widgets]}"
        for (name, spec), value in zip(widgets, node["widgets_values"], strict=True):
            check_widget(f"{where}.{name}", spec, value)


@WORKFLOW_PARAMS
def test_train_seed_is_fixed_so_queueing_again_does_not_retrain(path):
    """Train's seed declares no control_after_generate, so the frontend never randomizes it between queues."""
    train = only(load(path), "WhetstoneTrain")
    assert CONTROL not in widget_map(train)
    seed_spec = next(spec for name, spec, _ in DEFS["WhetstoneTrain"].inputs if name == "seed")
    assert seed_spec[1][CONTROL] is False


@WORKFLOW_PARAMS
def test_plan_widgets_name_the_tier_and_its_defaults(path):
    workflow = load(path)
    tier = TIERS[tier_of(path)]
    _, widgets = planned(workflow, tier.name)
    assert widgets["tier"] == tier.name
    assert widgets["mode"] in tier.modes_allowed
    assert widgets["target_batch"] == tier.target_global_batch
    model = widgets["model_name"]
    assert widget_map(only(workflow, "WhetstoneTrain"))["model_name"] == model, "train what was planned"
    if widgets["mode"] == "full":  # it samples its own result: no base model, no LoRA
        assert not nodes_of(workflow, "UNETLoader") and not nodes_of(workflow, "WhetstoneLoadTrainedLoRA")
    else:
        assert widget_map(only(workflow, "UNETLoader"))["unet_name"] == model, "sample the model trained on"
    resolution = widgets["resolution"]
    assert widget_map(only(workflow, "WhetstonePackDataset"))["resolution"] == resolution, "pack at the plan's size"
    latent = widget_map(only(workflow, "EmptySD3LatentImage"))
    assert (latent["width"], latent["height"]) == (resolution, resolution)


@WORKFLOW_PARAMS
def test_note_shows_the_plan_the_planner_makes(path):
    workflow = load(path)
    tier_name = tier_of(path)
    plan, widgets = planned(workflow, tier_name)
    config = model_config(widgets["model_name"])
    speed = predicted_images_per_second(plan, tier_name, config)
    expected = {
        "mode": plan.mode,
        "LoRA rank": str(plan.lora_rank),
        "resolution": f"{plan.resolution[0]}x{plan.resolution[1]}",
        "GPUs": str(plan.world_size),
        "parallelism": plan.parallelism,
        "micro-batch per GPU": str(plan.micro_batch),
        "gradient accumulation": str(plan.grad_accum),
        "global batch": str(plan.global_batch),
        "checkpoint depth": f"{plan.checkpoint_depth} of {config.n_layers} blocks",
        "frozen base": {"bf16": "bf16", "fp8": "FP8 (e4m3, upcast per layer)"}[plan.base_storage]
        if plan.mode == "lora"
        else "trains (fp32 master)"
        if plan.mode == "full"
        else "NF4",
        "block swap": "off"
        if not plan.swap_blocks
        else f"{plan.swap_blocks} of {config.n_layers + 2 * config.n_refiner_layers} blocks in host memory, "
        f"{plan.swap_bytes_per_step / GIB:.1f} GiB over PCIe per step",
        "predicted peak": f"{plan.predicted_peak_bytes / GIB:.1f} GiB",
        "budget": f"{plan.budget_bytes / GIB:.1f} GiB",
        "compile": "on" if plan.compile else "off",
        "attention": plan.attention_backend,
        "NCCL timeout": f"{plan.nccl_timeout_s} s",
        "learning rate": f"{plan.lr:.3g}",
        "throughput (predicted)": "—" if speed is None else f"{speed:.2f} img/s",
    }
    if plan.nodes > 1:  # across machines: the spread and the planner's network time per step
        decided = {name: value for name, value, _ in plan.decisions}
        expected["machines"] = f"{plan.nodes} × {plan.world_size // plan.nodes} GPUs"
        expected["inter-node time (predicted)"] = (
            f"{decided['inter_node_s_per_step'] * 1e3:.0f} ms per step at {decided['inter_node_gbps']:g} GB/s"
        )
    assert note_table(workflow) == expected


def test_cpu_smoke_workflow_plans_one_process_without_gpu():
    workflow = load(workflow_path("cpu"))
    plan, widgets = planned(workflow, "cpu")
    assert (plan.world_size, plan.parallelism, plan.compile) == (1, "none", False)
    assert plan.predicted_peak_bytes < plan.budget_bytes
    assert model_config(widgets["model_name"]).dim == 3840, "ComfyUI's loaders only recognise Z-Image at dim 3840"


def readme_rows() -> dict[str, dict[str, str]]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Tier workflows") :]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    return {row["tier"]: row for row in rows}


def test_readme_table_matches_the_planner():
    rows = readme_rows()
    assert set(rows) == set(TIERS)
    for tier_name, row in rows.items():
        path = workflow_path(tier_name)
        assert f"(workflows/{quote(path.name)})" in row["workflow"]
        plan, widgets = planned(load(path), tier_name)
        config = model_config(widgets["model_name"])
        label = {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}[plan.mode]
        assert row["trains"].startswith(f"{label} r{plan.lora_rank} at {plan.resolution[0]}²"), row
        assert row["micro-batch"] == f"{plan.micro_batch} × {plan.grad_accum} accum = {plan.global_batch}"
        assert row["checkpoint depth"] == f"{plan.checkpoint_depth} of {config.n_layers} blocks"
        peak, budget = plan.predicted_peak_bytes / GIB, plan.budget_bytes / GIB
        assert row["predicted peak"] == f"{peak:.1f} GiB of {budget:.1f} GiB"
        speed = predicted_images_per_second(plan, tier_name, config)
        assert row["throughput"] == ("—" if speed is None else f"{speed:.2f} img/s (predicted)"), row


MULTI_NODE_TIERS = [name for name, tier in TIERS.items() if tier.nodes > 1]


def test_a_committed_tier_spans_several_machines_and_has_its_workflow():
    assert MULTI_NODE_TIERS == ["2x8xH100-80GB-IB"]
    assert workflow_path("2x8xH100-80GB-IB").is_file()


@WORKFLOW_PARAMS
def test_train_gets_a_multi_node_run_exactly_when_the_tier_spans_machines(path):
    workflow = load(path)
    tier = TIERS[tier_of(path)]
    train = only(workflow, "WhetstoneTrain")
    machines_input = [slot for slot in train["inputs"] if slot["name"] == "machines"]
    if tier.nodes == 1:
        assert not nodes_of(workflow, "WhetstoneMultiNode") and not machines_input
        return
    run = only(workflow, "WhetstoneMultiNode")
    links = {link[0]: link for link in workflow["links"]}
    (slot,) = machines_input
    assert links[slot["link"]][1:3] == [run["id"], 0], "Multi-Node Run feeds Train's machines input"
    assert widget_map(run) == {"nodes": tier.nodes, "master_address": ""}, "the address is the user's machine's"


@pytest.mark.parametrize("tier_name", MULTI_NODE_TIERS)
def test_the_multi_node_workflow_makes_comfyui_node_0_and_prints_the_other_machines_command(tier_name, tmp_path):
    """The workflow's plan spans every GPU of every machine; with the address filled in, Multi-Node Run and Train's
    multi-node helpers give node 0 this machine's GPUs and one printed torchrun line per other machine."""
    multinode = load_pack().nodes.multinode
    workflow = load(workflow_path(tier_name))
    tier = TIERS[tier_name]
    plan, _ = planned(workflow, tier_name)
    assert (plan.nodes, plan.world_size, plan.parallelism) == (tier.nodes, tier.nodes * tier.gpu_count, "ddp")
    assert plan.global_batch == tier.target_global_batch
    widgets = widget_map(only(workflow, "WhetstoneMultiNode"))
    with pytest.raises(ValueError, match="master_address='': with nodes=2"):
        multinode.MultiNode().machines(**widgets)  # queued as shipped: refused, saying what to fill in
    (machines,) = multinode.MultiNode().machines(**widgets | {"master_address": "10.0.0.5:29500"})
    per_node = multinode.gpus_per_node(plan, machines)
    assert per_node == tier.gpu_count
    run = multinode.plan_multinode(machines, tmp_path / "config.json", per_node, tmp_path / "repo")
    assert len(run.others) == tier.nodes - 1
    for rank, line in enumerate([shlex.join(run.this_node), *run.others]):
        assert f"--nnodes {tier.nodes} --node_rank {rank} --nproc_per_node {tier.gpu_count} " in line, line
        assert "--rdzv_endpoint 10.0.0.5:29500" in line and line.endswith(f"--config {tmp_path / 'config.json'}")
    note = only(workflow, "MarkdownNote")["widgets_values"][0]
    assert "`master_address`" in note and "other_nodes.txt" in note and "same paths" in note


def test_full_fine_tune_workflows_plan_fsdp2_and_sample_the_run_through_load_trained_model():
    assert FULL_JOBS, "a full fine-tune workflow for the tiers that fit it"
    for tier_name, job in FULL_JOBS.items():
        workflow = load(workflow_path(tier_name, job))
        plan, widgets = planned(workflow, tier_name)
        assert (widgets["mode"], plan.parallelism, plan.world_size) == ("full", "fsdp2", TIERS[tier_name].gpu_count)
        tuned, train, sampler = (only(workflow, kind) for kind in ("WhetstoneLoadTrainedModel", "WhetstoneTrain",
                                                                  "KSampler"))  # fmt: skip
        run_link = next(i["link"] for i in tuned["inputs"] if i["name"] == "run")
        model_link = next(i["link"] for i in sampler["inputs"] if i["name"] == "model")
        links = {link[0]: link for link in workflow["links"]}
        assert (links[run_link][1], links[run_link][2]) == (train["id"], 0), "the run feeds Load Trained Model"
        assert (links[model_link][1], links[model_link][2]) == (tuned["id"], 0), "the sampler uses the fine-tune"
        assert widget_map(tuned)["model_name"] == f"whetstone/{widget_map(train)['run_name']}.safetensors"
        assert "diffusion_models/whetstone/" in only(workflow, "MarkdownNote")["widgets_values"][0]


# ---------------------------------------------------------------------------------------------------------------------
# layout, models, wording

TITLE_HEIGHT = 30  # litegraph draws a node's title bar above its pos
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "VAELoader": "vae"}
MODEL_FILE_KEYS = {"name", "url", "hash", "hash_type", "directory"}  # the frontend's zModelFile


def rectangles(workflow: dict) -> dict[int, tuple[float, float, float, float]]:
    return {
        node["id"]: (node["pos"][0], node["pos"][1] - TITLE_HEIGHT, node["pos"][0] + node["size"][0],
                     node["pos"][1] + node["size"][1])
        for node in workflow["nodes"]
    }  # fmt: skip


@WORKFLOW_PARAMS
def test_no_two_nodes_overlap(path):
    boxes = rectangles(load(path))
    ids = sorted(boxes)
    for index, a in enumerate(ids):
        for b in ids[index + 1 :]:
            (l1, t1, r1, b1), (l2, t2, r2, b2) = boxes[a], boxes[b]
            assert r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1, f"{path.name}: nodes {a} and {b} overlap"


@WORKFLOW_PARAMS
def test_plan_node_is_sized_for_its_panel_text(path):
    """The plan panel's text (as the node shows it after a run) fits the saved size: nothing grows into a neighbour."""
    from tools.workflow_graph import node_height, text_panel_height, text_panel_width
    from training.hardware.panel import plan_panel

    workflow = load(path)
    plan, _ = planned(workflow, tier_of(path))
    lines = plan_panel(plan).split("\n")
    node = only(workflow, "WhetstoneTrainingPlan")
    assert node["size"][0] >= text_panel_width(max(map(len, lines)))
    widgets = len(DEFS["WhetstoneTrainingPlan"].widgets())
    slots = max(len(node["inputs"]), len(node["outputs"]))
    assert node["size"][1] >= node_height(slots, widgets, text_panel_height(len(lines)))


@WORKFLOW_PARAMS
def test_loaders_declare_the_models_they_need(path):
    """Each loader of a downloadable model names it for the missing-models dialog (name, url, directory)."""
    workflow = load(path)
    declared = 0
    for node in workflow["nodes"]:
        if node["type"] not in LOADER_FOLDERS:
            assert "models" not in node["properties"], f"{node['type']} declares models"
            continue
        file_name = node["widgets_values"][0]
        models = node["properties"].get("models", [])
        if file_name.startswith("z_image_smoke"):
            assert models == [], "the smoke model is made locally (tools/make_smoke_model.py), not downloaded"
            continue
        assert len(models) == 1, f"{node['type']} declares {models}"
        (model,) = models
        assert set(model) <= MODEL_FILE_KEYS
        assert model["name"] == file_name, "the frontend only offers models named in the node's widgets"
        assert model["directory"] == LOADER_FOLDERS[node["type"]]
        assert model["url"].startswith("https://huggingface.co/Comfy-Org/")
        assert model["url"].endswith(f"/resolve/main/split_files/{model['directory']}/{file_name}")
        declared += 1
    full = widget_map(only(workflow, "WhetstoneTrainingPlan"))["mode"] == "full"  # no base model loader
    assert declared == (2 if tier_of(path) == "cpu" or full else 3)


@WORKFLOW_PARAMS
def test_note_wording(path):
    note = note_table(load(path)) and only(load(path), "MarkdownNote")["widgets_values"][0]
    assert not re.search(r"\b1 images\b", note) and "entry tier" not in note
    if tier_of(path) == "1x80GB":
        assert "512 px" not in note and "1024²" in note, "the note says the resolution it trains at"


# ---------------------------------------------------------------------------------------------------------------------
# templates: ComfyUI's browser shows a pack's template by file name (title and description) with <name>.jpg beside it


def test_template_names_are_titles_in_tier_order():
    stems = [path.stem for path in workflow_files()]
    assert [tier_of_template(stem) for stem in stems] == [tier for tier, _ in templates()], "sorted = numbered"
    assert [tier for tier, _ in templates()][: len(TIER_ORDER)] == list(TIER_ORDER), "one per tier, in tier order"
    for number, stem in enumerate(stems, start=1):
        assert stem.startswith(f"Whetstone {number:02d} - ")  # two digits: ten tiers still sort by name
        assert not set(stem) & set("#?%&/\\"), f"{stem!r} would break the template URL"


def test_every_template_has_its_thumbnail_and_nothing_else_lies_there():
    from PIL import Image

    files = sorted(WORKFLOWS_DIR.iterdir())
    assert {path.suffix for path in files} == {".json", ".jpg"}
    for path in workflow_files():
        jpg = path.with_suffix(".jpg")
        with Image.open(jpg) as image:
            assert image.format == "JPEG" and image.size == (512, 384)


def test_committed_templates_are_what_the_generator_writes():
    """Regenerating changes nothing: JSON byte for byte, thumbnails pixel for pixel within JPEG noise."""
    import io

    import numpy as np
    from PIL import Image

    for path, content in outputs().items():
        if path.suffix == ".json" or path.name == "README.md":
            assert path.read_text(encoding="utf-8") == content, f"{path.name} is stale: python -m tools.make_workflows"
            continue
        with Image.open(path) as committed, Image.open(io.BytesIO(content)) as generated:
            difference = np.abs(np.asarray(committed, np.int16) - np.asarray(generated, np.int16)).mean()
        assert difference < 2.0, f"{path.name} is stale: python -m tools.make_workflows"
