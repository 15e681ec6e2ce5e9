"""LoRA (and DoRA, LoKr, LoHa) on the Z-Image transformer through peft: target presets, attach, state in our names,
merge.

peft wraps each targeted ``nn.Linear`` in place (``layers.0.attention.qkv`` becomes a ``lora.Linear`` holding
``base_layer``, ``lora_A.default`` and ``lora_B.default``), so the model stays a ``ZImageTransformer``. The fused
``attention.qkv`` gets one LoRA (A [r, dim], B [3·dim, r]); the file format splits it into to_q/to_k/to_v.
``LoraSettings.adapter`` picks the type; ``training.model.adapters`` holds what differs between types.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..vocabulary import ADAPTER_TYPES
from . import adapters
from .adapters import ADAPTER, DORA_SCALE
from .adapters import PEFT_PARAM as _PEFT_PARAM
from .targets import DEFAULT_TARGETS, TARGET_PRESETS, target_preset

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank, i.e. scale 1
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS
    adapter: str = "lora"  # one of training.vocabulary.ADAPTER_TYPES

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraSettings.rank must be a positive integer (e.g. 16), got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not self.alpha > 0):
            raise ValueError(f"LoraSettings.alpha must be > 0 or None (None means alpha = rank), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets not in TARGET_PRESETS:
            raise ValueError(f"LoraSettings.targets must be one of {list(TARGET_PRESETS)}, got {self.targets!r}")
        if self.adapter not in ADAPTER_TYPES:
            raise ValueError(f"LoraSettings.adapter must be one of {list(ADAPTER_TYPES)}, got {self.adapter!r}")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """The factor applied to B @ A (alpha / rank), as in peft and ComfyUI."""
        return self.effective_alpha / self.rank


def target_module_names(model: nn.Module, targets: str) -> list[str]:
    """Full names of the modules a preset targets, in model order (modules absent from a block are skipped)."""
    preset = target_preset(targets)
    pattern = re.compile(
        rf"^(?:{'|'.join(map(re.escape, preset.block_groups))})\.\d+\.(?:{'|'.join(map(re.escape, preset.modules))})$"
    )
    names = [name for name, _ in model.named_modules() if pattern.match(name)]
    if not names:
        raise ValueError(f"LoRA targets {targets!r} match no module of {type(model).__name__}")
    return names


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name → peft adapter layer (LoRA, DoRA, LoKr or LoHa), for every wrapped module of ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}


def set_lora_input_cast(model: nn.Module, enabled: bool) -> int:
    """Whether peft casts each LoRA input to the adapter dtype (its default). Under bf16 autocast the adapter matmuls
    run in bf16 whatever their weights' dtype, so the cast only makes an extra float32 copy of every LoRA input for
    autograd to keep; switching it off saves that memory and bandwidth. Returns the number of layers changed."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.cast_input_dtype_enabled = enabled
    return len(layers)


