"""Confining user-typed paths and names to the folders this pack may read or write.

Rules (checked before anything touches the disk):
- a name (shard set, run, LoRA) is a plain ASCII file name: letters, digits, '_', '-', '.', no leading dot or dash,
  no '..', at most 64 characters;
- a path may be relative (taken inside the first allowed root, or the root where it exists) or absolute (must lie in
  an allowed root); it may not contain '..' components, NUL bytes, '~' or shell metacharacters, and after resolving
  symlinks it must still lie inside the allowed root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from . import comfy_bridge

MAX_NAME_CHARS = 64
MAX_PATH_CHARS = 1024
MAX_PART_BYTES = 255  # NAME_MAX: longer names make the OS raise ENAMETOOLONG, not report a missing file
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Never needed in a folder path and typical of injection attempts (no shell runs anyway; they are refused early).
_SHELL_METACHARACTERS = set(";&|`$<>!*?\"'\n\r\t{}~")


class PathRefused(ValueError):
    """A user-typed path or name is outside the allowed roots or malformed; the message says which and why."""


@dataclass(frozen=True)
class AllowedRoots:
    """Named roots a path field may point into; the first root is where new folders are created."""

    label: str
    roots: tuple[Path, ...]

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots) or "(none configured)"


def check_name(value: str, field: str) -> str:
    """A plain file name for a new shard set, run or LoRA; returned stripped of surrounding spaces."""
    name = value.strip() if isinstance(value, str) else value
    if not isinstance(name, str) or not name:
        raise PathRefused(f"{field} is empty: give a short name like 'my_style'")
    if len(name) > MAX_NAME_CHARS:
        raise PathRefused(f"{field}={name[:40]!r}... is {len(name)} characters long; use at most {MAX_NAME_CHARS}")
    if ".." in name or not _NAME.match(name):
        raise PathRefused(
            f"{field}={name!r} is not a plain name: use letters, digits, '_', '-' and '.', starting with a letter or "
            "digit (no '/', '..', spaces or shell characters)"
        )
    return name


def _check_path_text(value: str, field: str) -> str:
    text = value.strip() if isinstance(value, str) else value
    if not isinstance(text, str) or not text:
        raise PathRefused(f"{field} is empty: give a folder name or path")
    if len(text) > MAX_PATH_CHARS:
        raise PathRefused(f"{field} is {len(text)} characters long; use at most {MAX_PATH_CHARS}")
    if "\x00" in text:
        raise PathRefused(f"{field} contains a NUL byte")
    bad = sorted(set(text) & _SHELL_METACHARACTERS)
    if bad:
        raise PathRefused(f"{field}={text!r} contains the characters {''.join(bad)!r}; use a plain folder path")
    parts = set(PurePosixPath(text).parts) | set(PureWindowsPath(text).parts)
    too_long = next((part for part in parts if len(os.fsencode(part)) > MAX_PART_BYTES), None)
    if too_long is not None:
        raise PathRefused(
            f"{field}: the part {too_long[:40]!r}... is longer than the {MAX_PART_BYTES} bytes a file or folder name "
            "can have; give a shorter path"
        )
    if ".." in parts:
        raise PathRefused(f"{field}={text!r} contains '..'; give a path inside the allowed folders without '..'")
    return text


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def confine(value: str, allowed: AllowedRoots, field: str, *, must_exist: bool) -> Path:
    """The resolved path of a user-typed path inside one of the allowed roots, or PathRefused saying why not."""
    text = _check_path_text(value, field)
    if not allowed.roots:
        raise PathRefused(f"{field}: no {allowed.label} folder is configured")
    typed = Path(text)
    candidates = [typed] if typed.is_absolute() else [root / typed for root in allowed.roots]
    escaping = None  # an existing candidate that a symbolic link leads out of the roots
    for candidate in candidates:
        resolved = candidate.resolve()
        root = next((r for r in allowed.roots if _inside(resolved, r.resolve())), None)
        if root is None:
            escaping = escaping or (resolved if resolved.exists() else None)
            continue
        if must_exist and not resolved.exists():
            continue
        return resolved
    if typed.is_absolute() and not any(_inside(typed.resolve(), r.resolve()) for r in allowed.roots):
        raise PathRefused(f"{field}={text!r} is outside the {allowed.label} folders ({allowed.describe()})")
    if escaping is not None:
        raise PathRefused(
            f"{field}={text!r} leads to {escaping}, outside the {allowed.label} folders ({allowed.describe()}), "
            "through a symbolic link; links out of these folders are not followed"
        )
    if must_exist:
        raise PathRefused(f"{field}={text!r} was not found in the {allowed.label} folders ({allowed.describe()})")
    raise PathRefused(f"{field}={text!r} resolves outside the {allowed.label} folders ({allowed.describe()})")


def new_child(allowed: AllowedRoots, name: str, field: str) -> Path:
    """<first root>/<name> for a new shard set, run or LoRA (the name checked, the result inside the root)."""
    name = check_name(name, field)
    if not allowed.roots:
        raise PathRefused(f"{field}: no {allowed.label} folder is configured")
    root = allowed.roots[0].resolve()
    path = (root / name).resolve()
    if not _inside(path, root) or path == root:
        raise PathRefused(f"{field}={name!r} resolves outside {root}")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The roots, from ComfyUI's folders


def image_roots() -> AllowedRoots:
    """Where image folders to pack may live: ComfyUI's input and output folders."""
    return AllowedRoots("input", (comfy_bridge.input_directory(), comfy_bridge.output_directory()))


def dataset_roots() -> AllowedRoots:
    return AllowedRoots(comfy_bridge.DATASETS_FOLDER, tuple(comfy_bridge.folder_roots(comfy_bridge.DATASETS_FOLDER)))


def run_roots() -> AllowedRoots:
    return AllowedRoots(comfy_bridge.RUNS_FOLDER, tuple(comfy_bridge.folder_roots(comfy_bridge.RUNS_FOLDER)))


def lora_roots() -> AllowedRoots:
    return AllowedRoots(comfy_bridge.LORAS_FOLDER, tuple(comfy_bridge.folder_roots(comfy_bridge.LORAS_FOLDER)))


def diffusion_model_roots() -> AllowedRoots:
    return AllowedRoots(
        comfy_bridge.DIFFUSION_MODELS_FOLDER, tuple(comfy_bridge.folder_roots(comfy_bridge.DIFFUSION_MODELS_FOLDER))
    )
