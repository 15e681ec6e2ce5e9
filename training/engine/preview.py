"""Preview images during training: the weights being trained sample each validation prompt as ComfyUI's KSampler
would (`training.model.sampling`), at the configured steps; the latents go to the run folder.

Inputs: ``preview.features``, a safetensors file of encoded prompts (``prompt.000``, ``prompt.001``, ... [L, D]
float, optional ``negative`` [L, D]; metadata ``prompts``: the texts as a JSON list), written by `save_prompt_features`
(the Train node encodes with the wired CLIP; the CLI takes the file). Outputs, per preview:
``<run>/previews/step_0000100.safetensors`` (``prompt.000``... [16, h, w] float32 in the DiT's latent format, the
shards' format; metadata: step, prompts, settings), written atomically, then one line in ``<run>/previews.jsonl``
(step, file, prompts, seconds). Readers (node, CLI) use `read_preview` / `read_preview_events`.

The training run is not disturbed: sampling runs under ``torch.no_grad`` in eval mode (no LoRA dropout), its noise
comes from a private CPU generator, and the step clock restarts after it (the preview's own seconds are in its
event), so losses, RNG streams and step times are those of a run without previews. LoRA/QLoRA: rank 0 samples with
the unwrapped model (other ranks wait at the next step's all-reduce); full fine-tuning (FSDP2): every rank runs each
forward (the shards must gather), rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..model.safetensors_io import write_safetensors
from ..model.sampling import SamplerSettings, sample_zimage
from ..model.variants import variant_settings
from ..run.events import load_json

logger = logging.getLogger(__name__)

PREVIEW_DIR = "previews"
PREVIEW_EVENTS = "previews.jsonl"
LATENT_CHANNELS = 16
MAX_PROMPTS = 64
MAX_PROMPT_TOKENS = 8192
MAX_LATENT_SIDE = 4096 // 8  # preview.width/height are at most 4096 pixels
_PROMPT_KEY = re.compile(r"^prompt\.(\d{3})$")
MAX_PREVIEW_STEP = 10**7  # step_NNNNNNN: seven digits
_PREVIEW_FILE = re.compile(r"^step_(\d{7})\.safetensors$")


class PreviewError(ValueError):
    """A preview input or output file that cannot be used (names the file and what to do)."""


@dataclass(kw_only=True, frozen=True)
class PromptFeatures:
    texts: tuple[str, ...]
    positives: tuple[torch.Tensor, ...]  # [L_i, D] float32
    negative: torch.Tensor | None  # [L, D] float32


def save_prompt_features(
    path: str | os.PathLike, texts: list[str], positives: list[torch.Tensor], negative: torch.Tensor | None = None
) -> None:
    """The ``preview.features`` file (atomic)."""
    if len(texts) != len(positives) or not 1 <= len(texts) <= MAX_PROMPTS:
        raise ValueError(
            f"give 1..{MAX_PROMPTS} prompts with one feature tensor each, got {len(texts)}/{len(positives)}"
        )
    entries = [(f"prompt.{i:03d}", f.float().contiguous()) for i, f in enumerate(positives)]
    if negative is not None:
        entries.append(("negative", negative.float().contiguous()))
    write_safetensors(Path(path), entries, {"prompts": json.dumps(list(texts))})


def load_prompt_features(path: str | os.PathLike, *, feature_dim: int) -> PromptFeatures:
    """Read and check a ``preview.features`` file (untrusted: shapes, count and values are validated)."""
    path = Path(path)
    where = f"preview.features {path}"
    if not path.is_file():
        raise PreviewError(f"{where} does not exist; encode the prompts first (the Train node does) or fix the path")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
        texts = json.loads(metadata.get("prompts", "null"))
    except (OSError, ValueError, SafetensorError) as error:
        raise PreviewError(f"{where} is not a readable safetensors file ({error})") from None
    keys = sorted(k for k in tensors if _PROMPT_KEY.match(k))
    unknown = sorted(set(tensors) - set(keys) - {"negative"})
    if unknown or not keys or keys != [f"prompt.{i:03d}" for i in range(len(keys))] or len(keys) > MAX_PROMPTS:
        raise PreviewError(f"{where} must hold prompt.000 ... (1..{MAX_PROMPTS}, no gaps) and optionally negative")
    if not (isinstance(texts, list) and len(texts) == len(keys) and all(isinstance(t, str) for t in texts)):
        raise PreviewError(f"{where}: metadata 'prompts' must list one text per prompt tensor")
    for key, tensor in tensors.items():
        if tensor.ndim != 2 or tensor.shape[1] != feature_dim or not 1 <= tensor.shape[0] <= MAX_PROMPT_TOKENS:
            raise PreviewError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, the model needs [tokens, {feature_dim}]; "
                "encode the prompts with this model's text encoder"
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise PreviewError(f"{where}: {key} is not finite floating-point features")
    negative = tensors.get("negative")
    return PromptFeatures(
        texts=tuple(texts),
        positives=tuple(tensors[k].float() for k in keys),
        negative=None if negative is None else negative.float(),
    )


def preview_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / PREVIEW_DIR / f"step_{step:07d}.safetensors"


@dataclass(kw_only=True, frozen=True)
class PreviewSchedule:
    every: int  # 0: at the end only
    at_start: bool
    total_steps: int

    def due(self, step: int) -> bool:
        """After ``step`` optimizer steps (0: before training)."""
        if step == 0:
            return self.at_start
        return step == self.total_steps or (self.every > 0 and step % self.every == 0)


class Previewer:
    """Samples the prompts with the model at due steps and records them (see the module docstring)."""

    def __init__(
        self,
        *,
        prompts: PromptFeatures,
        settings: SamplerSettings,
        schedule: PreviewSchedule,
        size: tuple[int, int],
        run_dir: str | os.PathLike,
        device: torch.device,
        writes: bool,
        forward_context: Callable[[], object] | None = None,
    ) -> None:
        width, height = size
        self.prompts, self.settings, self.schedule = prompts, settings, schedule
        self.latent_shape = (LATENT_CHANNELS, height // 8, width // 8)
        self.run_dir, self.device, self.writes = Path(run_dir), device, writes
        self.forward_context = forward_context
        self.seconds = 0.0
        if settings.uses_guidance and prompts.negative is None:
            raise PreviewError(f"preview.cfg {settings.cfg} needs a negative prompt and none was found")

    def maybe_sample(self, step: int, model: nn.Module) -> dict | None:
        if not self.schedule.due(step):
            return None
        return self.sample(step, model)

    def sample(self, step: int, model: nn.Module) -> dict:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            latents = [
                sample_zimage(
                    model,
                    positive,
                    self.prompts.negative,
                    self.settings,
                    latent_shape=self.latent_shape,
                    device=self.device,
                    forward_context=self.forward_context,
                )
                for positive in self.prompts.positives
            ]
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        event = {"step": step, "file": preview_path(self.run_dir, step).name, "prompts": list(self.prompts.texts)}
        event.update(seconds=seconds, time=time.time(), **self._settings_record())
        if self.writes:
            metadata = {"preview": json.dumps(event)}
            entries = [(f"prompt.{i:03d}", latent) for i, latent in enumerate(latents)]
            write_safetensors(preview_path(self.run_dir, step), entries, metadata)
            _append_line(self.run_dir / PREVIEW_EVENTS, json.dumps(event, separators=(",", ":")))
        logger.info("previews at step %d: %d prompt(s) in %.1f s", step, len(latents), seconds)
        return event

    def _settings_record(self) -> dict:
        s = self.settings
        height, width = (8 * n for n in self.latent_shape[1:])
        return {"seed": s.seed, "steps": s.steps, "cfg": s.cfg, "shift": s.shift, "width": width, "height": height}


def _append_line(path: Path, line: str) -> None:
    """One complete line at the end of ``path`` (created; a link there is refused, not followed)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def read_preview_events(run_dir: str | os.PathLike) -> list[dict]:
    """The run's preview events, oldest first (see `parse_preview_events`)."""
    path = Path(run_dir) / PREVIEW_EVENTS
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return parse_preview_events(text)


