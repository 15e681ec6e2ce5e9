"""What a background run hands on: Wait for Run gives a full fine-tune's model (as the foreground Train node does) and
a LoRA run's LoRA, a background Train of mode full names its model, and a background run with Preview Settings has
its prompts' features written into the run folder for the engine (tiny model on the CPU, bridge faked)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_nodes_jobs import comfy, defaults, job, runs, start_in_background, wait_for  # noqa: F401 (comfy: fixture)
from test_nodes_pack import FakeCLIP, FakeVAE, make_images
from test_nodes_previews import FakeFluxVAE
from test_nodes_previews import settings as preview_values
from test_nodes_support import pack_module

from training.engine.preview import load_prompt_features, read_preview, read_preview_events
from training.engine.preview_images import image_path, to_image
from training.lock import FolderLock
from training.model.config import PRESETS
from training.model.weights import read_header, save_weights
from training.model.zimage import ZImageTransformer
from training.run.events import write_status
from training.run.jobs import JobRecord, JobStore

wait_node = pack_module("nodes.wait_node")
train_node = pack_module("nodes.train_node")
plan_node = pack_module("nodes.plan_node")
pack_node = pack_module("nodes.pack_node")
model_node = pack_module("nodes.model_node")
previews = pack_module("nodes.previews")
preview_jobs = pack_module("nodes.preview_jobs")
report_node = pack_module("nodes.report_node")
bridge = pack_module("nodes.comfy_bridge")
values = pack_module("nodes.values")


def launched_job(fake, name: str, queued_at: float) -> None:
    (runs(fake) / name).mkdir()
    with JobStore(runs(fake)).edit() as records:
        records.append(JobRecord(run=name, queued_at=queued_at, launched_at=queued_at + 1))


def fine_tune_handle(fake, name: str):
    """The handle background Train returns for a full fine-tune (`nodes.background.submit`)."""
    return values.RunRef(
        run_dir=runs(fake) / name,
        lora_path=fake.folders["loras"] / f"{name}.safetensors",
        lora_name=f"{name}.safetensors",
        state="queued",
        model_path=fake.folders["diffusion_models"] / "whetstone" / f"{name}.safetensors",
        model_name=f"whetstone/{name}.safetensors",
    )


def test_wait_for_an_ended_full_fine_tune_gives_its_model(comfy):  # noqa: F811
    launched_job(comfy, "ft", time.time() - 60)
    run = fine_tune_handle(comfy, "ft")
    run.model_path.parent.mkdir(parents=True)
    run.model_path.write_bytes(b"the fine-tuned model")
    write_status(run.run_dir, "completed", "completed at step 2 of 2")
    done, name, state = wait_node.WaitForRun().wait(run, until="end", timeout_minutes=1)
    assert name == "whetstone/ft.safetensors" == done.model_name and done.model_path == run.model_path
    assert done.state == "completed" and state == "completed: completed at step 2 of 2"
    assert not run.lora_path.exists(), "a full fine-tune has no LoRA; its model is the result"


def test_wait_until_lora_goes_on_once_the_fine_tune_saved_its_model(comfy):  # noqa: F811
    launched_job(comfy, "live", time.time() - 60)
    run = fine_tune_handle(comfy, "live")
    write_status(run.run_dir, "running", "step 5 of 9")
    run.model_path.parent.mkdir(parents=True)
    run.model_path.write_bytes(b"saved at the end, before the process exits")
    lock = FolderLock(run.run_dir, "training").acquire()  # the run's process still holds its folder
    try:
        done, name, state = wait_node.WaitForRun().wait(run, until="lora", timeout_minutes=1)
    finally:
        lock.release()
    assert (name, done.state, state) == ("whetstone/live.safetensors", "running", "running: step 5 of 9")


def test_a_model_left_by_an_earlier_run_of_the_name_is_not_the_result(comfy):  # noqa: F811
    queued = time.time() - 60
    launched_job(comfy, "old", queued)
    run = fine_tune_handle(comfy, "old")
    run.model_path.parent.mkdir(parents=True)
    run.model_path.write_bytes(b"an earlier run's model")
    os.utime(run.model_path, (queued - 3600, queued - 3600))
    run.lora_path.write_bytes(b"a LoRA of the same name: not a full fine-tune's result")
    write_status(run.run_dir, "stopped", "removed from the queue before it started")
    with pytest.raises(RuntimeError, match="ended .*without saving its model"):
        wait_node.WaitForRun().wait(run, until="end", timeout_minutes=1)


def packed(fake):
    torch.manual_seed(0)
    save_weights(ZImageTransformer(PRESETS["tiny"]), fake.folders["diffusion_models"] / "tiny.safetensors")
    make_images(fake.folders["input"] / "photos", count=2)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
    )
    return pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"][0]


def plan_for(mode: str):
    settings = defaults(plan_node.WIDGETS, tier="cpu", mode=mode, resolution=256, lora_rank=4, target_batch=1)
    return plan_node.TrainingPlan().plan("tiny.safetensors", **settings)["result"][0]


@pytest.mark.slow
def test_a_background_full_fine_tune_names_its_model_and_wait_for_run_hands_it_to_load_trained_model(
    comfy,  # noqa: F811
    monkeypatch,
):
    dataset = packed(comfy)
    run, name, report = start_in_background(comfy, dataset, plan_for("full"), "bgft", steps=2)
    model = comfy.folders["diffusion_models"] / "whetstone" / "bgft.safetensors"
    assert name == run.model_name == "whetstone/bgft.safetensors" and run.model_path == model
    assert f"model (when saved): {model}" in report and "LoRA" not in report
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["run"]["model_path"] == str(model) and config["mode"] == "full"

    done, waited_name, state = wait_node.WaitForRun().wait(run, until="lora", timeout_minutes=5)
    assert waited_name == name and done.model_path == model and state.startswith(("completed", "running"))
    wait_node.WaitForRun().wait(run, until="end", timeout_minutes=5)
    finished = job("bgft")
    assert (finished["state"], finished["lora_name"], finished["model_name"]) == ("completed", None, name)
    assert name in comfy.list_files("diffusion_models") and not (comfy.folders["loras"] / "bgft.safetensors").exists()
    assert read_header(model).keys() == ZImageTransformer(PRESETS["tiny"]).state_dict().keys()

    monkeypatch.setattr(bridge, "load_diffusion_model", lambda path: (f"patcher of {path.name}", [], []))
    loaded, text = model_node.LoadTrainedModel().load("", run=done)["result"]
    assert loaded == "patcher of bgft.safetensors" and "0 missing and 0 unexpected keys" in text


@pytest.mark.slow
def test_a_background_run_with_preview_settings_writes_the_prompts_and_wait_for_run_decodes_the_previews(
    comfy,  # noqa: F811
    monkeypatch,
    tmp_path,
):
    monkeypatch.setattr(bridge, "temp_directory", lambda: tmp_path / "temp")
    dataset = packed(comfy)
    (request,) = previews.PreviewSettings().settings(FakeCLIP(), FakeFluxVAE(), **preview_values())
    run, _, report = start_in_background(comfy, dataset, plan_for("lora"), "bgprev", steps=2, preview_settings=request)
    assert "decoded with the wired VAE on this ComfyUI's CPU when shown" in report
    features_file = run.run_dir / previews.FEATURES_FILE
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["preview"]["features"] == str(features_file) and config["preview"]["every"] == 1
    written = load_prompt_features(features_file, feature_dim=PRESETS["tiny"].cap_feat_dim)
    assert written.texts == ("a red cat", "a blue dog")
    for got, encoded in zip(written.positives, request.prompts.positives, strict=True):
        assert torch.equal(got, encoded.float())
    assert torch.equal(written.negative, request.prompts.negative.float())

    done, _, state = wait_node.WaitForRun().wait(run, until="end", timeout_minutes=5, unique_id="9")
    assert done.state == "completed", state
    sampled = read_preview_events(run.run_dir)
    assert [event["step"] for event in sampled] == [0, 1, 2]
    assert all(event["prompts"] == ["a red cat", "a blue dog"] for event in sampled)
    sent = [data for event, data in comfy.events if event == previews.PREVIEW_EVENT]
    assert [(data["node"], data["run"], data["step"]) for data in sent] == [("9", "bgprev", s) for s in (0, 1, 2)]
    for event in sampled:  # decoded with the wired VAE into the run folder, as the foreground Train node does
        for index in range(2):
            with Image.open(image_path(run.run_dir, event["step"], index)) as image:
                assert image.size == (64, 64)
    assert all((tmp_path / "temp" / image["subfolder"] / image["filename"]).is_file() for image in sent[-1]["images"])
    grid = report_node.report_image([], 20, run.run_dir)
    assert grid.shape[1] > 620, "Training Report draws the previews below its charts"


@pytest.mark.slow
def test_a_background_runs_previews_show_in_the_jobs_list_with_no_wait_for_run(comfy, monkeypatch):  # noqa: F811
    monkeypatch.setattr(preview_jobs, "_decoding", preview_jobs.PreviewDecoding())  # this test's worker thread
    dataset = packed(comfy)
    (request,) = previews.PreviewSettings().settings(FakeCLIP(), FakeFluxVAE(), **preview_values())
    run, _, report = start_in_background(comfy, dataset, plan_for("lora"), "bgshow", steps=2, preview_settings=request)
    assert "decoded with the wired VAE" in report
    wait_for(lambda: job("bgshow")["state"] == "completed", "the run's end")
    wait_for(lambda: (job("bgshow")["previews"] or {}).get("state") == "decoded", "its latest preview decoded", 60)
    card = job("bgshow")["previews"]
    assert card["step"] == 2 and card["prompts"] == ["a red cat", "a blue dog"] and len(card["images"]) == 2
    wait_for(
        lambda: all(
            s["state"] == "decoded" for s in preview_jobs.respond("previews", {"run": "bgshow"}, None)[1]["steps"]
        ),
        "every preview step decoded",
        60,
    )
    events = read_preview_events(run.run_dir)
    assert [event["step"] for event in events] == [0, 1, 2]
    for event in events:  # each PNG is Preview Settings' decoder (the wired VAE) applied to the run's latent
        for index, latent in enumerate(read_preview(run.run_dir, event)):
            expected = np.asarray(to_image(request.decode(latent[None])[0]))
            with Image.open(image_path(run.run_dir, event["step"], index)) as image:
                assert np.array_equal(np.asarray(image.convert("RGB")), expected)
    url = card["images"][1]
    query = dict(part.split("=") for part in url.split("?")[1].split("&"))
    status, body = preview_jobs.respond("preview_image", query, None)
    assert status == 200 and body == image_path(run.run_dir, 2, 1).read_bytes()
    assert not [data for event, data in comfy.events if event == previews.PREVIEW_EVENT], "no node decoded them"
