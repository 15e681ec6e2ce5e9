"""The plan as the Training Plan node shows it: human labels, values with units, reasons wrapped to a fixed width.

``TrainingPlan.table()`` is the command line's table (engine field names, one line per decision); this is the
node's text panel, narrow enough to sit in a workflow without covering its neighbours (``tools.workflow_graph``
sizes the node from this text).
"""

from __future__ import annotations

import textwrap

from .memory import GIB
from .training_plan import TrainingPlan

#: The node's label for each decision the planner records (``TrainingPlan.decisions`` names).
DECISION_LABELS = {
    "tier": "tier",
    "mode": "mode",
    "world_size": "GPUs",
    "parallelism": "parallelism",
    "fsdp_cpu_offload": "FSDP CPU offload",
    "attention_backend": "attention",
    "compile": "torch.compile",
    "budget_bytes": "memory budget",
    "micro_batch": "micro-batch per GPU",
    "checkpoint_depth": "checkpointed blocks",
    "grad_accum": "gradient accumulation",
    "precision": "precision",
    "nccl_timeout_s": "NCCL timeout",
    "optimizer": "optimizer",
    "lr": "learning rate",
    "ema": "EMA of the weights",
    "predicted_peak_bytes": "predicted peak",
    "lora_dtype": "LoRA weights",
    "resolution": "resolution",
    "caption_tokens": "caption tokens",
    "caption_overflow": "longer captions",
    "nodes": "nodes",
    "inter_node_gbps": "network per node",
    "inter_node_s_per_step": "network time per step",
    "base_storage": "frozen base",
    "swap_blocks": "swapped blocks",
    "resolution_schedule": "resolution schedule",
}
REASON_WIDTH = 56
LABEL_WIDTH = max(map(len, DECISION_LABELS.values()))


def _value(name: str, value) -> str:
    if name.endswith("_bytes") and isinstance(value, int):
        return f"{value / GIB:.1f} GiB"
    if isinstance(value, bool):
        return "on" if value else "off"
    if name in ("nccl_timeout_s", "inter_node_s_per_step"):
        return f"{value} s"
    if name == "inter_node_gbps":
        return f"{value:g} GB/s"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return "x".join(map(str, value))
    return str(value)


def _where(plan: TrainingPlan) -> str:
    if plan.tier == "cpu":
        return "the CPU"
    return "1 GPU" if plan.world_size == 1 else f"{plan.world_size} GPUs"


def plan_panel(plan: TrainingPlan) -> str:
    """Header, then one row per decision: label, value, reason (continued under the reason column)."""
    values = [_value(name, value) for name, value, _ in plan.decisions]
    value_width = max(len("value"), *map(len, values))
    width = LABEL_WIDTH + value_width + 4 + REASON_WIDTH
    header = (
        f"{plan.mode} on {_where(plan)} (tier {plan.tier}): predicted peak {plan.predicted_peak_bytes / GIB:.1f} GiB "
        f"of a {plan.budget_bytes / GIB:.1f} GiB budget, {plan.headroom_bytes / GIB:.1f} GiB to spare"
    )
    lines = textwrap.wrap(header, width)
    lines.append(f"{'setting':<{LABEL_WIDTH}}  {'value':<{value_width}}  why")
    indent = " " * (LABEL_WIDTH + value_width + 4)
    for (name, _, reason), value in zip(plan.decisions, values, strict=True):
        label = DECISION_LABELS.get(name, name.replace("_", " "))
        first, *rest = textwrap.wrap(reason, REASON_WIDTH) or [""]
        lines.append(f"{label:<{LABEL_WIDTH}}  {value:<{value_width}}  {first}")
        lines += [indent + line for line in rest]
    return "\n".join(lines)


def panel_size_chars(text: str) -> tuple[int, int]:
    """(longest line, number of lines) of a panel's text."""
    lines = text.split("\n")
    return max(map(len, lines)), len(lines)
