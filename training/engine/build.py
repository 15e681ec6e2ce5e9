"""The model a run trains: loaded or randomly initialised on the device, then made LoRA / QLoRA / full and
parallelized; the precision it computes in and the objective it trains (``Trainer.build`` assembles these).

Random init builds on the meta device and materialises directly on the target device (the 6 B model never passes
through CPU RAM on a GPU run); every rank seeds the same generator, so every rank starts from the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..data.shards import EMPTY_CAPTION_KEY, EMPTY_CAPTION_NAME
from ..model.config import ZImageConfig, preset
from ..model.layers import RMSNorm
from ..model.lora import LoraSettings, attach_lora, set_lora_input_cast
from ..model.zimage import ZImageTransformer
from .compile_bounds import image_shape_count
from .config import TrainConfig
from .distributed import DistInfo
from .objective import FlowObjective
from .parallelize import parallelize
from .quantize import quantize_blocks

logger = logging.getLogger(__name__)


def compute_dtype(config: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if config.model.dtype == "bf16" else torch.float32


def storage_dtype(config: TrainConfig) -> tuple[torch.dtype, str]:
    """The dtype parameters are kept in, with the reason."""
    if config.mode == "full":
        return torch.float32, "full fine-tuning keeps float32 master weights (FSDP2 computes in model.dtype)"
    return compute_dtype(config), f"the frozen base is stored in model.dtype={config.model.dtype}"


def init_weights(model: ZImageTransformer) -> None:
    """Default init of every parameter (nn.Linear's own, RMSNorm ones, pad tokens zero); checks none is missed."""
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        else:
            continue
        seen.update(id(p) for p in module.parameters(recurse=False))
    for token in (model.x_pad_token, model.cap_pad_token):
        nn.init.zeros_(token)
        seen.add(id(token))
    missed = [name for name, p in model.named_parameters() if id(p) not in seen]
    assert not missed, f"init_weights does not initialise {missed}"


def random_model(model_config: ZImageConfig, *, dtype: torch.dtype, device: torch.device, seed: int):
    with torch.device("meta"):
        model = ZImageTransformer(model_config)
    model = model.to(dtype=dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        init_weights(model)
    return model


def build_device(config: TrainConfig, dist_info: DistInfo) -> tuple[torch.device, str]:
    """Where the model is built: on the host when FP8 storage or block swap will shrink it (the device would not
    hold the bf16 base; ``parallelize`` places it), else on the training device."""
    run = config.run
    if dist_info.device.type == "cuda" and (run.fp8_base or run.swap_blocks):
        return torch.device("cpu"), "built on the host: FP8 storage / block swap place it on the device block by block"
    return dist_info.device, "built on the training device"


def build_model(config: TrainConfig, dist_info: DistInfo) -> ZImageTransformer:
    dtype, reason = storage_dtype(config)
    device, where = build_device(config, dist_info)
    reason = f"{reason}; {where}"
    if config.model.weights:
        from ..model.weights import load_transformer

        model = load_transformer(config.model.weights, dtype=dtype, device=device)
        logger.info("model: %s as %s on %s (%s)", config.model.weights, dtype, device, reason)
    else:
        model_config = preset(config.model.preset)
        model = random_model(model_config, dtype=dtype, device=device, seed=config.run.seed)
        logger.info(
            "model: random init of preset %r (%.3f B parameters) as %s on %s, seed %d (%s)",
            config.model.preset,
            model_config.total_params() / 1e9,
            dtype,
            device,
            config.run.seed,
            reason,
        )
    return model


def lora_settings(config: TrainConfig) -> LoraSettings:
    section = config.lora
    return LoraSettings(
        rank=section.rank,
        alpha=section.alpha,
        dropout=section.dropout,
        targets=section.targets,
        adapter=section.adapter,
    )


def apply_mode(model: ZImageTransformer, config: TrainConfig) -> LoraSettings | None:
    """QLoRA: NF4 block linears, then the adapter (``lora.adapter``: LoRA, DoRA, LoKr or LoHa); LoRA: the adapter on
    the frozen base; full: every parameter trains.

    Adapter weights are float32 whatever the base dtype (the optimizer updates them in full precision)."""
    model.train()
    if config.mode == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return None
    if config.mode == "qlora":
        quantize_blocks(model, model.blocks(), compute_dtype=compute_dtype(config))
    settings = lora_settings(config)
    torch.manual_seed(config.run.seed + 1)  # LoRA A init: the same on every rank
    attach_lora(model, settings)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return settings


def load_empty_caption(config: TrainConfig, device: torch.device, folder: Path | None = None) -> torch.Tensor | None:
    """The features of "" for caption dropout: from ``<shards>/empty_caption.safetensors`` (None if dropout is off);
    `folder`: where the set's files are (a remote set's local view) when not data.shards."""
    if config.data.caption_dropout == 0 or config.data.synthetic:
        return None
    from safetensors.torch import load_file

    path = Path(config.data.shards if folder is None else folder) / EMPTY_CAPTION_NAME
    if not path.is_file():
        raise ValueError(
            f"data.caption_dropout={config.data.caption_dropout} needs the text encoder's features of the empty "
            f"caption in {path}, which this shard set lacks; re-pack it, or set data.caption_dropout to 0"
        )
    tensors = load_file(path)
    if EMPTY_CAPTION_KEY not in tensors:
        raise ValueError(f"{path} holds {sorted(tensors)}, not {EMPTY_CAPTION_KEY!r}; re-pack the shard set")
    logger.info("caption dropout %.2f with the empty caption from %s", config.data.caption_dropout, path)
    return tensors[EMPTY_CAPTION_KEY].to(device)


def parallelized(model: ZImageTransformer, config: TrainConfig, dist_info: DistInfo) -> nn.Module:
    """The model as the forward calls it: checkpointed, compiled, FP8, swapped and wrapped (DDP / FSDP2) as planned."""
    run = config.run
    return parallelize(
        model,
        mode=config.mode,
        dist_info=dist_info,
        checkpoint_depth=run.checkpoint_depth,
        compile=run.compile,
        fp8=run.fp8,
        param_dtype=compute_dtype(config),
        cpu_offload=run.fsdp_cpu_offload,
        ddp_bf16_grads=run.ddp_bf16_grads,
        strategy=config.parallel.strategy,
        fp8_base=run.fp8_base,
        swap_blocks=run.swap_blocks,
        image_shapes=image_shape_count(config) if run.compile else 1,
    )


def uses_autocast(config: TrainConfig, dist_info: DistInfo) -> bool:
    """bf16 autocast on CUDA for LoRA/QLoRA (bf16 base, float32 LoRA); FSDP2's policy casts in full mode."""
    return dist_info.is_cuda and config.mode != "full" and compute_dtype(config) == torch.bfloat16


def precision_summary(config: TrainConfig, dist_info: DistInfo) -> str:
    """The precision the run trains in, as the log states it."""
    if config.mode == "full":
        return f"float32 master weights, {compute_dtype(config)} compute and float32 gradient reduction (FSDP2)"
    if uses_autocast(config, dist_info):
        return "bf16 autocast over the frozen base; float32 LoRA weights and optimizer state"
    return f"{compute_dtype(config)} base without autocast ({dist_info.device.type}); float32 LoRA weights"


def flow_objective(config: TrainConfig) -> FlowObjective:
    """The σ sampling and loss weighting of ``config.objective``, with the data's caption dropout and the run's seed."""
    section = config.objective
    return FlowObjective(
        sampler=section.sigma_sampler,
        shift=section.shift,
        shift_rule=section.shift_rule,
        logit_mean=section.logit_mean,
        logit_std=section.logit_std,
        mode_scale=section.mode_scale,
        loss_weighting=section.loss_weighting,
        caption_dropout=config.data.caption_dropout,
        seed=config.run.seed,
    )


def keep_lora_inputs_bf16(model: nn.Module, config: TrainConfig, dist_info: DistInfo, lora) -> None:
    """Under autocast the adapters run in bf16: peft's fp32 cast of their inputs would only add copies."""
    if lora is not None and uses_autocast(config, dist_info):
        count = set_lora_input_cast(model, False)
        logger.info("LoRA inputs stay bf16 in %d layers (autocast runs the adapters in bf16; no fp32 copies)", count)
