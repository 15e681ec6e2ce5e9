"""The UI workflow a tier job becomes: a small schema-0.4 graph builder and the Whetstone pipeline laid out on it.

``tier_workflow`` packs an image folder, plans for a tier, trains, loads the LoRA into the base model and samples one
image; ``tools.make_workflows`` supplies the job, the step count and the note, and writes the files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

PACK_VERSION = "0.1.0"
COMFY_VERSION = "0.8.0"

BASE_MODEL = "z_image_bf16.safetensors"  # Comfy-Org's name for Z-Image-Base in bf16
TEXT_ENCODER = "qwen_3_4b.safetensors"
VAE = "ae.safetensors"
CLIP_TYPE = "lumina2"  # ComfyUI 0.8 loads Qwen3-4B as Z-Image's text encoder under this CLIPLoader type

#: Where each model file comes from and the ComfyUI models folder it goes in: the loaders' ``properties.models``,
#: which the frontend's missing-models dialog offers to download (``zModelFile``: name, url, directory). The text
#: encoder and VAE URLs are those of ComfyUI's own Z-Image template (comfyui_workflow_templates, image_z_image_turbo);
#: the Base diffusion model is Comfy-Org's repackaged Z-Image repository.
MODEL_FILES = {
    BASE_MODEL: (
        "diffusion_models",
        "https://huggingface.co/Comfy-Org/z_image/resolve/main/split_files/diffusion_models/z_image_bf16.safetensors",
    ),
    TEXT_ENCODER: (
        "text_encoders",
        "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
    ),
    VAE: ("vae", "https://huggingface.co/Comfy-Org/z_image_turbo/resolve/main/split_files/vae/ae.safetensors"),
}


@dataclass(frozen=True)
class Job:
    """What a tier's workflow trains and samples; the plan decides the rest."""

    mode: str = "lora"
    lora_rank: int = 32
    lora_targets: str = "attention+ffn"
    adapter: str = "lora"
    resolution: int = 1024
    learning_rate: float = 1e-4
    optimizer: str = "auto"  # the Training Plan node's choice ("auto": the mode's default)
    ema: str = "off"  # the Training Plan node's EMA placement
    ema_decay: float = 0.999
    caption_tokens: int = 128
    samples_seen: int = 8000  # steps = samples_seen / global batch, at least min_steps
    min_steps: int = 250
    save_every: int = 250
    warmup_steps: int = 50
    samples_per_shard: int = 1000  # the Pack Dataset node's default: the loader splits samples across GPUs
    image_folder: str = "my_images"
    model: str = BASE_MODEL
    sample_steps: int = 30
    cfg: float = 4.0
    prompt: str = "a portrait photo in golden evening light (use your captions' trigger words here)"
    negative: str = "blurry, low quality, watermark, text"
    smoothing: int = 20


# ---------------------------------------------------------------------------------------------------------------------
# the graph builder


class Graph:
    """Builds a schema-0.4 UI workflow: nodes with socket inputs/outputs and the links between them."""

    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, size, widgets, *, inputs=(), outputs=(), title=None, ours=False) -> dict:
        """A node of ``size`` (its largest: after a run has filled its text panels); ``layout`` places it."""
        node = {
            "id": len(self.nodes) + 1,
            "type": type_,
            "pos": [0, 0],
            "size": list(size),
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [{"name": name, "type": kind, "link": None} for name, kind in inputs],
            "outputs": [
                {"name": name, "type": kind, "links": [], "slot_index": index}
                for index, (name, kind) in enumerate(outputs)
            ],
            "properties": _properties(type_, ours),
            "widgets_values": list(widgets),
        }
        if title:
            node["title"] = title
        models = [
            {"name": value, "url": MODEL_FILES[value][1], "directory": MODEL_FILES[value][0]}
            for value in widgets
            if isinstance(value, str) and value in MODEL_FILES and type_ in MODEL_LOADERS
        ]
        if models:
            node["properties"]["models"] = models
        self.nodes.append(node)
        return node

    def link(self, source: dict, output: str, target: dict, input_: str) -> None:
        slot = next(i for i, o in enumerate(source["outputs"]) if o["name"] == output)
        target_slot = next(i for i, o in enumerate(target["inputs"]) if o["name"] == input_)
        kind = source["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        self.links.append([link_id, source["id"], slot, target["id"], target_slot, kind])
        source["outputs"][slot]["links"].append(link_id)
        target["inputs"][target_slot]["link"] = link_id

    def workflow(self) -> dict:
        self._order()
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.6, "offset": [60, 60]}},
            "version": 0.4,
        }

    def _order(self) -> None:
        """``order``: a topological execution order, as the frontend saves it."""
        parents = {n["id"]: {link[1] for link in self.links if link[3] == n["id"]} for n in self.nodes}
        done: list[int] = []
        while len(done) < len(self.nodes):
            ready = [i for i, p in parents.items() if i not in done and p <= set(done)]
            done.extend(sorted(ready))
        for node in self.nodes:
            node["order"] = done.index(node["id"])