def parse_preview_events(text: str) -> list[dict]:
    """The preview events of a ``previews.jsonl`` text (lines that are not preview events are skipped: an event is a
    step 0..9999999 whose file is that step's ``step_NNNNNNN.safetensors``, as `Previewer.sample` writes it). After a
    resume from an earlier checkpoint the steps sampled again replace the lost run's (as `read_events` does)."""
    events = []
    for line in text.splitlines():
        try:
            event = load_json(line)
        except ValueError:  # a line cut off by a killed writer; an integer too long to convert, nesting too deep
            continue
        if (
            isinstance(event, dict)
            and isinstance(event.get("step"), int)
            and not isinstance(event["step"], bool)
            and 0 <= event["step"] < MAX_PREVIEW_STEP
            and event.get("file") == preview_path("", event["step"]).name  # the step's own latents
        ):
            while events and events[-1]["step"] >= event["step"]:  # a resumed run sampled these steps again
                events.pop()
            events.append(event)
    return events


def read_preview(run_dir: str | os.PathLike, event: dict, *, max_side: int = MAX_LATENT_SIDE) -> list[torch.Tensor]:
    """The latents [16, h, w] of one preview event, read from the run's previews folder only (no path from the
    event is followed: the file name must be step_NNNNNNN.safetensors, and a link is refused). Shapes are checked
    before a tensor is read: at most MAX_PROMPTS latents, each side at most ``max_side``."""
    name = str(event.get("file"))
    if not _PREVIEW_FILE.match(name):
        raise PreviewError(f"preview event names file {name!r}, not step_NNNNNNN.safetensors")
    path = Path(run_dir) / PREVIEW_DIR / name
    if path.is_symlink() or not path.is_file():
        raise PreviewError(f"{path} is missing or a link; previews are read from the run folder only")
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = sorted(file.keys())
            if not keys or keys != [f"prompt.{i:03d}" for i in range(len(keys))] or len(keys) > MAX_PROMPTS:
                raise PreviewError(f"{path} holds {keys[:4]}, not prompt.000 ... (at most {MAX_PROMPTS})")
            for key in keys:
                shape = tuple(file.get_slice(key).get_shape())
                if (
                    len(shape) != 3
                    or shape[0] != LATENT_CHANNELS
                    or not 1 <= min(shape[1:]) <= max(shape[1:]) <= max_side
                ):
                    raise PreviewError(f"{path}: {key} has shape {shape}, not [16, h, w] latents of h, w <= {max_side}")
            latents = [file.get_tensor(key) for key in keys]
    except (OSError, SafetensorError) as error:
        raise PreviewError(f"{path} is not a readable safetensors file ({error})") from None
    for key, latent in zip(keys, latents, strict=True):
        if not latent.is_floating_point():
            raise PreviewError(f"{path}: {key} is {latent.dtype}, not floating-point latents")
    return [latent.float() for latent in latents]


