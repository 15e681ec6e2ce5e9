"""Load Trained LoRA: key matching and the node's refusal of files whose keys match nothing (bridge faked)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_nodes_support import install_fake_comfy, pack_module

lora_keys = pack_module("nodes.lora_keys")
lora_node = pack_module("nodes.lora_node")
values = pack_module("nodes.values")
bridge = pack_module("nodes.comfy_bridge")

MODULES = ("diffusion_model.layers.0.attention.to_q", "diffusion_model.layers.0.attention.to_k")


def lora_tensors(modules=MODULES, rank=2):
    tensors = {}
    for module in modules:
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, 8)
        tensors[f"{module}.lora_B.weight"] = torch.randn(8, rank)
        tensors[f"{module}.alpha"] = torch.tensor(float(rank))
    return tensors


class FakeModel:
    def __init__(self, key_map):
        self.key_map = key_map
        self.patches = None

    def clone(self):
        return FakeModel(self.key_map)


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = install_fake_comfy(tmp_path, monkeypatch)
    monkeypatch.setattr(bridge, "load_lora_state_dict", _read)
    monkeypatch.setattr(bridge, "lora_key_map", lambda model: model.key_map)

    def patch(model, state, key_map, strength):
        patched = model.clone()
        modules = {lora_keys.split_key(k)[0] for k in state}
        patched.patches = {key_map[m]: strength for m in modules if m in key_map}
        return patched, len(modules), len(patched.patches)

    monkeypatch.setattr(bridge, "patch_model_with_lora", patch)
    return fake


def _read(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_split_key_handles_every_lora_ending():
    assert lora_keys.split_key("a.b.lora_A.weight") == ("a.b", ".lora_A.weight")
    assert lora_keys.split_key("a.b.lora_up.weight") == ("a.b", ".lora_up.weight")
    assert lora_keys.split_key("a.b.alpha") == ("a.b", ".alpha")
    assert lora_keys.split_key("a.b.weight") is None


def test_match_keys_reports_unmatched_modules_and_foreign_tensors():
    keys = list(lora_tensors()) + ["something.else.weight"]
    match = lora_keys.match_keys(keys, {MODULES[0]: "w0"})
    assert not match.ok
    assert match.unmatched_modules == (MODULES[1],)
    assert match.unrecognised_keys == ("something.else.weight",)
    assert "1 of 2 modules" in match.describe()


def test_node_applies_a_fitting_lora_from_the_loras_list(comfy):
    save_file(lora_tensors(), str(comfy.folders["loras"] / "style.safetensors"))
    model = FakeModel({m: f"{m}.weight" for m in MODULES})
    output = lora_node.LoadTrainedLoRA().load(model, "style.safetensors", 0.8)
    patched, report = output["result"]
    assert output["ui"]["text"] == [report]
    assert patched.patches == {f"{m}.weight": 0.8 for m in MODULES}
    assert "2 weights patched" in report and "0 unmatched" in report


def test_node_refuses_a_lora_with_keys_the_model_lacks(comfy):
    save_file(lora_tensors(), str(comfy.folders["loras"] / "other.safetensors"))
    model = FakeModel({MODULES[0]: "w0"})
    with pytest.raises(lora_node.LoraKeysUnmatched, match=MODULES[1].replace(".", r"\.")):
        lora_node.LoadTrainedLoRA().load(model, "other.safetensors", 1.0)


def test_node_uses_the_linked_run_and_confines_its_path(comfy, tmp_path):
    lora_path = comfy.folders["loras"] / "run1.safetensors"
    save_file(lora_tensors(), str(lora_path))
    run = values.RunRef(
        run_dir=comfy.folders["whetstone_runs"] / "run1", lora_path=lora_path, lora_name="x", state="completed"
    )
    model = FakeModel({m: f"{m}.weight" for m in MODULES})
    patched, _ = lora_node.LoadTrainedLoRA().load(model, "", 1.0, run=run)["result"]
    assert len(patched.patches) == 2
    outside = tmp_path / "elsewhere.safetensors"
    save_file(lora_tensors(), str(outside))
    escaped = values.RunRef(run_dir=tmp_path, lora_path=outside, lora_name="x", state="completed")
    with pytest.raises(ValueError, match="outside"):
        lora_node.LoadTrainedLoRA().load(model, "", 1.0, run=escaped)


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/passwd"])
def test_validate_inputs_refuses_paths_in_lora_name(name):
    assert lora_node.LoadTrainedLoRA.VALIDATE_INPUTS(name, {}) != True  # noqa: E712 (ComfyUI wants True or a message)
    assert lora_node.LoadTrainedLoRA.VALIDATE_INPUTS(name, {"run": "WHETSTONE_RUN"}) != True  # noqa: E712


def test_strength_outside_range_is_refused(comfy):
    with pytest.raises(ValueError, match="strength"):
        lora_node.LoadTrainedLoRA().load(FakeModel({}), "x.safetensors", 1e9)


def test_node_warns_when_a_lora_meets_the_other_variant(comfy, caplog):
    save_file(lora_tensors(), str(comfy.folders["loras"] / "base.safetensors"), metadata={"model_variant": "base"})
    model = FakeModel({m: f"{m}.weight" for m in MODULES})
    node = lora_node.LoadTrainedLoRA()
    with caplog.at_level("WARNING"):
        patched, report = node.load(model, "base.safetensors", 1.0, model_variant="turbo")["result"]
    assert report.startswith("WARNING: base.safetensors was trained on Z-Image (Base) but is applied to Z-Image-Turbo")
    assert "trained on Z-Image (Base)" in caplog.text and len(patched.patches) == 2  # warned, still applied
    _, same = node.load(model, "base.safetensors", 1.0, model_variant="base")["result"]
    assert "WARNING" not in same and "trained on Z-Image (Base), as the model" in same
    _, unknown = node.load(model, "base.safetensors", 1.0)["result"]  # auto: the model's variant is not readable
    assert "WARNING" not in unknown and "set model_variant to check" in unknown


def test_node_says_nothing_of_variants_for_a_lora_without_the_record(comfy):
    save_file(lora_tensors(), str(comfy.folders["loras"] / "other.safetensors"))
    model = FakeModel({m: f"{m}.weight" for m in MODULES})
    _, report = lora_node.LoadTrainedLoRA().load(model, "other.safetensors", 1.0, model_variant="turbo")["result"]
    assert "WARNING" not in report and "trained on" not in report
    with pytest.raises(ValueError, match="model_variant"):
        lora_node.LoadTrainedLoRA().load(model, "other.safetensors", 1.0, model_variant="sdxl")
