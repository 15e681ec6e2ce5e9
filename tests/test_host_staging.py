"""The LoRA files' host copy during a run (issue 12: the step after each LoRA save took 0.30–0.75 s instead of 0.24 on
an H200): reusable page-locked buffers, allocated at a step boundary, when they fit; copies queued without waiting;
the writer waiting for them; the plain way otherwise. The CUDA tests run on a GPU machine
(`python3 -m pytest tests/test_host_staging.py` on the device)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from model_helpers import randomize
from test_engine_runs import tiny_config

from training.engine import host_staging
from training.engine import trainer as trainer_module
from training.engine.config import TrainConfig
from training.engine.host_staging import HostStaging, pinned_staging_fits
from training.model.config import PRESETS
from training.model.lora import LoraSettings, attach_lora, lora_state_dict
from training.model.lora_file import StagedLoraFile, lora_file_tensors_on_device, stage_lora_file
from training.model.safetensors_io import read_into, read_sources
from training.model.zimage import ZImageTransformer

GB = 10**9
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def staging(ram=64 * GB, available=64 * GB) -> HostStaging:
    return HostStaging("LoRA staging", ram_bytes=lambda: ram, available_bytes=lambda: available)


def _lora_state(device: str, dtype=torch.float32):
    model = ZImageTransformer(PRESETS["tiny"]).float()
    randomize(model, seed=0)
    settings = LoraSettings(rank=4)
    model = attach_lora(model, settings)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return {name: tensor.to(device, dtype) for name, tensor in lora_state_dict(model).items()}, settings


def _file_bytes(state, settings, path, copy_to_host=None) -> bytes:
    stage_lora_file(state, settings, metadata={"steps": "3"}, copy_to_host=copy_to_host).write(path)
    return path.read_bytes()


def _read(path, name) -> torch.Tensor:
    source = read_sources(path)[name]
    tensor = torch.empty(source.shape)
    with open(source.file, "rb") as file:
        read_into(file, source, tensor)
    return tensor


def test_an_r128_lora_fits_and_a_quarter_of_ram_or_half_of_what_is_available_is_the_limit():
    fits, reason = pinned_staging_fits(int(0.64 * GB), ram_bytes=24 * GB, available_bytes=20 * GB)
    assert fits and reason == (
        "0.64 GB copied into reusable page-locked host buffers, the training thread not waiting "
        "(within 6.0 GB: 25% of host RAM, at most 50% of the 20.0 GB available)"
    )
    fits, reason = pinned_staging_fits(int(0.64 * GB), ram_bytes=24 * GB, available_bytes=1 * GB)  # block swap
    assert not fits and "the plain way, the training thread waiting for the copy (more than 0.5 GB" in reason
    assert pinned_staging_fits(6 * GB, ram_bytes=24 * GB, available_bytes=24 * GB)[0]
    assert not pinned_staging_fits(6 * GB + 1, ram_bytes=24 * GB, available_bytes=24 * GB)[0]


def test_cpu_tensors_are_copied_at_once_once_each_and_never_ask_for_page_locked_memory():
    asked = []
    cpu_staging = HostStaging("LoRA staging", ram_bytes=lambda: asked.append(1) or GB, available_bytes=lambda: GB)
    source = torch.arange(6.0).reshape(2, 3)
    cpu_staging.prepare({"lora": [("w", source)]})
    copies = cpu_staging.copy([("w", source), ("b", source[:, 1]), ("w for k", source)], slot="lora")
    source.add_(100)  # training goes on
    copies.wait()
    (_, w), (_, b), (_, w_again) = copies.tensors
    assert copies.ready is None and asked == [] and w_again is w  # q, k and v's shared A: one copy
    assert torch.equal(w, torch.arange(6.0).reshape(2, 3)) and torch.equal(b, torch.tensor([1.0, 4.0]))


def test_a_lora_staged_through_host_staging_is_the_same_file_byte_for_byte(tmp_path):
    state, settings = _lora_state("cpu")
    staged = _file_bytes(state, settings, tmp_path / "staged.safetensors", staging().copy)
    assert staged == _file_bytes(state, settings, tmp_path / "plain.safetensors")


def test_the_lora_writer_waits_until_the_staged_copies_are_ready(tmp_path):
    landing = torch.zeros(3)  # what an asynchronous device-to-host copy does: its values arrive by ready()
    StagedLoraFile({"w": landing}, {"dtype": "F32"}, lambda: landing.fill_(7.0)).write(tmp_path / "lora.safetensors")
    assert torch.equal(_read(tmp_path / "lora.safetensors", "w"), torch.full((3,), 7.0))


def test_only_a_loras_file_tensors_are_cast_in_place():
    state, _ = _lora_state("cpu")
    with pytest.raises(ValueError, match="only a LoRA's file tensors are cast in place, not a dora's"):
        lora_file_tensors_on_device(state, LoraSettings(rank=4, adapter="dora"))


def _recorded_run(tmp_path, monkeypatch, **config_changes):
    """Run a tiny LoRA training; returns (slots and names prepared, steps trained by then) for each prepare call."""
    steps_done, prepared = [], []
    train_step, prepare = trainer_module.Trainer.train_step, host_staging.HostStaging.prepare

    def counted_step(self, **kwargs):
        metrics = train_step(self, **kwargs)
        steps_done.append(1)
        return metrics

    def recorded_prepare(self, slots):
        prepared.append(
            ({slot: sorted(name for name, _ in entries) for slot, entries in slots.items()}, len(steps_done))
        )
        return prepare(self, slots)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted_step)
    monkeypatch.setattr(host_staging.HostStaging, "prepare", recorded_prepare)
    config = tiny_config(tmp_path / "run", grad_accum=1, micro_batch=2, **config_changes.pop("run", {}))
    config |= config_changes
    assert trainer_module.run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    return prepared


def test_a_run_prepares_both_result_files_buffers_once_after_its_first_step(tmp_path, monkeypatch):
    prepared = _recorded_run(tmp_path, monkeypatch, run={"steps": 3}, ema={"placement": "device"})
    names = sorted(read_sources(tmp_path / "run" / "lora.safetensors"))
    assert prepared == [({"lora": names, "ema": names}, 1)]
    assert sorted(read_sources(tmp_path / "run" / "lora_ema.safetensors")) == names


def test_a_run_that_ends_after_its_first_step_prepares_nothing(tmp_path, monkeypatch):
    assert _recorded_run(tmp_path, monkeypatch, run={"steps": 1}) == []


@cuda
def test_prepared_buffers_take_copies_in_stream_order_without_the_host_waiting(caplog):
    device_staging = staging()
    weight = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    moment = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    entries = [("w", weight), ("m", moment), ("w again", weight), ("cpu", torch.ones(2))]
    with caplog.at_level(logging.INFO, logger="training.engine.host_staging"):
        device_staging.prepare({"lora": entries})  # at a step boundary: allocating page-locked memory waits
    assert "LoRA staging: 2 page-locked buffers allocated in" in caplog.text  # "w again" is the same tensor
    torch.cuda._sleep(200_000_000)  # ~0.1 s of device work queued ahead of the copies
    slept = torch.cuda.Event()
    slept.record()
    weight.fill_(3.0)  # the last optimizer step, queued behind the sleep: the copy must see it
    moment.fill_(5.0)
    copies = device_staging.copy(entries, slot="lora")
    assert not slept.query()  # copy() returned while the device was still busy: the host did not wait
    weight.add_(1.0)  # the next optimizer step: the copy must not see it
    moment.zero_()
    copies.wait()
    (_, w), (_, m), (_, w_again), (_, c) = copies.tensors
    assert w.is_pinned() and m.is_pinned() and w_again is w and torch.equal(c, torch.ones(2))
    assert torch.equal(w, torch.full_like(w, 3.0)) and torch.equal(m, torch.full_like(m, 5.0))
    again = device_staging.copy(entries, slot="lora")
    again.wait()
    assert again.tensors[0][1].data_ptr() == w.data_ptr()  # the buffers are reused
    assert torch.equal(w, torch.full_like(w, 4.0)) and torch.equal(again.tensors[1][1], torch.zeros_like(m))
    other = device_staging.copy(entries, slot="ema")  # another result file's slot has no buffers: the plain way
    assert other.ready is None and not other.tensors[0][1].is_pinned()


@cuda
def test_copies_are_plain_before_prepare_when_too_large_and_when_page_locking_fails(caplog, monkeypatch):
    weight = torch.randn(1024, device="cuda")
    unprepared = staging().copy([("w", weight)], slot="lora")
    assert unprepared.ready is None and not unprepared.tensors[0][1].is_pinned()
    too_large = staging(available=1000)
    with caplog.at_level(logging.INFO, logger="training.engine.host_staging"):
        too_large.prepare({"lora": [("w", weight)]})
    assert "copied the plain way" in caplog.text and too_large.copy([("w", weight)], slot="lora").ready is None
    empty = torch.empty

    def no_page_locked_memory(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_page_locked_memory)
    failing = staging()
    with caplog.at_level(logging.WARNING, logger="training.engine.host_staging"):
        failing.prepare({"lora": [("w", weight)]})
    assert (
        "allocating page-locked buffers failed (CUDA error: out of memory (cudaHostAlloc)); copying the plain way"
        in caplog.text
    )
    assert failing.copy([("w", weight)], slot="lora").ready is None


@cuda
def test_a_bf16_lora_on_the_gpu_is_staged_without_waiting_and_written_as_it_was(tmp_path):
    state, settings = _lora_state("cuda", torch.bfloat16)  # bf16: the file's tensors are the state's own
    original = {name: tensor.clone() for name, tensor in state.items()}
    device_staging = staging()
    device_staging.prepare({"lora": lora_file_tensors_on_device(state, settings)})  # as the trainer does
    torch.cuda._sleep(200_000_000)
    slept = torch.cuda.Event()
    slept.record()
    copy_to_host = lambda entries: device_staging.copy(entries, slot="lora")  # noqa: E731
    staged = stage_lora_file(state, settings, metadata={"steps": "3"}, copy_to_host=copy_to_host)
    assert not slept.query()  # staging returned while the device was still busy
    for tensor in state.values():
        tensor.add_(1.0)  # the next optimizer step, on the very tensors being copied
    staged.write(tmp_path / "staged.safetensors")
    plain = _file_bytes(original, settings, tmp_path / "plain.safetensors")
    assert (tmp_path / "staged.safetensors").read_bytes() == plain
