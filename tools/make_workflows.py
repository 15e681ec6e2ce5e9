"""Write the per-tier template workflows (``workflows/<title>.json`` and ``.jpg``) and the README's tier table.

Run from the repository root after a planner or tier change: ``python -m tools.make_workflows`` (``--check`` only
reports files that are out of date). ComfyUI's template browser shows a custom pack's template by its file name (title
and description), ``<name>.jpg`` as its thumbnail, and sorts them by name: the names are numbered in tier order. Each workflow is a UI-format (schema 0.4) ComfyUI workflow that packs an image
folder, plans for its tier, trains, loads the LoRA into Z-Image-Base and samples one image, with a note giving the
plan's numbers. The numbers come from the planner for the tier's simulated hardware, exactly as the Training Plan
node computes them when its ``tier`` widget names that tier; ``tests/test_workflows.py`` checks that they still do.
The nodes, their widgets, positions and links are laid out by ``tools.workflow_graph``.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote

from training.hardware.memory import GIB
from training.hardware.panel import plan_panel
from training.hardware.plan import PlanRequest, TrainingPlan, make_plan
from training.hardware.tiers import Tier, load_tiers, simulated_profile
from training.model.config import PRESETS, ZImageConfig
from training.model.flops import image_tokens_for, training_flops

from .template_thumbnail import thumbnail
from .workflow_graph import TEXT_ENCODER, VAE, Job, render, tier_workflow

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = (
    ROOT / "workflows"
)  # the prescribed top-level folder; ComfyUI serves "workflows" as a template folder too
README = ROOT / "README.md"
README_HEADING = "## Tier workflows"
#: The smallest Z-Image ComfyUI's loaders recognise (dim 3840, one main block, two refiners of each kind), random
#: weights, written by ``python -m tools.make_smoke_model``: the CPU smoke run trains and samples it.
SMOKE_MODEL = "z_image_smoke_bf16.safetensors"
SMOKE_CONFIG = PRESETS["z-image"].replace(n_layers=1)

#: Dense bf16 tensor-core peak per GPU (TFLOP/s) by tier, for the predicted throughput only.
PEAK_TFLOPS = {
    # RTX 4060 / 4070 / 4080: the 4090's 165 scaled by SM count and boost clock (24, 46 and 76 of its 128 SMs)
    "1x8GB": 30.2,
    "1x12GB": 58.5,
    "1x16GB": 97.4,
    "1x24GB": 165.0,  # RTX 4090
    "1x80GB": 989.0,  # H100 SXM
    "2xA10-24GB": 125.0,
    "4xA100-40GB-SXM": 312.0,
    "4xH100-80GB-NVLink4": 989.0,
    "8xA100-80GB-NVSwitch": 312.0,
}
ASSUMED_MFU = 0.4  # share of the bf16 peak spent on useful FLOPs; a guess until docs/benchmarks.md has measurements
RECOMPUTE_SHARE = 1 / 3  # a checkpointed block runs its forward again: +1/3 of its forward+backward


JOBS = {
    "1x8GB": Job(lora_rank=16, resolution=512),
    "1x12GB": Job(lora_rank=16),
    "1x16GB": Job(),
    "1x24GB": Job(),
    "1x80GB": Job(),
    "2xA10-24GB": Job(),
    "4xA100-40GB-SXM": Job(),
    "4xH100-80GB-NVLink4": Job(),
    "8xA100-80GB-NVSwitch": Job(),
    "cpu": Job(
        lora_rank=8,
        resolution=256,
        caption_tokens=64,
        samples_seen=10,
        min_steps=10,
        save_every=5,
        warmup_steps=0,
        image_folder="whetstone_smoke_images",
        model=SMOKE_MODEL,
        sample_steps=4,
        prompt="a red circle on a white background",
        smoothing=2,
    ),
}


#: Full fine-tune workflows (FSDP2) for the tiers whose plan fits it at 1024 px without checkpointing, numbered
#: after the per-tier ones: Train writes the model to diffusion_models/whetstone/, Load Trained Model samples it.
FULL_JOBS = {
    "4xH100-80GB-NVLink4": Job(mode="full", save_every=100),
    "8xA100-80GB-NVSwitch": Job(mode="full", save_every=100),
}


def templates() -> list[tuple[str, Job]]:
    """(tier, job) of every template, in number order: one per tier, then the full fine-tunes."""
    return [(name, JOBS[name]) for name in TIER_ORDER] + list(FULL_JOBS.items())


def model_config(model_name: str) -> ZImageConfig:
    """The architecture the Training Plan node reads from this model file's header."""
    return SMOKE_CONFIG if model_name == SMOKE_MODEL else PRESETS["z-image"]


