"""Data-parallel scaling of our engine on one host: LoRA (DDP) and full fine-tuning (FSDP2) on 1..N GPUs.

Each run is ``torchrun --standalone --nproc_per_node N -m training train`` on synthetic cached inputs with the same
micro-batch per GPU; the figures come from the run's per-step events (rank 0). Prints img/s, img/s per GPU, scaling
efficiency against the 1-GPU run of the same mode, useful TFLOP/s per GPU (MFU against --peak), peak memory of
rank 0 and the data-wait fraction.

    python bench/bench_scaling.py --gpus 1,2 --runs lora,lora-shards
    python bench/bench_scaling.py --gpus 2 --runs full

"lora-shards" trains on a real shard set (generated images packed with the test encoders) through the streaming
loader, so its data-wait fraction is the loader's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ours import OUR_CONFIGS, train_config  # noqa: E402

from training.engine.timing import window_rate  # noqa: E402
from training.model.config import PRESETS  # noqa: E402
from training.model.flops import image_tokens_for, training_flops  # noqa: E402
from training.run.events import read_events  # noqa: E402

RUNS = {
    "lora": OUR_CONFIGS["lora-512"],
    # every parameter trains: FSDP2 shards fp32 master weights, grads and AdamW states; all blocks checkpointed
    "full": dataclasses.replace(OUR_CONFIGS["lora-512"], mode="full", checkpoint_depth=30),
}
WARMUP_STEPS = 4
SHARD_IMAGES = 512  # for "lora-shards": generated images packed at 512² with the test encoders (2560-wide features)


def pack_shards(root: Path) -> Path:
    """A real shard set for the loader: generated images, test latent/text encoders at the real model's widths."""
    from training.apps.demo import make_images
    from training.data.encoders import TestLatentEncoder, TestTextEncoder
    from training.data.pack import PackConfig, pack_dataset

    images = make_images(root / "images", count=SHARD_IMAGES, size=512)
    config = PackConfig(input_dir=images, output_dir=root / "shards", resolution=512, samples_per_shard=64)
    text_encoder = TestTextEncoder(feature_dim=PRESETS["z-image"].cap_feat_dim, max_tokens=128)
    pack_dataset(config, latent_encoder=TestLatentEncoder(), text_encoder=text_encoder)
    return root / "shards"


def run(name: str, gpus: int, steps: int, root: Path, timeout: int) -> dict:
    conf = RUNS["lora" if name in ("lora-shards", "lora-bf16grads") else name]
    run_dir = root / f"{name}-{gpus}"
    config = train_config(conf, str(run_dir), steps)
    if name == "lora-bf16grads":  # DDP all-reduces the LoRA gradients in bf16 (run.ddp_bf16_grads)
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, ddp_bf16_grads=True))
    if name == "lora-shards":  # the streaming loader instead of synthetic inputs: measures the data wait
        shards = root / "shards" if (root / "shards").is_dir() else pack_shards(root)
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, synthetic=False, shards=str(shards), num_workers=4)
        )
    config_path = root / f"{name}-{gpus}.json"
    config.save(config_path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        "training",
        "--log-level",
        "WARNING",
    ]
    command += ["train", "--config", str(config_path)]
    env = os.environ | {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    done = subprocess.run(command, timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        return {"run": name, "gpus": gpus, "error": f"exit {done.returncode}"}
    all_events = [e for e in read_events(run_dir) if "img_per_s" in e]
    window = window_rate(all_events, warmup=WARMUP_STEPS)  # raises when the step timer disagrees with the wall
    events = all_events[WARMUP_STEPS:]
    step_s = window.wall_s / window.steps
    global_batch = conf.batch * gpus
    model = PRESETS["z-image"]
    flops = training_flops(
        model,
        image_tokens=image_tokens_for(conf.resolution, model),
        caption_tokens=conf.caption_tokens,
        batch=global_batch,
        full_finetune=conf.mode == "full",
    )
    return {
        "run": name,
        "gpus": gpus,
        "global_batch": global_batch,
        "img_per_s": round(global_batch / step_s, 3),
        "img_per_s_per_gpu": round(global_batch / step_s / gpus, 3),
        "tflops_per_gpu": round(flops / step_s / gpus / 1e12, 1),
        "peak_gib_rank0": round(max(e["peak_mem_gb"] for e in events), 1),
        "data_wait": round(statistics.median(e["data_wait"] for e in events), 4),
        "timer_vs_wall": round(window.disagreement, 4),
    }


def measured_peak() -> float:
    """The bf16 matmul rate of GPU 0, measured in a child process (bench_speed's measurement)."""
    command = [sys.executable, str(Path(__file__).with_name("bench_speed.py")), "--item", "matmul-peak"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["bf16_matmul_tflops"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2")
    parser.add_argument("--runs", default="lora,full", help=f"from {sorted(RUNS)}, lora-shards, lora-bf16grads")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--peak", type=float, default=None, help="bf16 matmul TFLOP/s for MFU (default: measure)")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.peak is None:
        args.peak = measured_peak()
    print(json.dumps({"bf16_matmul_tflops": args.peak}), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="whetstone-scaling-") as root:
        for name in args.runs.split(","):
            for gpus in (int(g) for g in args.gpus.split(",")):
                results.append(run(name, gpus, args.steps, Path(root), args.timeout))
                print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text("\n".join(json.dumps(r) for r in results) + "\n")
    print("| run | GPUs | img/s | img/s/GPU | scaling | TFLOP/s/GPU | MFU | peak GiB (rank 0) | data wait |")
    print("|---|---|---|---|---|---|---|---|---|")
    single = {r["run"]: r for r in results if r.get("gpus") == 1 and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"| {r['run']} | {r['gpus']} | {r['error']} | | | | | | |")
            continue
        base = single.get(r["run"])
        scaling = f"{r['img_per_s_per_gpu'] / base['img_per_s_per_gpu']:.1%}" if base else "—"
        mfu = f"{r['tflops_per_gpu'] / args.peak:.1%}"
        print(
            f"| {r['run']} | {r['gpus']} | {r['img_per_s']:.2f} | {r['img_per_s_per_gpu']:.2f} | {scaling} "
            f"| {r['tflops_per_gpu']:.1f} | {mfu} | {r['peak_gib_rank0']:.1f} | {r['data_wait']:.2%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
