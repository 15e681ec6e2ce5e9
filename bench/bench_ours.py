"""Our engine's training throughput on the full-size random-init Z-Image (cached inputs, one GPU).

Each configuration is a real run of ``training.engine.trainer.run_training`` on synthetic cached inputs; the numbers
come from its per-step events, so what is measured is what a user's run does (loader, objective, optimizer, events).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass

import torch

from training.engine.config import DataSection, LoraSection, OptimSection, RunSection, TrainConfig
from training.engine.timing import window_rate
from training.engine.trainer import run_training
from training.model.config import PRESETS
from training.model.flops import image_tokens_for, training_flops
from training.run.events import read_events


@dataclass(kw_only=True, frozen=True)
class OurConfig:
    batch: int
    resolution: int
    caption_tokens: int = 128
    rank: int = 128
    targets: str = "attention+ffn+refiners"  # the peer's coverage: q,k,v,o,w1,w2,w3 of every block
    compile: bool = True
    checkpoint_depth: int = 0
    mode: str = "lora"  # lora | qlora | full
    fp8: bool = False
    cudagraphs: bool = False  # an experiment (issue 12): inductor's CUDA graphs over every compiled block
    adapter: str = "lora"  # training.vocabulary.ADAPTER_TYPES (lora modes)
    nf4_in_graph: bool = True  # qlora + compile; False: bitsandbytes' Linear4bit (before issue 12's lever)
    lora_concat: bool = True  # (q)lora + compile on one GPU; False: peft's separate adapter GEMMs (before the lever)
    max_autotune: bool = False  # an experiment (issue 12): Triton GEMM templates with elementwise work fused in
    benchmark_epilogue_fusion: bool = True  # max_autotune: False decides each fusion without timing it (compile time)


_BASE = OurConfig(batch=4, resolution=512)
OUR_CONFIGS = {
    "lora-512": _BASE,
    "lora-512-eager": dataclasses.replace(_BASE, compile=False),
    "lora-512-bs8": dataclasses.replace(_BASE, batch=8),
    "lora-512-peft": dataclasses.replace(_BASE, lora_concat=False),
    "lora-1024": dataclasses.replace(_BASE, batch=1, resolution=1024),
    "lora-1024-peft": dataclasses.replace(_BASE, batch=1, resolution=1024, lora_concat=False),
    "lora-1024-bs2": dataclasses.replace(_BASE, batch=2, resolution=1024),
    "qlora-512": dataclasses.replace(_BASE, mode="qlora"),
    "qlora-512-bnb": dataclasses.replace(_BASE, mode="qlora", nf4_in_graph=False),
    "qlora-512-peft": dataclasses.replace(_BASE, mode="qlora", lora_concat=False),
    "fp8-512": dataclasses.replace(_BASE, fp8=True),
    "fp8-1024": dataclasses.replace(_BASE, batch=1, resolution=1024, fp8=True),
    "lora-512+cg": dataclasses.replace(_BASE, cudagraphs=True),
    "lora-512+autotune": dataclasses.replace(_BASE, max_autotune=True),
    "lora-512+autotune-fast": dataclasses.replace(_BASE, max_autotune=True, benchmark_epilogue_fusion=False),
    "fp8-512+cg": dataclasses.replace(_BASE, fp8=True, cudagraphs=True),
    # issue 17: each adapter type against LoRA at 512² bs4 r32, eager (bench/bench_adapters.py runs these four)
    **{
        f"{adapter}-512-r32": dataclasses.replace(_BASE, rank=32, compile=False, adapter=adapter)
        for adapter in ("lora", "dora", "lokr", "loha")
    },
}


def train_config(conf: OurConfig, output_dir: str, steps: int, *, grad_accum: int = 1) -> TrainConfig:
    """The ``TrainConfig`` of a benchmark run of ``conf`` on synthetic cached inputs (no resume, no saved state)."""
    return TrainConfig(
        mode=conf.mode,
        run=RunSection(
            output_dir=output_dir,
            steps=steps,
            micro_batch=conf.batch,
            grad_accum=grad_accum,
            checkpoint_depth=conf.checkpoint_depth,
            compile=conf.compile,
            fp8=conf.fp8,
            resume=False,
            save_state=False,
        ),
        lora=LoraSection(rank=conf.rank, targets=conf.targets, adapter=conf.adapter),
        data=DataSection(
            synthetic=True, resolution=conf.resolution, caption_tokens=conf.caption_tokens, caption_dropout=0.0
        ),
        optim=OptimSection(lr=1e-4, grad_clip=1.0),
    )


def apply_levers(conf: OurConfig) -> None:
    """Set this process up for ``conf``'s experiments (issue 12's A/Bs); each item runs in its own process."""
    from training.engine import parallelize

    if conf.cudagraphs:  # what torch.compile(mode="reduce-overhead") turns on
        from torch._inductor import config as inductor_config

        inductor_config.triton.cudagraphs = True
    if conf.max_autotune:  # what torch.compile(mode="max-autotune-no-cudagraphs") turns on for GEMMs, plus Hopper's
        from torch._inductor import config as inductor_config  # persistent TMA templates

        inductor_config.max_autotune_gemm = True
        inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
        inductor_config.triton.enable_persistent_tma_matmul = True
        inductor_config.benchmark_epilogue_fusion = conf.benchmark_epilogue_fusion
    if not conf.nf4_in_graph:
        parallelize.apply_nf4_in_graph = lambda model: None
    if not conf.lora_concat:
        parallelize.apply_lora_concat_gemms = lambda model: None


def run_ours(conf: OurConfig, steps: int = 8, warmup: int = 3) -> dict:
    """Train warmup + steps steps; report the wall-clock rate of the last ``steps`` (compilation stays out).

    The rate is images over the wall time of the window (checked against the engine's device-finished step times:
    `training.engine.timing.window_rate` raises when they differ by more than 3%)."""
    apply_levers(conf)
    with tempfile.TemporaryDirectory(prefix="whetstone-bench-") as run_dir:
        torch.cuda.reset_peak_memory_stats()
        code = run_training(train_config(conf, run_dir, warmup + steps))
        if code != 0:
            raise RuntimeError(f"run_training exited with {code}; see {run_dir}")
        all_events = [e for e in read_events(run_dir) if "step" in e and "img_per_s" in e]
    window = window_rate(all_events, warmup=warmup)
    events = all_events[warmup:]
    seconds = window.wall_s / window.steps
    model_config = PRESETS["z-image"]
    flops = training_flops(
        model_config,
        image_tokens=image_tokens_for(conf.resolution, model_config),
        caption_tokens=conf.caption_tokens,
        batch=conf.batch,
        full_finetune=conf.mode == "full",
    )
    torch.cuda.empty_cache()
    return dict(
        dataclasses.asdict(conf),
        res=conf.resolution,
        s_per_step=round(seconds, 4),
        median_step_s=round(window.median_step_s, 4),
        img_per_s=round(window.img_per_s, 3),
        engine_img_per_s=round(window.engine_img_per_s, 3),
        timer_vs_wall=round(window.disagreement, 4),
        tflops_useful=round(flops / seconds / 1e12, 1),
        peak_gib=round(max(e["peak_mem_gb"] for e in events), 1),
        data_wait=round(sum(e["data_wait"] * e["step_s"] for e in events) / window.engine_s, 4),
        loss=events[-1]["loss"],
    )
