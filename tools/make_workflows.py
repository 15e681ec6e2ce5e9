"""Write the per-tier template workflows (``workflows/<title>.json`` and ``.jpg``) and the README's tier table.

Run from the repository root after a planner or tier change: ``python -m tools.make_workflows`` (``--check`` only
reports files that are out of date). ComfyUI's template browser shows a custom pack's template by its file name (title
and description), ``<name>.jpg`` as its thumbnail, and sorts them by name: the names are numbered in tier order. Each workflow is a UI-format (schema 0.4) ComfyUI workflow that packs an image
folder, plans for its tier, trains, loads the LoRA into Z-Image-Base and samples one image, with a note giving the
plan's numbers. The numbers come from the planner for the tier's simulated hardware, exactly as the Training Plan
node computes them when its ``tier`` widget names that tier; ``tests/test_workflows.py`` checks that they still do.
What each template trains is in ``tools.workflow_jobs``; the nodes, their widgets, positions and links are laid out by
``tools.workflow_pipeline`` on ``tools.workflow_graph``'s builder.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from urllib.parse import quote

from training.hardware.memory import GIB
from training.hardware.panel import plan_panel
from training.hardware.plan import PlanRequest, TrainingPlan
from training.hardware.tiers import Tier, load_tiers
from training.model.config import ZImageConfig

from .template_thumbnail import thumbnail
from .workflow_graph import TEXT_ENCODER, VAE, render
from .workflow_jobs import (  # re-exported: the tests and tools.make_smoke_model read them from here
    ASSUMED_MFU,
    FULL_JOBS,
    JOBS,
    MEASURED,
    SMOKE_CONFIG,
    SMOKE_MODEL,
    TIER_ORDER,
    inter_node_seconds,
    model_config,
    plan_for,
    predicted_images_per_second,
    steps_for,
    templates,
)
from .workflow_pipeline import Job, tier_workflow

__all__ = ["FULL_JOBS", "JOBS", "SMOKE_CONFIG", "SMOKE_MODEL", "TIER_ORDER", "model_config", "outputs", "plan_for",
           "predicted_images_per_second", "templates", "tier_of_template", "workflow_path"]  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = (
    ROOT / "workflows"
)  # the prescribed top-level folder; ComfyUI serves "workflows" as a template folder too
README = ROOT / "README.md"
README_HEADING = "## Tier workflows"
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
        **machines_facts(plan),
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


def machines_facts(plan: TrainingPlan) -> dict[str, str]:
    """For a plan across machines: how the GPUs are spread and the planner's inter-node time per step."""
    if plan.nodes == 1:
        return {}
    (gbps,) = [value for name, value, _ in plan.decisions if name == "inter_node_gbps"]
    return {
        "machines": f"{plan.nodes} × {plan.world_size // plan.nodes} GPUs",
        "inter-node time (predicted)": f"{inter_node_seconds(plan) * 1e3:.0f} ms per step at {gbps:g} GB/s",
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
    if plan.nodes > 1:
        lines += ["", *machines_lines(plan)]
    return "\n".join(lines)


def machines_lines(plan: TrainingPlan) -> list[str]:
    """What a person does for a run across machines: this ComfyUI is node 0, the others run the printed command."""
    others = plan.nodes - 1
    return [
        f"**{plan.nodes} machines.** This ComfyUI is node 0 (Multi-Node Run, wired into Train). Fill in its "
        "`master_address` with this machine's address and a free port the other machines reach (e.g. "
        "`10.0.0.5:29500`), then queue. Train prints the command for the other "
        f"{'machine' if others == 1 else f'{others} machines'} (in its report, ComfyUI's log and "
        "`<run>/other_nodes.txt`): run it there; ComfyUI never opens a shell on another machine.",
        "Every machine needs the run folder (`models/whetstone_runs`), the packed dataset and the model at the same "
        "paths (a shared file system) and this repository at the printed path. The inter-node time is the "
        "planner's from the bytes each step sends (docs/scaling.md); none of it is measured.",
    ]


def build_workflow(tier: Tier, job: Job) -> dict:
    plan = plan_for(tier, job)
    steps = steps_for(plan, job)
    note = note_text(tier, plan, job, steps)
    return tier_workflow(tier.name, tier.target_global_batch, job, steps, note, plan_panel(plan), machines=plan.nodes)


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

README_COLUMNS = ("trains", "micro-batch", "checkpoint depth", "predicted peak", "throughput", "measured")


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
        "measured": MEASURED.get(tier.name, "—"),
    }


def _where(tier: Tier, plan: TrainingPlan) -> str:
    if tier.gpu_count == 0:
        return "CPU, smoke model"
    if plan.world_size == 1:
        return "one GPU"
    machines = f" ({plan.nodes} machines)" if plan.nodes > 1 else ""
    return f"{plan.parallelism.upper()} on {plan.world_size} GPUs{machines}"


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
        f"margin). Throughput is predicted at {ASSUMED_MFU:.0%} of the bf16 peak on the tier's own card. The "
        "measured column says what ran, on the H200 lent here: the 8, 12 and 16 GB tiers' plans with the process "
        "capped to the card's memory (their img/s are an H200's, not the small card's), and the 1x80GB workflow in "
        "a real ComfyUI; the multi-GPU tiers have not run (no A10/A100 here, no 4- or 8-GPU host or second machine "
        "lent). Everything measured (LoRA r128 on H100 and 2xH200, "
        "QLoRA, FP8, full fine-tune) is in `docs/benchmarks.md`. The 8, 12 and 16 GB tiers use the small-card levers "
        "(FP8 base storage, block swap, full checkpointing, micro-batch 1 with accumulation; their predicted throughput "
        "leaves out the PCIe copies); `bench/bench_small_cards.py` runs their plans on an H200 capped to 8, 12 and "
        "16 GiB (`docs/benchmarks.md`). "
        f"{', '.join(name for name in TIER_ORDER if tiers[name].nodes > 1)} is several machines: its workflow makes "
        "this ComfyUI node 0 (Multi-Node Run wired into Train) and Train prints the command each other machine runs "
        "(`docs/scaling.md`); its memory per GPU, inter-node time and throughput are predicted only, since no "
        "multi-GPU machine was lent. Regenerate with `python -m tools.make_workflows`."
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
