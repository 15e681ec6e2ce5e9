"""The CPU demo: the whole pipeline on a generated image set in a couple of minutes.

Draw ~24 small captioned images (coloured shapes, deterministic), pack them into shards with the test encoders, plan
for the CPU tier, train a LoRA on the tiny Z-Image model through the real engine, then write the LoRA, a report PNG
and ``summary.json``, reload the LoRA file and check that merging it gives the same model as the trained adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..atomic import write_json_atomic

logger = logging.getLogger(__name__)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 200, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
PRESET = "tiny"


@dataclass(kw_only=True)
class DemoSettings:
    output: Path | None = None  # None: a new temporary folder (never the current directory, e.g. a checkout)
    steps: int = 100
    images: int = 24
    resolution: int = 128  # bucket area resolution²; the tiny model sees (128/16)² = 64 image tokens
    lora_rank: int = 8
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.output is not None:
            self.output = Path(self.output)
            if self.output.exists() and not self.output.is_dir():
                raise ValueError(f"demo --output {self.output} is a file, not a folder: give a folder")
        if not 10 <= self.steps <= 10_000:
            raise ValueError(f"demo steps must be in 10..10000 (the loss needs a few dozen), got {self.steps!r}")
        if not 4 <= self.images <= len(COLOURS) * len(BACKGROUNDS) * len(SHAPES) * 4:
            raise ValueError(f"demo images must be in 4..96, got {self.images!r}")
        if self.resolution % 16 or not 64 <= self.resolution <= 512:
            raise ValueError(f"demo resolution must be a multiple of 16 in 64..512, got {self.resolution!r}")
        if not 0 < self.lr < 1:
            raise ValueError(f"demo lr must be in (0, 1), got {self.lr!r}")


@dataclass(kw_only=True)
class DemoResult:
    output: Path
    lora_file: Path
    report_png: Path
    summary_json: Path
    run_dir: Path
    first_loss: float  # smoothed, first step
    last_loss: float  # smoothed, last step
    seconds: float


# ---------------------------------------------------------------------------- the pipeline


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run every stage; raise if the loss did not fall or the LoRA file does not reproduce the trained adapter."""
    from ..engine.report import loss_series, render_report, smooth
    from ..engine.trainer import run_training
    from ..run.events import read_events, read_status

    started = time.monotonic()
    out = settings.output
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="whetstone-demo-"))
        logger.info("demo output: %s (a new temporary folder; --output chooses one)", out)
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo always trains from scratch; the images and shards are reused
    images = make_images(out / "work" / "images", count=settings.images, size=settings.resolution * 3 // 2)
    shards = pack_images(images, out / "work" / "shards", resolution=settings.resolution, seed=settings.seed)
    plan = plan_demo(settings, shards)
    config = demo_config(settings, plan, shards=shards, run_dir=run_dir, lora_file=out / "demo-lora.safetensors")
    config.save(run_dir / "config.json")
    logger.info("training %d steps of a rank-%d LoRA on the tiny model", settings.steps, settings.lora_rank)
    if run_training(config) != 0 or (read_status(run_dir) or {}).get("state") != "completed":
        raise RuntimeError(f"demo training did not complete: {read_status(run_dir)}")
    events = read_events(run_dir)
    smoothed = smooth(loss_series(events)[1])
    report = render_report(events, out / "loss.png")
    check = verify_lora(config.run.lora_file, seed=settings.seed, rank=settings.lora_rank)
    result = DemoResult(
        output=out,
        lora_file=config.run.lora_file,
        report_png=out / "loss.png",
        summary_json=out / "summary.json",
        run_dir=run_dir,
        first_loss=smoothed[0],
        last_loss=smoothed[-1],
        seconds=time.monotonic() - started,
    )
    summary = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()},
        "steps": events[-1]["step"],
        "plan": {k: plan.to_dict()[k] for k in ("tier", "micro_batch", "grad_accum", "checkpoint_depth", "lr")},
        "lora_check": check,
        "report_size": list(report.size),
    }
    write_json_atomic(result.summary_json, summary, sort_keys=True)
    if not result.last_loss < result.first_loss:
        raise RuntimeError(f"demo loss did not fall: smoothed {result.first_loss:.4f} -> {result.last_loss:.4f}")
    return result