def attach_lora(model: nn.Module, settings: LoraSettings, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the preset's modules with LoRA in place; freeze every base parameter. Returns ``model``.

    LoRA weights take the base weights' dtype unless ``dtype`` is given (e.g. float32 adapters on a bf16 base)."""
    from peft import inject_adapter_in_model

    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; merge_lora() them or build a fresh model first")
    names = target_module_names(model, settings.targets)
    lokr_factor = _lokr_factor(model, names) if settings.adapter == "lokr" else -1
    # full names: matched exactly (peft also accepts '.'-suffixes, none collide here)
    config = adapters.peft_config(
        settings.adapter,
        rank=settings.rank,
        alpha=settings.effective_alpha,
        dropout=settings.dropout,
        names=names,
        lokr_factor=lokr_factor,
    )
    injected = inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    assert injected is model, "peft must wrap modules in place"
    wrapped = sorted(lora_layers(model))
    assert wrapped == sorted(names), f"peft wrapped {wrapped}, expected {names}"
    trainable = [p for n, p in model.named_parameters() if _PEFT_PARAM.match(n)]
    for param in model.parameters():
        param.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
        if dtype is not None:
            param.data = param.data.to(dtype)
    logger.info(
        "%s %r: rank %d, alpha %g, dropout %g on %d modules, %d trainable parameters",
        settings.adapter,
        settings.targets,
        settings.rank,
        settings.effective_alpha,
        settings.dropout,
        len(names),
        sum(p.numel() for p in trainable),
    )
    return model


def _lokr_factor(model: nn.Module, names: list[str]) -> int:
    """peft's decompose factor for a LoKr on ``names`` (``targets.lokr_decompose_factor``), logged with why."""
    linears = {}
    for name in names:
        linear = model.get_submodule(name)
        linears[name] = (linear.in_features, linear.out_features)
    factor = adapters.lokr_decompose_factor(linears)
    if factor != -1:
        logger.info(
            "LoKr decompose factor %d (not peft's default -1): the fused qkv's Kronecker rows then split into "
            "q/k/v LoKrs of a [d, d] linear's own shape, which ComfyUI and diffusers both load exactly",
            factor,
        )
    return factor


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under our names (``layers.0.attention.qkv.lora_A.weight``, ``….lokr_w1.weight``), detached
    copies: what trains, for resuming and for ``load_lora_state_dict``."""
    state = {}
    for name, param in model.named_parameters():
        match = _PEFT_PARAM.match(name)
        if match:
            state[f"{match['module']}.{match['kind']}.weight"] = param.detach().clone()
    if not state:
        raise ValueError("the model has no LoRA layers; call attach_lora() first")
    return state


def adapter_file_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``save_lora_file`` writes: ``lora_state_dict`` with each DoRA magnitude replaced by the ``dora_scale``
    ComfyUI rebuilds the merged weight from (``adapters.comfy_dora_scale``: it depends on the base weights)."""
    state = lora_state_dict(model)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            if adapters.layer_adapter_type(layer) == "dora":
                del state[f"{name}.lora_magnitude_vector.weight"]
                state[f"{name}.{DORA_SCALE}.weight"] = adapters.comfy_dora_scale(layer)
    return state


def _dora_scales_to_magnitudes(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file state's ``dora_scale`` entries as the peft magnitudes of ``model`` (whose base must be the file's)."""
    suffix = f".{DORA_SCALE}.weight"
    if not any(key.endswith(suffix) for key in state):
        return state
    converted = dict(state)
    for key in [k for k in state if k.endswith(suffix)]:
        module = key.removesuffix(suffix)
        a, b = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"DoRA state has {key} without {module}.lora_A.weight and .lora_B.weight")
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise ValueError(f"DoRA state key {key} names no module of the model (different targets?)") from None
        if adapters.layer_adapter_type(layer) != "dora":
            raise ValueError(f"DoRA state key {key}: the model's {module} is not a DoRA layer; attach adapter 'dora'")
        del converted[key]
        converted[f"{module}.lora_magnitude_vector.weight"] = adapters.dora_magnitude_from_scale(
            layer, a, b, state[key]
        )
    return converted


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (our names) into an attached model. Strict: keys and shapes must match exactly. A DoRA
    file's ``dora_scale`` becomes the magnitude again from the model's base weights (they must be the trained base)."""
    params = {
        f"{m['module']}.{m['kind']}.weight": param
        for name, param in model.named_parameters()
        if (m := _PEFT_PARAM.match(name))
    }
    if not params:
        raise ValueError("the model has no LoRA layers; call attach_lora() with the same settings first")
    state = _dora_scales_to_magnitudes(model, state)
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected keys); "
            f"missing: {missing[:5]}, unexpected: {unexpected[:5]}. Attach with the adapter type and targets the "
            "LoRA was trained with."
        )
    for key, param in params.items():
        if tuple(state[key].shape) != tuple(param.shape):
            raise ValueError(
                f"LoRA weight {key} has shape {tuple(state[key].shape)}, the model expects {tuple(param.shape)} "
                "(different rank?)"
            )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``adapters.merged_weight``, float32 math) and unwrap the layer."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.get_base_layer()
            base.weight.copy_(adapters.merged_weight(layer).to(base.weight.dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, base)
    logger.info("merged %d adapter layers into their base weights", len(layers))
    return model
