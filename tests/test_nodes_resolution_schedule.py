"""Training Plan's resolution_schedule (issue 22's gap): the node plans a multi-resolution shard set as
`python -m training plan --resolution-schedule` does, Train writes the same `resolutions` section the CLI writes,
and a bad combination is refused with the CLI's message (naming the node's inputs instead of the flags)."""

from __future__ import annotations

import logging

import pytest
import torch
from test_nodes_pack import FakeCLIP, FakeVAE, make_images
from test_nodes_support import install_fake_comfy, pack_module

from tests.data_fixtures import make_dataset
from training.__main__ import main as cli_main
from training.data.encoders import TestLatentEncoder, TestTextEncoder
from training.data.pack import PackConfig, pack_dataset
from training.engine.config import TrainConfig
from training.model.config import PRESETS
from training.model.weights import save_weights
from training.model.zimage import ZImageTransformer

plan_node = pack_module("nodes.plan_node")
train_node = pack_module("nodes.train_node")
values_module = pack_module("nodes.values")
pack_node = pack_module("nodes.pack_node")

SIZES = ((160, 160), (192, 128), (128, 192))
SCHEDULES = {
    "progressive": {"resolution_stages": "64=0.5,128=1.0"},
    "mix": {"resolution_weights": "64=0.3,128=0.7"},
}
CLI_FLAGS = {"resolution_schedule": "--resolution-schedule", "resolution_weights": "--resolution-weights"}
CLI_FLAGS |= {"resolution_stages": "--resolution-stages", "the dataset input": "--shards"}


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = install_fake_comfy(tmp_path, monkeypatch)
    torch.manual_seed(0)
    save_weights(ZImageTransformer(PRESETS["tiny"]), fake.folders["diffusion_models"] / "tiny.safetensors")
    return fake


def packed(comfy, name: str, resolution) -> values_module.DatasetRef:
    """A tiny shard set in whetstone_datasets (the CLI's packer, as a ComfyUI user with a CLI-packed set has)."""
    images = comfy.root / f"{name}_images"
    make_dataset(images, 6, sizes=SIZES)
    output = comfy.folders["whetstone_datasets"] / name
    config = PackConfig(input_dir=images, output_dir=output, resolution=resolution)
    result = pack_dataset(config, latent_encoder=TestLatentEncoder(), text_encoder=TestTextEncoder())
    return values_module.DatasetRef(path=output, samples=result.samples, skipped=result.skipped)


def node_plan(dataset, **schedule):
    settings = {name: widget.default for name, widget in plan_node.WIDGETS.items()}
    settings |= {"tier": "cpu", "lora_rank": 4, "target_batch": 4}
    return plan_node.TrainingPlan().plan("tiny.safetensors", dataset=dataset, **settings, **schedule)["result"]


def cli_argv(shards, schedule: dict) -> list[str]:
    argv = ["plan", "--tier", "cpu", "--model", "tiny", "--rank", "4", "--batch", "4", "--shards", str(shards)]
    for name, value in schedule.items():
        argv += [CLI_FLAGS[name], value]
    return argv


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_the_node_writes_the_config_section_the_cli_writes(comfy, tmp_path, kind):
    dataset = packed(comfy, "multi", (64, 128))
    schedule = {"resolution_schedule": kind, **SCHEDULES[kind]}
    plan, table = node_plan(dataset, **schedule)
    assert "resolution schedule" in table and kind in table  # the decision, shown in the node's table
    assert "micro-batch x accumulation per resolution: 64 px" in " ".join(table.split())
    values = train_node.check_all(train_node.WIDGETS, {n: w.default for n, w in train_node.WIDGETS.items()})
    model = comfy.folders["diffusion_models"] / "tiny.safetensors"
    node_config = train_node.build_config(plan, dataset.path, model, tmp_path / "r", tmp_path / "l.safetensors", values)

    cli_path = tmp_path / "cli_run" / "config.json"
    assert cli_main([*cli_argv(dataset.path, schedule), "--write-config", str(cli_path)]) == 0
    cli_config = TrainConfig.load(cli_path).to_dict()
    node = node_config.to_dict()
    assert node["resolutions"] == cli_config["resolutions"]
    assert node["resolutions"]["schedule"] == kind and set(node["resolutions"]["micro_batch"]) == {"64", "128"}
    assert node["plan"] == cli_config["plan"]  # every decision, the schedule's row included
    for key in ("micro_batch", "grad_accum", "checkpoint_depth", "compile"):
        assert node["run"][key] == cli_config["run"][key], key
    loaded = TrainConfig.from_dict(node)  # the engine's checks: every resolution keeps the effective batch
    assert loaded.resolutions.resolutions == (64, 128)


