"""Matching a LoRA file's keys against the LoRA names ComfyUI understands for a model (no ComfyUI import here).

ComfyUI logs "lora key not loaded" and carries on; the Load Trained LoRA node refuses instead, listing every key of
the file that would change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

#: Tensor-name endings of the adapters ComfyUI's weight_adapter and load_lora consume (LoRA, LoCon, DoRA, LoKr, LoHa,
#: diff, set).
TENSOR_ENDINGS = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_A.default.weight",
    ".lora_B.default.weight",
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_mid.weight",
    "_lora.down.weight",
    "_lora.up.weight",
    ".lora.down.weight",
    ".lora.up.weight",
    ".alpha",
    ".dora_scale",
    ".diff",
    ".diff_b",
    ".set_weight",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_t2",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".w_norm",
    ".b_norm",
)


@dataclass(frozen=True)
class KeyMatch:
    modules: tuple[str, ...]  # module names found in the file
    unmatched_modules: tuple[str, ...]  # modules that no weight of the model answers to
    unrecognised_keys: tuple[str, ...]  # tensors whose ending is not a LoRA tensor at all

    @property
    def ok(self) -> bool:
        return not self.unmatched_modules and not self.unrecognised_keys

    def describe(self, limit: int = 12) -> str:
        lines = []
        if self.unmatched_modules:
            shown = ", ".join(self.unmatched_modules[:limit])
            more = len(self.unmatched_modules) - limit
            lines.append(
                f"{len(self.unmatched_modules)} of {len(self.modules)} modules match no weight of the model: {shown}"
                + (f" (+{more} more)" if more > 0 else "")
            )
        if self.unrecognised_keys:
            shown = ", ".join(self.unrecognised_keys[:limit])
            lines.append(f"{len(self.unrecognised_keys)} tensors are not LoRA tensors: {shown}")
        return "; ".join(lines)


def split_key(key: str) -> tuple[str, str] | None:
    """(module, ending) for a LoRA tensor name, or None when the ending is not one ComfyUI reads."""
    for ending in sorted(TENSOR_ENDINGS, key=len, reverse=True):
        if key.endswith(ending) and len(key) > len(ending):
            return key[: -len(ending)], ending
    return None


def match_keys(file_keys: Iterable[str], model_key_map: dict) -> KeyMatch:
    """Compare a file's tensor names with comfy.lora.model_lora_keys_unet(model.model)."""
    modules: set[str] = set()
    unrecognised = []
    for key in file_keys:
        split = split_key(key)
        if split is None:
            unrecognised.append(key)
        else:
            modules.add(split[0])
    unmatched = sorted(m for m in modules if m not in model_key_map)
    return KeyMatch(tuple(sorted(modules)), tuple(unmatched), tuple(sorted(unrecognised)))
