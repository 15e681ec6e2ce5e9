"""LoRA: presets, gradient parity with diffusers + peft, file round trip, merging, and ComfyUI's way of applying it."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from model_helpers import diffusers_forward, diffusers_twin, randomize, relative_error
from safetensors.torch import load_file, save_file

from training.model import lora_file
from training.model.config import PRESETS
from training.model.lora import (
    LoraSettings,
    attach_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    target_module_names,
)
from training.model.lora_file import load_lora_file, merge_lora_file_into, save_lora_file
from training.model.zimage import ZImageTransformer

GRAD_TOLERANCE = 1e-5  # float32, ours (fused qkv) vs diffusers + peft (split q/k/v)
MERGE_TOLERANCE = 2e-6  # float32, W + s·B@A folded into the weight vs applied as a side branch (measured 8e-7)
DIM = PRESETS["tiny"].dim


@pytest.fixture(scope="module")
def base():
    model = ZImageTransformer(PRESETS["tiny"]).float().eval()
    randomize(model, seed=0)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def with_lora(base: ZImageTransformer, settings: LoraSettings, seed: int = 3) -> ZImageTransformer:
    """A copy of ``base`` with LoRA attached and non-zero A and B (peft starts B at zero: no gradient to A)."""
    model = attach_lora(copy.deepcopy(base), settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    cfg = PRESETS["tiny"]
    latents = torch.randn(3, cfg.in_channels, 10, 6, generator=generator)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=generator) for n in (7, 45, 20)]
    return latents, torch.tensor([0.1, 0.5, 0.9]), captions


def run(model, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(seed))


# ---- ComfyUI's LoRA loader, emulated from zimage.md §4 (independent of lora_file.py) ----------------------------------


def comfy_key_map(weight_names: list[str]) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """LoRA module name → (our weight, (row offset, rows) or None), for diffusers and generic names."""
    key_map = {}
    for name in weight_names:
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        targets = {module: None}
        if module.endswith(".attention.qkv"):
            block = module.removesuffix(".qkv")
            targets |= {f"{block}.{part}": (i * DIM, DIM) for i, part in enumerate(("to_q", "to_k", "to_v"))}
        else:
            targets[module.replace(".attention.out", ".attention.to_out.0")] = None
        for diffusers_module, rows in targets.items():
            for prefix in ("diffusion_model.", "transformer."):
                key_map[prefix + diffusers_module] = (name, rows)
    return key_map


def comfy_apply(state: dict, lora: dict, strength: float) -> tuple[dict, int]:
    """W += strength·(alpha/rank)·(up@down) in float32 on the mapped slice; returns (weights, unmatched keys)."""
    patched = {name: tensor.clone() for name, tensor in state.items()}
    loaded = set()
    for module, (target, rows) in comfy_key_map(list(state)).items():
        for down_name, up_name in (("lora_A", "lora_B"), ("lora_down", "lora_up")):
            down_key, up_key = f"{module}.{down_name}.weight", f"{module}.{up_name}.weight"
            if down_key not in lora:
                continue
            down, up = lora[down_key].float(), lora[up_key].float()
            alpha_key = f"{module}.alpha"
            scale = lora[alpha_key].item() / down.shape[0] if alpha_key in lora else 1.0
            loaded |= {down_key, up_key, alpha_key}
            weight = patched[target].float()
            view = weight if rows is None else weight.narrow(0, *rows)
            view += strength * scale * (up @ down)
            patched[target] = weight.to(state[target].dtype)
    return patched, len(set(lora) - loaded)


def plain_with(base: ZImageTransformer, weights: dict) -> ZImageTransformer:
    model = copy.deepcopy(base)
    model.load_state_dict(weights, strict=True)
    return model


# ---- settings and presets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value", [("rank", 0), ("rank", 2.5), ("alpha", 0.0), ("alpha", -1.0), ("dropout", 1.0), ("targets", "ffn")]
)
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"LoraSettings\.{field}.*{value!r}"):
        LoraSettings(**{field: value})


def test_settings_defaults():
    settings = LoraSettings()
    assert (settings.rank, settings.effective_alpha, settings.scale, settings.targets) == (
        16,
        16.0,
        1.0,
        "attention+ffn",
    )
    assert LoraSettings(rank=8, alpha=4.0).scale == 0.5


def test_presets_target_expected_modules(base):
    # tiny: 2 main layers, 1 noise_refiner (modulated) and 1 context_refiner (not modulated); 5 linears per block
    counts = {t: len(target_module_names(base, t)) for t in ("attention", "attention+ffn", "attention+ffn+refiners")}
    assert counts == {"attention": 4, "attention+ffn": 10, "attention+ffn+refiners": 20}
    names = target_module_names(base, "all")
    assert len(names) == 23 and "context_refiner.0.adaLN_modulation.0" not in names
    assert "noise_refiner.0.adaLN_modulation.0" in names and "layers.1.feed_forward.w2" in names


def test_attach_wraps_in_place_and_freezes_base(base):
    model = attach_lora(copy.deepcopy(base), LoraSettings(rank=4))
    assert type(model) is ZImageTransformer
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable) == 20 and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert "layers.0.attention.qkv.lora_A.default.weight" in trainable
    assert relative_error(run(model), run(base)) == 0.0  # peft starts B at zero
    state = lora_state_dict(model)
    assert state["layers.0.attention.qkv.lora_B.weight"].shape == (3 * DIM, 4)
    assert not any(".default." in key for key in state)
    with pytest.raises(ValueError, match="already has LoRA"):
        attach_lora(model, LoraSettings(rank=4))


def test_float32_adapters_on_bf16_base(base):
    model = attach_lora(copy.deepcopy(base).bfloat16(), LoraSettings(rank=4), dtype=torch.float32)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    latents, sigma, captions = inputs()
    model(latents, sigma, captions).float().square().mean().backward()
    assert model.layers[0].attention.qkv.lora_B.default.weight.grad.abs().sum() > 0
    assert merge_lora(model).layers[0].attention.qkv.weight.dtype == torch.bfloat16


def test_load_lora_state_dict_is_strict(base):
    model = with_lora(base, LoraSettings(rank=4))
    state = lora_state_dict(model)
    missing = dict(state)
    del missing["layers.0.feed_forward.w1.lora_A.weight"]
    with pytest.raises(ValueError, match=r"1 missing.*layers\.0\.feed_forward\.w1\.lora_A\.weight"):
        load_lora_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"1 unexpected.*noise_refiner\.0\.attention\.out\.lora_A\.weight"):
        load_lora_state_dict(model, {**state, "noise_refiner.0.attention.out.lora_A.weight": torch.zeros(4, DIM)})
    with pytest.raises(ValueError, match="different rank"):
        load_lora_state_dict(model, {k: torch.zeros(8, v.shape[1]) if "lora_A" in k else v for k, v in state.items()})


# ---- gradient parity with diffusers + peft ------------------------------------------------------------------------


def test_gradients_match_diffusers_peft(base, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    settings = LoraSettings(rank=4, alpha=8.0, targets="all")
    ours = with_lora(base, settings)
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, lora_state_dict(ours), settings, dtype=torch.float32)
    exported = {k.removeprefix("diffusion_model."): v for k, v in load_file(path).items()}
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in exported if ".lora_" in k})

    twin = diffusers_twin(base)
    twin.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8.0, target_modules=modules), twin)
    twin_params = dict(twin.named_parameters())
    with torch.no_grad():
        for module in modules:
            for kind in ("lora_A", "lora_B"):
                twin_params[f"{module}.{kind}.default.weight"].copy_(exported[f"{module}.{kind}.weight"])

    latents, sigma, captions = inputs()
    ours_out, twin_out = ours(latents, sigma, captions), diffusers_forward(twin, latents, sigma, captions)
    assert relative_error(ours_out.detach(), twin_out.detach()) <= GRAD_TOLERANCE
    probe = torch.randn(ours_out.shape, generator=torch.Generator().manual_seed(7))
    (ours_out * probe).sum().backward()
    (twin_out * probe).sum().backward()

    def twin_grad(module: str, kind: str) -> torch.Tensor:
        return twin_params[f"{module}.{kind}.default.weight"].grad

    errors = {}
    for name, param in ours.named_parameters():
        if not param.requires_grad:
            continue
        module, kind = name.removesuffix(".default.weight").rsplit(".", 1)
        if module.endswith(".attention.qkv"):
            parts = [module.replace(".qkv", f".{p}") for p in ("to_q", "to_k", "to_v")]
            grads = [twin_grad(p, kind) for p in parts]  # shared A: its gradient is the sum of the three
            expected = torch.cat(grads) if kind == "lora_B" else sum(grads)
        else:
            expected = twin_grad(module.replace(".attention.out", ".attention.to_out.0"), kind)
        errors[name] = relative_error(param.grad, expected)
    assert len(errors) == 46 and max(errors.values()) <= GRAD_TOLERANCE, max(errors.items(), key=lambda kv: kv[1])


# ---- file format, round trip, merging -----------------------------------------------------------------------------


def test_file_layout_and_metadata(base, tmp_path):
    settings = LoraSettings(rank=4, alpha=2.0, targets="attention+ffn")
    state = lora_state_dict(with_lora(base, settings))
    path = tmp_path / "out" / "lora.safetensors"
    save_lora_file(path, state, settings, metadata={"steps": "120", "dataset_hash": "abc123"})
    assert [p.name for p in path.parent.iterdir()] == ["lora.safetensors"]  # no temp file left behind
    tensors = load_file(path)
    assert len(tensors) == 2 * (3 + 1 + 3) * 3  # 2 layers × (q, k, v, out, w1, w2, w3) × (A, B, alpha)
    prefix = "diffusion_model.layers.0.attention"
    a, b = state["layers.0.attention.qkv.lora_A.weight"], state["layers.0.attention.qkv.lora_B.weight"]
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        assert tensors[f"{prefix}.{part}.lora_A.weight"].dtype == torch.bfloat16
        assert torch.equal(tensors[f"{prefix}.{part}.lora_A.weight"], a.bfloat16())
        assert torch.equal(tensors[f"{prefix}.{part}.lora_B.weight"], b[i * DIM : (i + 1) * DIM].bfloat16())
        alpha = tensors[f"{prefix}.{part}.alpha"]
        assert alpha.dtype == torch.float32 and alpha.ndim == 0 and alpha.item() == 2.0
    assert tensors[f"{prefix}.to_out.0.lora_B.weight"].shape == (DIM, 4)
    assert tensors["diffusion_model.layers.1.feed_forward.w2.lora_A.weight"].shape == (
        4,
        PRESETS["tiny"].ffn_hidden_dim,
    )
    metadata = load_lora_file(path).metadata
    assert metadata["base_model"] == "Z-Image" and metadata["format"] == lora_file.FORMAT_NAME
    assert (metadata["rank"], metadata["alpha"], metadata["targets"], metadata["dtype"]) == (
        "4",
        "2.0",
        "attention+ffn",
        "bfloat16",
    )
    assert (metadata["steps"], metadata["dataset_hash"]) == ("120", "abc123")
    with pytest.raises(ValueError, match="'rank'.*written from the settings"):
        save_lora_file(path, state, settings, metadata={"rank": "8"})
    with pytest.raises(ValueError, match="str to str.*'steps': 120"):
        save_lora_file(path, state, settings, metadata={"steps": 120})


def test_failed_save_keeps_previous_file(base, tmp_path, monkeypatch):
    settings = LoraSettings(rank=4)
    state = lora_state_dict(with_lora(base, settings))
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, state, settings)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)  # the new bytes are written, then the disk fails before the rename
    with pytest.raises(OSError, match="disk full"):
        save_lora_file(path, state, settings, dtype=torch.float32)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_same_lora_gives_the_same_bytes(base, tmp_path):
    settings = LoraSettings(rank=4)
    state = lora_state_dict(with_lora(base, settings))
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_lora_file(first, state, settings, metadata={"steps": "10", "seed": "0"})
    save_lora_file(second, dict(reversed(list(state.items()))), settings, metadata={"seed": "0", "steps": "10"})
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_gives_identical_outputs(base, tmp_path, dtype):
    settings = LoraSettings(rank=4, alpha=8.0, dropout=0.1, targets="attention+ffn+refiners")
    trained = with_lora(base, settings).eval()
    state = lora_state_dict(trained)
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, state, settings, dtype=dtype)
    loaded = load_lora_file(path)
    assert loaded.settings == settings
    assert loaded.state.keys() == state.keys()
    assert all(torch.equal(loaded.state[k], v.to(dtype)) for k, v in state.items())
    resumed = attach_lora(copy.deepcopy(base), loaded.settings).eval()
    load_lora_state_dict(resumed, loaded.state)
    if dtype == torch.float32:
        assert torch.equal(run(resumed), run(trained))
    else:  # the file holds bf16-rounded weights: identical to loading those rounded weights directly
        load_lora_state_dict(trained, {k: v.bfloat16() for k, v in state.items()})
        assert torch.equal(run(resumed), run(trained))


def test_merge_lora_equals_lora_output(base):
    model = with_lora(base, LoraSettings(rank=4, alpha=2.0, targets="all"))
    expected = run(model)
    merged = merge_lora(model)
    assert type(merged) is ZImageTransformer and not lora_layers(merged)
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert relative_error(run(merged), expected) <= MERGE_TOLERANCE


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_comfyui_applies_saved_lora_like_training(base, tmp_path, strength):
    settings = LoraSettings(rank=4, alpha=8.0, targets="all")
    trained = with_lora(base, settings)
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, lora_state_dict(trained), settings, dtype=torch.float32)
    base_state = base.state_dict()
    weights, unmatched = comfy_apply(base_state, load_file(path), strength)
    assert unmatched == 0
    if strength != 1.0:  # strength scales the delta; in training terms: B scaled by the strength
        full, _ = comfy_apply(base_state, load_file(path), 1.0)
        for name, weight in weights.items():
            assert torch.allclose(weight - base_state[name], strength * (full[name] - base_state[name]), atol=1e-6)
        load_lora_state_dict(
            trained, {k: v * strength if "lora_B" in k else v for k, v in lora_state_dict(trained).items()}
        )
    assert relative_error(run(plain_with(base, weights)), run(trained)) <= MERGE_TOLERANCE

    ours = copy.deepcopy(base)
    assert merge_lora_file_into(ours, path, strength) == 0
    assert max(relative_error(ours.state_dict()[k], w) for k, w in weights.items() if k in ours.state_dict()) <= 1e-7


def foreign_lora(base: ZImageTransformer, rank: int = 3) -> dict[str, torch.Tensor]:
    """Another trainer's file: ``transformer.`` prefix, lora_down/lora_up, distinct A for q/k/v, no alpha."""
    generator = torch.Generator().manual_seed(11)
    tensors = {}
    for module in ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v"):
        tensors[f"transformer.{module}.lora_down.weight"] = torch.randn(rank, DIM, generator=generator) * 0.1
        tensors[f"transformer.{module}.lora_up.weight"] = torch.randn(DIM, rank, generator=generator) * 0.1
    hidden = PRESETS["tiny"].ffn_hidden_dim
    tensors["diffusion_model.layers.1.feed_forward.w2.lora_A.weight"] = torch.randn(rank, hidden, generator=generator)
    tensors["diffusion_model.layers.1.feed_forward.w2.lora_B.weight"] = torch.randn(DIM, rank, generator=generator)
    tensors["diffusion_model.layers.1.feed_forward.w2.alpha"] = torch.tensor(1.5)
    tensors["diffusion_model.noise_refiner.0.attention.qkv.lora_A.weight"] = torch.randn(rank, DIM, generator=generator)
    tensors["diffusion_model.noise_refiner.0.attention.qkv.lora_B.weight"] = torch.randn(
        3 * DIM, rank, generator=generator
    )
    return tensors


