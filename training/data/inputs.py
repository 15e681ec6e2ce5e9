"""Listing a dataset folder: image files in a deterministic order, unique sample keys, duplicate-stem handling."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .images import IMAGE_EXTENSIONS

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_STEM_CHARS = 48


@dataclass(frozen=True, slots=True)
class InputFile:
    path: Path
    relative: str  # POSIX path relative to the input root; the identity of the sample in reports
    key: str  # WebDataset key: ASCII, no dots or slashes, unique per relative path
    size: int


@dataclass(frozen=True, slots=True)
class Skip:
    path: str
    reason: str

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def sample_key(relative: str) -> str:
    """A readable, dot-free ASCII key plus a hash of the full relative path (so Unicode names stay unique)."""
    stem = relative.rsplit(".", 1)[0]
    readable = _UNSAFE_KEY_CHARS.sub("_", stem).strip("_")[-_KEY_STEM_CHARS:] or "img"
    return f"{readable}-{hashlib.sha1(relative.encode('utf-8')).hexdigest()[:12]}"


def scan_images(input_dir: Path, *, exclude: Path | None = None) -> tuple[list[InputFile], list[Skip]]:
    """Every image file below input_dir (recursive, hidden entries ignored), sorted by relative path.

    Files sharing a stem in one folder (a.jpg and a.png) would share a sidecar caption, so only the first in sorted
    order is kept; the others are returned as skips.
    """
    found: list[InputFile] = []
    for root, dirs, files in os.walk(input_dir):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (exclude is None or root_path / d != exclude))
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = root_path / name
            relative = path.relative_to(input_dir).as_posix()
            found.append(InputFile(path=path, relative=relative, key=sample_key(relative), size=path.stat().st_size))
    found.sort(key=lambda item: item.relative)
    kept: list[InputFile] = []
    skips: list[Skip] = []
    first_by_stem: dict[str, str] = {}
    for item in found:
        stem = item.relative.rsplit(".", 1)[0]
        if stem in first_by_stem:
            skips.append(Skip(item.relative, f"duplicate stem: {first_by_stem[stem]} has the same name and was kept"))
            continue
        first_by_stem[stem] = item.relative
        kept.append(item)
    return kept, skips


def inputs_digest(inputs: list[InputFile]) -> str:
    """Identifies the input listing (paths and sizes) so a resumed pack can tell the folder did not change."""
    digest = hashlib.sha256()
    for item in inputs:
        digest.update(f"{item.relative}\0{item.size}\n".encode())
    return digest.hexdigest()
