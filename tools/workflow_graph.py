"""The UI workflow a tier job becomes: a small schema-0.4 graph builder and the Whetstone pipeline laid out on it.

``tier_workflow`` packs an image folder, plans for a tier, trains, loads the LoRA into the base model and samples one
image; ``tools.make_workflows`` supplies the job, the step count and the note, and writes the files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PACK_VERSION = "0.1.0"
COMFY_VERSION = "0.8.0"

BASE_MODEL = "z_image_base_bf16.safetensors"
TEXT_ENCODER = "qwen_3_4b.safetensors"
VAE = "ae.safetensors"
CLIP_TYPE = "lumina2"  # ComfyUI 0.8 loads Qwen3-4B as Z-Image's text encoder under this CLIPLoader type


@dataclass(frozen=True)
class Job:
    """What a tier's workflow trains and samples; the plan decides the rest."""

    mode: str = "lora"
    lora_rank: int = 32
    lora_targets: str = "attention+ffn"
    resolution: int = 1024
    learning_rate: float = 1e-4
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

    def node(self, type_: str, pos, size, widgets, *, inputs=(), outputs=(), title=None, ours=False) -> dict:
        node = {
            "id": len(self.nodes) + 1,
            "type": type_,
            "pos": list(pos),
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


def tier_workflow(tier_name: str, target_batch: int, job: Job, steps: int, note: str) -> dict:
    """The workflow for one tier: the note, then loaders, training and sampling nodes, linked."""
    run_name = f"my_lora_{tier_name}"
    g = Graph()
    g.node("MarkdownNote", (0, -560), (760, 820), [note], title=f"About: {tier_name}")
    nodes = _loader_nodes(g, job)
    nodes |= _training_nodes(g, tier_name, target_batch, job, steps, run_name)
    nodes |= _sampling_nodes(g, tier_name, job, run_name)
    for source, output, target, input_ in PIPELINE_LINKS:
        g.link(nodes[source], output, nodes[target], input_)
    return g.workflow()


def _loader_nodes(g: Graph, job: Job) -> dict[str, dict]:
    return {
        "unet": g.node("UNETLoader", (0, 300), (360, 82), [job.model, "default"], outputs=[("MODEL", "MODEL")]),
        "clip": g.node(
            "CLIPLoader", (0, 420), (360, 106), [TEXT_ENCODER, CLIP_TYPE, "default"], outputs=[("CLIP", "CLIP")]
        ),
        "vae": g.node("VAELoader", (0, 570), (360, 58), [VAE], outputs=[("VAE", "VAE")]),
    }


def _training_nodes(g: Graph, tier_name: str, target_batch: int, job: Job, steps: int, run_name: str) -> dict:
    """Pack Dataset, Training Plan (its widgets name the tier), Train, Training Report and its chart's preview."""
    pack_widgets = [job.image_folder, f"my_dataset_{job.resolution}", job.resolution, job.samples_per_shard]
    plan_widgets = [job.model, tier_name, job.mode, job.lora_rank, job.lora_targets, job.resolution, target_batch]
    train_widgets = [job.model, run_name, steps, job.save_every, job.warmup_steps, "constant", 0.1, 0, True]
    return {
        "pack": g.node(
            "WhetstonePackDataset",
            (420, 300),
            (400, 270),
            [*pack_widgets, "skip", "empty", False],
            inputs=[("vae", "VAE"), ("clip", "CLIP")],
            outputs=[("dataset", "WHETSTONE_DATASET"), ("report", "STRING")],
            ours=True,
        ),
        "plan": g.node(
            "WhetstoneTrainingPlan",
            (420, -100),
            (400, 330),
            [*plan_widgets, job.learning_rate, job.caption_tokens, "longest", True],
            inputs=[("hardware", "WHETSTONE_HARDWARE"), ("dataset", "WHETSTONE_DATASET")],
            outputs=[("plan", "WHETSTONE_PLAN"), ("table", "STRING")],
            ours=True,
        ),
        "train": g.node(
            "WhetstoneTrain",
            (880, 0),
            (400, 330),
            train_widgets,
            inputs=[("plan", "WHETSTONE_PLAN"), ("dataset", "WHETSTONE_DATASET")],
            outputs=[("run", "WHETSTONE_RUN"), ("lora_name", "STRING"), ("report", "STRING")],
            ours=True,
        ),
        "report": g.node(
            "WhetstoneTrainingReport",
            (880, 400),
            (400, 110),
            ["", job.smoothing],
            inputs=[("run", "WHETSTONE_RUN")],
            outputs=[("chart", "IMAGE"), ("summary", "STRING")],
            ours=True,
        ),
        "preview": g.node("PreviewImage", (880, 560), (400, 360), [], inputs=[("images", "IMAGE")]),
    }


def _sampling_nodes(g: Graph, tier_name: str, job: Job, run_name: str) -> dict[str, dict]:
    """The trained LoRA on the base model, both prompts, the latent, KSampler, decode and save."""
    return {
        "lora": g.node(
            "WhetstoneLoadTrainedLoRA", (1340, 0), (380, 110), [f"{run_name}.safetensors", 1.0],
            inputs=[("model", "MODEL"), ("run", "WHETSTONE_RUN")], outputs=[("model", "MODEL"), ("report", "STRING")],
            ours=True,
        ),
        "positive": g.node(
            "CLIPTextEncode", (1340, 160), (380, 140), [job.prompt], inputs=[("clip", "CLIP")],
            outputs=[("CONDITIONING", "CONDITIONING")], title="Positive prompt",
        ),
        "negative": g.node(
            "CLIPTextEncode", (1340, 340), (380, 140), [job.negative], inputs=[("clip", "CLIP")],
            outputs=[("CONDITIONING", "CONDITIONING")], title="Negative prompt",
        ),
        "latent": g.node(
            "EmptySD3LatentImage", (1340, 520), (380, 106), [job.resolution, job.resolution, 1],
            outputs=[("LATENT", "LATENT")],
        ),
        "sampler": g.node(
            "KSampler", (1780, 0), (320, 262), [0, "fixed", job.sample_steps, job.cfg, "euler", "simple", 1.0],
            inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")]
            + [("latent_image", "LATENT")],
            outputs=[("LATENT", "LATENT")],
        ),
        "decode": g.node(
            "VAEDecode", (2160, 0), (220, 46), [], inputs=[("samples", "LATENT"), ("vae", "VAE")],
            outputs=[("IMAGE", "IMAGE")],
        ),
        "save": g.node("SaveImage", (2160, 100), (480, 520), [f"whetstone/{tier_name}"], inputs=[("images", "IMAGE")]),
    }  # fmt: skip
