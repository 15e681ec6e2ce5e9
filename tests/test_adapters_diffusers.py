"""Our adapter files in diffusers' Z-Image pipeline (the pinned diffusers 0.42.1): ``ZImagePipeline.load_lora_weights``
on a pipeline around a tiny ``ZImageTransformer2DModel`` with our weights. What diffusers does with each:

- LoRA and LoKr: the ComfyUI file loads as it is. LoKr does because the fused qkv trains with the decompose factor
  that makes each q/k/v third a LoKr of a [d, d] linear's default shape (``targets.lokr_decompose_factor``);
  with peft's default factor diffusers refuses the thirds ("Could not infer a `decompose_factor`").
- DoRA: the ComfyUI file loads as plain LoRA (diffusers drops ``dora_scale``); ``export_diffusers`` writes peft's
  DoRA form (``lora_magnitude_vector``), which diffusers loads as DoRA.
- LoHa: diffusers converts no ``hada_`` keys; ``export_diffusers`` writes its exact rank-r² LoRA.
Each file diffusers loads gives our outputs, and peft's merge in diffusers gives our merged weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import diffusers_forward, diffusers_twin, randomize
from safetensors.torch import load_file
from test_adapters import inputs, with_adapter
from test_adapters import run as ours_out

from training.__main__ import main
from training.model.config import PRESETS
from training.model.diffusers_file import diffusers_path, export_diffusers
from training.model.layouts import diffusers_names
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
from training.model.weights import save_weights
from training.model.zimage import ZImageTransformer
from training.vocabulary import ADAPTER_TYPES

diffusers = pytest.importorskip("diffusers")
CFG = PRESETS["tiny"]
TOLERANCE = 1e-4  # float32 outputs, our fused qkv vs diffusers' split q/k/v + peft (relative to the output's size)
WEIGHT_TOLERANCE = 1e-6  # float32 weights: diffusers' (peft's) merge vs the engine's, relative to the weight


@pytest.fixture(scope="module")
def base():
    model = ZImageTransformer(CFG).float().eval()
    randomize(model, seed=0)
    return model


def settings_for(adapter: str) -> LoraSettings:
    return LoraSettings(rank=4, alpha=2.0, targets="all", adapter=adapter)


def trained(base, adapter: str) -> ZImageTransformer:
    return with_adapter(base, settings_for(adapter))


def diffusers_pipeline(base):
    """The real pipeline (load_lora_weights and its format check) with only the transformer: no LoRA touches the rest."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=diffusers_twin(base))


def load_in_diffusers(base, source):
    pipe = diffusers_pipeline(base)
    pipe.load_lora_weights(source)
    return pipe.transformer


def diffusers_out(twin) -> torch.Tensor:
    with torch.no_grad():
        return diffusers_forward(twin, *inputs())


def save(model, adapter: str, path) -> None:
    save_lora_file(path, adapter_file_state(model), settings_for(adapter), dtype=torch.float32)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOLERANCE * b.abs().max().item()


def file_for_diffusers(model, base, adapter: str, tmp_path):
    """The file a user loads in diffusers: the ComfyUI file (LoRA, LoKr) or its export (DoRA, LoHa)."""
    path = tmp_path / f"{adapter}.safetensors"
    save(model, adapter, path)
    if adapter in ("lora", "lokr"):
        return path
    weights = base.state_dict()
    return export_diffusers(path, base=lambda name: weights[name])