def make_images(folder: Path, *, count: int, size: int) -> Path:
    """``count`` PNGs of one coloured shape each, with a ``.txt`` caption beside each; the same on every machine."""
    folder.mkdir(parents=True, exist_ok=True)
    combos = [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]
    for index in range(count):
        shape, colour, background = combos[index % len(combos)]
        scale = (0.5, 0.7, 0.35, 0.6)[index // len(combos) % 4]
        image = Image.new("RGB", (size, size), BACKGROUNDS[background])
        _draw_shape(ImageDraw.Draw(image), shape, COLOURS[colour], size, scale)
        stem = folder / f"{index:03d}"
        image.save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(f"a {colour} {shape} on a {background} background\n", encoding="utf-8")
    return folder


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, size: int, scale: float) -> None:
    half = size * scale / 2
    centre = size / 2
    box = (centre - half, centre - half, centre + half, centre + half)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(centre, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)


def pack_images(images: Path, shards: Path, *, resolution: int, seed: int) -> Path:
    """Pack with the test encoders (tiny model: 32-wide caption features); the packer stores the empty caption too."""
    from ..data.encoders import TestLatentEncoder, TestTextEncoder
    from ..data.pack import PackConfig, pack_dataset
    from ..model.config import preset

    text_encoder = TestTextEncoder(feature_dim=preset(PRESET).cap_feat_dim, seed=seed)
    config = PackConfig(input_dir=images, output_dir=shards, resolution=resolution, samples_per_shard=8)
    result = pack_dataset(config, latent_encoder=TestLatentEncoder(seed=seed), text_encoder=text_encoder)
    logger.info("packed %d samples into %d shards (%d skipped)", result.samples, len(result.shards), result.skipped)
    return shards


def plan_demo(settings: DemoSettings, shards: Path):
    """The planner's decision for this job and these shards on the CPU tier (a simulated profile: the same plan on
    any machine)."""
    from ..data.stats import read_dataset_stats
    from ..hardware.plan import make_plan
    from ..hardware.request import PlanRequest
    from ..hardware.tiers import simulated_profile, tier
    from ..model.config import preset

    cpu = tier("cpu")
    request = PlanRequest(
        mode="lora",
        resolution=settings.resolution,
        caption_tokens=64,
        lora_rank=settings.lora_rank,
        target_global_batch=4,
        lr_base=settings.lr,
        lr_scaling="none",
        model=preset(PRESET),
        dataset=read_dataset_stats(shards),
    )
    plan = make_plan(request, simulated_profile(cpu), tier=cpu)
    logger.info("plan:\n%s", plan.table())
    return plan


def demo_config(settings: DemoSettings, plan, *, shards: Path, run_dir: Path, lora_file: Path):
    from ..engine.config import TrainConfig

    return TrainConfig.from_plan(
        plan,
        run={
            "output_dir": str(run_dir),
            "lora_path": str(lora_file),
            "steps": settings.steps,
            "save_every": max(10, settings.steps // 2),
            "seed": settings.seed,
            "resume": False,
        },
        model={"preset": PRESET},
        data={"shards": str(shards), "num_workers": 0, "shuffle_buffer": 64, "caption_dropout": 0.1},
        optim={"warmup_steps": 5, "schedule": "constant", "weight_decay": 0.0},
    )


def verify_lora(lora_file: Path, *, seed: int, rank: int) -> dict:
    """Reload the file and check it applies: merged into the base, it gives the same outputs as the base with the
    file's weights in a LoRA adapter, and different outputs from the base alone."""
    from ..engine.build import random_model
    from ..model.config import preset
    from ..model.lora import attach_lora, load_lora_state_dict
    from ..model.lora_file import load_lora_file, merge_lora_file_into

    loaded = load_lora_file(lora_file)
    if loaded.settings.rank != rank:
        raise RuntimeError(f"{lora_file} has rank {loaded.settings.rank}, the demo trained rank {rank}")
    config = preset(PRESET)

    def base():
        return random_model(config, dtype=torch.float32, device=torch.device("cpu"), seed=seed).eval()

    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    captions = torch.randn(2, 12, config.cap_feat_dim, generator=generator)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        plain = base()(latents, sigma, captions)
        adapter = attach_lora(base(), loaded.settings)
        load_lora_state_dict(adapter, loaded.state)
        with_adapter = adapter(latents, sigma, captions)
        merged = base()
        unmatched = merge_lora_file_into(merged, lora_file)
        with_merge = merged(latents, sigma, captions)
    agreement = (with_merge - with_adapter).abs().max().item()
    effect = (with_merge - plain).abs().max().item()
    if unmatched or agreement > 1e-3 * max(1.0, effect) or effect == 0.0:
        raise RuntimeError(
            f"{lora_file} does not apply cleanly: {unmatched} unmatched keys, merged-vs-adapter difference "
            f"{agreement:.3g}, effect on the output {effect:.3g}"
        )
    return {"modules": len(loaded.state) // 2, "merge_vs_adapter_max_diff": agreement, "output_change": effect}