def sampler_settings(section, variant: str) -> SamplerSettings:
    """The section's sampler settings, each unset one the variant's (``training.model.variants``), logged."""
    defaults = variant_settings(variant)
    steps = section.steps if section.steps is not None else defaults.preview_steps
    cfg = section.cfg if section.cfg is not None else defaults.cfg
    shift = section.shift if section.shift is not None else defaults.sampling_shift
    unset = [name for name in ("steps", "cfg", "shift") if getattr(section, name) is None]
    if unset:
        logger.info("preview %s: %s's defaults (%s)", ", ".join(unset), defaults.title, variant)
    return SamplerSettings(steps=steps, cfg=cfg, shift=shift, seed=section.seed)


def build_previewer(
    config,
    *,
    rank: int,
    device: torch.device,
    feature_dim: int,
    empty_caption: torch.Tensor | None,
    forward_context,
    variant: str = "base",
) -> Previewer | None:
    """The run's previewer, or None (no ``preview.features``, or a rank that does not sample: see the docstring)."""
    section = config.preview
    if not section.features:
        return None
    sharded = config.mode == "full"  # FSDP2: every rank must take part in each forward
    if rank != 0 and not sharded:
        return None
    prompts = load_prompt_features(section.features, feature_dim=feature_dim)
    settings = sampler_settings(section, variant)
    if settings.uses_guidance and prompts.negative is None:
        if empty_caption is None:
            raise PreviewError(
                f"preview.cfg is {settings.cfg} but {section.features} has no 'negative' features and the data has no "
                "empty caption: encode a negative prompt with the prompts, or set preview.cfg to 1"
            )
        logger.info("preview negative prompt: the empty caption's features (the file has no 'negative')")
        prompts = PromptFeatures(texts=prompts.texts, positives=prompts.positives, negative=empty_caption.float().cpu())
    schedule = PreviewSchedule(every=section.every, at_start=section.at_start, total_steps=config.run.steps)
    logger.info(
        "previews of %d prompt(s) at %dx%d, %s: euler/simple, %d steps, cfg %g, shift %g, seed %d",
        len(prompts.texts),
        section.width,
        section.height,
        f"every {section.every} steps and at the end" if section.every else "at the end",
        settings.steps,
        settings.cfg,
        settings.shift,
        settings.seed,
    )
    return Previewer(
        prompts=prompts,
        settings=settings,
        schedule=schedule,
        size=(section.width, section.height),
        run_dir=config.run.output_dir,
        device=device,
        writes=rank == 0,
        forward_context=forward_context,
    )
