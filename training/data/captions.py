"""Finding an image's caption: a metadata.jsonl / metadata.csv at the input root, else a sidecar .txt / .caption."""

from __future__ import annotations

import csv
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

METADATA_FILE_NAMES = ("metadata.jsonl", "metadata.csv")
_FILE_COLUMNS = ("file_name", "file", "image", "path")
_CAPTION_COLUMNS = ("text", "caption", "prompt")


class CaptionRejected(Exception):
    """The image's caption is unusable; the message is the skip reason for report.json."""


@dataclass(frozen=True, slots=True)
class Caption:
    text: str
    source: str  # "metadata", "sidecar:<name>" or "missing"
    notes: tuple[str, ...] = ()


@dataclass(kw_only=True)
class CaptionIndex:
    """Captions from a metadata file, keyed by path relative to the input root (POSIX) and by bare file name."""

    sidecar_extensions: tuple[str, ...] = (".txt", ".caption")
    missing_caption: str = "empty"  # "empty" keeps the image with caption "", "skip" drops it
    max_caption_chars: int = 4000
    by_relative_path: dict[str, str] = field(default_factory=dict)
    by_file_name: dict[str, str | None] = field(default_factory=dict)  # None marks an ambiguous bare name

    @classmethod
    def load(cls, input_dir: Path, metadata_file: Path | None, **settings) -> CaptionIndex:
        index = cls(**settings)
        path = metadata_file or next((input_dir / n for n in METADATA_FILE_NAMES if (input_dir / n).is_file()), None)
        if path is None:
            return index
        rows = _read_jsonl(path) if path.suffix.lower() == ".jsonl" else _read_csv(path)
        for file_name, text in rows:
            relative = file_name.replace("\\", "/").removeprefix("./")
            index.by_relative_path[relative] = text
            bare = relative.rsplit("/", 1)[-1]
            index.by_file_name[bare] = None if bare in index.by_file_name else text
        return index

    def caption_for(self, image_path: Path, relative: str) -> Caption:
        text, source = self._lookup(image_path, relative)
        if text is None or not text.strip():
            if self.missing_caption == "skip":
                raise CaptionRejected("caption missing or empty (missing_caption='skip')")
            return Caption(text="", source=source, notes=(f"caption missing or empty ({source}); kept with ''",))
        text = unicodedata.normalize("NFC", text.strip())
        if len(text) > self.max_caption_chars:
            note = f"caption truncated from {len(text)} to {self.max_caption_chars} characters"
            return Caption(text=text[: self.max_caption_chars], source=source, notes=(note,))
        return Caption(text=text, source=source)

    def _lookup(self, image_path: Path, relative: str) -> tuple[str | None, str]:
        if relative in self.by_relative_path:
            return self.by_relative_path[relative], "metadata"
        bare = image_path.name
        if self.by_file_name.get(bare) is not None:
            return self.by_file_name[bare], "metadata"
        for extension in self.sidecar_extensions:
            sidecar = image_path.with_suffix(extension)
            if sidecar.is_file():
                return _read_text(sidecar), f"sidecar:{sidecar.name}"
        return None, "missing"


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise CaptionRejected(
            f"caption file {path.name} is not UTF-8 (invalid byte at position {error.start}); re-save it as UTF-8"
        ) from error


def _read_metadata_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"metadata file {path} is not UTF-8 (invalid byte at position {error.start})") from error


def _pick(row: dict, columns: tuple[str, ...], path: Path, where: str) -> str:
    for column in columns:
        if column in row and row[column] is not None:
            return str(row[column])
    raise ValueError(f"{path} {where}: needs one of the columns {columns}, found {sorted(row)}")


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(_read_metadata_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON: {error}") from error
        if not isinstance(row, dict):
            raise ValueError(f'{path} line {number} must be a JSON object like {{"file_name": ..., "text": ...}}')
        where = f"line {number}"
        rows.append((_pick(row, _FILE_COLUMNS, path, where), _pick(row, _CAPTION_COLUMNS, path, where)))
    return rows


def _read_csv(path: Path) -> list[tuple[str, str]]:
    reader = csv.DictReader(_read_metadata_text(path).splitlines())
    return [
        (_pick(row, _FILE_COLUMNS, path, f"row {n}"), _pick(row, _CAPTION_COLUMNS, path, f"row {n}"))
        for n, row in enumerate(reader, start=2)
    ]
