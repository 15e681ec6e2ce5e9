"""Hardware Profile, Training Plan, Train and Training Report on the tiny model (bridge faked, engine for real)."""

from __future__ import annotations

import json
import sys
import threading

import pytest
import torch
from test_nodes_pack import FakeCLIP, FakeVAE, make_images
from test_nodes_support import install_fake_comfy, pack_module

from training.model.config import PRESETS
from training.model.weights import save_weights
from training.model.zimage import ZImageTransformer
from training.run import events, launch

hardware_node = pack_module("nodes.hardware_node")
plan_node = pack_module("nodes.plan_node")
train_node = pack_module("nodes.train_node")
report_node = pack_module("nodes.report_node")
pack_node = pack_module("nodes.pack_node")


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = install_fake_comfy(tmp_path, monkeypatch)
    torch.manual_seed(0)
    save_weights(ZImageTransformer(PRESETS["tiny"]), fake.folders["diffusion_models"] / "tiny.safetensors")
    return fake


def defaults(widgets, **overrides):
    return {**{name: widget.default for name, widget in widgets.items()}, **overrides}


def tiny_plan(comfy):
    settings = defaults(plan_node.WIDGETS, tier="cpu", resolution=256, lora_rank=4, target_batch=1)
    return plan_node.TrainingPlan().plan("tiny.safetensors", **settings)["result"][0]


def test_hardware_profile_measures_and_names_a_tier(comfy):
    output = hardware_node.HardwareProfile().measure(free_comfyui_memory=True)
    choice, summary = output["result"]
    assert comfy.unloads == 1
    assert choice.tier.name and choice.reason in summary
    assert hardware_node.HardwareProfile.IS_CHANGED(free_comfyui_memory=True) != 0  # NaN: always re-run


def test_plan_for_a_tier_shows_the_table(comfy):
    settings = defaults(plan_node.WIDGETS, tier="1x24GB", resolution=512, lora_rank=16)
    output = plan_node.TrainingPlan().plan("tiny.safetensors", **settings)
    plan, table = output["result"]
    assert output["ui"]["text"] == [table]
    assert plan.tier == "1x24GB" and plan.world_size == 1
    assert "micro-batch per GPU" in table and "memory budget" in table, "human labels"
    assert "micro_batch" not in table and "budget_bytes" not in table, "no engine field names"


def test_plan_node_chooses_and_writes_the_optimizer(comfy):
    settings = defaults(plan_node.WIDGETS, tier="1x80GB", resolution=512, lora_rank=16)
    assert settings["optimizer"] == "auto"
    assert plan_node.TrainingPlan().plan("tiny.safetensors", **settings)["result"][0].optimizer == "adamw"
    chosen = plan_node.TrainingPlan().plan("tiny.safetensors", **settings | {"optimizer": "prodigy"})["result"][0]
    assert (chosen.optimizer, chosen.lr) == ("prodigy", 1.0)
    with pytest.raises(ValueError, match="cannot train mode 'full'"):
        plan_node.TrainingPlan().plan("tiny.safetensors", **settings | {"optimizer": "prodigy", "mode": "full"})


def test_plan_measured_without_hardware_says_what_to_link(comfy):
    with pytest.raises(ValueError, match="Hardware Profile"):
        plan_node.TrainingPlan().plan("tiny.safetensors", **defaults(plan_node.WIDGETS))


