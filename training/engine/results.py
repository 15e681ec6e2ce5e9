"""A run's result files as the user loads them: the LoRA (rank 0, at every save; written in the background during
the run) or full fine-tuning's transformer (gathered from FSDP2 shards, written by rank 0 as one ComfyUI
diffusion-model file at the end), and the EMA twin of either beside it."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from ..model.lora import LoraSettings, adapter_file_state
from ..model.lora_file import lora_file_tensors_on_device, stage_lora_file
from ..model.safetensors_io import host_copy
from .background_writes import BackgroundWrites
from .config import TrainConfig
from .distributed import DistInfo
from .ema import ema_path
from .host_staging import HostStaging
from .parallelize import clean_name
from .variant_setup import lora_metadata

logger = logging.getLogger("training.engine.trainer")


def save_result(
    model: nn.Module,
    config: TrainConfig,
    *,
    lora: LoraSettings | None,
    variant: str,
    step: int,
    dist_info: DistInfo,
    final: bool,
    ema: bool,
    writes: BackgroundWrites,
    staging: HostStaging | None = None,
) -> None:
    """The LoRA (rank 0; staged here, written by ``writes`` unless ``final``) or, at the end, the full model (every
    rank gathers); ``ema``: the EMA twin beside it (``<name>_ema.safetensors``, same format). ``staging``: the
    reusable host buffers the LoRA is copied into (its slot, `result_slot`: the next save reuses it only once
    ``writes`` has written this one)."""
    run = config.run
    metadata = {"steps": str(step), "seed": str(run.seed), "mode": config.mode}
    if ema:
        metadata |= {"ema_decay": str(config.ema.decay), "ema_start_step": str(config.ema.start_step)}
    if lora is not None and dist_info.is_main:
        state = {clean_name(k): v for k, v in adapter_file_state(model).items()}
        metadata.update(lora_metadata(variant, config))
        path = ema_path(run.lora_file) if ema else run.lora_file
        copy_to_host = None if staging is None else functools.partial(staging.copy, slot=result_slot(ema))
        staged = stage_lora_file(state, lora, metadata=metadata, copy_to_host=copy_to_host)  # training may go on
        if final:
            staged.write(path)
        else:
            writes.submit(str(path), functools.partial(staged.write, path))
    if lora is None and final:
        path = ema_path(run.model_file) if ema else run.model_file
        save_full_model(model, path, dist_info=dist_info, metadata=metadata)


def result_slot(ema: bool) -> str:
    """The `HostStaging` slot of a result file: its buffers are its own (the LoRA's and its EMA twin's are written
    side by side)."""
    return "ema" if ema else "lora"


def prepare_result_staging(model: nn.Module, lora: LoraSettings, staging: HostStaging, *, ema: bool) -> None:
    """Allocate ``staging``'s buffers for this model's LoRA file (and its EMA twin's, of the same shapes) now, at a
    step boundary (the trainer: after the first step); saves before it copy the plain way. DoRA, LoKr and LoHa files
    are always copied the plain way (`stage_lora_file`)."""
    if lora.adapter != "lora":
        return
    state = {clean_name(k): v for k, v in adapter_file_state(model).items()}
    entries = lora_file_tensors_on_device(state, lora)
    staging.prepare({result_slot(twin): entries for twin in ((False, True) if ema else (False,))})


def save_full_model(
    model: nn.Module, path: Path, *, dist_info: DistInfo, dtype=torch.bfloat16, metadata: dict | None = None
) -> None:
    """The fine-tuned transformer as a ComfyUI single file in ``dtype`` (rank 0 writes; every rank must call): the
    key layout of ComfyUI's diffusion-model loader (unprefixed, fused qkv), which diffusers' ``from_single_file``
    converts too.

    FSDP2 shards are gathered one tensor at a time on the device, so rank 0 holds only the ``dtype`` copy in RAM."""
    save_full_state(
        {clean_name(name): tensor for name, tensor in model.state_dict().items()},
        path,
        dist_info=dist_info,
        dtype=dtype,
        metadata=metadata,
    )


def save_full_state(
    tensors: dict, path: Path, *, dist_info: DistInfo, dtype=torch.bfloat16, metadata: dict | None = None
) -> None:
    """``save_full_model`` for a name -> tensor (or DTensor shard) mapping: the model's, or its EMA's."""
    from torch.distributed.tensor import DTensor

    from ..model.weights import save_weights

    state = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            local = tensor.to_local()
            if local.device != dist_info.device:  # CPU-offloaded shard: gather on the device
                local = local.to(dist_info.device)
                tensor = DTensor.from_local(
                    local, tensor.device_mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride()
                )
            tensor = tensor.full_tensor()
        if dist_info.is_main:
            state[name] = host_copy(tensor, dtype)
    if dist_info.is_main:
        save_weights(state, path, layout="comfy", metadata={"format": "whetstone.zimage-full", **(metadata or {})})
        logger.info("saved the fine-tuned transformer (%s) to %s", dtype, path)
