"""The closed sets every layer shares, defined once: a ``Literal`` type for annotations and its values as a tuple
(``typing.get_args``) for validation and widgets. LoRA target presets live with the model
(``training.model.targets``), since they name its modules."""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["lora", "qlora", "full"]
Parallelism = Literal["none", "ddp", "fsdp2"]
AttentionBackend = Literal["flash", "efficient", "cudnn", "math"]
LrScaling = Literal["sqrt", "linear", "none"]
CaptionOverflow = Literal["truncate", "refuse"]
#: "adamw" is the default of every mode; "adamw8bit" needs bitsandbytes, "prodigy" prodigyopt, "schedulefree_adamw"
#: schedulefree (both optional); "adafactor" is torch's own.
Optimizer = Literal["adamw", "adamw8bit", "prodigy", "adafactor", "schedulefree_adamw"]
#: How the frozen base of adapter training is stored: bf16 (model.dtype), or e4m3 with a scale per row (1 byte/weight).
BaseStorage = Literal["bf16", "fp8"]
#: What trains on the frozen base (``training.model.adapters``): LoRA; DoRA (LoRA plus a learned magnitude per output
#: row); LoKr (a Kronecker product of two small factors); LoHa (a Hadamard product of two low-rank products).
AdapterType = Literal["lora", "dora", "lokr", "loha"]
#: Which Z-Image the weights are ("auto": from the weights file's name, see ``training.model.variants``).
ModelVariantChoice = Literal["auto", "base", "turbo"]
#: How a Turbo run keeps the distillation intact: "adapter" merges model.training_adapter into the frozen base,
#: "dedistilled" says the weights already are (De-Turbo), "raw" trains the distilled weights as they are (warned).
TurboTraining = Literal["adapter", "dedistilled", "raw"]
#: σ ~ the training distribution (``training.engine.objective``; docs/training.md says where each comes from).
SigmaSampler = Literal["shifted_uniform", "uniform", "logit_normal", "shifted_logit_normal", "mode", "cosmap"]
#: The shift of the shifted samplers: "fixed" objective.shift, or from the image's token count ("flux", "sd3").
ShiftRule = Literal["fixed", "flux", "sd3"]
#: Per-sample loss weights w(σ) as diffusers' compute_loss_weighting_for_sd3 (+ the logit-normal density).
LossWeighting = Literal["none", "sigma_sqrt", "cosmap", "logit_normal"]

#: The optimizer each mode trains with unless another is chosen: AdamW everywhere (the optimizer the planner's
#: measurements and the tier settings were made with). Full fine-tuning runs under FSDP2 (also on one GPU), where
#: only AdamW steps the sharded parameters.
DEFAULT_OPTIMIZER: dict[str, str] = {"lora": "adamw", "qlora": "adamw", "full": "adamw"}
FULL_MODE_OPTIMIZERS: tuple[str, ...] = ("adamw",)

#: Where the EMA of the trained weights lives (fp32): "off", on the training "device", or in host RAM ("cpu").
EmaPlacement = Literal["off", "device", "cpu"]
#: Which resolution each step of a multi-resolution run trains (``training.engine.resolution_schedule``): one stream
#: over the whole shard set, a weighted "mix", or "progressive" stages.
ResolutionSchedule = Literal["none", "mix", "progressive"]

MODES: tuple[str, ...] = get_args(Mode)
PARALLELISMS: tuple[str, ...] = get_args(Parallelism)
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
LR_SCALINGS: tuple[str, ...] = get_args(LrScaling)
CAPTION_OVERFLOWS: tuple[str, ...] = get_args(CaptionOverflow)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
MODEL_VARIANT_CHOICES: tuple[str, ...] = get_args(ModelVariantChoice)
MODEL_VARIANTS: tuple[str, ...] = MODEL_VARIANT_CHOICES[1:]  # what "auto" resolves to
TURBO_TRAININGS: tuple[str, ...] = get_args(TurboTraining)
SIGMA_SAMPLERS: tuple[str, ...] = get_args(SigmaSampler)
SHIFTED_SAMPLERS: tuple[str, ...] = ("shifted_uniform", "shifted_logit_normal")
SHIFT_RULES: tuple[str, ...] = get_args(ShiftRule)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
BASE_STORAGES: tuple[str, ...] = get_args(BaseStorage)
ADAPTER_TYPES: tuple[str, ...] = get_args(AdapterType)
EMA_PLACEMENTS: tuple[str, ...] = get_args(EmaPlacement)
RESOLUTION_SCHEDULES: tuple[str, ...] = get_args(ResolutionSchedule)
LORA_MODES: tuple[str, ...] = ("lora", "qlora")
