"""Full fine-tuning's result file: the transformer (or its EMA) gathered from FSDP2 shards and written by rank 0 as
one ComfyUI diffusion-model file."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..model.safetensors_io import host_copy
from .distributed import DistInfo
from .parallelize import clean_name

logger = logging.getLogger("training.engine.trainer")


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
