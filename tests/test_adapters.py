"""DoRA, LoKr and LoHa beside LoRA: peft layers, float32 merge, the ComfyUI-form file (fused qkv as exact q/k/v
slices), reading it back, applying it as ComfyUI does, QLoRA support and parameter counts."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import randomize
from safetensors import safe_open

from training.engine.config import TrainConfig
from training.model.adapter_file import FILE_KINDS
from training.model.config import PRESETS, ZImageConfig
from training.model.lora import (
    LoraSettings,
    adapter_file_state,
    attach_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
)
from training.model.lora_file import load_lora_file, merge_lora_file_into, save_lora_file
from training.model.targets import adapter_param_count, kronecker_factors, lora_param_count
from training.model.zimage import ZImageTransformer
from training.vocabulary import ADAPTER_TYPES

NEW_TYPES = ("dora", "lokr", "loha")
#: float32: the merged weight vs the adapter as a side branch (outputs of ~30; measured ≤ 9e-5 absolute).
MERGE_TOLERANCE = 1e-5
#: float32: the file applied the ComfyUI way vs the engine's merge, relative to the weight (measured 0 and 1.7e-7).
FILE_MERGE_TOLERANCE = 1e-6
CFG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def base():
    model = ZImageTransformer(CFG).float().eval()
    randomize(model, seed=0)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def with_adapter(base, settings: LoraSettings, seed: int = 3) -> ZImageTransformer:
    """A copy of ``base`` with the adapter attached and every trained tensor moved off its (often zero) init."""
    model = attach_lora(copy.deepcopy(base), settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, CFG.in_channels, 8, 8, generator=generator)
    captions = [torch.randn(n, CFG.cap_feat_dim, generator=generator) for n in (5, 9)]
    return latents, torch.tensor([0.3, 0.7]), captions


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs())


def relative_to_weight(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def settings_for(adapter: str, **overrides) -> LoraSettings:
    return LoraSettings(**{"rank": 4, "alpha": 2.0, "targets": "all", "adapter": adapter, **overrides})


# ---- settings, config, refusals -------------------------------------------------------------------------------------


def test_adapter_vocabulary_is_checked_everywhere():
    assert ADAPTER_TYPES == ("lora", "dora", "lokr", "loha")
    with pytest.raises(ValueError, match=r"LoraSettings.adapter must be one of .*'lokr'.*got 'lycoris'"):
        LoraSettings(adapter="lycoris")
    with pytest.raises(ValueError, match=r"lora.adapter must be one of .*got 'oft'"):
        TrainConfig.from_dict({"run": {"output_dir": "x"}, "data": {"synthetic": True}, "lora": {"adapter": "oft"}})
    assert (
        TrainConfig.from_dict(
            {"run": {"output_dir": "x"}, "data": {"synthetic": True}, "lora": {"adapter": "loha"}}
        ).lora.adapter
        == "loha"
    )


@pytest.mark.parametrize("adapter", ["lokr", "loha"])
def test_qlora_refuses_lokr_and_loha_naming_why(adapter):
    with pytest.raises(ValueError, match=rf"lora.adapter: adapter '{adapter}' cannot train on mode 'qlora'.*packed"):
        TrainConfig.from_dict(
            {"mode": "qlora", "run": {"output_dir": "x"}, "data": {"synthetic": True}, "lora": {"adapter": adapter}}
        )
    assert TrainConfig.from_dict(
        {"mode": "qlora", "run": {"output_dir": "x"}, "data": {"synthetic": True}, "lora": {"adapter": "dora"}}
    )


def _nf4_block():
    from training.engine.quantize import quantize_blocks

    model = ZImageTransformer(CFG).float()
    randomize(model, seed=0)
    quantize_blocks(model, model.blocks(), compute_dtype=torch.float32)
    return model


@pytest.mark.parametrize("adapter", ["lokr", "loha"])
def test_peft_still_cannot_run_lokr_or_loha_on_a_4bit_base(adapter):
    """The reason for the refusal above: if peft learns to, this fails and the refusal can go."""
    pytest.importorskip("bitsandbytes")
    model = attach_lora(_nf4_block(), settings_for(adapter))
    with pytest.raises(RuntimeError):
        run(model)


def test_dora_trains_on_a_4bit_base_and_merges_to_its_output():
    pytest.importorskip("bitsandbytes")
    model = attach_lora(_nf4_block(), settings_for("dora"))
    latents, sigma, captions = inputs()
    model(latents, sigma, captions).square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_lokr_whose_qkv_factor_would_move_another_width_is_refused():
    """dim 32 = 4 x 8: the fused qkv needs decompose factor 12 (rows 12 x 8, thirds 4 x 8); peft applies one factor
    to every layer, and a feed-forward width of 96 would then split 12 x 8 instead of its default 8 x 12."""
    odd = ZImageConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, ffn_hidden_dim=96, cap_feat_dim=16,
                       axes_dims=(4, 6, 6))  # fmt: skip
    with pytest.raises(ValueError, match=r"fused qkv \[96, 32\].*decompose factor 12 \(rows 12 x 8\).*\[96\]"):
        attach_lora(ZImageTransformer(odd), settings_for("lokr", targets="attention+ffn"))
    model = attach_lora(ZImageTransformer(odd), settings_for("lokr", targets="attention"))  # no ffn: fine
    assert tuple(lora_layers(model)["layers.0.attention.qkv"].lokr_w1["default"].shape) == (12, 4)
    attach_lora(ZImageTransformer(odd), settings_for("loha", targets="attention+ffn"))  # LoHa slices any height


@pytest.mark.parametrize("config", [PRESETS["tiny"], PRESETS["z-image"]], ids=["tiny", "z-image"])
def test_lokr_qkv_thirds_have_the_default_lokr_shape_of_a_square_linear(config):
    """Each q/k/v third of the fused LoKr (w1's rows split in 3, w2 shared) has the factors peft (and diffusers'
    re-derivation) give a [d, d] linear by default; every other targeted linear keeps peft's default split."""
    d = config.dim
    with torch.device("meta"):
        model = attach_lora(ZImageTransformer(config), settings_for("lokr", rank=32, targets="all"))
    (a, b), default_qkv_rows = kronecker_factors(d), kronecker_factors(3 * d)
    for name, layer in lora_layers(model).items():
        w1 = layer.lokr_w1["default"]
        full = "default" in layer.lokr_w2
        w2_rows = (layer.lokr_w2 if full else layer.lokr_w2_a)["default"].shape[0]
        w2_cols = (layer.lokr_w2 if full else layer.lokr_w2_b)["default"].shape[1]
        assert (w1.shape[1], w2_cols) == kronecker_factors(layer.in_features)
        if name.endswith("attention.qkv"):
            assert (w1.shape[0], w2_rows) == (3 * a, b) != default_qkv_rows
        else:
            assert (w1.shape[0], w2_rows) == kronecker_factors(layer.out_features)