def plan_for(tier: Tier, job: Job) -> TrainingPlan:
    request = PlanRequest(
        mode=job.mode,
        resolution=job.resolution,
        caption_tokens=job.caption_tokens,
        lora_rank=job.lora_rank,
        lora_targets=job.lora_targets,
        target_global_batch=tier.target_global_batch,
        lr_base=job.learning_rate,
        model=model_config(job.model),
    )
    return make_plan(request, simulated_profile(tier), tier=tier)


def predicted_images_per_second(plan: TrainingPlan, tier_name: str, config: ZImageConfig) -> float | None:
    """Useful training FLOPs per image (plus recomputed checkpointed blocks) at ASSUMED_MFU of the bf16 peak."""
    peak = PEAK_TFLOPS.get(tier_name)
    if peak is None:
        return None
    tokens = image_tokens_for(plan.resolution, config)
    flops = training_flops(
        config, image_tokens=tokens, caption_tokens=plan.caption_tokens, full_finetune=plan.mode == "full"
    )
    flops *= 1 + RECOMPUTE_SHARE * plan.checkpoint_depth / config.n_layers
    return plan.world_size * peak * 1e12 * ASSUMED_MFU / flops


def steps_for(plan: TrainingPlan, job: Job) -> int:
    return max(job.min_steps, math.ceil(job.samples_seen / plan.global_batch))


# ---------------------------------------------------------------------------------------------------------------------
# the facts a note and the README show


def plan_facts(plan: TrainingPlan, tier_name: str, job: Job) -> dict[str, str]:
    """The plan's numbers as the note's table shows them (``tests/test_workflows.py`` recomputes every row)."""
    config = model_config(job.model)
    speed = predicted_images_per_second(plan, tier_name, config)
    return {
        "mode": plan.mode,
        "LoRA rank": str(plan.lora_rank),
        "resolution": f"{plan.resolution[0]}x{plan.resolution[1]}",
        "GPUs": str(plan.world_size),
        "parallelism": plan.parallelism,
        "micro-batch per GPU": str(plan.micro_batch),
        "gradient accumulation": str(plan.grad_accum),
        "global batch": str(plan.global_batch),
        "checkpoint depth": f"{plan.checkpoint_depth} of {config.n_layers} blocks",
        "frozen base": base_storage_words(plan),
        "block swap": block_swap_words(plan, config),
        "predicted peak": f"{plan.predicted_peak_bytes / GIB:.1f} GiB",
        "budget": f"{plan.budget_bytes / GIB:.1f} GiB",
        "compile": "on" if plan.compile else "off",
        "attention": plan.attention_backend,
        "NCCL timeout": f"{plan.nccl_timeout_s} s",
        "learning rate": f"{plan.lr:.3g}",
        "throughput (predicted)": "—" if speed is None else f"{speed:.2f} img/s",
    }


def base_storage_words(plan: TrainingPlan) -> str:
    if plan.mode == "full":
        return "trains (fp32 master)"
    return {"bf16": "bf16", "fp8": "FP8 (e4m3, upcast per layer)"}[plan.base_storage] if plan.mode == "lora" else "NF4"


