"""Which σ-sampling recipe learns fastest? A fixed memorisation task, trained once per recipe from the same start.

Task (synthetic but structured): K latents of a 512² image (16×64×64), each a smooth random field (8×8 noise,
bilinearly upsampled, plus 10 % fine noise, unit variance), each with its own random caption features (32 tokens of
Qwen3's 2560 dims). A medium random-init Z-Image (dim 1024, 10 main + 2+2 refiner blocks, ≈0.19 B parameters; the
real token widths, RoPE and adaLN) is fully trained on all K samples per step, AdamW, bf16 autocast, the engine's own
``FlowObjective`` drawing σ and noise per sample index: every recipe sees the same data, noise and initial weights.

Reported after N steps, per recipe:
- ``eval_mse``: the unweighted x0 − ε error at σ ∈ {0.05, 0.2, 0.4, 0.6, 0.8, 0.95} with fixed noise (and per σ):
  comparable across recipes whatever their σ distribution or loss weighting;
- ``preview_rel_error``: ‖x̂ − x0‖ / ‖x0‖ of a latent sampled from fixed noise with its caption as ComfyUI's KSampler
  would (Euler, simple schedule, Base's sampling shift from ``training.model.variants``, cfg 1, ``--preview-steps``);
- ``caption_margin``: cos(x̂_i, x0_i) − max over j ≠ i of cos(x̂_i, x0_j): > 0 means each caption gives its own latent.

    python bench/recipe_experiment.py                     # H200: estimated 1-2 minutes for the 8 recipes
    python bench/recipe_experiment.py --cpu-smoke         # CPU: tiny model, 3 steps, checks the script runs

Writes ``$OUT/recipe_experiment.json`` (or ``--out``). Exits non-zero on a non-finite loss or a missing GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.batches import Batch  # noqa: E402
from training.engine.build import random_model  # noqa: E402
from training.engine.objective import FlowObjective, shift_sigma  # noqa: E402
from training.model.config import PRESETS  # noqa: E402
from training.model.variants import variant_settings  # noqa: E402

MEDIUM = PRESETS["z-image"].replace(dim=1024, n_layers=10, n_heads=8, ffn_hidden_dim=2816)
#: name → FlowObjective settings; the first is the current default (docs/training.md)
RECIPES = {
    "shifted_uniform_3": {"sampler": "shifted_uniform", "shift": 3.0},
    "uniform": {"sampler": "uniform"},
    "logit_normal": {"sampler": "logit_normal"},
    "shifted_logit_normal_3": {"sampler": "shifted_logit_normal", "shift": 3.0},
    "shifted_logit_normal_flux": {"sampler": "shifted_logit_normal", "shift_rule": "flux"},
    "mode_1.29": {"sampler": "mode", "mode_scale": 1.29},
    "cosmap": {"sampler": "cosmap"},
    "uniform_cosmap_weights": {"sampler": "uniform", "loss_weighting": "cosmap"},
}
EVAL_SIGMAS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)


def task(samples: int, latent: int, tokens: int, cap_dim: int, device: torch.device, seed: int):
    """K smooth latents [K, 16, latent, latent] (unit variance) and their caption features [K, tokens, cap_dim]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(samples, 16, 8, 8, generator=generator)
    smooth = F.interpolate(coarse, size=(latent, latent), mode="bilinear", align_corners=False)
    latents = smooth + 0.1 * torch.randn(samples, 16, latent, latent, generator=generator)
    latents = latents / latents.std(dim=(1, 2, 3), keepdim=True)
    captions = torch.randn(samples, tokens, cap_dim, generator=generator)
    return latents.to(device), captions.to(device)