#: The core loaders whose file widget names a model in MODEL_FILES.
MODEL_LOADERS = ("UNETLoader", "CLIPLoader", "VAELoader")


def _properties(type_: str, ours: bool) -> dict:
    if type_ in ("Note", "MarkdownNote"):
        return {}
    if ours:
        return {"Node name for S&R": type_, "cnr_id": "comfyui-whetstone", "ver": PACK_VERSION}
    return {"Node name for S&R": type_, "cnr_id": "comfy-core", "ver": COMFY_VERSION}


def render(workflow: dict) -> str:
    """The workflow file's text, as written to ``workflows/``."""
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# sizes and layout: the frontend's geometry (litegraph), so that no node covers another, before or after a run

TITLE_HEIGHT = 30  # litegraph draws the title bar above ``pos``
SLOT_HEIGHT = 20
WIDGET_HEIGHT = 24  # a 20 px widget and its 4 px spacing
GAP = 40
CHAR_WIDTH = 6.1  # js/whetstone.js text panels: 10 px monospace
TEXT_LINE_HEIGHT = 13
TEXT_MAX_HEIGHT = 260  # the panel scrolls beyond this (js/whetstone.js TEXT_MAX_HEIGHT)
DOM_MARGIN = 10
CHART_HEIGHT = 190
#: Lines that fill a text panel to its maximum height: what the layout reserves for reports whose length is not
#: known here (pack and train); they wrap at the node's width (js/whetstone.js), so they never widen it.
REPORT_LINES = 20
#: The Load Trained LoRA report: one line, wrapped at the node's width.
LORA_REPORT_LINES = 4
#: Sockets a node may gain without moving its neighbours (room for one more input or output row).
SPARE_SLOTS = 1


def text_panel_height(lines: int) -> int:
    """The text panel's height in js/whetstone.js ``textPanelHeight`` for a text of ``lines`` lines."""
    return min(TEXT_MAX_HEIGHT, lines * TEXT_LINE_HEIGHT + 8 + 16) + 2 * DOM_MARGIN


def text_panel_width(chars: int) -> int:
    return math.ceil(chars * CHAR_WIDTH) + 8 + 16 + 2 * DOM_MARGIN


def node_height(slots: int, widgets: int, panels: int = 0) -> int:
    return (slots + SPARE_SLOTS) * SLOT_HEIGHT + widgets * WIDGET_HEIGHT + panels + 12


def layout(columns: list[list[dict]], top: int = 0) -> None:
    """Place columns left to right and their nodes top to bottom, ``GAP`` apart counting the title bars."""
    x = 0
    for column in columns:
        y = top + TITLE_HEIGHT
        for node in column:
            node["pos"] = [x, y]
            y += node["size"][1] + GAP + TITLE_HEIGHT
        x += max(node["size"][0] for node in column) + GAP


