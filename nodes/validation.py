"""Widget declarations that also validate: one table per node gives ComfyUI its INPUT_TYPES and checks every value.

ComfyUI checks widget ranges for prompts it validates, but values can also arrive through links or from tests, so the
node functions check again (with messages that name the input and the allowed range) before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class SettingRefused(ValueError):
    """A node input is outside its allowed range or choices; the message names the input and what is allowed."""


@dataclass(frozen=True)
class Int:
    default: int
    min: int
    max: int
    tooltip: str
    step: int = 1
    #: The frontend adds a "control after generate" widget (randomize by default) to INTs named seed unless False.
    control_after_generate: bool | None = None

    def declare(self) -> tuple:
        spec = {"default": self.default, "min": self.min, "max": self.max, "step": self.step, "tooltip": self.tooltip}
        if self.control_after_generate is not None:
            spec["control_after_generate"] = self.control_after_generate
        return ("INT", spec)

    def check(self, name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingRefused(f"{name}={value!r} must be a whole number in {self.min}..{self.max}")
        if not self.min <= value <= self.max:
            raise SettingRefused(f"{name}={value} is outside {self.min}..{self.max}")
        return value


@dataclass(frozen=True)
class Float:
    default: float
    min: float
    max: float
    tooltip: str
    step: float = 0.01

    def declare(self) -> tuple:
        spec = {"default": self.default, "min": self.min, "max": self.max, "step": self.step, "tooltip": self.tooltip}
        return ("FLOAT", spec)

    def check(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SettingRefused(f"{name}={value!r} must be a finite number in {self.min}..{self.max}")
        if not self.min <= value <= self.max:
            raise SettingRefused(f"{name}={value} is outside {self.min}..{self.max}")
        return float(value)


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]
    tooltip: str
    default: str | None = None  # None: the first option

    def __post_init__(self) -> None:
        if self.default is None:
            object.__setattr__(self, "default", self.options[0])
        if self.default not in self.options:
            raise ValueError(f"Choice default {self.default!r} is not one of {self.options}")

    def declare(self) -> tuple:
        return (list(self.options), {"default": self.default, "tooltip": self.tooltip})

    def check(self, name: str, value: Any) -> str:
        if value not in self.options:
            raise SettingRefused(f"{name}={value!r} must be one of {list(self.options)}")
        return value


@dataclass(frozen=True)
class Text:
    default: str
    tooltip: str
    max_chars: int = 1024
    multiline: bool = False

    def declare(self) -> tuple:
        return ("STRING", {"default": self.default, "multiline": self.multiline, "tooltip": self.tooltip})

    def check(self, name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise SettingRefused(f"{name} must be text, got {type(value).__name__}")
        if len(value) > self.max_chars:
            raise SettingRefused(f"{name} is {len(value)} characters long; at most {self.max_chars} are allowed")
        return value


@dataclass(frozen=True)
class Toggle:
    default: bool
    tooltip: str

    def declare(self) -> tuple:
        return ("BOOLEAN", {"default": self.default, "tooltip": self.tooltip})

    def check(self, name: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise SettingRefused(f"{name}={value!r} must be true or false")
        return value


Widget = Int | Float | Choice | Text | Toggle


def declare(widgets: dict[str, Widget]) -> dict[str, tuple]:
    """The INPUT_TYPES entries for a table of widgets."""
    return {name: widget.declare() for name, widget in widgets.items()}


def check_all(widgets: dict[str, Widget], values: dict[str, Any]) -> dict[str, Any]:
    """Every widget value checked (missing ones refused); returns the checked values."""
    missing = sorted(set(widgets) - set(values))
    if missing:
        raise SettingRefused(f"missing input(s) {missing}")
    return {name: widget.check(name, values[name]) for name, widget in widgets.items()}
