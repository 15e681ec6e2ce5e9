"""Every optimizer of ``training.vocabulary.OPTIMIZERS``: built from the config, its loss falls, its whole state goes
through the checkpoint (stop and resume gives the uninterrupted loss curve bit for bit), the planner prices its state
as the real optimizer holds it after one step, and schedule-free AdamW saves its averaged (eval-mode) weights."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from tests.test_engine_runs import assert_same_curve, tiny_config, train_in_process
from training.engine.build import random_model
from training.engine.config import OptimSection, TrainConfig
from training.engine.optim import averaged_weights, build_optimizer, trainable_parameters
from training.hardware.memory import OPTIMIZER_STATE_VALUES, MemoryModel
from training.model.config import preset
from training.model.lora import LoraSettings, attach_lora
from training.vocabulary import OPTIMIZERS

CPU = torch.device("cpu")
#: the optional package each optimizer needs (CI installs them from requirements-test.txt)
PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "schedulefree_adamw": "schedulefree"}
#: a learning rate each converges with (Prodigy's lr multiplies its own estimate of the step size; Adafactor's caps
#: its relative step, a fraction of each parameter's RMS)
LRS = {"adamw": 1e-2, "adamw8bit": 1e-2, "prodigy": 1.0, "adafactor": 1e-1, "schedulefree_adamw": 5e-2}
#: those the tests below run; adamw8bit needs a CUDA build of bitsandbytes to step
TESTED = ("adamw", "prodigy", "adafactor", "schedulefree_adamw")


def needs(name: str) -> None:
    if name in PACKAGES:
        pytest.importorskip(PACKAGES[name])


def test_the_vocabulary_the_config_and_the_planner_agree():
    assert set(OPTIMIZERS) == set(OPTIMIZER_STATE_VALUES) == set(LRS)
    assert OptimSection().optimizer == "adamw"
    with pytest.raises(ValueError, match=r"optim.optimizer must be one of .* got 'lion'"):
        OptimSection(optimizer="lion")


def test_schedule_free_refuses_a_cosine_schedule_naming_the_fix():
    with pytest.raises(ValueError, match=r"optim.schedule 'cosine' with optim.optimizer 'schedulefree_adamw'"):
        OptimSection(optimizer="schedulefree_adamw", schedule="cosine")


@pytest.mark.parametrize("name", TESTED)
def test_loss_falls(name):
    needs(name)
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    inputs = torch.randn(64, 16)
    targets = inputs @ torch.randn(16, 4)  # reachable: the optimum is a loss of 0
    optimizer = build_optimizer(
        list(model.parameters()), OptimSection(optimizer=name, lr=LRS[name], weight_decay=0.0), device=CPU
    )
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(inputs), targets)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with averaged_weights(optimizer, list(model.parameters())):
        final = nn.functional.mse_loss(model(inputs), targets).item()
    assert final < 0.5 * losses[0], (losses[0], losses[-1], final)


def test_a_missing_optional_package_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt now raises ImportError
    param = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"optim.optimizer 'prodigy' needs .*pip install prodigyopt"):
        build_optimizer([param], OptimSection(optimizer="prodigy", lr=1.0), device=CPU)


def optimizer_config(run_dir, name: str, *, steps: int) -> dict:
    config = tiny_config(run_dir, micro_batch=2, grad_accum=1, steps=steps)
    config["optim"] = {"optimizer": name, "lr": LRS[name] / 10}  # constant: runs can be extended
    return config


@pytest.mark.parametrize("name", TESTED)
def test_stop_and_resume_continues_exactly(tmp_path, name):
    """The run stops (and saves) after 2 of 4 steps and resumes; its curve is the uninterrupted one, bit for bit."""
    needs(name)
    reference = train_in_process(optimizer_config(tmp_path / "reference", name, steps=4))
    first = optimizer_config(tmp_path / "run", name, steps=2)
    assert len(train_in_process(first)) == 2
    extended = copy.deepcopy(first)
    extended["run"]["steps"] = 4
    resumed = train_in_process(extended)
    assert_same_curve(resumed, reference, rel=0)
    assert len(reference) == 4 and reference[0]["loss"] != reference[-1]["loss"]


def tiny_lora_model(rank: int) -> tuple[nn.Module, list[nn.Parameter]]:
    model = random_model(preset("tiny"), dtype=torch.float32, device=CPU, seed=0)
    torch.manual_seed(1)
    attach_lora(model, LoraSettings(rank=rank))
    return model, trainable_parameters(model)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


@pytest.mark.parametrize("name", TESTED)
def test_the_planner_prices_the_real_optimizer_state(name):
    needs(name)
    rank = 4
    _, params = tiny_lora_model(rank)
    optimizer = build_optimizer(params, OptimSection(optimizer=name, lr=LRS[name]), device=CPU)
    torch.manual_seed(2)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    real = state_bytes(optimizer)
    fixed = MemoryModel(model=preset("tiny")).fixed_bytes("lora", 1, "none", rank, optimizer=name)
    assert fixed["trainable"] == sum(p.numel() for p in params) * 4  # the same parameters as the real model
    if OPTIMIZER_STATE_VALUES[name] is None:  # factored (Adafactor): an upper bound, within a few times the truth
        assert real <= fixed["optimizer"] <= 3 * real, (real, fixed["optimizer"])
        adamw = MemoryModel(model=preset("tiny")).fixed_bytes("lora", 1, "none", rank, optimizer="adamw")
        assert 4 * fixed["optimizer"] <= adamw["optimizer"]  # 2/rank values per parameter, AdamW's 2
    elif name == "prodigy":  # p0 of a zero-initialised LoRA B is one scalar: 4 values/parameter is an upper bound
        assert real <= fixed["optimizer"] <= 1.2 * real, (real, fixed["optimizer"])
    else:  # dense states, plus a few scalar step counters
        assert fixed["optimizer"] == pytest.approx(real, rel=0.01)


def test_schedule_free_saves_the_average_and_trains_on_exactly_the_same_weights():
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    params = list(model.parameters())
    optimizer = build_optimizer(params, OptimSection(optimizer="schedulefree_adamw", lr=1e-2), device=CPU)
    assert isinstance(optimizer, schedulefree.AdamWScheduleFree)
    for _ in range(5):
        model(torch.randn(4, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    beta1 = optimizer.param_groups[0]["betas"][0]
    trained = [p.detach().clone() for p in params]
    expected = [torch.lerp(y, optimizer.state[p]["z"], 1 - 1 / beta1) for y, p in zip(trained, params)]
    with averaged_weights(optimizer, params):
        for param, want in zip(params, expected):
            torch.testing.assert_close(param.detach(), want, rtol=0, atol=0)
        assert not any(torch.equal(p, y) for p, y in zip(params, trained))
    assert optimizer.param_groups[0]["train_mode"]
    for param, want in zip(params, trained):
        assert torch.equal(param.detach(), want)  # bit for bit, not through eval() then train()


def test_schedule_free_lora_file_holds_the_averaged_weights(tmp_path):
    """The saved LoRA is the eval-mode average, not the train-mode point the checkpoint keeps."""
    pytest.importorskip("schedulefree")
    from safetensors.torch import load_file

    config = optimizer_config(tmp_path / "run", "schedulefree_adamw", steps=3)
    train_in_process(config)
    lora = load_file(TrainConfig.from_dict(copy.deepcopy(config)).run.lora_file)
    checkpoint = load_file(next((tmp_path / "run/checkpoints").glob("step-000003/rank-*.safetensors")))
    assert lora and checkpoint
    saved_b = [v for k, v in lora.items() if "lora_B" in k or "lora_up" in k]
    trained_b = [v for k, v in checkpoint.items() if "lora_B" in k and "optim" not in k and ".z" not in k]
    assert saved_b and trained_b
    # after 3 steps from B = 0 the average and the point differ; the LoRA file holds neither the zero init
    # nor exactly any train-mode B tensor of the checkpoint
    assert all(v.abs().sum() > 0 for v in saved_b)
    trained_set = {tuple(v.flatten().tolist()) for v in trained_b}
    assert not any(tuple(v.float().flatten().tolist()) in trained_set for v in saved_b)


def test_the_plan_prices_the_chosen_optimizer():
    from training.hardware.fitting import Setting, estimate
    from training.hardware.request import PlanRequest

    peaks = {}
    for name in ("adafactor", "adamw", "prodigy"):
        request = PlanRequest(mode="lora", resolution=512, lora_rank=32, optimizer=name)
        setting = Setting(world_size=1, parallelism="none", attention_backend="flash", compiled=False)
        peaks[name] = estimate(request, setting, 1, 0, MemoryModel()).peak_bytes
    adamw_state = MemoryModel().fixed_bytes("lora", 1, "none", 32)["optimizer"]
    assert peaks["prodigy"] - peaks["adamw"] == adamw_state  # 4 state values per parameter vs AdamW's 2
    # Adafactor: 2/rank values per parameter, 1/32 of AdamW's 2 at rank 32
    assert peaks["adamw"] - peaks["adafactor"] == pytest.approx(adamw_state * 31 / 32, abs=4)
    with pytest.raises(ValueError, match="PlanRequest.optimizer 'lion'"):
        PlanRequest(mode="lora", resolution=512, optimizer="lion")


def test_8bit_adamw_is_warned_against_on_base_naming_why(caplog):
    pytest.importorskip("bitsandbytes")
    param = nn.Parameter(torch.zeros(4096))
    with caplog.at_level("WARNING", logger="training.engine.optim"):
        build_optimizer([param], OptimSection(optimizer="adamw8bit"), device=CPU)
    assert "degrade Z-Image-Base LoRAs" in caplog.text and "ai-toolkit#696" in caplog.text


def plan_for(mode: str = "lora", **request):
    from training.hardware.plan import PlanRequest, make_plan
    from training.hardware.tiers import load_tiers, simulated_profile

    settings = {"mode": mode, "resolution": 512, "lora_rank": 16, "model": preset("tiny"), "world_size": 1}
    return make_plan(PlanRequest(**settings | request), simulated_profile(load_tiers()["1x80GB"]))


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_the_plan_writes_each_modes_default_optimizer_with_its_reason(mode):
    from training.vocabulary import DEFAULT_OPTIMIZER

    plan = plan_for(mode)
    assert plan.optimizer == DEFAULT_OPTIMIZER[mode] == "adamw"
    (reason,) = [r for name, value, r in plan.decisions if name == "optimizer"]
    assert f"the default of mode {mode}" in reason
    config = TrainConfig.from_plan(plan, run={"output_dir": "run"}, data={"synthetic": True})
    assert config.optim.optimizer == "adamw" and config.optim.lr == plan.lr


def test_a_chosen_optimizer_is_priced_written_and_sets_its_own_lr():
    adamw, prodigy, adafactor = (plan_for(optimizer=name) for name in ("adamw", "prodigy", "adafactor"))
    assert (prodigy.optimizer, adafactor.optimizer) == ("prodigy", "adafactor")
    assert prodigy.memory_breakdown["optimizer"] == 2 * adamw.memory_breakdown["optimizer"]
    assert adafactor.memory_breakdown["optimizer"] < adamw.memory_breakdown["optimizer"] / 4
    assert (adamw.lr, prodigy.lr, adafactor.lr) == (1e-4, 1.0, 1e-2)
    (reason,) = [r for name, value, r in prodigy.decisions if name == "lr"]
    assert "Prodigy estimates its own step size" in reason and "lr_base" in reason
    config = TrainConfig.from_plan(prodigy, run={"output_dir": "run"}, data={"synthetic": True})
    assert (config.optim.optimizer, config.optim.lr) == ("prodigy", 1.0)
    with pytest.raises(ValueError, match=r"optim.optimizer is decided by the plan"):
        TrainConfig.from_plan(prodigy, run={"output_dir": "r"}, data={"synthetic": True}, optim={"optimizer": "adamw"})


def test_full_fine_tuning_refuses_an_optimizer_fsdp2_cannot_step():
    with pytest.raises(ValueError, match=r"PlanRequest.optimizer 'prodigy' cannot train mode 'full'.*FSDP2"):
        plan_for("full", optimizer="prodigy")


def test_a_plan_written_before_the_optimizer_field_reads_as_adamw():
    from training.hardware.plan import TrainingPlan

    data = plan_for().to_dict()
    assert data.pop("optimizer") == "adamw"
    assert TrainingPlan.from_dict(data).optimizer == "adamw"
    assert TrainingPlan.from_dict(plan_for(optimizer="prodigy").to_dict()).optimizer == "prodigy"


def test_plan_cli_takes_the_optimizer(capsys):
    import json

    from training.__main__ import main

    code = main(["plan", "--tier", "1x80GB", "--model", "tiny", "--resolution", "512", "--optimizer", "adafactor",
                 "--json"])  # fmt: skip
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["optimizer"], plan["lr"]) == ("adafactor", 1e-2)