def rectangle(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node including its title bar."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


# ---------------------------------------------------------------------------------------------------------------------
# the Whetstone pipeline

#: (source node, output, target node, input), in link-id order.
PIPELINE_LINKS = (
    ("vae", "VAE", "pack", "vae"),
    ("clip", "CLIP", "pack", "clip"),
    ("plan", "plan", "train", "plan"),
    ("pack", "dataset", "plan", "dataset"),
    ("pack", "dataset", "train", "dataset"),
    ("train", "run", "report", "run"),
    ("report", "chart", "preview", "images"),
    ("unet", "MODEL", "lora", "model"),
    ("train", "run", "lora", "run"),
    ("clip", "CLIP", "positive", "clip"),
    ("clip", "CLIP", "negative", "clip"),
    ("lora", "model", "sampler", "model"),
    ("positive", "CONDITIONING", "sampler", "positive"),
    ("negative", "CONDITIONING", "sampler", "negative"),
    ("latent", "LATENT", "sampler", "latent_image"),
    ("sampler", "LATENT", "decode", "samples"),
    ("vae", "VAE", "decode", "vae"),
    ("decode", "IMAGE", "save", "images"),
)
NOTE_SIZE = (520, 760)


#: A full fine-tune samples its own model: Load Trained Model (the run linked) replaces the base model and the LoRA.
FULL_LINKS = tuple(
    ("tuned", "model", "sampler", "model") if link == ("lora", "model", "sampler", "model") else
    ("train", "run", "tuned", "run") if link == ("train", "run", "lora", "run") else link
    for link in PIPELINE_LINKS
    if link != ("unet", "MODEL", "lora", "model")
)  # fmt: skip


def tier_workflow(tier_name: str, target_batch: int, job: Job, steps: int, note: str, plan_text: str) -> dict:
    """The workflow for one tier: the note, then loaders, training and sampling nodes, linked and laid out.

    ``plan_text`` is the Training Plan node's panel text for this tier: the node is sized so that it fits. A job of
    mode full samples the fine-tuned model (Load Trained Model) instead of the base model with the LoRA.
    """
    full = job.mode == "full"
    run_name = f"my_{'finetune' if full else 'lora'}_{tier_name}"
    g = Graph()
    note_node = g.node("MarkdownNote", NOTE_SIZE, [note], title=f"About: {tier_name}")
    nodes = _loader_nodes(g, job)
    nodes |= _training_nodes(g, tier_name, target_batch, job, steps, run_name, plan_text)
    nodes |= _sampling_nodes(g, tier_name, job, run_name)
    for source, output, target, input_ in FULL_LINKS if full else PIPELINE_LINKS:
        g.link(nodes[source], output, nodes[target], input_)
    result = nodes["tuned"] if full else nodes["lora"]
    layout(
        [
            [note_node, *([] if full else [nodes["unet"]]), nodes["clip"], nodes["vae"]],
            [nodes["plan"], nodes["pack"]],
            [nodes["train"], nodes["report"], nodes["preview"]],
            [result, nodes["positive"], nodes["negative"], nodes["latent"]],
            [nodes["sampler"], nodes["decode"], nodes["save"]],
        ]
    )
    return g.workflow()


def _loader_nodes(g: Graph, job: Job) -> dict[str, dict]:
    """The base model (not for a full fine-tune, which samples its own), the text encoder and the VAE."""
    width = NOTE_SIZE[0]
    nodes = {}
    if job.mode != "full":
        widgets = [job.model, "default"]
        nodes["unet"] = g.node("UNETLoader", (width, node_height(1, 2)), widgets, outputs=[("MODEL", "MODEL")])
    nodes["clip"] = g.node(
        "CLIPLoader", (width, node_height(1, 3)), [TEXT_ENCODER, CLIP_TYPE, "default"], outputs=[("CLIP", "CLIP")]
    )
    nodes["vae"] = g.node("VAELoader", (width, node_height(1, 1)), [VAE], outputs=[("VAE", "VAE")])
    return nodes


def _training_nodes(g, tier_name: str, target_batch: int, job: Job, steps: int, run_name: str, plan_text: str):
    """Pack Dataset, Training Plan (its widgets name the tier), Train, Training Report and its chart's preview."""
    pack_widgets = [job.image_folder, f"my_dataset_{job.resolution}", job.resolution, job.samples_per_shard]
    plan_widgets = [
        job.model,
        tier_name,
        job.mode,
        job.lora_rank,
        job.lora_targets,
        job.adapter,
        job.resolution,
        target_batch,
        job.learning_rate,
        job.caption_tokens,
        "longest",  # caption_length
        job.optimizer,
        job.ema,
        True,  # free_comfyui_memory
        0,  # gpu_count (optional)
    ]
    train_widgets = [job.model, run_name, steps, job.save_every, job.warmup_steps, "constant", 0.1, 0, True]
    train_widgets += ["auto", "adapter", "none"]  # model_variant, turbo_training, training_adapter (optional)
    train_widgets += [False, "auto"]  # background, gpus (optional)
    train_widgets += [job.ema_decay, 0]  # the optional EMA inputs: decay, start step
    lines = plan_text.split("\n")
    plan_width = max(460, text_panel_width(max(map(len, lines))))
    report_panel = text_panel_height(REPORT_LINES)
    return {
        "pack": g.node(
            "WhetstonePackDataset",
            (plan_width, node_height(2, 7, report_panel)),
            [*pack_widgets, "skip", "empty", False],
            inputs=[("vae", "VAE"), ("clip", "CLIP")],
            outputs=[("dataset", "WHETSTONE_DATASET"), ("report", "STRING")],
            ours=True,
        ),
        "plan": g.node(
            "WhetstoneTrainingPlan",
            (plan_width, node_height(2, len(plan_widgets), text_panel_height(len(lines)))),
            plan_widgets,
            inputs=[("hardware", "WHETSTONE_HARDWARE"), ("dataset", "WHETSTONE_DATASET")],
            outputs=[("plan", "WHETSTONE_PLAN"), ("table", "STRING")],
            ours=True,
        ),
        "train": g.node(
            "WhetstoneTrain",
            (460, node_height(3, len(train_widgets), CHART_HEIGHT + report_panel)),
            train_widgets,
            inputs=[("plan", "WHETSTONE_PLAN"), ("dataset", "WHETSTONE_DATASET")],
            outputs=[("run", "WHETSTONE_RUN"), ("lora_name", "STRING"), ("report", "STRING")],
            ours=True,
        ),
        "report": g.node(
            "WhetstoneTrainingReport",
            (460, node_height(2, 2)),
            ["", job.smoothing],
            inputs=[("run", "WHETSTONE_RUN")],
            outputs=[("chart", "IMAGE"), ("summary", "STRING")],
            ours=True,
        ),
        "preview": g.node("PreviewImage", (460, 420), [], inputs=[("images", "IMAGE")]),
    }


def _sampling_nodes(g: Graph, tier_name: str, job: Job, run_name: str) -> dict[str, dict]:
    """The trained LoRA on the base model, both prompts, the latent, KSampler, decode and save."""
    lora_height = node_height(2, 2, text_panel_height(LORA_REPORT_LINES))
    if job.mode == "full":
        result = {
            "tuned": g.node(
                "WhetstoneLoadTrainedModel",
                (420, lora_height),
                [f"whetstone/{run_name}.safetensors"],
                inputs=[("run", "WHETSTONE_RUN")],
                outputs=[("model", "MODEL"), ("report", "STRING")],
                ours=True,
            )
        }
    else:
        result = {
            "lora": g.node(
                "WhetstoneLoadTrainedLoRA",
                (420, lora_height),
                [f"{run_name}.safetensors", 1.0, "auto"],
                inputs=[("model", "MODEL"), ("run", "WHETSTONE_RUN")],
                outputs=[("model", "MODEL"), ("report", "STRING")],
                ours=True,
            )
        }
    return {
        **result,
        "positive": g.node(
            "CLIPTextEncode", (420, 160), [job.prompt], inputs=[("clip", "CLIP")],
            outputs=[("CONDITIONING", "CONDITIONING")], title="Positive prompt",
        ),
        "negative": g.node(
            "CLIPTextEncode", (420, 160), [job.negative], inputs=[("clip", "CLIP")],
            outputs=[("CONDITIONING", "CONDITIONING")], title="Negative prompt",
        ),
        "latent": g.node(
            "EmptySD3LatentImage", (420, node_height(1, 3)), [job.resolution, job.resolution, 1],
            outputs=[("LATENT", "LATENT")],
        ),
        "sampler": g.node(
            "KSampler", (340, node_height(4, 7)), [0, "fixed", job.sample_steps, job.cfg, "euler", "simple", 1.0],
            inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")]
            + [("latent_image", "LATENT")],
            outputs=[("LATENT", "LATENT")],
        ),
        "decode": g.node(
            "VAEDecode", (340, node_height(2, 0)), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
            outputs=[("IMAGE", "IMAGE")],
        ),
        "save": g.node(
            "SaveImage", (512, 580), [f"whetstone/{tier_name}"], inputs=[("images", "IMAGE")],
        ),
    }  # fmt: skip
