"""Typed config fields: bounds on numbers, each value checked against its annotation, nested sections built from JSON
objects with unknown and missing keys named (``training.engine.config`` and its sections use these)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class Bounds:
    """The range a number field (or each element of a tuple field) must lie in; None: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            if isinstance(self.low, int) and isinstance(self.high, int) and not (self.low_open or self.high_open):
                return f" in {self.low}..{self.high:,}"
            return f" in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low}"
        return f" {'<' if self.high_open else '<='} {self.high}" if self.high is not None else ""


def bounded(default, *, ge=None, gt=None, le=None, lt=None):
    """A dataclass field whose value `validate` checks against these bounds (ge/gt below, le/lt above)."""
    bounds = Bounds(
        low=gt if gt is not None else ge,
        high=lt if lt is not None else le,
        low_open=gt is not None,
        high_open=lt is not None,
    )
    return field(default=default, metadata={"bounds": bounds})


def validate(section, where: str) -> None:
    """Check every field against its annotation and bounds; ints become floats where a float is expected.

    bool is not an int here (JSON ``true`` is no step count), and every float must be finite."""
    hints = typing.get_type_hints(type(section))
    for spec in dataclasses.fields(section):
        key = f"{where}.{spec.name}" if where else spec.name
        value = _typed(getattr(section, spec.name), hints[spec.name], key, spec.metadata.get("bounds"))
        setattr(section, spec.name, value)


def _typed(value, hint, key: str, bounds: Bounds | None):
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _typed(value, hint, key, bounds)
    origin = typing.get_origin(hint)
    if origin is tuple:
        many = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, (list, tuple)) or (not many and len(value) != len(args)):
            raise ValueError(f"{key}: must be a list of {'' if many else f'{len(args)} '}values, got {value!r}")
        kinds = [args[0]] * len(value) if many else list(args)
        return tuple(_typed(item, kind, f"{key}[{i}]", bounds) for i, (kind, item) in enumerate(zip(kinds, value)))
    if origin is dict or dataclasses.is_dataclass(hint):
        require(isinstance(value, origin or hint), f"{key}: must be an object, got {value!r}")
        return value
    if hint is bool:
        require(isinstance(value, bool), f"{key}: must be true or false, got {value!r}")
    elif hint is str:
        require(isinstance(value, str), f"{key}: must be a string, got {value!r}")
    elif hint is int:
        expected = f"an integer{bounds.describe() if bounds else ''}"
        require(isinstance(value, int) and not isinstance(value, bool), f"{key}: must be {expected}, got {value!r}")
    elif hint is float:
        expected = f"a finite number{bounds.describe() if bounds else ''}"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(number and math.isfinite(value), f"{key}: must be {expected}, got {value!r}")
    if bounds is not None and hint in (int, float):
        kind = "an integer" if hint is int else "a finite number"
        require(bounds.contains(value), f"{key}: must be {kind}{bounds.describe()}, got {value!r}")
    return float(value) if hint is float else value


def build_from_dict(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        section = _dataclass_type(hints[name])
        values[name] = build_from_dict(section, value, f"{where}.{name}") if section and value is not None else value
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing key(s) {missing} in {where}")
    return cls(**values)


def _dataclass_type(hint) -> type | None:
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)