def block_swap_words(plan: TrainingPlan, config: ZImageConfig) -> str:
    if not plan.swap_blocks:
        return "off"
    blocks = config.n_layers + 2 * config.n_refiner_layers
    return (
        f"{plan.swap_blocks} of {blocks} blocks in host memory, "
        f"{plan.swap_bytes_per_step / GIB:.1f} GiB over PCIe per step"
    )


def _describe(job: Job) -> str:
    request = PlanRequest(
        mode=job.mode, resolution=job.resolution, lora_rank=job.lora_rank, caption_tokens=job.caption_tokens
    )
    return request.describe()


def _pack_at_least(images: int) -> str:
    noun = "image" if images == 1 else "images"
    return (
        f"Pack at least {images} {noun} (one global batch); the GPUs split the samples of any shard set, so packing "
        "does not depend on the GPU count."
    )


def _saves(job: Job) -> str:
    if job.mode == "full":
        return (
            f"a resumable checkpoint every {job.save_every} steps and, at the end, the fine-tuned model in "
            "`diffusion_models/whetstone/` (bf16, ComfyUI's layout), which Load Trained Model samples"
        )
    return f"LoRA and a resumable checkpoint every {job.save_every} steps"


def note_text(tier: Tier, plan: TrainingPlan, job: Job, steps: int) -> str:
    facts = plan_facts(plan, tier.name, job)
    rows = "\n".join(f"| {key} | {value} |" for key, value in facts.items())
    per_gpu = "per machine" if tier.gpu_count == 0 else "per GPU"
    if tier.gpu_count == 0:
        speed_line = "No throughput prediction on CPU: expect tens of seconds per step."
    else:
        speed_line = (
            f"Throughput is predicted ({ASSUMED_MFU:.0%} of the bf16 peak on useful FLOPs), not measured; measured "
            "numbers are in docs/benchmarks.md."
        )
    lines = [
        f"# Whetstone: {tier.name}",
        "",
        tier.description + ".",
        "",
        f"Planned for this tier by the Training Plan node (tier widget `{tier.name}`): the table is what it "
        f"predicts for {_describe(job)}.",
        "",
        "| setting | value |",
        "|---|---|",
        rows,
        "",
        f"- **Checkpoint depth** is the fewest blocks (from the first) whose activations are recomputed so the "
        f"micro-batch fits the {facts['budget']} budget {per_gpu}; the peak is `max_memory_allocated`.",
        f"- **{steps} steps** see about {steps * plan.global_batch} images; {_saves(job)}. The seed has no randomize "
        "control, so queueing again resumes instead of retraining.",
        f"- {_pack_at_least(plan.global_batch)}",
        f"- {speed_line}",
        "- To plan for the machine you are on instead, add Hardware Profile, link it to the plan's `hardware` input "
        "and set `tier` to `measured (hardware input)`.",
    ]
    if tier.gpu_count == 0:
        lines += [
            "",
            f"CPU smoke run: `{SMOKE_MODEL}` is a random-weight Z-Image with one main block that ComfyUI still "
            "loads as Z-Image (`python -m tools.make_smoke_model <ComfyUI>/models/diffusion_models`); the images "
            "are noise. It checks the whole pipeline, not quality. Put a few captioned images in "
            f"`input/{job.image_folder}`.",
        ]
    else:
        lines += [
            "",
            f"Models: `{job.model}` (diffusion_models), `{TEXT_ENCODER}` (text_encoders), `{VAE}` (vae).",
            f"Images with `.txt` captions go in `input/{job.image_folder}`.",
        ]
    return "\n".join(lines)


def build_workflow(tier: Tier, job: Job) -> dict:
    plan = plan_for(tier, job)
    steps = steps_for(plan, job)
    note = note_text(tier, plan, job, steps)
    return tier_workflow(tier.name, tier.target_global_batch, job, steps, note, plan_panel(plan))


