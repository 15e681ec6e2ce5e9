"""API-format prompts for the integration suite: pack -> plan -> train -> load LoRA -> sample, and pieces of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

RESOLUTION = 256  # the smallest Pack Dataset / Training Plan resolution: 16x16 patches of the dim-3840 model
IMAGE_FOLDER = "whetstone_images"


def make_images(input_dir: Path, count: int = 4, folder_name: str = IMAGE_FOLDER) -> str:
    """A few 256x256 noise images with captions in ComfyUI's input folder; returns the folder's name there."""
    folder = input_dir / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a test pattern number {index}")
    return folder_name


def plan_node(model: str, **overrides) -> dict:
    """Training Plan for the CPU tier: LoRA rank 4 at the test resolution, one sample per step."""
    inputs = {
        "model_name": model,
        "tier": "cpu",
        "mode": "lora",
        "lora_rank": 4,
        "lora_targets": "attention+ffn",
        "adapter": "lora",
        "resolution": RESOLUTION,
        "target_batch": 1,
        "learning_rate": 1e-4,
        "caption_tokens": 32,
        "caption_length": "longest",
        "optimizer": "auto",
        "ema": "off",
        "free_comfyui_memory": False,
    }
    return {"class_type": "WhetstoneTrainingPlan", "inputs": {**inputs, **overrides}}


def train_prompt(models: dict[str, str], *, run_name: str, dataset_name: str, steps: int, save_every: int = 0) -> dict:
    """Loaders -> Pack Dataset (VAE + text encoder) -> Training Plan (CPU tier) -> Train."""
    model = models["diffusion_models"]
    return {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "clip": {"class_type": "WhetstoneTestSmallQwen3Loader", "inputs": {"clip_name": models["text_encoders"]}},
        "pack": {
            "class_type": "WhetstonePackDataset",
            "inputs": {
                "image_folder": IMAGE_FOLDER,
                "dataset_name": dataset_name,
                "resolution": RESOLUTION,
                "samples_per_shard": 100,
                "too_small": "skip",
                "missing_caption": "empty",
                "store_images": False,
                "vae": ["vae", 0],
                "clip": ["clip", 0],
            },
        },
        "plan": plan_node(model, dataset=["pack", 0]),  # planned for the packed buckets and caption lengths
        "train": {
            "class_type": "WhetstoneTrain",
            "inputs": {
                "plan": ["plan", 0],
                "dataset": ["pack", 0],
                "model_name": model,
                "run_name": run_name,
                "steps": steps,
                "save_every": save_every,
                "warmup_steps": 0,
                "schedule": "constant",
                "caption_dropout": 0.0,
                "seed": 0,
                "resume": False,
            },
        },
    }


def end_to_end_prompt(models: dict[str, str], *, run_name: str, steps: int) -> dict:
    """train_prompt, then the LoRA onto UNETLoader's MODEL at strength 1, a 2-step 64x64 sample saved as PNG, and the
    run's Training Report chart as a preview."""
    prompt = train_prompt(models, run_name=run_name, dataset_name="patterns", steps=steps)
    prompt.update(
        {
            "unet": {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": models["diffusion_models"], "weight_dtype": "default"},
            },
            "lora": {
                "class_type": "WhetstoneLoadTrainedLoRA",
                "inputs": {"model": ["unet", 0], "lora_name": "", "strength": 1.0, "run": ["train", 0]},
            },
            "lora_report": {"class_type": "PreviewAny", "inputs": {"source": ["lora", 1]}},
            "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": "a test pattern", "clip": ["clip", 0]}},
            "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["positive", 0]}},
            "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "sample": {
                "class_type": "KSampler",
                "inputs": {
                    "model": ["lora", 0],
                    "seed": 0,
                    "steps": 2,
                    "cfg": 1.0,
                    "sampler_name": "euler",
                    "scheduler": "simple",
                    "positive": ["positive", 0],
                    "negative": ["negative", 0],
                    "latent_image": ["latent", 0],
                    "denoise": 1.0,
                },
            },
            "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": run_name}},
            "report": {
                "class_type": "WhetstoneTrainingReport",
                "inputs": {"run_name": "", "smoothing": 5, "run": ["train", 0]},
            },
            "report_image": {"class_type": "PreviewImage", "inputs": {"images": ["report", 0]}},
        }
    )
    return prompt
