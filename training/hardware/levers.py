"""The small-card levers of adapter training, chosen in order of what they cost, each priced by the memory model:

1. the frozen base in bf16 (nothing to pay);
2. the frozen base stored in FP8 (e4m3, one scale per row, upcast per layer: half the weight bytes, a small
   quantisation error in weights that never train, and an elementwise upcast per matmul);
3. FP8 storage plus block swap: the fewest main blocks kept in pinned host memory and streamed through two device
   slots (PCIe traffic, hidden behind compute while a block's matmuls take longer than its copy). Swapped blocks are
   checkpointed (their weights are not saved for the backward, which reloads them).

Full activation checkpointing and the smallest micro-batch with gradient accumulation follow from the sizing of the
plan (``plan._size``) inside the chosen setting. QLoRA keeps its NF4 base (3 GiB: no small card needs it swapped);
full fine-tuning has none of these levers.
"""

from __future__ import annotations

import dataclasses

from .discovery import HardwareProfile
from .fitting import HOST_RAM_USABLE, Setting, largest_fitting_batch, least_memory_depth
from .memory import GIB, MemoryModel
from .offload import CONSUMER_PCIE_BYTES_PER_S, SWAP_SLOTS, swap_bytes_per_micro_step, swap_host_bytes
from .request import PlanRequest


def choose_levers(
    request: PlanRequest, profile: HardwareProfile, setting: Setting, memory_model: MemoryModel, budget: int, decisions
) -> Setting:
    """The setting with the frozen base's storage and the swapped block count decided and logged."""
    if request.mode != "lora":
        storage = "NF4 (QLoRA)" if request.mode == "qlora" else "fp32 master weights"
        decisions.add("base_storage", "bf16" if request.mode == "full" else "nf4", f"mode {request.mode}: {storage}")
        decisions.add("swap_blocks", 0, f"block swap is for mode lora; mode {request.mode} keeps every block")
        return setting
    if request.base_storage is not None or request.swap_blocks is not None:
        return _requested(request, setting, decisions)
    model = memory_model.model
    bf16_peak = _one_sample_peak(request, setting, memory_model)
    if _fits(request, setting, memory_model, budget):
        decisions.add("base_storage", "bf16", f"the bf16 base fits one sample in {_gib(bf16_peak)}")
        decisions.add("swap_blocks", 0, "every block fits on the device")
        return setting
    fp8 = dataclasses.replace(setting, base_storage="fp8")
    over = f"bf16 base: one sample needs {_gib(bf16_peak)} of {_gib(budget)}"
    if _fits(request, fp8, memory_model, budget):
        fp8_peak = _one_sample_peak(request, fp8, memory_model)
        decisions.add("base_storage", "fp8", f"{over}; the e4m3 base fits one sample in {_gib(fp8_peak)}")
        decisions.add("swap_blocks", 0, "every block fits on the device with the FP8 base")
        return fp8
    swapped = _fewest_swapped(request, profile, fp8, memory_model, budget)
    if swapped is None:
        decisions.add("base_storage", "fp8", f"{over}; FP8 storage is the smallest adapter base besides NF4")
        decisions.add("swap_blocks", 0, "no swapped count fits the device and the host's pinned memory")
        return fp8
    decisions.add("base_storage", "fp8", f"{over}; FP8 halves the weights and the bytes block swap copies")
    copied = swap_bytes_per_micro_step(model, "fp8", swapped.swap_blocks)
    total = model.n_layers + 2 * model.n_refiner_layers
    decisions.add(
        "swap_blocks",
        swapped.swap_blocks,
        f"fewest main blocks in pinned host memory so one sample fits ({total - swapped.swap_blocks} of {total} "
        f"blocks resident, {SWAP_SLOTS} device slots; {_gib(swap_host_bytes(model, 'fp8', swapped.swap_blocks))} "
        f"pinned; {copied / GIB:.2f} GiB copied per micro-step, {copied / CONSUMER_PCIE_BYTES_PER_S:.2f} s at "
        f"{CONSUMER_PCIE_BYTES_PER_S / 1e9:.0f} GB/s)",
    )
    if swapped.compiled:
        _override(decisions, "compile", False, _compile_reason(setting))
    return dataclasses.replace(swapped, compiled=False)


def _compile_reason(setting: Setting) -> str:
    return "block swap's hooks run between the blocks: torch.compile per block would trace them (untested)"


def _requested(request: PlanRequest, setting: Setting, decisions) -> Setting:
    storage = request.base_storage or "bf16"
    swap = request.swap_blocks or 0
    decisions.add("base_storage", storage, "requested" if request.base_storage else "bf16 unless requested")
    decisions.add("swap_blocks", swap, "requested" if request.swap_blocks is not None else "off unless requested")
    chosen = dataclasses.replace(setting, base_storage=storage, swap_blocks=swap)
    if swap and setting.compiled:
        _override(decisions, "compile", False, _compile_reason(setting))
        chosen = dataclasses.replace(chosen, compiled=False)
    return chosen


def _override(decisions, name: str, value, reason: str) -> None:
    """Replace an earlier decision of ``name`` (the table shows each decision once)."""
    decisions[:] = [entry for entry in decisions if entry[0] != name]
    decisions.add(name, value, reason)


def _fits(request, setting, memory_model, budget) -> bool:
    depth = least_memory_depth(request, setting, memory_model)
    return largest_fitting_batch(request, setting, depth, memory_model, budget) >= 1


def _one_sample_peak(request, setting, memory_model) -> int:
    from .fitting import estimate

    depth = least_memory_depth(request, setting, memory_model)
    return estimate(request, setting, 1, depth, memory_model).peak_bytes


def _fewest_swapped(request, profile, setting, memory_model, budget) -> Setting | None:
    """The fewest swapped main blocks (more than the slots hold) that fit one sample, within the host's RAM."""
    if not profile.gpus:
        return None
    model = memory_model.model
    for count in range(SWAP_SLOTS + 1, model.n_layers + 1):
        if swap_host_bytes(model, setting.base_storage, count) > profile.ram_bytes * HOST_RAM_USABLE:
            return None
        candidate = dataclasses.replace(setting, swap_blocks=count)
        if _fits(request, candidate, memory_model, budget):
            return candidate
    return None


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"
