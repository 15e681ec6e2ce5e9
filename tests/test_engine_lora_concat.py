"""LoRA's up-projection concatenated into the base GEMM (training/engine/lora_concat.py): the same forward and
gradients as peft's path, eager and compiled, after optimizer steps (the mirrored B rows), with the base stored
once, and peft's path kept where the layer is not eligible."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import randomize, relative_error
from torch import nn

from training.engine.lora_concat import apply_lora_concat, concat_eligible
from training.model.config import PRESETS
from training.model.lora import LoraSettings, attach_lora, lora_layers, merge_lora
from training.model.zimage import ZImageTransformer

TOLERANCE = 1e-10  # float64: the same sums in another order (float32 drifts to ~2e-5 over steps of a deep net)


SETTINGS = LoraSettings(rank=4, alpha=8.0, targets="attention+ffn")  # scale 2: the scale must land in A's and B's grads


def lora_model(settings: LoraSettings = SETTINGS):
    model = ZImageTransformer(PRESETS["tiny"]).double()
    randomize(model, seed=0)
    attach_lora(model, settings)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # peft starts B at zero, which would hide B's rows and A's gradient
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def inputs(seed: int = 1, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    cfg = PRESETS["tiny"]
    latents = torch.randn(2, cfg.in_channels, 8, 6, generator=generator, dtype=dtype)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=generator, dtype=dtype) for n in (9, 16)]
    return latents, torch.tensor([0.3, 0.8], dtype=dtype), captions


def loss_and_grads(model: nn.Module, seed: int = 1, dtype=torch.float64) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    loss = model(*inputs(seed, dtype)).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training(
    reference: nn.Module, concat: nn.Module, steps: int = 3, tolerance=TOLERANCE, optimizer_class=None
) -> None:
    """Equal loss and LoRA gradients over a few optimizer steps of ``concat`` (SGD unless given): B changes every
    step and the mirrored rows must follow it; ``reference`` is given the same parameters before each step (the
    trajectories would otherwise drift apart from rounding alone)."""
    trained = {n: p for n, p in concat.named_parameters() if p.requires_grad}
    optimizer = (optimizer_class or (lambda params: torch.optim.SGD(params, lr=0.5)))(trained.values())
    for step in range(steps):
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if param.requires_grad:
                    param.copy_(trained[name])
        (loss_ref, grads_ref), (loss_cat, grads_cat) = loss_and_grads(reference, step), loss_and_grads(concat, step)
        assert relative_error(loss_cat, loss_ref) < tolerance, step
        assert grads_ref.keys() == grads_cat.keys()
        for name, grad in grads_ref.items():
            assert relative_error(grads_cat[name], grad) < tolerance, (step, name)
        optimizer.step()


def test_training_equals_peft_eager():
    reference = lora_model()
    concat = copy.deepcopy(reference)
    assert apply_lora_concat(concat) == len(lora_layers(reference)) > 0
    assert_same_training(reference, concat)


def test_training_equals_peft_under_fused_adamw():
    """Regression (2026-12-03): the fused AdamW, the engine's default on CUDA, updates B without bumping its version
    counter; a mirror that copied only when B's version changed trained with the first B forever (the 200-step loss
    curve stayed flat). The CPU has the same fused kernel, with the same untouched version."""
    reference = lora_model()
    concat = copy.deepcopy(reference)
    apply_lora_concat(concat)
    probe = nn.Parameter(torch.zeros(3))
    probe.grad = torch.ones(3)
    torch.optim.AdamW([probe], fused=True).step()
    assert probe._version == 0 and probe.abs().sum() > 0  # what made the version-gated mirror stale
    assert_same_training(
        reference, concat, optimizer_class=lambda params: torch.optim.AdamW(params, lr=0.1, fused=True)
    )


def test_b_written_through_data_is_mirrored():
    """Any change of B reaches the next forward, whichever way it was written (``.data`` keeps the version too)."""
    reference = lora_model()
    concat = copy.deepcopy(reference)
    apply_lora_concat(concat)
    concat(*inputs(1))
    for model in (reference, concat):
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.mul_(-2.0)
    assert relative_error(concat(*inputs(2)), reference(*inputs(2))) < TOLERANCE


def test_training_equals_peft_compiled_blocks():
    """Compiled in one graph per block (no graph break around the custom function); the blocks' RMSNorms compute in
    float32, which Inductor fuses and rounds in another order than eager, hence the float32-sized tolerance."""
    torch._dynamo.reset()
    reference = lora_model()
    concat = copy.deepcopy(reference)
    apply_lora_concat(concat)
    for model in (reference, concat):
        for block in [*model.noise_refiner, *model.context_refiner, *model.layers]:
            block.compile(backend="inductor", fullgraph=True)
    assert_same_training(reference, concat, steps=2, tolerance=1e-6)


def test_base_is_stored_once_and_the_model_keeps_its_names():
    reference = lora_model()
    concat = copy.deepcopy(reference)
    assert apply_lora_concat(concat) > 0
    assert apply_lora_concat(concat) == 0  # converted layers are not converted again (no second hook)
    for name, layer in lora_layers(concat).items():
        weight, combined = layer.get_base_layer().weight, layer.combined_t
        assert weight.untyped_storage().data_ptr() == combined.untyped_storage().data_ptr(), name
        assert torch.equal(weight, lora_layers(reference)[name].get_base_layer().weight)
    trained = [n for n, p in concat.named_parameters() if p.requires_grad]
    assert trained == [n for n, p in reference.named_parameters() if p.requires_grad]
    assert concat.state_dict().keys() == reference.state_dict().keys()  # the buffer is not persistent
    merged_ref, merged_cat = merge_lora(reference), merge_lora(concat)  # through the views themselves
    for (name, a), (_, b) in zip(merged_ref.state_dict().items(), merged_cat.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_second_forward_before_backward():
    """A no-grad forward (a preview) and a second graph between a forward and its backward leave the saved buffer
    untouched while B is unchanged, as on peft's path."""
    model = lora_model()
    apply_lora_concat(model)
    first = model(*inputs(1)).square().mean()
    with torch.no_grad():
        model(*inputs(2))
    second = model(*inputs(3)).square().mean()
    (first + second).backward()
    reference = lora_model()
    (reference(*inputs(1)).square().mean() + reference(*inputs(3)).square().mean()).backward()
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if want.requires_grad:
            assert relative_error(got.grad, want.grad) < TOLERANCE, name