def test_train_command_uses_torchrun_only_for_several_gpus(tmp_path):
    single = launch.train_command(tmp_path / "config.json", 1)
    assert single[:5] == [sys.executable, "-m", "training", "train", "--config"]
    multi = launch.train_command(tmp_path / "config.json", 4)
    assert multi[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in multi and "4" in multi


def test_event_tail_reads_only_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = events.EventTail(path)
    assert tail.read_new() == []
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert [e["step"] for e in tail.read_new()] == [1]
    with open(path, "a") as handle:
        handle.write('ss": 0.4}\n')
    assert [e["step"] for e in tail.read_new()] == [2]


def test_failure_message_carries_the_traceback_and_run_folder(tmp_path):
    (tmp_path / "error.txt").write_text("Traceback (most recent call last):\nValueError: boom\n")
    (tmp_path / "status.json").write_text(json.dumps({"state": "failed", "message": "boom"}))
    result = launch.outcome(tmp_path, 1)
    message = launch.failure_message(tmp_path, result)
    assert result.state == "failed" and "ValueError: boom" in message and str(tmp_path) in message


def test_failure_message_shows_the_traceback_once_below_one_line(tmp_path):
    """torchrun, the failure record and the log repeat a rank's traceback: the user sees one headline, then it once."""
    traceback_text = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: CUDA error: boom\n'
    (tmp_path / "error.txt").write_text(("[rank0] failed\n" + traceback_text) * 3)
    (tmp_path / "status.json").write_text(json.dumps({"state": "failed", "message": "rank 0: CUDA error: boom"}))
    message = launch.failure_message(tmp_path, launch.outcome(tmp_path, 1))
    assert message.splitlines()[0] == "Training failed: rank 0: CUDA error: boom (exit code 1)"
    assert message.count("Traceback (most recent call last)") == 1
    assert message.rstrip().endswith("RuntimeError: CUDA error: boom")


def test_a_users_mistake_is_one_message_without_a_traceback(tmp_path):
    """Exit code 2 is a mistake in the config or data: the status names the fix; no traceback is shown."""
    (tmp_path / "train.log").write_text(
        "Traceback (most recent call last):\nValueError: mode 'qlora' needs bitsandbytes\n"
    )
    fix = "mode 'qlora' needs bitsandbytes; pip install bitsandbytes, or use mode 'lora'"
    (tmp_path / "status.json").write_text(json.dumps({"state": "failed", "message": fix}))
    message = launch.failure_message(tmp_path, launch.outcome(tmp_path, 2))
    assert message.splitlines()[0] == f"Training failed: {fix} (exit code 2)"
    assert "Traceback" not in message and "train.log" in message


def test_a_mistake_refused_before_the_engine_started_shows_the_cli_message(tmp_path):
    """The CLI can refuse a config before the engine writes a status: its one ERROR line is what the user sees."""
    (tmp_path / "train.log").write_text(
        "2026-12-01 INFO x: starting\n2026-12-01 ERROR training: model.weights: no file at /m.safetensors\n"
    )
    (tmp_path / "status.json").write_text(json.dumps({"state": "starting", "message": ""}))
    message = launch.failure_message(tmp_path, launch.outcome(tmp_path, 2))
    assert "model.weights: no file at /m.safetensors" in message and "Traceback" not in message


def test_train_refuses_hostile_settings_before_writing(comfy):
    plan = tiny_plan(comfy)
    dataset = pack_module("nodes.values").DatasetRef(path=comfy.folders["whetstone_datasets"], samples=1, skipped=0)
    for override in ({"run_name": "../x"}, {"steps": 0}, {"caption_dropout": 2.0}, {"run_name": "a;b"}):
        with pytest.raises(ValueError, match=next(iter(override))):
            train_node.Train().train(plan, dataset, "tiny.safetensors", **defaults(train_node.WIDGETS, **override))
    assert not any(comfy.folders["whetstone_runs"].iterdir())


@pytest.mark.slow
def test_pack_plan_train_report_end_to_end(comfy, monkeypatch):
    # A hung engine must fail this test, not hang CI: press Cancel after 120 s, kill 10 s later.
    monkeypatch.setattr(train_node, "STOP_TIMEOUT_SECONDS", 10.0)
    watchdog = threading.Timer(120.0, lambda: setattr(comfy, "interrupted", True))
    watchdog.start()
    try:
        _pack_plan_train_report(comfy)
    finally:
        watchdog.cancel()


def _pack_plan_train_report(comfy):
    make_images(comfy.folders["input"] / "photos", count=4)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
    )
    dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
    plan = tiny_plan(comfy)
    settings = defaults(train_node.WIDGETS, run_name="tiny_run", steps=3, save_every=0, caption_dropout=0.0)
    output = train_node.Train().train(plan, dataset, "tiny.safetensors", unique_id="5", **settings)
    run, lora_name, report = output["result"]
    assert run.state == "completed", report
    assert lora_name == "tiny_run.safetensors" and (comfy.folders["loras"] / lora_name).is_file()
    kinds = [data["kind"] for event, data in comfy.events if event == "whetstone.progress"]
    assert kinds[0] == "start" and kinds[-1] == "end" and "progress" in kinds
    image, summary = report_node.TrainingReport().report(run=run, **defaults(report_node.WIDGETS))
    assert image.shape[0] == 1 and image.shape[-1] == 3 and "tiny_run" in summary


