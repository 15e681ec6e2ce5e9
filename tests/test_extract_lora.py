"""A LoRA extracted from a full fine-tune (SVD of each targeted weight's change): the error falls with the rank and
vanishes at full rank, the file is a ComfyUI LoRA that merges back into the base as the truncated change, and the
CLI refuses mistakes with exit code 2."""

from __future__ import annotations

import pytest
import torch

from training.__main__ import main
from training.engine.build import random_model
from training.model.config import preset
from training.model.extract import extract_lora, low_rank, save_extracted, targeted
from training.model.lora_file import load_lora_file, merge_lora_file_into
from training.model.weights import load_transformer, save_weights

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and a 'fine-tune' whose attention and FFN weights changed by a full-rank amount (fp32 files)."""
    folder = tmp_path_factory.mktemp("extract")
    base = random_model(preset("tiny"), dtype=torch.float32, device=CPU, seed=0)
    save_weights(base, folder / "base.safetensors")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in base.parameters():
            if param.ndim == 2:  # a decaying spectrum, as fine-tuning changes are
                out, inp = param.shape
                u, v = torch.randn(out, 8, generator=generator), torch.randn(8, inp, generator=generator)
                param.add_(
                    u * torch.logspace(0, -2, 8) @ v * 0.01 + 1e-4 * torch.randn(param.shape, generator=generator)
                )
    save_weights(base, folder / "tuned.safetensors")
    return folder / "base.safetensors", folder / "tuned.safetensors"


def test_low_rank_is_exact_at_full_rank_and_the_error_falls_with_rank():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 7, generator=generator)
    errors = [low_rank(delta, rank)[2] for rank in range(1, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-6
    a, b, _ = low_rank(delta, 7)
    torch.testing.assert_close(b @ a, delta, rtol=1e-5, atol=1e-5)


def test_the_extracted_error_falls_with_rank(models):
    base, tuned = models
    means = [extract_lora(base, tuned, rank=rank, targets="attention+ffn").mean_error for rank in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(means, means[1:])), means
    assert means[-1] < 0.05 < means[0]


def test_the_file_is_a_lora_that_merges_back_to_the_truncated_change(models, tmp_path):
    base, tuned = models
    path = tmp_path / "extracted.safetensors"
    extracted = extract_lora(base, tuned, rank=8, targets="attention+ffn")
    save_extracted(extracted, path, rank=8, targets="attention+ffn", source="tuned.safetensors")
    loaded = load_lora_file(path)
    assert (loaded.settings.rank, loaded.settings.targets) == (8, "attention+ffn")
    assert loaded.metadata["extracted_from"] == "tuned.safetensors"
    merged = load_transformer(base, dtype=torch.float32)
    merge_lora_file_into(merged, path)
    tuned_state, merged_state = load_transformer(tuned, dtype=torch.float32).state_dict(), merged.state_dict()
    base_state = load_transformer(base, dtype=torch.float32).state_dict()
    for name, weight in merged_state.items():
        module = targeted(name, "attention+ffn")
        change = (tuned_state[name] - base_state[name]).norm()
        if module is None:
            assert torch.equal(weight, base_state[name]), name  # untargeted: unchanged
        else:  # the bf16 file rounds A and B: within a few % of the change
            assert (weight - tuned_state[name]).norm() <= 0.05 * change + extracted.errors[module] * change, name


def test_cli_writes_the_file_and_refuses_mistakes(models, tmp_path, capsys):
    base, tuned = models
    out = tmp_path / "cli.safetensors"
    assert main(["extract-lora", "--base", str(base), "--tuned", str(tuned), "--rank", "4", "--out", str(out)]) == 0
    assert out.is_file() and "rank 4" in capsys.readouterr().out
    assert main(["extract-lora", "--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"
    save_weights(random_model(preset("tiny").replace(n_layers=1), dtype=torch.float32, device=CPU, seed=0), other)
    assert main(["extract-lora", "--base", str(other), "--tuned", str(tuned), "--out", str(out)]) == 2
    assert "is not a fine-tune of" in capsys.readouterr().err