def template_name(tier_name: str, job: Job | None = None) -> str:
    """The template's file stem, which ComfyUI shows as its title: number (tier order, then the full fine-tunes),
    tier, what it trains. ``job`` None: the tier's own (``JOBS``)."""
    job = job or JOBS[tier_name]
    number = templates().index((tier_name, job)) + 1
    if tier_name == "cpu":
        return f"Whetstone {number:02d} - cpu - smoke test without a GPU (tiny random model)"
    if job.mode == "full":
        return f"Whetstone {number:02d} - {tier_name} - full fine-tune (FSDP2) at {job.resolution}px"
    trains = {"lora": "LoRA", "qlora": "QLoRA"}[job.mode]
    return f"Whetstone {number:02d} - {tier_name} - {trains} r{job.lora_rank} at {job.resolution}px"


def tier_of_template(stem: str) -> str:
    return stem.split(" - ")[1]


def workflow_path(tier_name: str, job: Job | None = None) -> Path:
    return WORKFLOWS_DIR / f"{template_name(tier_name, job)}.json"


def thumbnail_path(tier_name: str, job: Job | None = None) -> Path:
    return WORKFLOWS_DIR / f"{template_name(tier_name, job)}.jpg"


def thumbnail_for(tier: Tier, job: Job, workflow: dict) -> bytes:
    row = readme_row(tier, job)
    lines = [
        row["trains"],
        f"micro-batch {row['micro-batch']}, {row['checkpoint depth']} checkpointed",
        f"predicted peak {row['predicted peak']}",
        f"throughput {row['throughput']}" if row["throughput"] != "—" else "CPU: tens of seconds per step",
    ]
    ascii_lines = [line.replace("²", "px").replace(" × ", " x ") for line in lines]  # the default font's glyphs
    return thumbnail(workflow, tier.name, ascii_lines)


# ---------------------------------------------------------------------------------------------------------------------
# the README table

TIER_ORDER = (
    "cpu",
    "1x8GB",
    "1x12GB",
    "1x16GB",
    "1x24GB",
    "1x80GB",
    "2xA10-24GB",
    "4xA100-40GB-SXM",
    "4xH100-80GB-NVLink4",
    "8xA100-80GB-NVSwitch",
)
README_COLUMNS = ("trains", "micro-batch", "checkpoint depth", "predicted peak", "throughput")


def readme_row(tier: Tier, job: Job) -> dict[str, str]:
    plan = plan_for(tier, job)
    facts = plan_facts(plan, tier.name, job)
    trains = {"lora": "LoRA", "qlora": "QLoRA", "full": "full"}[plan.mode]
    speed = facts["throughput (predicted)"]
    return {
        "tier": tier.name,
        "workflow": f"[{workflow_path(tier.name).stem}]({WORKFLOWS_DIR.name}/{quote(workflow_path(tier.name).name)})",
        "trains": f"{trains}{'' if plan.mode == 'full' else f' r{plan.lora_rank}'} at {plan.resolution[0]}², "
        f"{_where(tier, plan)}{_levers(plan)}",
        "micro-batch": f"{plan.micro_batch} × {plan.grad_accum} accum = {plan.global_batch}",
        "checkpoint depth": facts["checkpoint depth"],
        "predicted peak": f"{facts['predicted peak']} of {facts['budget']}",
        "throughput": "—" if speed == "—" else f"{speed} (predicted)",
    }


def _where(tier: Tier, plan: TrainingPlan) -> str:
    if tier.gpu_count == 0:
        return "CPU, smoke model"
    if plan.world_size == 1:
        return "one GPU"
    return f"{plan.parallelism.upper()} on {plan.world_size} GPUs"


def _levers(plan: TrainingPlan) -> str:
    words = ["FP8 base"] if plan.base_storage == "fp8" else []
    words += [f"{plan.swap_blocks} blocks swapped"] if plan.swap_blocks else []
    return "".join(f", {word}" for word in words)


