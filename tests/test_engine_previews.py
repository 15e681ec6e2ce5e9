"""Previews during training (tiny model, CPU, float32): the ComfyUI sampling pieces, the config, the feature file,
and that a run with previews trains exactly as one without (losses, gradient norms, resume) while writing them."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from tests.test_engine_runs import assert_same_curve, tiny_config, train_in_process
from training.engine.config import TrainConfig
from training.engine.preview import (
    PreviewError,
    PreviewSchedule,
    build_previewer,
    load_prompt_features,
    read_preview,
    read_preview_events,
    save_prompt_features,
)
from training.model.config import preset
from training.model.sampling import SamplerSettings, comfy_noise, sample_zimage, sigma_table, simple_sigmas
from training.run.events import read_events

FEATURE_DIM = preset("tiny").cap_feat_dim
STEPS = 4


def test_simple_schedule_is_comfyuis():
    """Values of ComfyUI 0.8's simple_scheduler on ModelSamplingDiscreteFlow (checked bit for bit against ComfyUI
    itself for shifts 1, 3, 6 and 1..1000 steps when this was written; the integration test samples through it)."""
    assert simple_sigmas(4, 3.0).tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-7)
    table = sigma_table(6.0)
    assert len(table) == 1000 and float(table[-1]) == 1.0
    assert float(table[0]) == pytest.approx(6 * 0.001 / (1 + 5 * 0.001), rel=1e-6)
    sigmas = simple_sigmas(3, 6.0)
    assert sigmas.tolist()[1] == pytest.approx(float(table[-1 - int(1000 / 3)]))
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0


def test_noise_is_comfyuis_stream_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    noise = comfy_noise((1, 16, 4, 6), seed=1234)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # what ComfyUI's prepare_noise does
    assert torch.equal(noise, torch.randn((1, 16, 4, 6)))


def test_sampler_settings_are_validated():
    with pytest.raises(ValueError, match="steps"):
        SamplerSettings(steps=0)
    with pytest.raises(ValueError, match="cfg"):
        SamplerSettings(cfg=float("nan"))
    with pytest.raises(ValueError, match="shift"):
        SamplerSettings(shift=0.0)


def test_euler_with_cfg_follows_comfyuis_formulas():
    """A model whose raw output is a known function: one Euler step from σ=1 to 0 lands on the CFG-mixed
    denoised prediction x + σ·raw (NextDiT's −img under CONST)."""

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, sigma, captions):
            return -0.5 * x + captions.mean() * self.weight

    positive, negative = torch.full((3, 8), 2.0), torch.full((2, 8), -1.0)
    settings = SamplerSettings(steps=1, cfg=3.0, seed=5)
    out = sample_zimage(Linear(), positive, negative, settings, latent_shape=(16, 2, 2), device=torch.device("cpu"))
    noise = comfy_noise((1, 16, 2, 2), 5)[0]
    cond, uncond = noise + (-0.5 * noise + 2.0), noise + (-0.5 * noise - 1.0)
    torch.testing.assert_close(out, uncond + (cond - uncond) * 3.0, rtol=1e-6, atol=1e-6)


def write_features(path, count=2, negative=True):
    generator = torch.Generator().manual_seed(3)
    positives = [torch.randn(5 + i, FEATURE_DIM, generator=generator) for i in range(count)]
    save_prompt_features(
        path,
        [f"prompt {i}" for i in range(count)],
        positives,
        torch.randn(3, FEATURE_DIM, generator=generator) if negative else None,
    )
    return positives


def test_feature_file_round_trips_and_bad_files_are_refused(tmp_path):
    path = tmp_path / "prompts.safetensors"
    positives = write_features(path)
    loaded = load_prompt_features(path, feature_dim=FEATURE_DIM)
    assert loaded.texts == ("prompt 0", "prompt 1")
    for got, want in zip(loaded.positives, positives, strict=True):
        assert torch.equal(got, want)
    assert loaded.negative.shape == (3, FEATURE_DIM)
    with pytest.raises(PreviewError, match=r"\[tokens, 64\]"):
        load_prompt_features(path, feature_dim=64)
    with pytest.raises(PreviewError, match="does not exist"):
        load_prompt_features(tmp_path / "missing.safetensors", feature_dim=FEATURE_DIM)
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    with pytest.raises(PreviewError, match="not a readable"):
        load_prompt_features(tmp_path / "junk.safetensors", feature_dim=FEATURE_DIM)


