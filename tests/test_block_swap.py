"""Block swap: the schedule's order (forward prefetch, reversed backward, recompute under checkpointing, steady-state
traffic) and CPU runs whose losses are bit-identical to the same run without swap. On the CPU an evicted block holds
NaN, so any use out of schedule shows in the loss."""

from __future__ import annotations

import pytest
import torch

from training.engine.block_swap import block_swap_of
from training.engine.build import random_model
from training.engine.distributed import DistInfo
from training.engine.parallelize import parallelize
from training.engine.swap_schedule import SWAP_SLOTS, Action, SwapSchedule, replay
from training.hardware import offload
from training.model.config import PRESETS
from training.model.lora import LoraSettings, attach_lora

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
CONFIG = PRESETS["tiny"].replace(n_layers=5)


def micro_step_events(blocks: int, *, checkpointed: bool = True) -> list[tuple[str, int]]:
    events = []
    for block in range(blocks):
        events += [("forward", block), ("forward_done", block)]
    for block in reversed(range(blocks)):
        events += [("backward", block)] + ([("forward", block)] if checkpointed else [])
    return events + [("end", -1)]


def test_the_slot_counts_agree_between_engine_and_planner():
    assert SWAP_SLOTS == offload.SWAP_SLOTS == 2


def test_first_micro_step_order():
    schedule = SwapSchedule(4)
    actions = replay(schedule, micro_step_events(4))
    L, E, W = "load", "evict", "wait"  # noqa: N806
    expected = [
        (L, 0, 0), (L, 1, 1), (W, 0, 0),  # forward 0: 0 and the next one copied
        (E, 0, 0), (L, 2, 0), (W, 1, 1),  # 0 done: 2 copied while 1 computes
        (E, 1, 1), (L, 3, 1), (W, 2, 0),
        (W, 3, 1),  # 2 done: 3 is in, 2 stays for the backward
        (W, 3, 1), (W, 3, 1),  # backward 3 and its recompute: nothing to copy
        (E, 3, 1), (L, 1, 1), (W, 2, 0), (W, 2, 0),  # backward 2: 1 copied ahead, in reverse order
        (E, 2, 0), (L, 0, 0), (W, 1, 1), (W, 1, 1),
        (W, 0, 0), (W, 0, 0),  # backward 0; at the end 0 and 1 stay for the next forward
    ]  # fmt: skip
    assert actions == [Action(*a) for a in expected]
    assert schedule.trace == [
        ("forward", 0), ("forward", 1), ("forward", 2), ("forward", 3),
        ("backward", 3), ("recompute", 3), ("backward", 2), ("recompute", 2),
        ("backward", 1), ("recompute", 1), ("backward", 0), ("recompute", 0), ("end", -1),
    ]  # fmt: skip


@pytest.mark.parametrize("blocks", [3, 4, 7, 12])
def test_invariants_over_micro_steps(blocks):
    schedule = SwapSchedule(blocks)
    events = micro_step_events(blocks) * 3
    resident: dict[int, int] = {}  # block -> slot
    for kind, block in events:
        step_actions = replay(schedule, [(kind, block)])
        for action in step_actions:
            if action.kind == "evict":
                assert resident.pop(action.block) == action.slot
            elif action.kind == "load":
                assert action.slot not in resident.values(), "a slot is loaded while another block holds it"
                resident[action.block] = action.slot
            else:
                assert resident[action.block] == action.slot, "a block is used while not resident"
        if kind == "forward" and schedule.phase == "forward" and block + 1 < blocks:
            assert block + 1 in resident, f"block {block + 1} is not being copied while block {block} computes"
        if kind == "backward" and block > 0:
            assert block - 1 in resident, f"block {block - 1} is not being copied during block {block}'s backward"
    assert len(resident) <= SWAP_SLOTS


@pytest.mark.parametrize("blocks", [3, 5, 30])
def test_steady_state_traffic_is_what_the_planner_prices(blocks):
    schedule = SwapSchedule(blocks)
    replay(schedule, micro_step_events(blocks))  # the first micro-step fills the slots
    loads = [a for a in replay(schedule, micro_step_events(blocks)) if a.kind == "load"]
    assert len(loads) == 2 * (blocks - SWAP_SLOTS)
    block_bytes = offload.frozen_block_bytes(PRESETS["z-image"], "fp8")
    assert offload.swap_bytes_per_micro_step(PRESETS["z-image"], "fp8", blocks) == len(loads) * block_bytes
    # the forward copies the blocks the last backward did not leave behind, the backward the rest, in reverse
    assert [a.block for a in loads] == [*range(SWAP_SLOTS, blocks), *range(blocks - 1 - SWAP_SLOTS, -1, -1)]


def test_a_forward_without_backward_ends_the_pass():
    schedule = SwapSchedule(3)
    events = [e for b in range(3) for e in (("forward", b), ("forward_nograd", b))]
    replay(schedule, events)
    assert schedule.phase == "idle" and schedule.trace[-1] == ("end", -1)
    assert sorted(b for b in schedule.slots if b is not None) == [0, 1]  # ready for the next forward


def test_too_few_blocks_to_swap_is_refused():
    with pytest.raises(ValueError, match="more swapped blocks"):
        SwapSchedule(2)


