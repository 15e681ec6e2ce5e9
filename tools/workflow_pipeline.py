"""The Whetstone pipeline a tier job becomes, laid out on ``tools.workflow_graph``'s builder.

``tier_workflow`` packs an image folder, plans for a tier, trains, loads the LoRA into the base model and samples one
image (a full fine-tune samples its own model); a tier of several machines adds a Multi-Node Run node wired into
Train, which makes this ComfyUI node 0 and prints the other machines' commands. ``tools.make_workflows`` supplies the
job, the step count and the note, and writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass

from .workflow_graph import (
    BASE_MODEL,
    CHART_HEIGHT,
    CLIP_TYPE,
    LORA_REPORT_LINES,
    REPORT_LINES,
    TEXT_ENCODER,
    VAE,
    Graph,
    layout,
    node_height,
    text_panel_height,
    text_panel_width,
)


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
MACHINES_TYPE = "WHETSTONE_MACHINES"  # nodes/values.py; tests/test_workflows.py checks every socket type
MACHINES_LINK = ("machines", "machines", "train", "machines")


#: A full fine-tune samples its own model: Load Trained Model (the run linked) replaces the base model and the LoRA.
FULL_LINKS = tuple(
    ("tuned", "model", "sampler", "model") if link == ("lora", "model", "sampler", "model") else
    ("train", "run", "tuned", "run") if link == ("train", "run", "lora", "run") else link
    for link in PIPELINE_LINKS
    if link != ("unet", "MODEL", "lora", "model")
)  # fmt: skip


def tier_workflow(
    tier_name: str, target_batch: int, job: Job, steps: int, note: str, plan_text: str, *, machines: int = 1
) -> dict:
    """The workflow for one tier: the note, then loaders, training and sampling nodes, linked and laid out.

    ``plan_text`` is the Training Plan node's panel text for this tier: the node is sized so that it fits. A job of
    mode full samples the fine-tuned model (Load Trained Model) instead of the base model with the LoRA. With
    ``machines`` > 1 a Multi-Node Run node (that many machines; the master address left for the user to fill in)
    feeds Train's machines input.
    """
    full = job.mode == "full"
    run_name = f"my_{'finetune' if full else 'lora'}_{tier_name}"
    g = Graph()
    note_node = g.node("MarkdownNote", NOTE_SIZE, [note], title=f"About: {tier_name}")
    nodes = _loader_nodes(g, job)
    nodes |= _training_nodes(g, tier_name, target_batch, job, steps, run_name, plan_text, machines > 1)
    nodes |= _sampling_nodes(g, tier_name, job, run_name)
    links = FULL_LINKS if full else PIPELINE_LINKS
    if machines > 1:
        nodes["machines"] = _machines_node(g, machines)
        links += (MACHINES_LINK,)
    for source, output, target, input_ in links:
        g.link(nodes[source], output, nodes[target], input_)
    result = nodes["tuned"] if full else nodes["lora"]
    layout(
        [
            [note_node, *([] if full else [nodes["unet"]]), nodes["clip"], nodes["vae"]],
            [nodes["plan"], nodes["pack"], *([nodes["machines"]] if machines > 1 else [])],
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


def _machines_node(g: Graph, machines: int) -> dict:
    """Multi-Node Run: ``machines`` machines, this one node 0; the rendezvous address is this machine's, so it is
    left empty (Multi-Node Run refuses to run until it is filled in, saying what to enter)."""
    return g.node(
        "WhetstoneMultiNode",
        (460, node_height(1, 2)),
        [machines, ""],
        outputs=[("machines", MACHINES_TYPE)],
        title=f"Multi-Node Run: this machine is node 0 of {machines}",
        ours=True,
    )


def _plan_widgets(tier_name: str, target_batch: int, job: Job) -> list:
    """The Training Plan node's widget values, in its inputs' order."""
    return [
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
        "none",  # resolution_schedule (optional)
        "",  # resolution_weights (optional)
        "",  # resolution_stages (optional)
    ]


def _train_widgets(job: Job, run_name: str, steps: int) -> list:
    """The Train node's widget values, in its inputs' order."""
    widgets = [job.model, run_name, steps, job.save_every, job.warmup_steps, "constant", 0.1, 0, True]
    widgets += ["auto", "adapter", "none"]  # model_variant, turbo_training, training_adapter (optional)
    widgets += [False, "auto"]  # background, gpus (optional)
    widgets += [job.ema_decay, 0]  # the optional EMA inputs: decay, start step
    return widgets


def _training_nodes(
    g, tier_name: str, target_batch: int, job: Job, steps: int, run_name: str, plan_text: str, several: bool
):
    """Pack Dataset, Training Plan (its widgets name the tier), Train (with a machines input when ``several``),
    Training Report and its chart's preview."""
    pack_widgets = [job.image_folder, f"my_dataset_{job.resolution}", job.resolution, job.samples_per_shard]
    plan_widgets = _plan_widgets(tier_name, target_batch, job)
    train_widgets = _train_widgets(job, run_name, steps)
    lines = plan_text.split("\n")
    plan_width = max(460, text_panel_width(max(map(len, lines))))
    report_panel = text_panel_height(REPORT_LINES)
    return {
        "pack": g.node(
            "WhetstonePackDataset",
            (plan_width, node_height(2, 8, report_panel)),
            [*pack_widgets, "skip", "empty", False, ""],  # more_resolutions (optional)
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
            inputs=[("plan", "WHETSTONE_PLAN"), ("dataset", "WHETSTONE_DATASET")]
            + ([("machines", MACHINES_TYPE)] if several else []),
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
