"""The flow-matching objective: ComfyUI's x_σ and target, σ samplers, per-sample determinism, caption dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.data.batches import Batch
from training.engine.objective import FlowObjective, expected_sigma_quantile, replace_captions, shift_sigma
from training.engine.synthetic import global_sample_indices
from training.model.config import PRESETS
from training.model.zimage import ZImageTransformer

CPU = torch.device("cpu")


class Recorder(nn.Module):
    """Returns a fixed prediction and remembers what the objective fed it."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction

    def forward(self, latents, sigma, features, lengths):
        self.seen = (latents, sigma, features, lengths)
        return self.prediction


def batch(size: int = 3, tokens: int = 5, dim: int = 8) -> Batch:
    generator = torch.Generator().manual_seed(1)
    return Batch(
        keys=[str(i) for i in range(size)],
        captions=["x"] * size,
        size=(32, 32),
        latents=torch.randn(size, 16, 4, 4, generator=generator),
        caption_features=torch.randn(size, tokens, dim, generator=generator),
        caption_lengths=torch.full((size,), tokens),
    )


def test_shifted_sigma_is_comfyuis_time_shift():
    u = torch.tensor([0.0, 0.5, 1.0])
    assert shift_sigma(u, 3.0).tolist() == pytest.approx([0.0, 0.75, 1.0])  # σ = 3u / (1 + 2u)
    assert shift_sigma(u, 1.0).tolist() == pytest.approx(u.tolist())


@pytest.mark.parametrize("sampler", ["shifted_uniform", "logit_normal", "uniform"])
def test_sigma_samplers_follow_their_distribution(sampler):
    objective = FlowObjective(sampler=sampler, seed=3)
    sigma, _, _ = objective.draw(list(range(4000)), (1,), CPU)
    assert 0 <= sigma.min() and sigma.max() <= 1
    assert sigma.median().item() == pytest.approx(expected_sigma_quantile(objective, 0.5), abs=0.03)
    assert sigma.quantile(0.9).item() == pytest.approx(expected_sigma_quantile(objective, 0.9), abs=0.03)


def test_draws_depend_on_the_sample_index_only():
    objective = FlowObjective(caption_dropout=0.5, seed=7)
    together = objective.draw([10, 11, 12], (16, 4, 4), CPU)
    alone = objective.draw([11], (16, 4, 4), CPU)
    for joint, single in zip(together, alone):
        assert torch.equal(joint[1:2], single)
    other_seed = FlowObjective(caption_dropout=0.5, seed=8).draw([11], (16, 4, 4), CPU)
    assert not torch.equal(other_seed[2], alone[2])


def test_loss_is_comfyuis_flow_objective():
    """x_σ = σ·ε + (1−σ)·x0, the model gets σ itself, and the float32 MSE is taken against x0 − ε."""
    objective = FlowObjective(seed=0)
    data = batch()
    prediction = torch.randn(3, 16, 4, 4)
    model = Recorder(prediction)
    out = objective.loss(model, data, [0, 1, 2], empty_caption=None)
    sigma, _, noise = objective.draw([0, 1, 2], (16, 4, 4), CPU)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(model.seen[0], s * noise + (1 - s) * data.latents)
    torch.testing.assert_close(model.seen[1], sigma)
    expected = ((prediction - (data.latents - noise)) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.per_sample.mean(), expected)
    assert out.loss.dtype == torch.float32


def test_caption_dropout_swaps_in_the_empty_caption():
    empty = torch.randn(7, 8)  # longer than the batch's captions: the batch is padded to fit
    data = batch(tokens=5)
    model = Recorder(torch.zeros(3, 16, 4, 4))
    FlowObjective(caption_dropout=1.0).loss(model, data, [0, 1, 2], empty_caption=empty)
    features, lengths = model.seen[2], model.seen[3]
    assert features.shape == (3, 7, 8) and lengths.tolist() == [7, 7, 7]
    assert torch.equal(features[1], empty)
    FlowObjective(caption_dropout=0.0).loss(model, data, [0, 1, 2], empty_caption=None)
    assert torch.equal(model.seen[2], data.caption_features)
    with pytest.raises(ValueError, match="caption_dropout"):
        FlowObjective(caption_dropout=0.5).loss(model, data, [0, 1, 2], empty_caption=None)


def test_replace_captions_keeps_the_kept_ones():
    features, lengths = torch.randn(2, 6, 4), torch.tensor([6, 3])
    out, out_lengths = replace_captions(features, lengths, torch.tensor([False, True]), torch.ones(2, 4))
    assert torch.equal(out[0], features[0]) and out_lengths.tolist() == [6, 2]
    assert torch.equal(out[1, :2], torch.ones(2, 4)) and not out[1, 2:].any()


def test_zero_token_captions_are_not_an_option():
    """Why caption dropout uses stored features of "": a batch of empty (0-token) captions breaks the model."""
    model = ZImageTransformer(PRESETS["tiny"])
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 16, 4, 4), torch.rand(2), torch.randn(2, 3, 32), torch.tensor([0, 0]))


def test_bucket_stats():
    objective = FlowObjective(n_buckets=4)
    stats = objective.bucket_stats(torch.tensor([0.1, 0.2, 0.9, 1.0]), torch.tensor([1.0, 3.0, 5.0, 7.0]))
    means = objective.bucket_means(stats)
    assert means == {"0.00-0.25": 2.0, "0.25-0.50": None, "0.50-0.75": None, "0.75-1.00": 6.0}


@pytest.mark.parametrize("world_size,micro_batch,grad_accum", [(2, 2, 1), (4, 1, 3), (3, 2, 2)])
def test_global_batch_is_split_the_same_on_any_process_count(world_size, micro_batch, grad_accum):
    """Micro-step m on W ranks of micro-batch b holds the samples micro-step m of one rank with micro-batch W·b does."""
    for step in range(3):
        for micro in range(grad_accum):
            one = global_sample_indices(
                step, micro, rank=0, world_size=1, micro_batch=world_size * micro_batch, grad_accum=grad_accum
            )
            many = [
                global_sample_indices(
                    step, micro, rank=r, world_size=world_size, micro_batch=micro_batch, grad_accum=grad_accum
                )
                for r in range(world_size)
            ]
            assert [i for part in many for i in part] == one


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="sigma sampler"):
        FlowObjective(sampler="cosine")
    with pytest.raises(ValueError, match="shift"):
        FlowObjective(shift=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        FlowObjective(caption_dropout=1.5)
