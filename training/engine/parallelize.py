"""Everything that changes how the model runs, not what it computes: FP8 matmuls, activation checkpointing,
per-block ``torch.compile``, and data parallelism (DDP for LoRA/QLoRA, FSDP2 for full fine-tuning).

Order as torchtitan: FP8 (or QLoRA's in-graph NF4) → checkpointing → compile → DDP/FSDP. The model module stays a ``ZImageTransformer``
(FSDP2 and the wrappers act in place); DDP returns a wrapper whose ``.module`` is the model.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .block_swap import apply_block_swap, place_on_device
from .distributed import DistInfo

logger = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)
CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."
COMPILE_RECOMPILE_LIMIT = 64


def apply_activation_checkpointing(model: nn.Module, depth: int) -> None:
    """Non-reentrant checkpointing of the first ``depth`` main blocks, replacing each in ``model.layers``.

    The wrapper's state-dict hooks drop ``_checkpoint_wrapped_module.`` from ``state_dict()`` keys (not from
    ``named_parameters()``; ``clean_name`` does that).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    n_layers = len(model.layers)
    if depth > n_layers:
        raise ValueError(f"run.checkpoint_depth={depth} exceeds the model's {n_layers} main blocks; use 0..{n_layers}")
    for index in range(depth):
        model.layers[index] = checkpoint_wrapper(model.layers[index], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    logger.info("activation checkpointing: the first %d of %d main blocks", depth, n_layers)


def clean_name(name: str) -> str:
    return name.replace(CHECKPOINT_PREFIX, "")


def apply_compile(model: nn.Module, *, backend: str = "inductor", image_shapes: int = 1) -> None:
    """``torch.compile`` each transformer block in place (names and state-dict keys stay unchanged).

    Every block shares one code object, so dynamo's per-code recompile limit covers all of them: refiner and main
    blocks, grad and no-grad inputs, and each token count (image buckets, caption lengths) need graphs of their own.
    ``image_shapes``: how many image shapes the run trains; the limits follow it (``compile_bounds``).
    """
    from .compile_bounds import apply_limits, compile_bounds

    bounds = compile_bounds(image_shapes, COMPILE_RECOMPILE_LIMIT)
    apply_limits(bounds)
    blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
    options = {} if bounds.dynamic is None else {"dynamic": bounds.dynamic}
    for block in blocks:
        block.compile(backend=backend, **options)
    logger.info(
        "torch.compile: %d blocks compiled one by one, up to %d graphs (block kinds x token counts); the first steps "
        "of each new shape are slow while they compile",
        len(blocks),
        bounds.recompile_limit,
    )


def fp8_supported(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"FP8 training needs a CUDA GPU; this process runs on {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return False, f"FP8 training needs compute capability >= 8.9 (Ada/Hopper); {device} has {capability}"
    return True, f"compute capability {capability}"


def apply_fp8(model: nn.Module, *, mode: str, device: torch.device) -> None:
    """FP8 for the big block matmuls. Adapter modes: the frozen base linears are quantised once (`fp8_frozen`, e4m3,
    rowwise scales, a transposed copy for the input gradient). Full fine-tuning: torchao's float8 training, which
    re-quantises the weights every call because they train."""
    supported, reason = fp8_supported(device)
    if not supported:
        raise ValueError(f"run.fp8 is on but {reason}; set run.fp8 to false")
    blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
    if mode != "full":
        from .fp8_frozen import convert_frozen_linears

        converted = convert_frozen_linears(blocks)
        logger.info(
            "FP8: %d frozen block linears quantised once to e4m3 with rowwise scales, plus a transposed copy for the "
            "input gradient (the base never trains, so it is never re-quantised; %s)",
            converted,
            reason,
        )
        return
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as error:
        raise ValueError(f"run.fp8 needs torchao ({error}); pip install torchao, or set run.fp8 to false") from error
    block_groups = ("noise_refiner.", "context_refiner.", "layers.")

    def wanted(module: nn.Module, fqn: str) -> bool:
        in_block = fqn.startswith(block_groups) and "lora_" not in fqn
        return in_block and module.in_features % 16 == 0 and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=wanted)
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    logger.info("FP8 (torchao, tensorwise scaling; weights train): %d block linears converted (%s)", converted, reason)


def apply_nf4_in_graph(model: nn.Module) -> None:
    """QLoRA under compile: the NF4 block linears as plain tensors dequantised inside the compiled graphs
    (`nf4_frozen`); eager keeps bitsandbytes' kernels, which beat the unfused PyTorch ops there."""
    from .nf4_frozen import convert_nf4_linears

    converted = convert_nf4_linears(model.blocks())
    logger.info(
        "QLoRA: %d NF4 block linears dequantised inside the compiled blocks (the same packed tensors; bitsandbytes' "
        "per-call custom ops left the GPU waiting on the host, issue 12)",
        converted,
    )


def lora_concat_blocker(
    *, mode: str, compile: bool, plain_base: bool, dtype: torch.dtype, device: torch.device, strategy: str
) -> str | None:
    """Why `lora_concat` stays off, or None where it was measured to pay (issue 12): compiled LoRA or QLoRA on a
    plain bf16 or NF4 base, one CUDA process (H200: LoRA +2.5% at 512², QLoRA +2.6%). Eager would copy each input
    into the concatenation that Inductor fuses."""
    reasons = (
        (mode not in ("lora", "qlora"), f"mode {mode!r}"),
        (not compile, "run.compile is off (eager would copy every input into the concatenation)"),
        (not plain_base, "the base is FP8 or block-swapped"),
        (dtype != torch.bfloat16, f"the base computes in {dtype}, not bf16"),
        (device.type != "cuda", f"it runs on {device.type}"),
        (strategy != "none", f"parallel strategy {strategy!r} is not measured with it yet"),
    )
    return next((reason for blocked, reason in reasons if blocked), None)


def lora_concat_applies(**where) -> bool:
    return lora_concat_blocker(**where) is None


def apply_lora_concat_gemms(model: nn.Module) -> None:
    """LoRA under compile on one CUDA process: each adapter's up-projection computed in its base's GEMM
    (`lora_concat`), which writes the output once instead of twice."""
    from .lora_concat import apply_lora_concat

    converted = apply_lora_concat(model)
    logger.info(
        "LoRA: %d layers compute x·Wᵀ + s·(x·Aᵀ)·Bᵀ as one GEMM over [x | s·x·Aᵀ] (one output write instead of the "
        "adapter's separate [M, N] product and add, issue 12)",
        converted,
    )


def apply_ddp(model: nn.Module, dist_info: DistInfo, *, bf16_grads: bool = False) -> nn.Module:
    """DDP over the model; only the (LoRA) parameters that require grad are all-reduced.

    ``bf16_grads``: all-reduce the gradients in bf16 (half the bytes and half the time the NCCL kernels share the
    GPU with the backward); each rank's gradient is rounded to bf16 before averaging, so results differ slightly."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist_info.device.index] if dist_info.is_cuda else None
    wrapped = DistributedDataParallel(
        model, device_ids=device_ids, gradient_as_bucket_view=True, **_no_forward_buffer_sync(DistributedDataParallel)
    )
    if bf16_grads:
        wrapped.register_comm_hook(None, _bf16_all_reduce)
    logger.info(
        "data parallel: DDP over %d ranks (%d trainable tensors all-reduced in %s; gradient_as_bucket_view; buffers "
        "not re-broadcast before each forward: every buffer is a frozen derivative of the weights, the same on every "
        "rank, and the FP8 base's buffers would be %.2f GiB a step)",
        dist_info.world_size,
        sum(p.requires_grad for p in model.parameters()),
        "bf16 (run.ddp_bf16_grads)" if bf16_grads else "float32",
        sum(b.numel() * b.element_size() for b in model.buffers()) / 2**30,
    )
    return wrapped


def _no_forward_buffer_sync(ddp_class: type) -> dict:
    """DDP's keyword that stops it broadcasting rank 0's buffers before every forward (its default): torch 2.13
    calls it ``forward_sync_buffers`` and deprecates ``broadcast_buffers``, which older versions have alone."""
    import inspect

    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _bf16_all_reduce(process_group, bucket):  # no return annotation: DDP checks it literally
    """DDP comm hook: average a gradient bucket in bf16 (torch's own bf16 hook refuses gloo, which the tests use)."""
    import torch.distributed as dist

    group = process_group if process_group is not None else dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(done: torch.futures.Future) -> torch.Tensor:
        buffer = bucket.buffer()
        buffer.copy_(done.value()[0])
        return buffer

    return future.then(decompress)


def apply_fsdp(model: nn.Module, dist_info: DistInfo, *, param_dtype: torch.dtype, cpu_offload: bool) -> None:
    """FSDP2 ``fully_shard`` on every block, then the root; fp32 master params, ``param_dtype`` compute, fp32 reduce.

    Inputs are not cast by FSDP (σ and the RoPE tables must stay float32); the model casts its own activations.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cpu_offload and not dist_info.is_cuda:
        raise ValueError("run.fsdp_cpu_offload moves GPU memory to the host; it needs CUDA. Set it to false")
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    offload = CPUOffloadPolicy(pin_memory=True) if cpu_offload else OffloadPolicy()
    blocks = [*model.noise_refiner, *model.context_refiner, *model.layers]
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        last = index == len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=not last)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    logger.info(
        "FSDP2: %d blocks + root sharded over %d ranks; params %s, reduce float32, master float32%s",
        len(blocks),
        dist_info.world_size,
        param_dtype,
        ", CPU offload" if cpu_offload else "",
    )


def parallelize(
    model: nn.Module,
    *,
    mode: str,
    dist_info: DistInfo,
    checkpoint_depth: int,
    compile: bool,
    fp8: bool,
    param_dtype: torch.dtype,
    cpu_offload: bool,
    ddp_bf16_grads: bool = False,
    strategy: str = "auto",
    fp8_base: bool = False,
    swap_blocks: int = 0,
    measure_swap: bool = False,
    image_shapes: int = 1,
) -> nn.Module:
    """Apply FP8, checkpointing, block swap, compile and data parallelism (``strategy``: the config's
    ``parallel.strategy``, as the plan decided it); returns the module to call for the forward pass. A model built
    on the host (small-card levers, ``build.build_device``) reaches the device here: FP8 storage one block at a time,
    the swapped blocks never."""
    if fp8:
        apply_fp8(model, mode=mode, device=dist_info.device)
    if fp8_base:
        from .fp8_storage import convert_to_fp8_storage

        convert_to_fp8_storage(model.blocks(), compute_dtype=param_dtype, device=dist_info.device)
    if mode == "qlora" and compile:
        apply_nf4_in_graph(model)
    strategy = resolve_strategy(strategy, mode=mode, world_size=dist_info.world_size)
    if checkpoint_depth:
        apply_activation_checkpointing(model, checkpoint_depth)
    if swap_blocks:
        if compile:
            raise ValueError("run.swap_blocks with run.compile: set run.compile to false (the hooks would be traced)")
        apply_block_swap(model, swap_blocks, dist_info.device, measure=measure_swap)
    else:
        place_on_device(model, dist_info.device)
    plain_base = not (fp8 or fp8_base or swap_blocks)
    where = dict(mode=mode, compile=compile, plain_base=plain_base, dtype=param_dtype, device=dist_info.device)
    if lora_concat_applies(**where, strategy=strategy):
        apply_lora_concat_gemms(model)  # after placement: the base weight becomes a view of the combined buffer
    elif mode in ("lora", "qlora"):
        logger.info("LoRA: peft's separate adapter GEMMs (%s)", lora_concat_blocker(**where, strategy=strategy))
    if compile:
        apply_compile(model, image_shapes=image_shapes)
    if strategy == "fsdp2":
        apply_fsdp(model, dist_info, param_dtype=param_dtype, cpu_offload=cpu_offload)
        return model
    if strategy == "ddp":
        return apply_ddp(model, dist_info, bf16_grads=ddp_bf16_grads)
    logger.info("data parallel: none (one process)")
    return model


def resolve_strategy(strategy: str, *, mode: str, world_size: int) -> str:
    """'auto' by mode (FSDP2 for full fine-tuning, which also gives its fp32 master weights bf16 compute on one
    rank; DDP for LoRA/QLoRA on several ranks); 'ddp' on one rank is 'none'; 'none' refuses several ranks."""
    if strategy == "auto":
        strategy = "fsdp2" if mode == "full" else "ddp"
    if strategy == "ddp" and world_size == 1:
        return "none"
    if strategy == "none" and mode == "full":
        raise ValueError(
            "parallel.strategy 'none' cannot train mode 'full' (FSDP2 holds its mixed precision): use 'fsdp2'"
        )
    if strategy == "none" and world_size > 1:
        raise ValueError(
            f"parallel.strategy is 'none' but {world_size} processes run: use 'ddp' (LoRA/QLoRA) or start one process"
        )
    return strategy


def attention_kernels(backend: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Restrict SDPA to the kernels the plan priced: 'flash' is the memory class of the fused kernels whose memory is
    linear in the sequence (cuDNN's fused attention, which PyTorch prefers on Hopper and our profiles measured,
    flash, and memory-efficient attention, the fallback for masked batches); PyTorch keeps its own order among them.
    The quadratic 'math' kernel only when planned; 'auto' leaves PyTorch's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "auto":
        return contextlib.nullcontext()
    kernels = {
        "flash": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }[backend]
    if device.type != "cuda" and backend in ("efficient", "cudnn"):
        raise ValueError(f"model.attention_backend {backend!r} needs CUDA; this process runs on {device}: use 'auto'")
    return sdpa_kernel(kernels)


def unwrap(model: nn.Module) -> nn.Module:
    """The ``ZImageTransformer`` inside a DDP wrapper (FSDP2 works in place)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def gradient_sync(model: nn.Module, *, sync: bool) -> contextlib.AbstractContextManager:
    """DDP: skip the all-reduce on non-final micro-steps (``no_sync``). FSDP2 reduce-scatters every micro-step:
    skipping it would keep unsharded float32 gradients of the whole model in memory."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()
