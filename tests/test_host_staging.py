"""The LoRA file's host copy during a run (issue 12: the step after each LoRA save took 0.30–0.75 s instead of 0.24 on
an H200): reusable page-locked buffers when they fit, copies queued without waiting, the writer waiting for them.
The CUDA tests run on a GPU machine (`python3 -m pytest tests/test_host_staging.py` on the device)."""

from __future__ import annotations

import logging

import pytest
import torch
from model_helpers import randomize

from training.engine.host_staging import HostStaging, pinned_staging_fits
from training.model.config import PRESETS
from training.model.lora import LoraSettings, attach_lora, lora_state_dict
from training.model.lora_file import StagedLoraFile, lora_file_tensors_on_device, stage_lora_file
from training.model.safetensors_io import read_into, read_sources
from training.model.zimage import ZImageTransformer

GB = 10**9
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _lora_state(device: str):
    model = ZImageTransformer(PRESETS["tiny"]).float()
    randomize(model, seed=0)
    settings = LoraSettings(rank=4)
    model = attach_lora(model, settings)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return {name: tensor.to(device) for name, tensor in lora_state_dict(model).items()}, settings


def _file_bytes(state, settings, path, staging=None) -> bytes:
    staged = stage_lora_file(state, settings, metadata={"steps": "3"}, copy_to_host=staging and staging.copy)
    staged.write(path)
    return path.read_bytes()


def _read(path, name) -> torch.Tensor:
    source = read_sources(path)[name]
    tensor = torch.empty(source.shape)
    with open(source.file, "rb") as file:
        read_into(file, source, tensor)
    return tensor


def test_an_r128_lora_is_pinned_and_a_state_over_a_quarter_of_host_ram_is_not():
    fits, reason = pinned_staging_fits(int(0.64 * GB), 24 * GB)
    assert fits and reason == (
        "0.64 GB copied into reusable page-locked host buffers, the training thread not waiting "
        "(within 6.0 GB, 25% of host RAM)"
    )
    fits, reason = pinned_staging_fits(int(0.64 * GB), 2 * GB)
    assert not fits and "the plain way, the training thread waiting for the copy (more than 0.5 GB" in reason
    assert pinned_staging_fits(6 * GB, 24 * GB)[0] and not pinned_staging_fits(6 * GB + 1, 24 * GB)[0]


