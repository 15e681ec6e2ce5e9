"""Base vs Turbo: the per-variant table, the variant a run trains (explicit or from the file name), the refusal of a
Turbo run nothing protects, the de-distillation adapter merged before LoRA, and the variant in the LoRA file."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from tests.test_engine_runs import tiny_config, train_in_process
from training.cli_support import USER_ERROR
from training.engine.build import build_model
from training.engine.cli import train_command
from training.engine.config import TrainConfig
from training.engine.distributed import DistInfo
from training.engine.variant_setup import lora_metadata, prepare_variant, run_variant
from training.model.variants import (
    LORA_VARIANT_KEY,
    VARIANTS,
    mismatch_warning,
    read_lora_variant,
    resolve_variant,
    variant_settings,
)


def test_the_table_holds_the_documented_settings():
    base, turbo = variant_settings("base"), variant_settings("turbo")
    assert (base.sampling_shift, base.reference_shift, base.steps, base.cfg) == (3.0, 6.0, 50, 4.0)
    assert (turbo.sampling_shift, turbo.reference_shift, turbo.steps, turbo.cfg) == (3.0, 3.0, 8, 1.0)
    assert base.uses_cfg and not turbo.uses_cfg and turbo.distilled and not base.distilled
    assert all(settings.sources for settings in VARIANTS.values())
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        variant_settings("auto")


def test_auto_reads_the_file_name_only_and_says_so():
    assert resolve_variant("turbo", "z_image.safetensors") == ("turbo", "model.variant = 'turbo'")
    assert resolve_variant("auto", None)[0] == "base"
    assert resolve_variant("auto", "/m/z_image_turbo_bf16.safetensors")[0] == "turbo"
    variant, reason = resolve_variant("auto", "/m/z_image_bf16.safetensors")
    assert variant == "base" and "cannot tell Base from Turbo" in reason
    with pytest.raises(ValueError, match="model.variant must be one of"):
        resolve_variant("distilled", None)


def config(tmp_path, mode: str = "lora", **model) -> TrainConfig:
    return TrainConfig.from_dict(
        {"mode": mode, "run": {"output_dir": str(tmp_path)}, "model": {"preset": "tiny", "dtype": "fp32", **model}}
    )


def test_a_turbo_run_without_protection_is_refused_naming_the_fixes(tmp_path):
    with pytest.raises(ValueError) as refusal:
        run_variant(config(tmp_path, variant="turbo"))
    for fix in ("model.training_adapter", "zimage_turbo_training_adapter", "De-Turbo", "'dedistilled'", "'raw'"):
        assert fix in str(refusal.value)
    assert "DiffSynth#1251" in str(refusal.value) and "musubi#769" in str(refusal.value)
    with pytest.raises(ValueError) as full:  # a full fine-tune cannot use the adapter: not offered
        run_variant(config(tmp_path, "full", variant="turbo"))
    assert "training_adapter" not in str(full.value) and "'dedistilled'" in str(full.value)
    assert run_variant(config(tmp_path, variant="turbo", turbo_training="raw"))[0] == "turbo"
    assert run_variant(config(tmp_path, variant="turbo", turbo_training="dedistilled"))[0] == "turbo"


@pytest.mark.parametrize(
    ("mode", "model", "message"),
    [
        ("lora", {"variant": "base", "training_adapter": "a.safetensors"}, "model.variant is 'base'"),
        ("full", {"variant": "turbo", "training_adapter": "a.safetensors"}, "with mode 'full'"),
        ("lora", {"training_adapter": "a.safetensors", "turbo_training": "raw"}, "turbo_training is 'raw'"),
        ("lora", {"variant": "distilled"}, "model.variant must be one of"),
        ("lora", {"turbo_training": "ignore"}, "model.turbo_training must be one of"),
    ],
)
def test_config_refuses_inconsistent_variant_settings(tmp_path, mode, model, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, mode, **model)


def test_the_cli_refuses_a_turbo_file_by_name_with_exit_2(tmp_path, caplog):
    weights = tmp_path / "z_image_turbo_bf16.safetensors"
    weights.write_bytes(b"not read: the refusal comes first")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"run": {"output_dir": str(tmp_path / "run")}, "model": {"weights": str(weights)}}))
    with caplog.at_level(logging.ERROR):
        assert train_command(argparse.Namespace(config=path, nproc_per_node=None)) == USER_ERROR
    assert "contains 'turbo'" in caplog.text and "model.training_adapter" in caplog.text


def test_the_training_adapter_is_merged_into_the_base_before_lora(tmp_path):
    adapter = tmp_path / "adapter.safetensors"
    turbo = config(tmp_path, variant="turbo", training_adapter=str(adapter))
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    model = build_model(turbo, cpu)
    weight = model.get_parameter("layers.0.feed_forward.w1.weight")
    before = weight.detach().clone()
    down, up = torch.randn(2, weight.shape[1]), torch.randn(weight.shape[0], 2)
    module = "diffusion_model.layers.0.feed_forward.w1"
    save_file(
        {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up, f"{module}.alpha": torch.tensor(1.0)},
        str(adapter),
    )
    assert prepare_variant(model, turbo) == "turbo"
    torch.testing.assert_close(weight.detach(), before + 0.5 * up @ down)  # alpha / rank = 1 / 2
    assert lora_metadata("turbo", turbo) == {
        LORA_VARIANT_KEY: "turbo",
        "turbo_training": "adapter",
        "training_adapter": "adapter.safetensors",
    }


def test_the_lora_file_records_the_variant_it_was_trained_on(tmp_path):
    run = tiny_config(tmp_path / "run", micro_batch=1, grad_accum=1)
    run["run"]["steps"] = 1
    run["model"] |= {"variant": "turbo", "turbo_training": "raw"}
    assert len(train_in_process(run)) == 1
    assert read_lora_variant(tmp_path / "run" / "lora.safetensors") == "turbo"


def test_mismatch_warning_names_both_variants_and_the_fix():
    assert mismatch_warning(None, "turbo", "x.safetensors") is None  # not recorded: nothing to compare
    assert mismatch_warning("base", "base", "x.safetensors") is None
    warning = mismatch_warning("base", "turbo", "x.safetensors")
    assert "trained on Z-Image (Base)" in warning and "applied to Z-Image-Turbo" in warning
    assert "model_variant to 'base'" in warning