def test_disabled_adapters_take_peft_path():
    model = lora_model()
    apply_lora_concat(model)
    layer = next(iter(lora_layers(model).values()))
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    with_adapter = layer(x)
    layer.enable_adapters(False)
    assert torch.allclose(layer(x), x @ layer.get_base_layer().weight.t())
    assert not torch.allclose(with_adapter, layer(x))


def test_bf16_base_float32_adapter_under_autocast():
    """The engine's LoRA precision (bf16 base, float32 adapters, bf16 autocast): as close to the float32 result as
    peft's path is (one rounding of the sum instead of three)."""
    exact = lora_model().float()
    reference = copy.deepcopy(exact)
    for module in reference.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.to(torch.bfloat16)
    concat = copy.deepcopy(reference)
    apply_lora_concat(concat)
    assert all(layer.combined_t.dtype == torch.bfloat16 for layer in lora_layers(concat).values())
    loss_exact, grads_exact = loss_and_grads(exact, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = loss_and_grads(reference, dtype=torch.float32)
        loss_cat, grads_cat = loss_and_grads(concat, dtype=torch.float32)
    assert relative_error(loss_cat, loss_exact) <= 1.5 * relative_error(loss_ref, loss_exact) + 1e-4
    for name, grad in grads_exact.items():
        assert relative_error(grads_cat[name], grad) <= 1.5 * relative_error(grads_ref[name], grad) + 1e-4, name


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        (LoraSettings(rank=4, targets="attention", dropout=0.1), "dropout"),
        (LoraSettings(rank=4, targets="attention", adapter="dora"), "DoRA"),
        (LoraSettings(rank=4, targets="attention", adapter="loha"), "plain LoRA"),
    ],
    ids=["dropout", "dora", "loha"],
)
def test_ineligible_layers_keep_peft(settings, reason):
    model = lora_model(settings)
    for layer in lora_layers(model).values():
        assert reason in concat_eligible(layer)
    torch.manual_seed(0)  # the dropout's mask
    before = loss_and_grads(model)[0]
    assert apply_lora_concat(model) == 0
    torch.manual_seed(0)
    assert torch.equal(loss_and_grads(model)[0], before)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-adamw", "fused-adamw"])
