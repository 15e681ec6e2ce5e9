"""Our transformer equals diffusers' ZImageTransformer2DModel (float32, weights copied across)."""

from __future__ import annotations

import pytest
import torch
from model_helpers import diffusers_forward, diffusers_twin, randomize, relative_error

from training.model.config import PRESETS
from training.model.zimage import ZImageTransformer

TOLERANCE = 1e-5

CASES = {
    # name: (batch, latent H, latent W, caption lengths, sigmas)
    "equal-captions": (2, 8, 8, [32, 32], [0.3, 0.9]),
    "ragged-captions": (3, 10, 6, [7, 45, 70], [0.05, 0.5, 1.0]),
    "not-multiples-of-32": (2, 14, 10, [13, 19], [0.25, 0.75]),
    "single": (1, 6, 12, [1], [0.0]),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ours = ZImageTransformer(PRESETS["tiny"]).float().eval()
    randomize(ours)
    return ours, diffusers_twin(ours)


def make_inputs(batch, height, width, caption_lengths, sigmas, seed=1):
    generator = torch.Generator().manual_seed(seed)
    cfg = PRESETS["tiny"]
    latents = torch.randn(batch, cfg.in_channels, height, width, generator=generator)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=generator) for n in caption_lengths]
    return latents, torch.tensor(sigmas), captions


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_diffusers(models, case):
    ours, twin = models
    latents, sigma, captions = make_inputs(*CASES[case])
    with torch.no_grad():
        expected = diffusers_forward(twin, latents, sigma, captions)
        got = ours(latents, sigma, captions)
    assert got.shape == latents.shape
    assert relative_error(got, expected) <= TOLERANCE


def test_padded_tensor_input_equals_list_input(models):
    ours, _ = models
    latents, sigma, captions = make_inputs(*CASES["ragged-captions"])
    padded = torch.nn.utils.rnn.pad_sequence(captions, batch_first=True)
    lengths = torch.tensor([c.shape[0] for c in captions])
    with torch.no_grad():
        assert torch.equal(ours(latents, sigma, padded, lengths), ours(latents, sigma, captions))


def test_batch_equals_samples_run_alone(models):
    ours, _ = models
    latents, sigma, captions = make_inputs(*CASES["ragged-captions"])
    with torch.no_grad():
        together = ours(latents, sigma, captions)
        alone = torch.cat([ours(latents[i : i + 1], sigma[i : i + 1], captions[i : i + 1]) for i in range(3)])
    assert relative_error(together, alone) <= TOLERANCE


def test_odd_latent_sizes_are_padded_and_cropped(models):
    ours, twin = models
    latents, sigma, captions = make_inputs(2, 7, 9, [5, 5], [0.4, 0.6])
    with torch.no_grad():
        out = ours(latents, sigma, captions)
    assert out.shape == latents.shape


def test_no_mask_when_padded_caption_lengths_agree(models, monkeypatch):
    ours, _ = models
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        seen.append(attn_mask)
        return original(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    latents, sigma, captions = make_inputs(2, 8, 8, [20, 31], [0.5, 0.5])  # both pad to 32
    with torch.no_grad():
        ours(latents, sigma, captions)
    assert seen and all(m is None for m in seen)
    seen.clear()
    latents, sigma, captions = make_inputs(2, 8, 8, [20, 40], [0.5, 0.5])  # 32 vs 64
    with torch.no_grad():
        ours(latents, sigma, captions)
    assert any(m is not None for m in seen)
