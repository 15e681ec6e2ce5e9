"""Preview Settings -> Train -> Training Report with previews (tiny model, bridge faked, engine for real): the prompts
are encoded with the wired CLIP before the run, the previews decoded with the wired VAE's weights and sent to the
Train node, and the report draws them as a grid below its charts."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from test_nodes_pack import FakeCLIP, FakeVAE, make_images
from test_nodes_support import pack_module
from test_nodes_train import comfy, defaults, tiny_plan  # noqa: F401 (comfy is a fixture)

from tests.encoder_fixtures import diffusers_to_flux, tiny_diffusers_vae

previews = pack_module("nodes.previews")
train_node = pack_module("nodes.train_node")
report_node = pack_module("nodes.report_node")
pack_node = pack_module("nodes.pack_node")
bridge = pack_module("nodes.comfy_bridge")


class StateModule(torch.nn.Module):
    def __init__(self, state):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):
        return dict(self._state)


class FakeFluxVAE:
    """A ComfyUI VAE object as far as previews look at it: first_stage_model with the Flux VAE's keys."""

    def __init__(self):
        self.first_stage_model = StateModule(diffusers_to_flux(tiny_diffusers_vae(0).state_dict(), decoder=True))


def settings(**overrides):
    values = defaults(previews.WIDGETS, validation_prompts="a red cat\n\n  a blue dog  \n", every=1, steps=2)
    return {**values, "width": 64, "height": 64, **overrides}


def test_preview_settings_encode_now_and_refuse_mistakes(comfy):  # noqa: F811
    (request,) = previews.PreviewSettings().settings(FakeCLIP(), FakeFluxVAE(), **settings())
    assert request.prompts.texts == ["a red cat", "a blue dog"]
    assert torch.equal(request.prompts.positives[0], FakeCLIP().inner.encode(["a red cat"])[0])
    with pytest.raises(ValueError, match="validation_prompts is empty"):
        previews.PreviewSettings().settings(FakeCLIP(), FakeFluxVAE(), **settings(validation_prompts=" \n"))
    with pytest.raises(ValueError, match="width=72 must be a multiple of 16"):
        previews.PreviewSettings().settings(FakeCLIP(), FakeFluxVAE(), **settings(width=72))
    with pytest.raises(ValueError, match="no decoder|16-channel|Flux"):
        previews.PreviewSettings().settings(FakeCLIP(), FakeVAE(), **settings())


@pytest.mark.slow
def test_train_shows_previews_and_the_report_draws_them(comfy, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setattr(train_node, "STOP_TIMEOUT_SECONDS", 10.0)
    monkeypatch.setattr(bridge, "temp_directory", lambda: tmp_path / "temp")
    watchdog = threading.Timer(180.0, lambda: setattr(comfy, "interrupted", True))
    watchdog.start()
    try:
        make_images(comfy.folders["input"] / "photos", count=2)
        pack_settings = defaults(
            pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
        )
        dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
        (request,) = previews.PreviewSettings().settings(FakeCLIP(), FakeFluxVAE(), **settings())
        values = defaults(train_node.WIDGETS, run_name="preview_run", steps=2, save_every=0)
        output = train_node.Train().train(
            tiny_plan(comfy), dataset, "tiny.safetensors", unique_id="7", preview_settings=request, **values
        )
    finally:
        watchdog.cancel()
    run = output["result"][0]
    assert run.state == "completed"
    sent = [data for event, data in comfy.events if event == previews.PREVIEW_EVENT]
    assert [data["step"] for data in sent] == [0, 1, 2] and all(data["node"] == "7" for data in sent)
    for data in sent:
        assert data["prompts"] == ["a red cat", "a blue dog"] and len(data["images"]) == 2
        for image in data["images"]:
            assert image["type"] == "temp" and image["subfolder"] == "whetstone_previews/preview_run"
            with Image.open(tmp_path / "temp" / image["subfolder"] / image["filename"]) as png:
                assert png.size == (64, 64)
    chart, _ = report_node.TrainingReport().report(run=run, **defaults(report_node.WIDGETS))
    plain = report_node.report_image([], 20)
    assert chart.shape[1] > plain.shape[1]  # the preview grid below the charts


def test_zero_steps_and_cfg_leave_them_to_the_model_variant(tmp_path):
    defaults_section = previews.preview_section(tmp_path, settings(steps=0, cfg=0.0))
    assert (defaults_section["steps"], defaults_section["cfg"]) == (None, None)  # the engine takes the variant's
    chosen = previews.preview_section(tmp_path, settings(steps=12, cfg=3.5))
    assert (chosen["steps"], chosen["cfg"]) == (12, 3.5)
    assert (previews.WIDGETS["steps"].default, previews.WIDGETS["cfg"].default) == (0, 0.0)
