"""EMA of the trained weights: the recurrence, the file beside the result in the same format, an exact resume (its
shadow is in the checkpoint), and the planner's price for it on the device or in host RAM."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tests.test_engine_runs import tiny_config, train_in_process
from training.engine.config import EmaSection, TrainConfig
from training.engine.ema import WeightAverage, ema_path

CPU = torch.device("cpu")


def test_the_ema_follows_the_weights_until_start_step_then_averages():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    average = WeightAverage(
        list(layer.named_parameters()), EmaSection(placement="cpu", decay=0.9, start_step=2), device=CPU
    )
    expected = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for step in range(1, 6):
        with torch.no_grad():
            for param in layer.parameters():
                param.add_(torch.randn_like(param))
        average.update(step)
        for name, param in layer.named_parameters():
            value = param.detach()
            expected[name] = value.clone() if step <= 2 else 0.9 * expected[name] + 0.1 * value
            torch.testing.assert_close(average.shadow[name], expected[name], rtol=1e-6, atol=1e-7)
    trained = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with average.swapped_in():
        assert all(torch.equal(p.detach(), average.shadow[n]) for n, p in layer.named_parameters())
    assert all(torch.equal(p.detach(), trained[n]) for n, p in layer.named_parameters())  # put back bit for bit


def test_ema_settings_are_validated_naming_the_key():
    with pytest.raises(ValueError, match=r"ema.placement must be one of \('off', 'device', 'cpu'\), got 'gpu'"):
        EmaSection(placement="gpu")
    with pytest.raises(ValueError, match=r"ema.decay: must be a finite number in \(0, 1\)"):
        EmaSection(decay=1.0)
    with pytest.raises(ValueError, match="schedule-free AdamW already saves an average"):
        TrainConfig.from_dict(
            {"run": {"output_dir": "r"}, "ema": {"placement": "device"}, "optim": {"optimizer": "schedulefree_adamw"}}
        )


def ema_config(run_dir, mode: str = "lora", *, steps: int, **ema) -> dict:
    config = tiny_config(run_dir, mode, micro_batch=2, grad_accum=1, steps=steps)
    config["optim"] = {"lr": 1e-2}  # constant: the run can be extended
    config["ema"] = {"placement": "device", "decay": 0.5, **ema}
    return config


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_ema_file_sits_beside_the_result_in_its_format(tmp_path, mode):
    config = ema_config(tmp_path / "run", mode, steps=3, start_step=1)
    train_in_process(config)
    run = TrainConfig.from_dict(copy.deepcopy(config)).run
    result = run.lora_file if mode == "lora" else run.model_file
    twin = ema_path(result)
    assert twin == result.parent / f"{result.stem}_ema.safetensors"
    raw, averaged = load_file(result), load_file(twin)
    assert raw.keys() == averaged.keys() and all(raw[k].dtype == averaged[k].dtype for k in raw)
    assert any(not torch.equal(raw[k], averaged[k]) for k in raw)
    with safe_open(str(result), "pt") as a, safe_open(str(twin), "pt") as b:
        raw_meta, ema_meta = a.metadata(), b.metadata()
    assert {k: v for k, v in ema_meta.items() if not k.startswith("ema_")} == raw_meta
    assert (ema_meta["ema_decay"], ema_meta["ema_start_step"]) == ("0.5", "1")


def test_stop_and_resume_gives_the_uninterrupted_ema_bit_for_bit(tmp_path):
    reference_config = ema_config(tmp_path / "reference", steps=4)
    train_in_process(reference_config)
    first = ema_config(tmp_path / "run", steps=2)
    train_in_process(first)
    extended = copy.deepcopy(first)
    extended["run"]["steps"] = 4
    train_in_process(extended)
    reference = load_file(ema_path(TrainConfig.from_dict(reference_config).run.lora_file))
    resumed = load_file(ema_path(TrainConfig.from_dict(extended).run.lora_file))
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    checkpoint = load_file(next((tmp_path / "run/checkpoints").glob("step-000004/rank-*.safetensors")))
    assert any(k.startswith("ema/") for k in checkpoint)  # the shadow is part of the resumable state


def test_a_checkpoint_without_ema_is_not_resumed_into_a_run_with_it(tmp_path):
    from training.engine.checkpoint_files import CheckpointMismatch

    first = ema_config(tmp_path / "run", steps=2, placement="off")
    train_in_process(first)
    extended = copy.deepcopy(first)
    extended["run"]["steps"] = 3
    extended["ema"]["placement"] = "device"
    with pytest.raises(CheckpointMismatch, match="EMA"):
        train_in_process(extended)


def plan_for(ema: str, mode: str = "lora", tier: str = "1x80GB", **request):
    from training.hardware.plan import PlanRequest, make_plan
    from training.hardware.tiers import load_tiers, simulated_profile
    from training.model.config import preset

    settings = {"mode": mode, "resolution": 512, "lora_rank": 16, "model": preset("tiny"), "ema": ema}
    return make_plan(PlanRequest(**settings | request), simulated_profile(load_tiers()[tier]))


def test_the_plan_prices_the_ema_on_the_device_and_writes_its_placement():
    from training.engine.build import random_model
    from training.model.config import preset
    from training.model.lora import LoraSettings, attach_lora

    off, device, host = plan_for("off"), plan_for("device"), plan_for("cpu")
    model = random_model(preset("tiny"), dtype=torch.float32, device=CPU, seed=0)
    attach_lora(model, LoraSettings(rank=16))
    shadow = WeightAverage.create(model, EmaSection(placement="cpu"), device=CPU).state()
    real_bytes = sum(t.numel() * t.element_size() for t in shadow.values())
    assert device.memory_breakdown["ema"] == real_bytes  # the engine's own shadow, counted exactly
    assert device.predicted_peak_bytes == off.predicted_peak_bytes + real_bytes
    assert "ema" not in host.memory_breakdown and host.predicted_peak_bytes == off.predicted_peak_bytes
    assert (off.ema, device.ema, host.ema) == ("off", "device", "cpu")
    config = TrainConfig.from_plan(device, run={"output_dir": "r"}, data={"synthetic": True}, ema={"decay": 0.99})
    assert (config.ema.placement, config.ema.decay) == ("device", 0.99)
    with pytest.raises(ValueError, match=r"ema.placement is decided by the plan"):
        TrainConfig.from_plan(device, run={"output_dir": "r"}, data={"synthetic": True}, ema={"placement": "cpu"})


def test_full_fine_tuning_shards_the_ema_with_fsdp2():
    from training.hardware.memory import MemoryModel
    from training.model.config import PRESETS

    memory = MemoryModel(model=PRESETS["z-image"])
    one = memory.fixed_bytes("full", 1, "fsdp2", 0, ema_on_device=True)["ema"]
    eight = memory.fixed_bytes("full", 8, "fsdp2", 0, ema_on_device=True)["ema"]
    assert one == PRESETS["z-image"].total_params() * 4 and eight == one // 8


def test_auto_keeps_the_ema_on_the_gpu_unless_it_costs_training_memory():
    from training.hardware.plan import make_plan
    from training.hardware.request import PlanRequest
    from training.hardware.tiers import load_tiers, simulated_profile
    from training.model.config import PRESETS

    roomy = plan_for("auto")
    assert roomy.ema == "device" and "fits on the GPU" in dict((n, r) for n, _, r in roomy.decisions)["ema"]
    # Full fine-tuning of Z-Image on 4 x 40 GB: its 6 GB of EMA shard per GPU would cost checkpointing
    tier = load_tiers()["4xA100-40GB-SXM"]
    request = PlanRequest(mode="full", resolution=1024, model=PRESETS["z-image"], ema="auto")
    tight = make_plan(request, simulated_profile(tier))
    assert tight.ema == "cpu" and "kept in host RAM" in dict((n, r) for n, _, r in tight.decisions)["ema"]
    with pytest.raises(ValueError, match="PlanRequest.ema 'device' with fsdp_cpu_offload"):
        PlanRequest(mode="full", resolution=512, ema="device", fsdp_cpu_offload=True)