# ---------------------------------------------------------------------------------------------------------------------
# CPU runs


def lora_model(*, swap_blocks: int, depth: int, fp8_base: bool = False):
    model = random_model(CONFIG, dtype=torch.float32, device=torch.device("cpu"), seed=0)
    model.train()
    torch.manual_seed(1)
    attach_lora(model, LoraSettings(rank=4, alpha=4, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B: every block's adapter changes the output from the first step
            torch.nn.init.normal_(param, std=0.02)
    parallelize(
        model,
        mode="lora",
        dist_info=CPU,
        checkpoint_depth=depth,
        compile=False,
        fp8=False,
        param_dtype=torch.float32,
        cpu_offload=False,
        fp8_base=fp8_base,
        swap_blocks=swap_blocks,
    )
    return model


def batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, CONFIG.in_channels, 8, 8, generator=generator)
    sigma = torch.rand(2, generator=generator)
    captions = torch.randn(2, 7, CONFIG.cap_feat_dim, generator=generator)
    target = torch.randn(2, CONFIG.in_channels, 8, 8, generator=generator)
    return latents, sigma, captions, target


def train(model, steps: int = 2, accum: int = 2) -> tuple[list[float], dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(accum):
            latents, sigma, captions, target = batch(step * accum + micro)
            loss = torch.nn.functional.mse_loss(model(latents, sigma, captions), target)
            (loss / accum).backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / accum)
    with torch.no_grad():  # a preview-like forward without backward
        latents, sigma, captions, _ = batch(99)
        losses.append(model(latents, sigma, captions).square().mean().item())
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, lora


@pytest.mark.parametrize("fp8_base", [False, True])
def test_cpu_run_with_block_swap_is_bit_identical(fp8_base):
    reference_losses, reference_lora = train(lora_model(swap_blocks=0, depth=5, fp8_base=fp8_base))
    swapped = lora_model(swap_blocks=4, depth=5, fp8_base=fp8_base)
    losses, lora = train(swapped)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses == reference_losses  # bit for bit, with NaN in every evicted block
    assert all(torch.equal(lora[name], reference_lora[name]) for name in reference_lora)
    swap = block_swap_of(swapped)
    assert ("recompute", 0) in swap.schedule.trace
    stats = swap.take_stats()
    assert stats.loads > 0 and stats.bytes == sum(swap.packed[0].nbytes for _ in range(stats.loads))
    assert all(p.device.type == "cpu" and p.requires_grad for n, p in swapped.named_parameters() if "lora_" in n)


def test_an_evicted_block_holds_nan_so_a_use_out_of_schedule_shows():
    model = lora_model(swap_blocks=3, depth=5)
    for handle in block_swap_of(model).handles:
        handle.remove()  # the blocks now run without being loaded
    latents, sigma, captions, _ = batch(0)
    with torch.no_grad():
        assert torch.isnan(model(latents, sigma, captions)).all()


def test_fp8_base_stays_close_to_the_bf16_run():
    reference, _ = train(lora_model(swap_blocks=0, depth=0))
    fp8, _ = train(lora_model(swap_blocks=0, depth=0, fp8_base=True))
    assert all(abs(a - b) / abs(b) < 0.05 for a, b in zip(fp8, reference, strict=True)), (fp8, reference)
    assert fp8 != reference  # the storage did change something


def test_swapped_blocks_must_be_checkpointed():
    with pytest.raises(ValueError, match="main block 3 is not checkpointed"):
        lora_model(swap_blocks=4, depth=3)


def trainer_losses(run_dir, **run) -> list[float]:
    """Two steps of the engine's Trainer (synthetic data, 2 micro-steps each) on a 5-block model."""
    from training.engine.config import TrainConfig
    from training.engine.trainer import Trainer
    from training.run.events import RunLog

    config = TrainConfig.from_dict(
        {
            "mode": "lora",
            "model": {"preset": "tiny", "dtype": "fp32"},
            "run": {"output_dir": str(run_dir), "steps": 2, "grad_accum": 2, "checkpoint_depth": 5,
                    "save_state": False, "resume": False, **run},
            "lora": {"rank": 4},
            "data": {"synthetic": True, "resolution": 64, "caption_tokens": 8, "caption_dropout": 0.0},
        }
    )  # fmt: skip
    log = RunLog(str(run_dir), rank=0)
    try:
        model = random_model(CONFIG, dtype=torch.float32, device=torch.device("cpu"), seed=0)
        trainer = Trainer.build(config, CPU, log, model=model)
        losses = []
        for _ in range(2):
            losses.append(trainer.train_step()["loss"])
            trainer.step += 1
        return losses
    finally:
        log.close()


def test_the_trainer_runs_the_planned_levers_bit_identically(tmp_path):
    reference = trainer_losses(tmp_path / "reference")
    swapped = trainer_losses(tmp_path / "swapped", swap_blocks=4, fp8_base=True)
    fp8_only = trainer_losses(tmp_path / "fp8", fp8_base=True)
    assert swapped == fp8_only and all(torch.isfinite(torch.tensor(swapped)))
    assert swapped != reference and max(abs(a / b - 1) for a, b in zip(swapped, reference, strict=True)) < 0.05