def test_plan_reads_the_dataset_and_train_rechecks_a_typed_plan(comfy):
    make_images(comfy.folders["input"] / "photos", count=3)
    (comfy.folders["input"] / "photos" / "img0.txt").write_text("a long VLM caption " * 10)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="long", resolution=256, too_small="upscale"
    )
    dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
    settings = defaults(plan_node.WIDGETS, tier="cpu", resolution=512, lora_rank=4, target_batch=1)
    planned, table = plan_node.TrainingPlan().plan("tiny.safetensors", dataset=dataset, **settings)["result"]
    assert planned.caption_tokens == 190 and planned.caption_overflow == "refuse"  # 189 characters + BOS
    assert max(planned.resolution) <= 256 + 64 and "longest encoded caption" in table
    typed = plan_node.TrainingPlan().plan("tiny.safetensors", **settings | {"resolution": 256})["result"][0]
    with pytest.raises(ValueError, match=r"1 caption\(s\) are longer than the planned 128 tokens") as refusal:
        train_node.Train().train(typed, dataset, "tiny.safetensors", **defaults(train_node.WIDGETS))
    assert "dataset input" in str(refusal.value)
    assert not any(comfy.folders["whetstone_runs"].iterdir())
    p90 = plan_node.TrainingPlan().plan("tiny.safetensors", dataset=dataset, **settings | {"caption_length": "p90"})
    assert p90["result"][0].caption_overflow == "truncate"


def test_train_refuses_a_run_folder_held_by_another_process(comfy):
    """The node and the CLI share one lock: a folder a live training holds is refused before anything is written."""
    from training.lock import FolderLock

    make_images(comfy.folders["input"] / "photos", count=2)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
    )
    dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
    plan = tiny_plan(comfy)
    run_dir = comfy.folders["whetstone_runs"] / "busy"
    with FolderLock(run_dir, "training"):
        (run_dir / "config.json").write_text("{}")
        settings = defaults(train_node.WIDGETS, run_name="busy")
        with pytest.raises(ValueError, match=r"busy is in use by process \d+"):
            train_node.Train().train(plan, dataset, "tiny.safetensors", **settings)
        assert (run_dir / "config.json").read_text() == "{}"
        assert not (run_dir / "status.json").exists()


def test_train_refuses_turbo_without_protection_and_passes_the_variant_to_the_config(comfy):
    make_images(comfy.folders["input"] / "photos", count=2)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
    )
    dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
    plan = tiny_plan(comfy)
    turbo = comfy.folders["diffusion_models"] / "tiny_turbo.safetensors"
    turbo.write_bytes((comfy.folders["diffusion_models"] / "tiny.safetensors").read_bytes())
    settings = defaults(train_node.WIDGETS, run_name="turbo")
    with pytest.raises(ValueError, match="contains 'turbo'.*model.training_adapter"):
        train_node.Train().train(plan, dataset, "tiny_turbo.safetensors", **settings)
    with pytest.raises(ValueError, match="model.variant = 'turbo'"):  # explicit, whatever the file is called
        train_node.Train().train(plan, dataset, "tiny.safetensors", model_variant="turbo", **settings)
    assert not any(comfy.folders["whetstone_runs"].iterdir())
    values = train_node.check_all(train_node.WIDGETS, settings) | {
        "variant": pack_module("nodes.variant_inputs").model_settings({"turbo_training": "dedistilled"})
    }
    config = train_node.build_config(plan, dataset.path, turbo, comfy.root / "r", comfy.root / "l.safetensors", values)
    assert (config.model.variant, config.model.turbo_training, config.model.training_adapter) == (
        "auto",
        "dedistilled",
        "",
    )