def test_engine_run_equals_peft(tmp_path, monkeypatch, caplog, fused):
    """The whole engine (grad accumulation, checkpointing, AdamW, the LoRA file) with the path forced on the CPU:
    the loss curve and the saved adapter equal peft's (the mirror hook runs before every forward). Also with the
    fused AdamW the engine takes on CUDA (forced here), which changes B without a version bump (regression)."""
    from safetensors.torch import load_file
    from test_engine_runs import STEPS, tiny_config, train_in_process

    from training.engine import optim, parallelize

    if fused:
        plain = optim._adamw

        def fused_adamw(params, section, device):
            plain(params, section, device)  # its log line; the optimizer it builds is replaced
            kwargs = dict(lr=section.lr, betas=section.betas, eps=section.eps, weight_decay=section.weight_decay)
            return torch.optim.AdamW(params, fused=True, **kwargs)

        monkeypatch.setattr(optim, "_adamw", fused_adamw)
    reference = train_in_process(tiny_config(tmp_path / "peft"))
    monkeypatch.setattr(parallelize, "lora_concat_applies", lambda **conditions: True)
    with caplog.at_level("INFO", logger="training.engine.parallelize"):
        concat = train_in_process(tiny_config(tmp_path / "concat"))
    assert "LoRA: 10 layers compute" in caplog.text  # the tiny model: 2 main blocks × qkv, out, w1, w2, w3
    assert len(concat) == STEPS
    for got, want in zip(concat, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), got["step"]
    files = [load_file(tmp_path / run / "lora.safetensors") for run in ("peft", "concat")]
    assert files[0].keys() == files[1].keys()
    for key, value in files[0].items():
        # the file holds bf16: float32 weights equal to 1e-5 may round one bf16 step apart (seen on an AMD EPYC CPU:
        # 1 of 680 values, 2⁻⁸ relative); more than one in a hundred values apart is a real difference
        torch.testing.assert_close(
            files[1][key], value, rtol=2**-7, atol=1e-6, msg=lambda detail, key=key: f"{key}: {detail}"
        )
        assert (files[1][key] != value).float().mean() <= 0.01, key


def test_gate_is_compiled_bf16_lora_or_qlora_on_one_cuda_process():
    from training.engine.parallelize import lora_concat_applies

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    where = dict(mode="lora", compile=True, plain_base=True, dtype=torch.bfloat16, device=cuda, strategy="none")
    assert lora_concat_applies(**where)
    assert lora_concat_applies(**(where | {"mode": "qlora"}))
    for change in (
        {"mode": "full"},
        {"compile": False},
        {"plain_base": False},  # FP8, FP8 storage or block swap
        {"dtype": torch.float32},
        {"device": cpu},
        {"strategy": "ddp"},
        {"strategy": "fsdp2"},
    ):
        assert not lora_concat_applies(**(where | change)), change


def test_peft_options_outside_the_path_are_refused():
    """peft's LoRA bias (on B): the one GEMM would silently drop it."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Sequential(nn.Linear(8, 16, bias=False))
    with pytest.warns(UserWarning, match="no bias"):  # peft's own warning: the base has none
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"], lora_bias=True), holder)
    holder[0].get_base_layer().weight.requires_grad_(False)
    assert "bias" in concat_eligible(holder[0])