def test_kronecker_factors_are_peft_s_factorization():
    from peft.tuners.lokr.layer import factorization

    pairs = [(dim, f) for dim in range(1, 300) for f in (-1, 0, 1, 2, 3, 7, 12, 24, 64)] + [(11520, 180), (3840, 180)]
    assert [kronecker_factors(dim, f) for dim, f in pairs] == [factorization(dim, f) for dim, f in pairs]


# ---- peft layers and merging -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", NEW_TYPES)
def test_attach_wraps_every_target_and_trains_only_the_adapter(base, adapter):
    model = attach_lora(copy.deepcopy(base), settings_for(adapter))
    assert type(model) is ZImageTransformer and len(lora_layers(model)) > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("base_layer" not in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter_param_count(CFG, 4, "all", adapter)
    assert run(model).allclose(run(base), atol=1e-5)  # every type starts as the identity


@pytest.mark.parametrize("adapter", ADAPTER_TYPES)
@pytest.mark.parametrize("targets", ["attention", "attention+ffn", "attention+ffn+refiners", "all"])
def test_param_count_formula_matches_peft(adapter, targets):
    model = attach_lora(ZImageTransformer(CFG), LoraSettings(rank=8, targets=targets, adapter=adapter))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter_param_count(
        CFG, 8, targets, adapter
    )
    if adapter == "lora":
        assert adapter_param_count(CFG, 8, targets, adapter) == lora_param_count(CFG, 8, targets)


@pytest.mark.parametrize("adapter", ADAPTER_TYPES)
def test_merge_equals_the_adapter_output(base, adapter):
    model = with_adapter(base, settings_for(adapter))
    expected = run(model)
    assert not expected.allclose(run(base), atol=1e-2)
    merged = merge_lora(copy.deepcopy(model))
    assert not lora_layers(merged)
    assert (run(merged) - expected).abs().max().item() < MERGE_TOLERANCE * expected.abs().max().item()


# ---- files -----------------------------------------------------------------------------------------------------------


def _keys_and_metadata(path):
    with safe_open(str(path), framework="pt") as handle:
        return set(handle.keys()), handle.metadata()


@pytest.mark.parametrize("adapter", NEW_TYPES)
def test_file_uses_comfyui_keys_with_qkv_split_into_q_k_v(base, tmp_path, adapter):
    settings = settings_for(adapter)
    model = with_adapter(base, settings)
    path = tmp_path / f"{adapter}.safetensors"
    save_lora_file(path, adapter_file_state(model), settings, metadata={"steps": "7"})
    keys, metadata = _keys_and_metadata(path)
    assert all(key.startswith("diffusion_model.") for key in keys)
    assert not any(".qkv." in key or ".attention.out." in key for key in keys)
    assert all(key.endswith(tuple(f".{e}" for e in (*FILE_KINDS[adapter], "alpha"))) for key in keys)
    for part in ("to_q", "to_k", "to_v"):
        first = next(iter(FILE_KINDS[adapter]))
        assert f"diffusion_model.layers.0.attention.{part}.{first}" in keys
    assert "diffusion_model.layers.0.attention.to_out.0." + first in keys
    assert metadata["adapter"] == adapter and metadata["rank"] == "4" and metadata["steps"] == "7"
    if adapter == "dora":
        with safe_open(str(path), framework="pt") as handle:
            scale = handle.get_tensor("diffusion_model.layers.0.attention.to_k.dora_scale")
        assert scale.shape == (CFG.dim, 1) and scale.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adapter", NEW_TYPES)
def test_save_load_round_trip_gives_the_same_adapter(base, tmp_path, adapter, dtype):
    settings = settings_for(adapter)
    model = with_adapter(base, settings)
    path = tmp_path / "a.safetensors"
    save_lora_file(path, adapter_file_state(model), settings, dtype=dtype)
    loaded = load_lora_file(path)
    assert loaded.settings == settings
    again = attach_lora(copy.deepcopy(base), loaded.settings)
    load_lora_state_dict(again, loaded.state)
    original, restored = lora_state_dict(model), lora_state_dict(again)
    assert original.keys() == restored.keys()
    for key in original:
        if "magnitude" in key:  # from the float32 dora_scale, which was computed with the unrounded A and B
            tolerance = 2e-6 if dtype == torch.float32 else 1e-3
            torch.testing.assert_close(restored[key], original[key], rtol=tolerance, atol=tolerance, msg=key)
        else:
            assert torch.equal(restored[key], original[key].to(dtype).float()), key
    if dtype == torch.float32:
        assert (run(again) - run(model)).abs().max().item() < MERGE_TOLERANCE * run(model).abs().max().item()


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("adapter", ADAPTER_TYPES)
def test_file_applied_the_comfyui_way_equals_the_engine_merge(base, tmp_path, adapter, strength):
    """``merge_lora_file_into`` follows ComfyUI 0.8's weight_adapter math (the real one: tests/integration)."""
    settings = settings_for(adapter)
    model = with_adapter(base, settings)
    path = tmp_path / "a.safetensors"
    save_lora_file(path, adapter_file_state(model), settings, dtype=torch.float32)
    patched = copy.deepcopy(base)
    assert merge_lora_file_into(patched, path, strength) == 0
    merged = merge_lora(copy.deepcopy(model)).state_dict()
    for name, weight in patched.state_dict().items():
        expected = base.state_dict()[name] + strength * (merged[name] - base.state_dict()[name])  # ComfyUI's blend
        assert relative_to_weight(weight, expected) <= FILE_MERGE_TOLERANCE, name


def test_dora_file_state_needs_the_trained_base(base, tmp_path):
    settings = settings_for("dora")
    model = with_adapter(base, settings)
    path = tmp_path / "d.safetensors"
    save_lora_file(path, adapter_file_state(model), settings)
    loaded = load_lora_file(path)
    assert any(key.endswith(".dora_scale.weight") for key in loaded.state)
    with pytest.raises(ValueError, match="not a DoRA layer; attach adapter 'dora'"):
        load_lora_state_dict(attach_lora(copy.deepcopy(base), settings_for("lora")), loaded.state)