def comfy_simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """ComfyUI's ModelSamplingDiscreteFlow table (1000 shifted σ) through the 'simple' scheduler, then 0."""
    table = shift_sigma(torch.arange(1, 1001, dtype=torch.float64) / 1000, shift)
    stride = len(table) / steps
    picked = [float(table[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor([*picked, 0.0], dtype=torch.float64)


@torch.no_grad()
def sample(model, noise, captions, lengths, steps: int, shift: float) -> torch.Tensor:
    """Euler as KSampler: denoised = x + σ·p for the raw prediction p ≈ x0 − ε; cfg 1 (one call per step)."""
    x = noise.clone()
    sigmas = comfy_simple_sigmas(steps, shift).tolist()
    for sigma, following in zip(sigmas, sigmas[1:], strict=False):
        s = torch.full((x.shape[0],), sigma, device=x.device)
        prediction = model(x, s, captions, lengths).float()
        x = x - (following - sigma) * prediction  # d = (x − denoised) / σ = −p
    return x


@torch.no_grad()
def evaluate(model, latents, captions, lengths, args, autocast) -> dict:
    generator = torch.Generator(device=latents.device).manual_seed(args.seed + 99)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    per_sigma = {}
    with autocast():
        for sigma in EVAL_SIGMAS:
            s = torch.full((latents.shape[0],), sigma, device=latents.device)
            prediction = model(sigma * noise + (1 - sigma) * latents, s, captions, lengths).float()
            per_sigma[str(sigma)] = F.mse_loss(prediction, latents - noise).item()
        sampled = sample(model, noise, captions, lengths, args.preview_steps, variant_settings("base").sampling_shift)
    flat, target = sampled.flatten(1), latents.flatten(1)
    relative = ((flat - target).norm(dim=1) / target.norm(dim=1)).mean().item()
    cosine = F.normalize(flat, dim=1) @ F.normalize(target, dim=1).T
    own = cosine.diagonal()
    other = cosine.masked_fill(torch.eye(len(own), dtype=torch.bool, device=own.device), -2).max(dim=1).values
    return {
        "eval_mse": sum(per_sigma.values()) / len(per_sigma),
        "eval_mse_per_sigma": per_sigma,
        "preview_rel_error": relative,
        "caption_margin": (own - other).mean().item(),
    }


def train_recipe(name: str, recipe: dict, config, latents, captions, args, device) -> dict:
    model = random_model(config, dtype=torch.float32, device=device, seed=args.seed)  # the same start per recipe
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    objective = FlowObjective(**recipe, seed=args.seed)
    lengths = torch.full((len(latents),), captions.shape[1], device=device)
    data = Batch(
        keys=[str(i) for i in range(len(latents))],
        captions=[f"caption {i}" for i in range(len(latents))],
        size=(latents.shape[-1] * 8, latents.shape[-2] * 8),
        latents=latents,
        caption_features=captions,
        caption_lengths=lengths,
    )

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        indices = [step * len(latents) + i for i in range(len(latents))]
        with autocast():
            output = objective.loss(model, data, indices, None)
        if not torch.isfinite(output.loss):
            raise RuntimeError(f"recipe {name}: loss {output.loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        losses.append(output.per_sample.mean().item())
    train_seconds = time.perf_counter() - start
    model.eval()
    result = evaluate(model, latents, captions, lengths, args, autocast)
    tail = losses[-max(1, args.steps // 10) :]
    return {"recipe": recipe, "train_seconds": train_seconds, "final_train_mse": sum(tail) / len(tail), **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--samples", type=int, default=4, help="latents to memorise (K)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in px (latent side = /8)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--preview-steps", type=int, default=20)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names from RECIPES")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--budget-s", type=float, default=200.0, help="stop after the first recipe if all would not fit"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "recipe_experiment.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, 3 steps (checks the script)")
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    if args.cpu_smoke:
        device, config = torch.device("cpu"), PRESETS["tiny"]
        args.steps, args.resolution, args.preview_steps = 3, 64, 4
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: this experiment is meant for a GPU (use --cpu-smoke to check the script)")
    else:
        device, config = torch.device("cuda"), MEDIUM
    latents, captions = task(args.samples, args.resolution // 8, 32, config.cap_feat_dim, device, args.seed)
    print(f"model {config.total_params() / 1e9:.3f} B parameters, {args.samples} latents of {tuple(latents.shape[1:])}")
    results, start = {}, time.perf_counter()
    for name in names:
        results[name] = train_recipe(name, RECIPES[name], config, latents, captions, args, device)
        row = results[name]
        projected = (time.perf_counter() - start) / len(results) * len(names)
        if len(results) == 1 and projected > args.budget_s:
            print(f"projected {projected:.0f} s > --budget-s {args.budget_s:.0f}: lower --steps", file=sys.stderr)
            return 3
        print(
            f"{name:28s} train mse {row['final_train_mse']:.4f}  eval mse {row['eval_mse']:.4f}  "
            f"preview rel err {row['preview_rel_error']:.4f}  caption margin {row['caption_margin']:+.3f}  "
            f"({row['train_seconds']:.1f} s)",
            flush=True,
        )
    total = time.perf_counter() - start
    report = {
        "task": {"samples": args.samples, "resolution": args.resolution, "steps": args.steps, "lr": args.lr},
        "model": {"dim": config.dim, "n_layers": config.n_layers, "params": config.total_params()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preview": {"steps": args.preview_steps, "shift": variant_settings("base").sampling_shift, "cfg": 1.0},
        "total_seconds": total,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    best = min(results, key=lambda n: results[n]["eval_mse"])
    print(f"best eval mse: {best}; total {total:.0f} s; wrote {args.out}")
    bad = [n for n, r in results.items() if not all(map(math.isfinite, (r["eval_mse"], r["preview_rel_error"])))]
    if bad:
        print(f"non-finite results for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