def test_preview_config_is_validated(tmp_path):
    config = tiny_config(tmp_path)
    for key, value, message in [
        ("width", 100, "preview.width: must be a multiple of 16"),
        ("steps", 0, "preview.steps"),
        ("cfg", 0, "preview.cfg"),
        ("colour", 1, "unknown key"),
    ]:
        bad = copy.deepcopy(config)
        bad["preview"] = {key: value}
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_dict(bad)


def test_schedule():
    schedule = PreviewSchedule(every=3, at_start=True, total_steps=7)
    assert [s for s in range(8) if schedule.due(s)] == [0, 3, 6, 7]
    assert [s for s in range(8) if PreviewSchedule(every=0, at_start=False, total_steps=7).due(s)] == [7]


def with_previews(config: dict, features, **settings) -> dict:
    config = copy.deepcopy(config)
    config["preview"] = {"features": str(features), "every": 2, "steps": 2, "width": 32, "height": 48, **settings}
    return config


def short_run(run_dir, **run) -> dict:
    config = tiny_config(run_dir, micro_batch=2, grad_accum=1, **run)
    config["run"]["steps"] = STEPS
    config["optim"] = {"lr": 1e-3}  # constant: a run can be extended
    config["lora"]["dropout"] = 0.2  # a model left in eval mode by the previews would train differently
    return config


def test_previews_do_not_change_training_and_are_written(tmp_path):
    features = tmp_path / "prompts.safetensors"
    write_features(features)
    reference = train_in_process(short_run(tmp_path / "plain"))
    previewed = train_in_process(with_previews(short_run(tmp_path / "previews"), features, cfg=2.5))
    assert_same_curve(previewed, reference, rel=0)

    events = read_preview_events(tmp_path / "previews")
    assert [e["step"] for e in events] == [0, 2, 4]
    assert events[0]["prompts"] == ["prompt 0", "prompt 1"] and events[0]["cfg"] == 2.5
    first, last = (read_preview(tmp_path / "previews", e) for e in (events[0], events[-1]))
    assert [tuple(x.shape) for x in last] == [(16, 6, 4)] * 2
    assert not torch.equal(first[0], last[0])  # the weights changed between step 0 and 4
    assert not torch.equal(last[0], last[1])  # each prompt conditions its own sample
    assert not (tmp_path / "plain" / "previews.jsonl").exists()


def test_a_resumed_run_with_previews_equals_one_without(tmp_path):
    features = tmp_path / "prompts.safetensors"
    write_features(features, negative=False)
    reference = train_in_process(short_run(tmp_path / "plain"))
    first = with_previews(short_run(tmp_path / "run", save_every=2), features)
    first["run"]["steps"] = 2
    train_in_process(first)
    resumed = copy.deepcopy(first)
    resumed["run"]["steps"] = STEPS
    train_in_process(resumed)
    assert_same_curve(read_events(tmp_path / "run"), reference, rel=0)
    assert [e["step"] for e in read_preview_events(tmp_path / "run")] == [0, 2, 4]  # not again at the resume


def test_cfg_without_any_negative_is_refused_and_the_empty_caption_fills_in(tmp_path):
    features = tmp_path / "prompts.safetensors"
    write_features(features, negative=False)
    config = TrainConfig.from_dict(with_previews(short_run(tmp_path / "run"), features, cfg=3.0))
    build = functools.partial(
        build_previewer, config, rank=0, device=torch.device("cpu"), feature_dim=FEATURE_DIM, forward_context=None
    )
    with pytest.raises(PreviewError, match="no 'negative' features and the data has no empty caption"):
        build(empty_caption=None)
    empty = torch.zeros(4, FEATURE_DIM)
    assert torch.equal(build(empty_caption=empty).prompts.negative, empty)
    assert (
        build_previewer(
            config,
            rank=1,
            device=torch.device("cpu"),
            feature_dim=FEATURE_DIM,
            empty_caption=empty,
            forward_context=None,
        )
        is None
    )  # LoRA on several ranks: rank 0 samples