def test_without_a_schedule_the_plan_and_config_are_unchanged(comfy, tmp_path):
    dataset = packed(comfy, "multi", (64, 128))
    plan, table = node_plan(dataset)
    assert not hasattr(plan, "resolutions") and "resolution schedule" not in table
    values = train_node.check_all(train_node.WIDGETS, {n: w.default for n, w in train_node.WIDGETS.items()})
    model = comfy.folders["diffusion_models"] / "tiny.safetensors"
    config = train_node.build_config(plan, dataset.path, model, tmp_path / "r", tmp_path / "l.safetensors", values)
    assert config.resolutions.schedule == "none"


REFUSALS = [
    ("single", {"resolution_schedule": "mix", "resolution_weights": "64=1"}, "was packed at one resolution"),
    ("multi", {"resolution_schedule": "mix", "resolution_weights": "64=1,256=1"}, "256 px, which"),
    ("multi", {"resolution_schedule": "mix", "resolution_weights": "64:1"}, "RES=NUMBER"),
    ("multi", {"resolution_schedule": "progressive", "resolution_stages": ""}, "is empty"),
    ("multi", {"resolution_schedule": "progressive", "resolution_weights": "64=1"}, "is for resolution_schedule mix"),
]


@pytest.mark.parametrize(("dataset_name", "schedule", "expected"), REFUSALS)
def test_a_bad_schedule_is_refused_with_the_clis_message(comfy, caplog, dataset_name, schedule, expected):
    dataset = packed(comfy, dataset_name, 64 if dataset_name == "single" else (64, 128))
    with pytest.raises(ValueError, match=expected) as refusal:
        node_plan(dataset, **schedule)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert cli_main(cli_argv(dataset.path, schedule)) == 2
    cli_message = caplog.records[-1].getMessage().removeprefix("plan: ")
    node_message = str(refusal.value)
    for node_name, flag in CLI_FLAGS.items():
        node_message = node_message.replace(node_name, flag)
    assert node_message == cli_message


def test_a_schedule_without_a_dataset_says_to_link_one(comfy, caplog):
    with pytest.raises(ValueError, match="resolution_schedule needs the dataset input"):
        node_plan(None, resolution_schedule="mix", resolution_weights="64=1")
    assert not any(comfy.folders["whetstone_runs"].iterdir())


@pytest.mark.slow
def test_a_progressive_schedule_planned_in_the_node_trains_through_train(comfy, monkeypatch):
    from training.run.events import read_events

    monkeypatch.setattr(train_node, "STOP_TIMEOUT_SECONDS", 10.0)
    dataset = packed(comfy, "multi", (64, 128))
    plan, _ = node_plan(dataset, resolution_schedule="progressive", resolution_stages="64=0.5,128=1.0")
    settings = {name: widget.default for name, widget in train_node.WIDGETS.items()}
    settings |= {"run_name": "multires", "steps": 4, "save_every": 0, "caption_dropout": 0.0}
    run, _, report = train_node.Train().train(plan, dataset, "tiny.safetensors", unique_id="7", **settings)["result"]
    assert run.state == "completed", report
    assert [e["resolution"] for e in read_events(run.run_dir)] == [64, 64, 128, 128]  # round(0.5 x 4) at 64 px
    assert run.summary["by_resolution"]["64"]["steps"] == 2 and run.summary["by_resolution"]["128"]["steps"] == 2


def test_pack_dataset_packs_more_resolutions_for_the_schedule(comfy, tmp_path):
    make_images(comfy.folders["input"] / "photos", count=3)
    settings = {name: widget.default for name, widget in pack_node.WIDGETS.items()}
    settings |= {"image_folder": "photos", "dataset_name": "both", "resolution": 256, "too_small": "upscale"}
    for bad in ("320,abc", "300", "8192"):
        with pytest.raises(ValueError, match="more_resolutions=.*must be a side in px"):
            pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), more_resolutions=bad, **settings)
    assert not any(comfy.folders["whetstone_datasets"].iterdir())
    output = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), more_resolutions=" 320, 256", **settings)
    dataset = output["result"][0]
    assert dataset.samples == 6  # 3 images x 2 resolutions
    plan, table = node_plan(dataset, resolution_schedule="mix", resolution_weights="256=1,320=3")
    values = train_node.check_all(train_node.WIDGETS, {n: w.default for n, w in train_node.WIDGETS.items()})
    model = comfy.folders["diffusion_models"] / "tiny.safetensors"
    config = train_node.build_config(plan, dataset.path, model, tmp_path / "r", tmp_path / "l.safetensors", values)
    assert config.resolutions.weights == {"256": 1.0, "320": 3.0} and config.resolutions.resolutions == (256, 320)
    cli_path = tmp_path / "cli_run" / "config.json"
    schedule = {"resolution_schedule": "mix", "resolution_weights": "256=1,320=3"}
    assert cli_main([*cli_argv(dataset.path, schedule), "--write-config", str(cli_path)]) == 0
    assert config.to_dict()["resolutions"] == TrainConfig.load(cli_path).to_dict()["resolutions"]
