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

MODES: tuple[str, ...] = get_args(Mode)
PARALLELISMS: tuple[str, ...] = get_args(Parallelism)
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
LR_SCALINGS: tuple[str, ...] = get_args(LrScaling)
CAPTION_OVERFLOWS: tuple[str, ...] = get_args(CaptionOverflow)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
LORA_MODES: tuple[str, ...] = ("lora", "qlora")