def test_preview_events_of_a_resumed_run_replace_the_lost_ones(tmp_path):
    lines = [
        {"step": s, "file": f"step_{s:07d}.safetensors", "prompts": ["a"], "n": i} for i, s in enumerate((0, 2, 4, 2))
    ]
    text = "\n".join(json.dumps(line) for line in lines) + '\n{"step": 6, "file": "../../etc/passwd"}\n{"step": 8, "fi'
    (tmp_path / "previews.jsonl").write_text(text)
    assert [(e["step"], e["n"]) for e in read_preview_events(tmp_path)] == [(0, 0), (2, 3)]
    with pytest.raises(PreviewError, match="not step_NNNNNNN"):
        read_preview(tmp_path, {"file": "../../etc/passwd"})


def test_preview_events_python_refuses_to_convert_are_skipped(tmp_path):
    """Training Report and Wait for Run read previews.jsonl with read_preview_events: a line with a 5000-digit integer
    or nesting too deep is skipped like any line that is not JSON (it raised ValueError / RecursionError)."""
    lines = [
        json.dumps({"step": 0, "file": "step_0000000.safetensors", "prompts": ["a"]}),
        '{"step": ' + "9" * 5000 + ', "file": "step_0000001.safetensors", "prompts": ["a"]}',
        "[" * 100_000,
        json.dumps({"step": 2, "file": "step_0000002.safetensors", "prompts": ["a"]}),
    ]
    (tmp_path / "previews.jsonl").write_text("\n".join(lines) + "\n")
    assert [event["step"] for event in read_preview_events(tmp_path)] == [0, 2]


def test_a_preview_event_whose_file_is_not_its_steps_is_skipped(tmp_path):
    """An event names its step's own latents (step_NNNNNNN, seven digits): one that names another step's file would
    show that step's images under its own number (its PNGs are named by the step), and a step of 10**7 and more
    (up to a 4300-digit one) has no file name, no image route and no exact JavaScript number."""
    good = {"step": 5, "file": "step_0000005.safetensors", "prompts": ["a"]}
    hostile = [
        {"step": 3, "file": "step_0000001.safetensors", "prompts": ["a"]},
        {"step": 10**7, "file": "step_0000000.safetensors", "prompts": ["a"]},
        {"step": 10**7, "file": "step_10000000.safetensors", "prompts": ["a"]},
        {"step": -1, "file": "step_-000001.safetensors", "prompts": ["a"]},
        {"step": 10**4000, "file": "step_0000009.safetensors", "prompts": ["a"]},
    ]
    (tmp_path / "previews.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [good, *hostile]))
    assert read_preview_events(tmp_path) == [good]


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("base", SamplerSettings(steps=20, cfg=4.0, shift=3.0)), ("turbo", SamplerSettings(steps=8, cfg=1.0, shift=3.0))],
)
def test_unset_preview_settings_are_the_model_variants(tmp_path, variant, expected):
    features = tmp_path / "prompts.safetensors"
    write_features(features, negative=True)
    build = functools.partial(
        build_previewer,
        rank=0,
        device=torch.device("cpu"),
        feature_dim=FEATURE_DIM,
        empty_caption=None,
        forward_context=None,
        variant=variant,
    )
    unset = with_previews(short_run(tmp_path / "run"), features)
    del unset["preview"]["steps"]
    config = TrainConfig.from_dict(unset)
    assert (config.preview.steps, config.preview.cfg, config.preview.shift) == (None, None, None)
    assert build(config).settings == expected
    chosen = TrainConfig.from_dict(with_previews(short_run(tmp_path / "run"), features, steps=5, cfg=2.0, shift=6.0))
    assert build(chosen).settings == SamplerSettings(steps=5, cfg=2.0, shift=6.0)  # what the user set is kept
