"""σ-sampling and loss-weighting recipes: each sampler's distribution (quantiles and moments), the resolution-aware
shift rules, the loss weights, config validation, and that a run with a non-default recipe resumes exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tests.test_engine_objective import batch
from tests.test_engine_runs import assert_same_curve, tiny_config, train_in_process
from training.engine.config import TrainConfig
from training.engine.objective import (
    FlowObjective,
    expected_sigma_quantile,
    image_tokens,
    loss_weights,
    rule_shift,
    shift_sigma,
)
from training.vocabulary import LOSS_WEIGHTINGS, SIGMA_SAMPLERS

CPU = torch.device("cpu")
N = 3000
SHAPE = (1, 2, 2)  # 1 image token: the fixed-shift samplers ignore the size


def sigmas(objective: FlowObjective, shape=SHAPE, n: int = N) -> torch.Tensor:
    return objective.draw(list(range(n)), shape, CPU)[0].double()


@pytest.mark.parametrize("sampler", SIGMA_SAMPLERS)
def test_every_sampler_follows_its_quantiles(sampler):
    objective = FlowObjective(sampler=sampler, seed=11)
    drawn = sigmas(objective)
    assert 0 <= drawn.min() and drawn.max() <= 1
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        expected = expected_sigma_quantile(objective, q, objective.shift_for(SHAPE))
        assert drawn.quantile(q).item() == pytest.approx(expected, abs=0.025), f"q={q}"


def test_sampler_moments_match_their_closed_forms():
    s = 3.0  # E[s·u / (1 + (s − 1)·u)] for u ~ U(0, 1)
    shifted_mean = s / (s - 1) * (1 - math.log(s) / (s - 1))
    assert sigmas(FlowObjective(sampler="shifted_uniform", shift=s)).mean().item() == pytest.approx(
        shifted_mean, abs=0.01
    )
    uniform = sigmas(FlowObjective(sampler="uniform"))
    assert (uniform.mean().item(), uniform.var().item()) == pytest.approx((0.5, 1 / 12), abs=0.01)
    for symmetric in ("logit_normal", "mode", "cosmap"):  # σ ↔ 1 − σ symmetric: mean 1/2
        assert sigmas(FlowObjective(sampler=symmetric)).mean().item() == pytest.approx(0.5, abs=0.01), symmetric
    # mode (s = 1.29) and logit-normal(0, 1) concentrate mid-range, cosmap less so: variance below uniform's
    for sampler, variance in (("mode", 0.0464), ("logit_normal", 0.0434)):
        assert sigmas(FlowObjective(sampler=sampler)).var().item() == pytest.approx(variance, abs=0.004), sampler
    assert sigmas(FlowObjective(sampler="cosmap")).var().item() < 1 / 12


def test_shift_rules_follow_flux_and_sd3():
    assert rule_shift("fixed", 3.0, 999) == 3.0
    assert rule_shift("flux", 3.0, 256) == pytest.approx(math.exp(0.5))  # diffusers calculate_shift's end points
    assert rule_shift("flux", 3.0, 4096) == pytest.approx(math.exp(1.15))
    assert rule_shift("sd3", 3.0, 4096) == pytest.approx(3.0)  # objective.shift is the 1024² shift
    assert rule_shift("sd3", 3.0, 1024) == pytest.approx(1.5)  # √(1024 / 4096) at 512²
    assert image_tokens((16, 128, 128)) == 4096 and image_tokens((16, 5, 7)) == 12  # 2×2 patches, padded


@pytest.mark.parametrize("rule", ["flux", "sd3"])
def test_resolution_aware_shift_moves_sigma_with_the_image_size(rule):
    objective = FlowObjective(sampler="shifted_logit_normal", shift_rule=rule, seed=2)
    small, large = (sigmas(objective, shape, 2000) for shape in ((1, 64, 64), (1, 128, 128)))
    assert large.median().item() > small.median().item() + 0.05  # bigger images: more noise (SD3 §5.3.2)
    for shape, drawn in (((1, 64, 64), small), ((1, 128, 128), large)):
        shift = rule_shift(rule, 3.0, image_tokens(shape))
        assert drawn.median().item() == pytest.approx(float(shift_sigma(torch.tensor(0.5), shift)), abs=0.03)


def test_sampler_changes_sigma_only():
    """Every sampler consumes the same draws: noise and caption dropout of a sample stay the same."""
    base = FlowObjective(sampler="shifted_uniform", caption_dropout=0.5, seed=4).draw([3, 9], SHAPE, CPU)
    for sampler in SIGMA_SAMPLERS:
        other = FlowObjective(sampler=sampler, caption_dropout=0.5, seed=4).draw([3, 9], SHAPE, CPU)
        assert torch.equal(other[1], base[1]) and torch.equal(other[2], base[2]), sampler


def test_draws_of_every_sampler_depend_on_the_sample_index_only():
    """What makes a resumed run exact whatever the recipe: σ of a sample never depends on its batch."""
    for sampler in SIGMA_SAMPLERS:
        objective = FlowObjective(sampler=sampler, shift_rule="flux" if "shifted" in sampler else "fixed", seed=5)
        together = objective.draw([20, 21, 22], SHAPE, CPU)[0]
        assert torch.equal(objective.draw([21], SHAPE, CPU)[0], together[1:2]), sampler


def test_density_weights_integrate_to_one_and_reweight_uniform_sigma():
    sigma = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000  # midpoint rule over (0, 1)
    for weighting in ("cosmap", "logit_normal"):  # both are densities of σ: their mean under uniform σ is 1
        assert loss_weights(weighting, sigma).mean().item() == pytest.approx(1.0, abs=1e-3), weighting
    # uniform σ weighted by the logit-normal density gives logit-normal σ's moments (SD3 §3.1's equivalence)
    drawn = sigmas(FlowObjective(sampler="logit_normal", logit_mean=0.5, logit_std=0.8), n=8000)
    weighted = (loss_weights("logit_normal", sigma, 0.5, 0.8) * sigma**2).mean().item()
    assert weighted == pytest.approx((drawn**2).mean().item(), abs=0.005)
    assert loss_weights("sigma_sqrt", torch.tensor([0.5, 0.25])).tolist() == pytest.approx([4.0, 16.0])
    assert torch.equal(loss_weights("none", sigma), torch.ones_like(sigma))


@pytest.mark.parametrize("weighting", LOSS_WEIGHTINGS)
def test_weighted_loss_is_the_mean_of_weighted_per_sample_errors(weighting):
    data = batch()

    class Zero(nn.Module):
        def forward(self, latents, sigma, features, lengths):
            return torch.zeros_like(latents)

    objective = FlowObjective(sampler="uniform", loss_weighting=weighting, seed=1)
    output = objective.loss(Zero(), data, [0, 1, 2], None)
    sigma, _, noise = objective.draw([0, 1, 2], tuple(data.latents.shape[1:]), CPU)
    per_sample = ((data.latents - noise) ** 2).flatten(1).mean(1)
    assert torch.allclose(output.per_sample, per_sample)  # the σ-bucket metric stays unweighted
    expected = (loss_weights(weighting, sigma) * per_sample).mean()
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        ({"sigma_sampler": "sigmoid"}, "objective.sigma_sampler must be one of"),
        ({"shift_rule": "dynamic"}, "objective.shift_rule must be one of"),
        ({"loss_weighting": "min_snr"}, "objective.loss_weighting must be one of"),
        ({"sigma_sampler": "cosmap", "shift_rule": "flux"}, "sigma_sampler 'cosmap' has no shift"),
        ({"mode_scale": 2.0}, "objective.mode_scale"),
        ({"shift": 0}, "objective.shift"),
    ],
)
def test_config_refuses_bad_recipes_naming_the_key(tmp_path, objective, message):
    config = {"run": {"output_dir": str(tmp_path)}, "objective": objective}
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(config)


@pytest.mark.parametrize(
    "recipe",
    [
        {"sigma_sampler": "shifted_logit_normal", "shift_rule": "flux", "loss_weighting": "logit_normal"},
        {"sigma_sampler": "mode", "loss_weighting": "cosmap"},
    ],
)
def test_a_run_with_a_recipe_resumes_exactly(tmp_path, recipe):
    def config(run: str, steps: int) -> dict:
        result = tiny_config(tmp_path / run, micro_batch=2, grad_accum=1, save_every=2)
        result["run"]["steps"] = steps
        result["optim"] = {"lr": 1e-3}
        result["objective"] = dict(recipe)
        return result

    reference = train_in_process(config("reference", 3))
    assert len(train_in_process(config("run", 2))) == 2
    resumed = train_in_process(config("run", 3))
    assert_same_curve(resumed, reference, rel=0)
    default = train_in_process(config("default", 1) | {"objective": {}})
    assert default[0]["loss"] != reference[0]["loss"]  # the recipe is in effect, not ignored
    written = TrainConfig.from_dict(copy.deepcopy(config("x", 1))).to_dict()["objective"]
    assert {key: written[key] for key in recipe} == recipe
