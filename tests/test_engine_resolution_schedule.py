"""The resolution schedule's rules (which step trains which resolution, the effective batch, the σ shift per
resolution), the loader restricted to one resolution's buckets, and the compile bounds from the image shapes."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch

from tests.data_fixtures import make_dataset
from training.data.loader import ShardLoader
from training.data.pack import PackConfig, pack_dataset
from training.engine.build import random_model
from training.engine.compile_bounds import compile_bounds
from training.engine.config import RunSection, TrainConfig
from training.engine.objective import shift_sigma
from training.engine.parallelize import COMPILE_RECOMPILE_LIMIT, apply_compile
from training.engine.resolution_schedule import ResolutionSection
from training.engine.sigma_shift import resolution_shift
from training.model.config import PRESETS


def test_progressive_stages_split_the_steps_by_fraction():
    section = ResolutionSection(schedule="progressive", stages=[[512, 0.4], [1024, 1.0]])
    assert section.resolutions == (512, 1024)
    assert [section.resolution_at(step, 10, seed=0) for step in range(10)] == [512] * 4 + [1024] * 6
    three = ResolutionSection(schedule="progressive", stages=[[512, 0.25], [768, 0.5], [1024, 1.0]])
    assert Counter(three.resolution_at(step, 8, seed=0) for step in range(8)) == {512: 2, 768: 2, 1024: 4}


def test_mix_draws_each_step_from_the_weights_as_a_function_of_seed_and_step():
    section = ResolutionSection(schedule="mix", weights={"512": 0.3, "1024": 0.7})
    draws = [section.resolution_at(step, 2000, seed=7) for step in range(2000)]
    assert draws == [section.resolution_at(step, 2000, seed=7) for step in range(2000)]  # no state: resumable
    assert draws.count(512) / len(draws) == pytest.approx(0.3, abs=0.04)
    assert draws != [section.resolution_at(step, 2000, seed=8) for step in range(2000)]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"schedule": "mix"}, "needs resolutions.weights"),
        ({"schedule": "mix", "weights": {"500": 1.0}}, r"key '500' must be a pack resolution"),
        ({"schedule": "mix", "weights": {"512": 0}}, r"weights\['512'\]: must be a number > 0"),
        ({"schedule": "progressive", "stages": [[512, 0.4]]}, "must end at 1.0"),
        ({"schedule": "progressive", "stages": [[512, 0.6], [1024, 0.5]]}, r"stages\[1\]: the fraction 0.5"),
        ({"schedule": "none", "micro_batch": {"512": 2}}, "need a resolutions.schedule"),
        ({"schedule": "linear"}, "resolutions.schedule must be one of"),
        (
            {"schedule": "mix", "weights": {"512": 1}, "micro_batch": {"768": 2}},
            r"micro_batch names 768 px, which the schedule does not train \(512\)",
        ),
        ({"schedule": "mix", "weights": {"512": 1}, "shift_rule": "log"}, "resolutions.shift_rule"),
    ],
)
def test_bad_sections_name_the_key(section, message):
    with pytest.raises(ValueError, match=message):
        ResolutionSection(**section)


def test_every_resolution_must_keep_the_effective_batch(tmp_path):
    resolutions = {
        "schedule": "progressive",
        "stages": [[512, 0.5], [1024, 1.0]],
        "micro_batch": {"512": 8, "1024": 2},
        "grad_accum": {"512": 1, "1024": 3},
    }
    config = {"run": {"output_dir": str(tmp_path), "micro_batch": 2, "grad_accum": 4}, "resolutions": resolutions}
    with pytest.raises(ValueError, match=r"1024 px has micro_batch 2 x grad_accum 3 = 6 samples .* = 8"):
        TrainConfig.from_dict(config)
    resolutions["grad_accum"]["1024"] = 4
    loaded = TrainConfig.from_dict(TrainConfig.from_dict(config).to_dict())  # round trip
    assert loaded.resolutions.sizes(512, loaded.run) == (8, 1) and loaded.resolutions.sizes(1024, loaded.run) == (2, 4)
    assert loaded.resolutions.stages == ((512, 0.5), (1024, 1.0))
    run = RunSection(output_dir=str(tmp_path), micro_batch=2, grad_accum=4)
    assert loaded.resolutions.sizes(768, run) == (2, 4)  # unset: the run's own


def test_sigma_shift_scales_with_the_side_as_sd3_prescribes():
    assert resolution_shift(3.0, 1024) == pytest.approx(3.0)
    assert resolution_shift(3.0, 512) == pytest.approx(1.5)  # sqrt(512² / 1024²) = 1/2
    assert resolution_shift(3.0, 512, rule="constant") == 3.0
    # shifting by α then by the base shift is one shift by their product: the rule composes with ComfyUI's shift
    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_sigma(shift_sigma(u, 0.5), 3.0), shift_sigma(u, 1.5))


@pytest.mark.parametrize(("samples_per_shard", "layout"), [(1000, "samples"), (1, "shards")])
def test_loader_restricted_to_one_resolution_yields_only_its_buckets(tmp_path, samples_per_shard, layout):
    make_dataset(tmp_path / "in", 9, sizes=((144, 96), (96, 144), (192, 192)))
    config = PackConfig(
        input_dir=tmp_path / "in",
        output_dir=tmp_path / "out",
        resolution=(64, 128),
        store_image=True,
        samples_per_shard=samples_per_shard,
    )
    result = pack_dataset(config)
    for resolution, buckets in result.resolutions.items():
        loader = ShardLoader(result.output_dir, batch_size=2, num_workers=0, buckets=frozenset(buckets))
        assert loader.layout == layout
        seen = [batch for batch in loader]
        assert {f"{b.size[0]}x{b.size[1]}" for b in seen} == set(buckets), resolution
        assert sum(len(b) for b in seen) == sum(buckets.values()) == loader.samples
        assert len(seen) == loader.num_batches()
        assert all({key.rsplit("_r", 1)[1] for key in b.keys} == {resolution} for b in seen)


def test_compile_bounds_follow_the_image_shapes():
    one = compile_bounds(1, COMPILE_RECOMPILE_LIMIT)
    assert one.recompile_limit == COMPILE_RECOMPILE_LIMIT and one.dynamic is None
    many = compile_bounds(6, COMPILE_RECOMPILE_LIMIT)
    assert many.recompile_limit == 6 * COMPILE_RECOMPILE_LIMIT and many.dynamic is False
    assert "6 image shapes" in many.reason


def test_several_image_shapes_compile_one_static_graph_each(caplog):
    """With the shapes bounded, a third image size gets its own static graph: dynamo's default would have turned the
    second into a dynamic-shape graph serving every later size."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = random_model(PRESETS["tiny"], dtype=torch.float32, device=torch.device("cpu"), seed=0)
    with caplog.at_level(logging.INFO, logger="training.engine.compile_bounds"):
        apply_compile(model, backend="aot_eager", image_shapes=3)
    assert "3 image shapes" in caplog.text and "recompile limit" in caplog.text
    assert torch._dynamo.config.recompile_limit >= 3 * COMPILE_RECOMPILE_LIMIT
    captions = torch.randn(1, 16, PRESETS["tiny"].cap_feat_dim)
    graphs = []
    with torch.no_grad():
        for side in (16, 24, 32):  # 64, 144 and 256 image tokens (the model pads to multiples of 32)
            counters.clear()
            model(torch.randn(1, PRESETS["tiny"].in_channels, side, side), torch.tensor([0.5]), captions)
            graphs.append(counters["stats"]["unique_graphs"])
    assert all(count > 0 for count in graphs), graphs  # every new size compiled, none served by a dynamic graph
    torch._dynamo.reset()