def test_cpu_tensors_are_copied_at_once_and_never_ask_for_page_locked_memory():
    asked = []
    staging = HostStaging("LoRA staging", ram_bytes=lambda: asked.append(1) or 64 * GB)
    source = torch.arange(6.0).reshape(2, 3)
    staging.prepare([("w", source)])
    copies = staging.copy([("w", source), ("b", source[:, 1])])
    source.add_(100)  # training goes on
    copies.wait()
    assert copies.ready is None and asked == []
    assert torch.equal(copies.tensors[0][1], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(copies.tensors[1][1], torch.tensor([1.0, 4.0]))


def test_a_lora_staged_through_host_buffers_is_the_same_file_byte_for_byte(tmp_path):
    state, settings = _lora_state("cpu")
    staging = HostStaging("LoRA staging", ram_bytes=lambda: 64 * GB)
    staged = _file_bytes(state, settings, tmp_path / "staged.safetensors", staging)
    assert staged == _file_bytes(state, settings, tmp_path / "plain.safetensors")


def test_the_lora_writer_waits_until_the_staged_copies_are_ready(tmp_path):
    landing = torch.zeros(3)  # what an asynchronous device-to-host copy does: its values arrive by ready()
    StagedLoraFile({"w": landing}, {"dtype": "F32"}, lambda: landing.fill_(7.0)).write(tmp_path / "lora.safetensors")
    assert torch.equal(_read(tmp_path / "lora.safetensors", "w"), torch.full((3,), 7.0))


def test_only_a_loras_file_tensors_are_cast_in_place():
    state, _ = _lora_state("cpu")
    with pytest.raises(ValueError, match="only a LoRA's file tensors are cast in place, not a dora's"):
        lora_file_tensors_on_device(state, LoraSettings(rank=4, adapter="dora"))


@cuda
def test_prepared_buffers_take_copies_without_the_host_waiting_for_the_device(caplog):
    staging = HostStaging("LoRA staging", ram_bytes=lambda: 64 * GB)
    weight = torch.randn(1024, 1024, device="cuda")
    moment = torch.randn(1024, device="cuda")
    expected = weight.cpu(), moment.cpu()
    entries = [("w", weight), ("m", moment), ("w again", weight), ("cpu", torch.ones(2))]
    with caplog.at_level(logging.INFO, logger="training.engine.host_staging"):
        staging.prepare(entries)  # at a step boundary: allocating page-locked memory waits for the device
    assert "LoRA staging: 2 page-locked buffers allocated in" in caplog.text  # "w again" is the same tensor
    torch.cuda._sleep(200_000_000)  # ~0.1 s of device work queued ahead of the copies
    slept = torch.cuda.Event()
    slept.record()
    copies = staging.copy(entries)
    assert not slept.query()  # copy() returned while the device was still busy: the host did not wait
    weight.add_(1.0)  # the next optimizer step, on the same stream
    moment.zero_()
    copies.wait()
    (_, w), (_, m), (_, w_again), (_, c) = copies.tensors
    assert w.is_pinned() and m.is_pinned() and w_again is w and torch.equal(c, torch.ones(2))
    assert torch.equal(w, expected[0]) and torch.equal(m, expected[1])
    again = staging.copy(entries)
    again.wait()
    assert again.tensors[0][1].data_ptr() == w.data_ptr()  # the buffers are reused
    assert torch.equal(again.tensors[0][1], expected[0] + 1.0) and torch.equal(again.tensors[1][1], torch.zeros(1024))


@cuda
def test_copies_too_large_for_page_locked_memory_are_made_the_plain_way(caplog):
    staging = HostStaging("LoRA staging", ram_bytes=lambda: 1000)
    with caplog.at_level(logging.INFO, logger="training.engine.host_staging"):
        copies = staging.copy([("w", torch.randn(1024, device="cuda"))])
    assert copies.ready is None and not copies.tensors[0][1].is_pinned()
    assert "copied the plain way" in caplog.text


@cuda
def test_a_lora_on_the_gpu_is_staged_without_waiting_and_written_as_the_plain_path_writes_it(tmp_path):
    state, settings = _lora_state("cuda")
    original = {name: tensor.clone() for name, tensor in state.items()}
    staging = HostStaging("LoRA staging", ram_bytes=lambda: 64 * GB)
    staging.prepare(lora_file_tensors_on_device(state, settings))  # as the trainer does after the first step
    torch.cuda._sleep(200_000_000)
    slept = torch.cuda.Event()
    slept.record()
    staged = stage_lora_file(state, settings, metadata={"steps": "3"}, copy_to_host=staging.copy)
    assert not slept.query()  # staging returned while the device was still busy
    for tensor in state.values():
        tensor.add_(1.0)  # the next optimizer step
    staged.write(tmp_path / "staged.safetensors")
    plain = _file_bytes(original, settings, tmp_path / "plain.safetensors")
    assert (tmp_path / "staged.safetensors").read_bytes() == plain


def test_a_run_prepares_the_lora_files_buffers_once_after_its_first_step(tmp_path, monkeypatch):
    import copy

    from test_engine_runs import tiny_config

    from training.engine import host_staging
    from training.engine import trainer as trainer_module
    from training.engine.config import TrainConfig

    steps_done, prepared = [], []
    train_step, prepare = trainer_module.Trainer.train_step, host_staging.HostStaging.prepare

    def counted_step(self, **kwargs):
        metrics = train_step(self, **kwargs)
        steps_done.append(1)
        return metrics

    def recorded_prepare(self, entries):
        prepared.append((self.purpose, sorted(name for name, _ in entries), len(steps_done)))
        return prepare(self, entries)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted_step)
    monkeypatch.setattr(host_staging.HostStaging, "prepare", recorded_prepare)
    config = tiny_config(tmp_path / "run", steps=3, grad_accum=1, micro_batch=2)
    assert trainer_module.run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    assert [(purpose, steps) for purpose, _, steps in prepared] == [("LoRA staging", 1)]
    assert prepared[0][1] == sorted(read_sources(tmp_path / "run" / "lora.safetensors"))