def test_foreign_lora_merges_per_slice_but_cannot_resume(base, tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file(foreign_lora(base), path)
    with pytest.raises(ValueError, match="different lora_A.*merge_lora_file_into"):
        load_lora_file(path)
    expected, unmatched = comfy_apply(base.state_dict(), load_file(path), 0.8)
    assert unmatched == 0
    ours = copy.deepcopy(base)
    assert merge_lora_file_into(ours, path, 0.8) == 0
    assert relative_error(run(ours), run(plain_with(base, expected))) <= MERGE_TOLERANCE
    attached = attach_lora(copy.deepcopy(base), LoraSettings(rank=2))  # merging also reaches wrapped base weights
    merge_lora_file_into(attached, path, 0.8)
    assert relative_error(run(attached), run(ours)) == 0.0


def test_unmatched_keys_raise_naming_file_and_keys(base, tmp_path):
    tensors = foreign_lora(base)
    tensors["diffusion_model.layers.9.attention.to_q.lora_A.weight"] = torch.zeros(3, DIM)
    tensors["diffusion_model.layers.9.attention.to_q.lora_B.weight"] = torch.zeros(DIM, 3)
    path = tmp_path / "bigger.safetensors"
    save_file(tensors, path)
    assert comfy_apply(base.state_dict(), tensors, 1.0)[1] == 2
    with pytest.raises(ValueError, match=r"bigger\.safetensors: 2 LoRA keys match no weight.*layers\.9\.attention"):
        merge_lora_file_into(copy.deepcopy(base), path)
    assert merge_lora_file_into(copy.deepcopy(base), path, strict=False) == 2
    save_file({"diffusion_model.layers.0.attention.to_q.hada_w1_a": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=r"loha module 'layers\.0\.attention\.to_q' has \['hada_w1_a'\]; it needs"):
        merge_lora_file_into(copy.deepcopy(base), path)


def test_lora_input_cast_off_under_autocast_keeps_outputs_and_saves_less():
    from training.model.lora import set_lora_input_cast

    torch.manual_seed(0)
    model = ZImageTransformer(PRESETS["tiny"]).to(torch.bfloat16)
    attach_lora(model, LoraSettings(rank=4), dtype=torch.float32)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    latents, sigma = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.7])
    captions = torch.randn(2, 16, PRESETS["tiny"].cap_feat_dim)

    def run() -> tuple[torch.Tensor, int]:
        storages = {}  # autograd's saved tensors, counted once per storage

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(latents.bfloat16(), sigma, captions.bfloat16())
        return out.float(), sum(storages.values())

    with_cast, saved_with_cast = run()
    assert set_lora_input_cast(model, False) == len(lora_layers(model)) > 0
    without_cast, saved_without_cast = run()
    assert torch.equal(with_cast, without_cast)
    assert saved_without_cast < 0.95 * saved_with_cast  # no per-adapter copy of each input
