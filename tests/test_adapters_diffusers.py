"""Our adapter files in diffusers' Z-Image loader (the pinned diffusers, ZImagePipeline.lora_state_dict +
load_lora_into_transformer on a tiny ZImageTransformer2DModel with our weights). What diffusers 0.42.1 does:

- LoRA loads and gives our outputs.
- DoRA loads as plain LoRA: diffusers drops every ``dora_scale`` key with a warning ("a DoRA checkpoint that is not
  compatible in Diffusers"), so the magnitude is lost; the outputs are those of our A and B without it.
- LoKr: diffusers rebuilds peft's LoKr from one ``decompose_factor`` and refuses our fused-qkv slices ("Could not
  infer a `decompose_factor`"): a slice of kron(w1, w2) has factors (out_l / 3, out_k), which peft's factorization
  of a [d, d] layer never gives, and diffusers' other route (fusing to ``to_qkv``) needs ``fuse_qkv_projections``,
  which ``ZImageTransformer2DModel`` lacks. Every other module loads and matches ours.
- LoHa: refused ("state_dict should be empty"): the Z-Image loader converts only LoRA and LoKr keys.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import diffusers_forward, diffusers_twin, randomize

from training.model.config import PRESETS
from training.model.lora import (
    LoraSettings,
    adapter_file_state,
    attach_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
)
from training.model.lora_file import save_lora_file
from training.model.zimage import ZImageTransformer

diffusers = pytest.importorskip("diffusers")
CFG = PRESETS["tiny"]
TOLERANCE = 1e-4  # float32, our fused qkv vs diffusers' split q/k/v + peft (relative to the output's size)


@pytest.fixture(scope="module")
def base():
    model = ZImageTransformer(CFG).float().eval()
    randomize(model, seed=0)
    return model


def trained(base, adapter: str) -> ZImageTransformer:
    model = attach_lora(copy.deepcopy(base), LoraSettings(rank=4, alpha=2.0, targets="all", adapter=adapter))
    generator = torch.Generator().manual_seed(3)
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


def ours_out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs())


def load_in_diffusers(base, source):
    from diffusers import ZImagePipeline

    twin = diffusers_twin(base)
    state = ZImagePipeline.lora_state_dict(source)
    ZImagePipeline.load_lora_into_transformer(state, transformer=twin)
    with torch.no_grad():
        return diffusers_forward(twin, *inputs())


def save(model, adapter: str, path) -> None:
    settings = LoraSettings(rank=4, alpha=2.0, targets="all", adapter=adapter)
    save_lora_file(path, adapter_file_state(model), settings, dtype=torch.float32)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOLERANCE * b.abs().max().item()


def test_lora_file_loads_in_diffusers_with_our_outputs(base, tmp_path):
    model = trained(base, "lora")
    save(model, "lora", tmp_path / "l.safetensors")
    expected = ours_out(model)
    assert close(load_in_diffusers(base, str(tmp_path / "l.safetensors")), expected)
    assert not close(ours_out(base), expected)


def test_dora_file_loads_in_diffusers_without_its_magnitude(base, tmp_path):
    model = trained(base, "dora")
    save(model, "dora", tmp_path / "d.safetensors")
    got = load_in_diffusers(base, str(tmp_path / "d.safetensors"))
    plain = attach_lora(copy.deepcopy(base), LoraSettings(rank=4, alpha=2.0, targets="all"))  # same A, B
    load_lora_state_dict(plain, {k: v for k, v in lora_state_dict(model).items() if "magnitude" not in k})
    assert close(got, ours_out(plain))
    assert not close(got, ours_out(model))


def test_lokr_file_is_refused_by_diffusers_for_its_qkv_slices_and_the_rest_loads(base, tmp_path):
    from safetensors.torch import load_file

    model = trained(base, "lokr")
    with torch.no_grad():  # no delta on the fused qkv: the file's q/k/v slices can be left out for diffusers
        for name, layer in lora_layers(model).items():
            if name.endswith(".attention.qkv"):
                layer.lokr_w1["default"].zero_()
    path = tmp_path / "k.safetensors"
    save(model, "lokr", path)
    with pytest.raises(ValueError, match="Could not infer a `decompose_factor`"):
        load_in_diffusers(base, str(path))
    tensors = {k: v for k, v in load_file(path).items() if not any(f".to_{p}." in k for p in "qkv")}
    assert close(load_in_diffusers(base, tensors), ours_out(model))
    assert not close(ours_out(base), ours_out(model))


def test_loha_file_is_refused_by_diffusers(base, tmp_path):
    save(trained(base, "loha"), "loha", tmp_path / "h.safetensors")
    with pytest.raises(ValueError, match="should be empty at this point.*hada_w1_a"):
        load_in_diffusers(base, str(tmp_path / "h.safetensors"))
