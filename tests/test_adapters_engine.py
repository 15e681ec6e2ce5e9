"""The engine trains DoRA, LoKr and LoHa like LoRA (CPU, tiny model, synthetic data): two torchrun (gloo) DDP
processes give the one-process loss curve, the saved file reads back as the trained type, and DoRA trains on the
QLoRA (NF4) base."""

from __future__ import annotations

import pytest
from test_engine_runs import STEPS, assert_same_curve, tiny_config, train_in_process, train_subprocess

from training.model.lora_file import load_lora_file
from training.run.events import read_status


def adapter_config(run_dir, adapter: str, mode: str = "lora", **run) -> dict:
    config = tiny_config(run_dir, mode, **run)
    config["lora"] = {"rank": 4, "adapter": adapter, "targets": "all"}
    return config


@pytest.mark.parametrize("adapter", ["dora", "lokr", "loha"])
def test_ddp_two_processes_match_one_and_save_the_adapter(tmp_path, adapter):
    single = train_in_process(adapter_config(tmp_path / "one", adapter, micro_batch=4))
    double = train_subprocess(adapter_config(tmp_path / "two", adapter, micro_batch=2), nproc=2)
    assert len(single) == STEPS
    assert_same_curve(double, single, rel=1e-5)
    assert read_status(tmp_path / "two")["state"] == "completed"
    loaded = load_lora_file(tmp_path / "two" / "lora.safetensors")
    assert loaded.settings.adapter == adapter and loaded.metadata["steps"] == str(STEPS)


def test_dora_trains_on_the_qlora_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    events = train_in_process(adapter_config(tmp_path, "dora", mode="qlora", micro_batch=2, grad_accum=1))
    assert len(events) == STEPS and all(e["loss"] == e["loss"] for e in events)  # finite, not NaN
    assert load_lora_file(tmp_path / "lora.safetensors").settings.adapter == "dora"