def diffusers_merged_weights(twin) -> dict[str, torch.Tensor]:
    """peft's merge of every adapter layer diffusers injected: module name → merged weight (float32)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = {}
    for name, module in twin.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            merged[f"{name}.weight"] = module.get_base_layer().weight.detach().float()
    return merged


@pytest.mark.parametrize("adapter", ADAPTER_TYPES)
def test_every_adapter_loads_in_diffusers_with_our_outputs_and_merged_weights(base, tmp_path, adapter):
    model = trained(base, adapter)
    expected = ours_out(model)
    twin = load_in_diffusers(base, str(file_for_diffusers(model, base, adapter, tmp_path)))
    assert close(diffusers_out(twin), expected)
    assert not close(ours_out(base), expected)

    ours = {}
    for name, weight in merge_lora(copy.deepcopy(model)).state_dict().items():
        targets = diffusers_names(name)
        ours |= dict(zip(targets, weight.float().chunk(len(targets)), strict=True))
    theirs = diffusers_merged_weights(twin)
    assert set(theirs) == {n for module in lora_layers(model) for n in diffusers_names(f"{module}.weight")}
    worst = max(((theirs[n] - ours[n]).abs().max() / ours[n].abs().max()).item() for n in theirs)
    assert worst <= WEIGHT_TOLERANCE, f"{adapter}: merged weight off by {worst:.2e} relative"
    assert any(not torch.equal(theirs[n], base.state_dict()[n]) for n in theirs if n in base.state_dict())


def test_lokr_with_peft_s_default_factor_is_refused_by_diffusers_for_its_qkv_thirds(base, tmp_path, monkeypatch):
    """Why the fused qkv trains with its own decompose factor: with peft's default the thirds have factors
    (out_l / 3, out_k) x (in_m, in_n), which diffusers cannot re-derive from one factor."""
    import training.model.lora as lora

    monkeypatch.setattr(lora, "_lokr_factor", lambda model, names: -1)
    path = tmp_path / "k.safetensors"
    save(trained(base, "lokr"), "lokr", path)
    with pytest.raises(ValueError, match="Could not infer a `decompose_factor`"):
        load_in_diffusers(base, str(path))


def test_dora_comfyui_file_loads_in_diffusers_without_its_magnitude(base, tmp_path):
    model = trained(base, "dora")
    save(model, "dora", tmp_path / "d.safetensors")
    got = diffusers_out(load_in_diffusers(base, str(tmp_path / "d.safetensors")))
    plain = attach_lora(copy.deepcopy(base), LoraSettings(rank=4, alpha=2.0, targets="all"))  # same A, B
    load_lora_state_dict(plain, {k: v for k, v in lora_state_dict(model).items() if "magnitude" not in k})
    assert close(got, ours_out(plain))
    assert not close(got, ours_out(model))


def test_loha_comfyui_file_is_refused_by_diffusers(base, tmp_path):
    """diffusers 0.42.1 converts LoRA and LoKr keys only (ZImageLoraLoaderMixin.lora_state_dict)."""
    save(trained(base, "loha"), "loha", tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="should be empty at this point.*hada_w1_a"):
        load_in_diffusers(base, str(tmp_path / "h.safetensors"))


def test_loha_in_peft_form_is_refused_by_diffusers_too(base, tmp_path):
    """No diffusers route takes LoHa: the pipeline's format check accepts only 'lora' / 'lokr' keys."""
    save(trained(base, "loha"), "loha", tmp_path / "h.safetensors")
    peft_form = {
        f"transformer.{key.removeprefix('diffusion_model.')}": tensor
        for key, tensor in load_file(tmp_path / "h.safetensors").items()
        if not key.endswith(".alpha")
    }
    with pytest.raises(ValueError, match="We currently support LoRA and LoKr"):
        diffusers_pipeline(base).load_lora_weights(peft_form)


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_export_of_a_file_diffusers_already_loads_keeps_its_tensors(base, tmp_path, adapter):
    path = tmp_path / f"{adapter}.safetensors"
    save(trained(base, adapter), adapter, path)
    out = export_diffusers(path)
    assert out == diffusers_path(path) == tmp_path / f"{adapter}.diffusers.safetensors"
    original, exported = load_file(path), load_file(out)
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)


def test_loha_export_is_a_lora_our_reader_and_comfyui_form_merge_the_same(base, tmp_path):
    model = trained(base, "loha")
    save(model, "loha", tmp_path / "h.safetensors")
    out = export_diffusers(tmp_path / "h.safetensors")
    exported = load_lora_file(out)
    assert (exported.settings.adapter, exported.settings.rank) == ("lora", 16)  # r² = 4²
    applied = copy.deepcopy(base)
    assert merge_lora_file_into(applied, out) == 0
    merged = merge_lora(copy.deepcopy(model)).state_dict()
    worst = max(((w - merged[n]).abs().max() / merged[n].abs().max()).item() for n, w in applied.state_dict().items())
    assert worst <= WEIGHT_TOLERANCE


def test_dora_export_needs_the_base_and_refuses_another_model(base, tmp_path):
    path = tmp_path / "d.safetensors"
    save(trained(base, "dora"), "dora", path)
    with pytest.raises(ValueError, match="needs the base model it was trained on"):
        export_diffusers(path)
    with pytest.raises(ValueError, match="must not overwrite its source"):
        export_diffusers(path, path, base=lambda name: base.state_dict()[name])
    narrow = {name: weight[..., :8] for name, weight in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit its base .*another model"):
        export_diffusers(path, base=lambda name: narrow[name])


def test_export_cli_writes_a_file_diffusers_loads_and_names_bad_input(base, tmp_path, capsys):
    model = trained(base, "dora")
    save(model, "dora", tmp_path / "d.safetensors")
    save_weights(base.state_dict(), tmp_path / "base.safetensors")
    args = ["export-diffusers", "--lora", str(tmp_path / "d.safetensors")]
    assert main([*args, "--base", str(tmp_path / "base.safetensors")]) == 0
    assert "d.diffusers.safetensors" in capsys.readouterr().out
    assert close(diffusers_out(load_in_diffusers(base, str(tmp_path / "d.diffusers.safetensors"))), ours_out(model))
    assert main(args) == 2
    assert "--base" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert main(["export-diffusers", "--lora", str(tmp_path / "junk.safetensors")]) == 2
    assert "junk.safetensors: not a readable .safetensors adapter file" in capsys.readouterr().err