def test_full_fine_tune_writes_the_model_into_diffusion_models_and_load_trained_model_takes_the_run(comfy, monkeypatch):
    """Mode full: the model lands in diffusion_models/whetstone/<run>.safetensors (listed by ComfyUI, never over a
    base model's name); the run links to Load Trained Model, which refuses a file whose keys do not all fit."""
    from training.model.weights import read_header

    model_node = pack_module("nodes.model_node")
    bridge = pack_module("nodes.comfy_bridge")
    make_images(comfy.folders["input"] / "photos", count=2)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
    )
    dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
    plan_settings = defaults(plan_node.WIDGETS, tier="cpu", mode="full", resolution=256, target_batch=1)
    plan = plan_node.TrainingPlan().plan("tiny.safetensors", **plan_settings)["result"][0]
    settings = defaults(train_node.WIDGETS, run_name="ft", steps=2, save_every=0, caption_dropout=0.0)
    run, name, report = train_node.Train().train(plan, dataset, "tiny.safetensors", **settings)["result"]
    assert run.state == "completed", report
    assert name == run.model_name == "whetstone/ft.safetensors" and name in comfy.list_files("diffusion_models")
    assert run.model_path == comfy.folders["diffusion_models"] / "whetstone" / "ft.safetensors"
    assert "model whetstone/ft.safetensors saved in diffusion_models" in report
    assert not (comfy.folders["loras"] / "ft.safetensors").exists()

    def fake_loader(path):  # ComfyUI's loader builds the tiny model's keys; the real one: tests/integration
        model_keys = set(ZImageTransformer(PRESETS["tiny"]).state_dict())
        file_keys = set(read_header(path))
        return "patcher", sorted(model_keys - file_keys), sorted(file_keys - model_keys)

    monkeypatch.setattr(bridge, "load_diffusion_model", fake_loader)
    loaded, text = model_node.LoadTrainedModel().load("", run=run)["result"]
    assert loaded == "patcher" and "0 missing and 0 unexpected keys" in text
    assert model_node.LoadTrainedModel.VALIDATE_INPUTS(None, {"run": "WHETSTONE_RUN"}) is True
    assert "not in the diffusion_models folder" in model_node.LoadTrainedModel.VALIDATE_INPUTS("nope", {})
    save_weights({"stray.weight": torch.zeros(2)}, comfy.folders["diffusion_models"] / "stray.safetensors")
    with pytest.raises(ValueError, match=r"weight\(s\) missing .* 1 tensor\(s\) unused \(stray.weight\)"):
        model_node.LoadTrainedModel().load("stray.safetensors")
    lora_run = pack_module("nodes.values").RunRef(
        run_dir=run.run_dir, lora_path=run.lora_path, lora_name="x", state="completed"
    )
    with pytest.raises(ValueError, match="trained a LoRA, not the full model"):
        model_node.LoadTrainedModel().load("", run=lora_run)


def test_a_fine_tune_never_overwrites_the_model_it_trains(comfy):
    base = comfy.folders["diffusion_models"] / "whetstone" / "ft.safetensors"
    base.parent.mkdir()
    base.write_bytes((comfy.folders["diffusion_models"] / "tiny.safetensors").read_bytes())
    with pytest.raises(ValueError, match="would write the fine-tune over the model it trains"):
        train_node.fine_tune_path("ft", base)


def test_an_ema_planned_in_the_plan_node_is_saved_beside_the_lora(comfy):
    make_images(comfy.folders["input"] / "photos", count=2)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
    )
    dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
    plan_settings = defaults(plan_node.WIDGETS, tier="cpu", resolution=256, lora_rank=4, target_batch=1, ema="auto")
    plan = plan_node.TrainingPlan().plan("tiny.safetensors", **plan_settings)["result"][0]
    assert plan.ema == "device"  # the CPU tier: the training process's memory, priced
    settings = defaults(train_node.WIDGETS, run_name="avg", steps=2, save_every=0, caption_dropout=0.0)
    output = train_node.Train().train(plan, dataset, "tiny.safetensors", ema_decay=0.9, **settings)
    run, name, report = output["result"]
    assert run.state == "completed", report
    assert (comfy.folders["loras"] / "avg_ema.safetensors").is_file() and "avg_ema.safetensors" in report
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["ema"] == {"placement": "device", "decay": 0.9, "start_step": 0}
    with pytest.raises(ValueError, match=r"ema_decay=2.0 is outside"):
        train_node.Train().train(plan, dataset, "tiny.safetensors", ema_decay=2.0, **settings)