def readme_section(tiers: dict[str, Tier]) -> str:
    header = ("tier", "workflow", *README_COLUMNS)
    rows = [readme_row(tiers[name], JOBS[name]) for name in TIER_ORDER]
    intro = (
        "One workflow per GPU tier in `workflows/` (Workflow → Browse Templates → Extensions → "
        "ComfyUI-Whetstone, or drag the file into ComfyUI), numbered in tier order, each with a thumbnail. Each packs `input/my_images` (CPU: `input/whetstone_smoke_images`), plans for its tier, trains, loads the LoRA into Z-Image-Base and "
        "samples one image; its note explains the choices. After them come full fine-tunes (FSDP2) for the tiers that fit one "
        f"({', '.join(FULL_JOBS)}): the model goes to `diffusion_models/whetstone/` and Load Trained Model samples "
        "it. The numbers below are the planner's for the tier's "
        "simulated hardware (peak per GPU, `max_memory_allocated`; budget = memory less CUDA context and safety "
        f"margin). Throughput is predicted at {ASSUMED_MFU:.0%} of the bf16 peak: none of these exact tier settings "
        "has run yet (no A10/A100 here, no 4- or 8-GPU host lent); what was measured (LoRA r128 on H100 and 2xH200, "
        "QLoRA, FP8, full fine-tune) is in `docs/benchmarks.md`. The 8, 12 and 16 GB tiers use the small-card levers "
        "(FP8 base storage, block swap, full checkpointing, micro-batch 1 with accumulation; their predicted throughput "
        "leaves out the PCIe copies); `bench/bench_small_cards.py` runs their plans on an H200 capped to 8, 12 and "
        "16 GiB (`docs/benchmarks.md`). Regenerate with `python -m tools.make_workflows`."
    )
    lines = [
        README_HEADING,
        "",
        textwrap.fill(intro, width=120, break_long_words=False, break_on_hyphens=False),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row[key] for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def readme_with_section(readme: str, section: str) -> str:
    """``readme`` with everything from the tier heading to the end replaced by ``section``."""
    start = readme.index(README_HEADING)
    return readme[:start] + section


# ---------------------------------------------------------------------------------------------------------------------


def outputs() -> dict[Path, str | bytes]:
    tiers = load_tiers()
    if set(tiers) != set(JOBS):
        raise ValueError(f"tiers {sorted(tiers)} and JOBS {sorted(JOBS)} differ: add a Job for every tier file")
    files: dict[Path, str | bytes] = {}
    for name, job in templates():
        workflow = build_workflow(tiers[name], job)
        files[workflow_path(name, job)] = render(workflow)
        files[thumbnail_path(name, job)] = thumbnail_for(tiers[name], job, workflow)
    files[README] = readme_with_section(README.read_text(encoding="utf-8"), readme_section(tiers))
    return files


def _current(path: Path, content: str | bytes) -> bool:
    if not path.is_file():
        return False
    return path.read_bytes() == content if isinstance(content, bytes) else path.read_text(encoding="utf-8") == content


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list files that are out of date; exit 1 if any")
    args = parser.parse_args(argv)
    files = outputs()
    stale = [path for path, content in files.items() if not _current(path, content)]
    leftovers = [p for p in WORKFLOWS_DIR.glob("*") if p.suffix in (".json", ".jpg") and p not in files]
    if not args.check:
        for path in stale:
            path.parent.mkdir(parents=True, exist_ok=True)
            content = files[path]
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
        for path in leftovers:
            path.unlink()
    for path in stale:
        print(f"{'out of date' if args.check else 'written'}: {path.relative_to(ROOT)}")
    for path in leftovers:
        print(f"{'not generated' if args.check else 'removed'}: {path.relative_to(ROOT)}")
    return 1 if args.check and (stale or leftovers) else 0


if __name__ == "__main__":
    sys.exit(main())
