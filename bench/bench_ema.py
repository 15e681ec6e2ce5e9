"""What the EMA of the trained weights costs on one GPU: LoRA r32 on attention+ffn at 512² bs4 (eager, full-size
random-init Z-Image, synthetic cached inputs), EMA off / on the device / in host RAM, each a real ``run_training``.

Prints one line per placement (img/s over the last steps, peak GiB) and the planner's EMA bytes, and writes
``$OUT/bench_ema.json`` (or ./bench_ema.json). Fails loudly: a run that does not exit 0, a device-placed EMA whose
measured extra peak differs from the planner's price by more than 15 % (allocator rounding), or a host-RAM EMA that adds GPU memory.
Run from the repository root: ``python bench/bench_ema.py`` (about 3 minutes on an H200).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: training
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_ours
from bench_ours import OurConfig, train_config  # noqa: E402

from training.engine.config import EmaSection  # noqa: E402
from training.engine.trainer import run_training  # noqa: E402
from training.hardware.memory import GIB, MemoryModel  # noqa: E402
from training.run.events import read_events  # noqa: E402

CONF = OurConfig(batch=4, resolution=512, rank=32, targets="attention+ffn", compile=False)
STEPS, WARMUP = 6, 2


def run(placement: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="whetstone-ema-") as run_dir:
        config = dataclasses.replace(train_config(CONF, run_dir, STEPS), ema=EmaSection(placement=placement))
        gc.collect()  # the previous run's model must be gone before this run's peak is measured
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        code = run_training(config)
        if code != 0:
            raise RuntimeError(f"EMA {placement}: run_training exited with {code}")
        events = [e for e in read_events(run_dir) if "img_per_s" in e][WARMUP:]
        if not (Path(run_dir) / "lora_ema.safetensors").is_file() and placement != "off":
            raise RuntimeError(f"EMA {placement}: no lora_ema.safetensors written")
    seconds = sum(e["step_s"] for e in events)
    return {
        "placement": placement,
        "img_per_s": CONF.batch * len(events) / seconds,
        "peak_gib": max(e["peak_mem_gb"] for e in events),
    }


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("bench_ema needs a CUDA GPU")
    priced = MemoryModel().fixed_bytes("lora", 1, "none", CONF.rank, lora_targets=CONF.targets, ema_on_device=True)
    rows = [run(placement) for placement in ("off", "device", "cpu")]
    off, device, host = rows
    measured_extra = (device["peak_gib"] - off["peak_gib"]) * GIB
    for row in rows:
        print(f"EMA {row['placement']:>6}: {row['img_per_s']:.2f} img/s, peak {row['peak_gib']:.2f} GiB")
    print(f"EMA on the device: measured +{measured_extra / 2**20:.1f} MiB, planner {priced['ema'] / 2**20:.1f} MiB")
    result = {"config": dataclasses.asdict(CONF), "runs": rows, "planner_ema_bytes": priced["ema"],
              "measured_extra_bytes": measured_extra}  # fmt: skip
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_ema.json").write_text(json.dumps(result, indent=2))
    if abs(measured_extra - priced["ema"]) > 0.15 * priced["ema"]:
        raise SystemExit(f"the device EMA's extra peak {measured_extra:.0f} B is not the planner's {priced['ema']} B")
    if host["peak_gib"] > off["peak_gib"] + 0.05:
        raise SystemExit(f"the host-RAM EMA added GPU memory: {host['peak_gib']:.2f} vs {off['peak_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
