"""Finding an image's caption: a metadata.jsonl / metadata.csv at the input root, else a sidecar .txt / .caption."""

from __future__ import annotations

import codecs
import csv
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

METADATA_FILE_NAMES = ("metadata.jsonl", "metadata.csv")


def printable_name(name: str) -> str:
    """A file name as report text: bytes that are not UTF-8 (os's surrogate escapes) shown as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_FILE_COLUMNS = ("file_name", "file", "image", "path")
_CAPTION_COLUMNS = ("text", "caption", "prompt")


class CaptionRejected(Exception):
    """The image's caption is unusable; the message is the skip reason for report.json, `kind` a key of
    outcomes.SKIP_KINDS."""

    def __init__(self, reason: str, kind: str = "caption_unreadable") -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Caption:
    text: str
    source: str  # "metadata", "sidecar:<name>" or "missing"
    notes: tuple[tuple[str, str], ...] = ()  # (kind, message); kinds are keys of outcomes.NOTE_KINDS


@dataclass(kw_only=True)
class CaptionIndex:
    """Captions from a metadata file, keyed by path relative to the input root (POSIX) and by bare file name."""

    sidecar_extensions: tuple[str, ...] = (".txt", ".caption")
    missing_caption: str = "empty"  # "empty" keeps the image with caption "", "skip" drops it
    max_caption_chars: int = 4000
    #: Caption files must lie in this folder after resolving links, unless follow_external_links (None: no check).
    root: Path | None = None
    follow_external_links: bool = False
    by_relative_path: dict[str, str] = field(default_factory=dict)
    by_file_name: dict[str, str | None] = field(default_factory=dict)  # None marks an ambiguous bare name
    #: (file name, note) about the metadata file, e.g. how it was decoded.
    notes: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, input_dir: Path, metadata_file: Path | None, **settings) -> CaptionIndex:
        index = cls(root=input_dir, **settings)
        path = metadata_file
        if path is None:
            path = next((input_dir / n for n in METADATA_FILE_NAMES if (input_dir / n).is_file()), None)
            if path is not None and (refusal := index._link_refusal(path)) is not None:
                raise ValueError(f"{path}: {refusal}")
        if path is None:
            return index
        text, notes = _read_metadata_text(path)
        index.notes.extend((path.name, note) for note in notes)
        rows = _read_jsonl(path, text) if path.suffix.lower() == ".jsonl" else _read_csv(path, text)
        for file_name, caption in rows:
            relative = file_name.replace("\\", "/").removeprefix("./")
            index.by_relative_path[relative] = caption
            bare = relative.rsplit("/", 1)[-1]
            index.by_file_name[bare] = None if bare in index.by_file_name else caption
        return index

    def caption_for(self, image_path: Path, relative: str) -> Caption:
        text, source, notes = self._lookup(image_path, relative)
        if text is not None and "\x00" in text:
            notes += (("caption_decoding", f"removed {text.count(chr(0))} NUL characters from the caption ({source})"),)
            text = text.replace("\x00", "")
        if text is None or not text.strip():
            if self.missing_caption == "skip":
                raise CaptionRejected("caption missing or empty (missing_caption='skip')", "no_caption")
            note = ("empty_caption", f"caption missing or empty ({source}); kept with ''")
            return Caption(text="", source=source, notes=(*notes, note))
        text = unicodedata.normalize("NFC", text.strip())
        if len(text) > self.max_caption_chars:
            notes += (
                ("caption_truncated", f"caption truncated from {len(text)} to {self.max_caption_chars} characters"),
            )
            text = text[: self.max_caption_chars]
        return Caption(text=text, source=source, notes=notes)

    def _lookup(self, image_path: Path, relative: str) -> tuple[str | None, str, tuple[tuple[str, str], ...]]:
        if relative in self.by_relative_path:
            return self.by_relative_path[relative], "metadata", ()
        bare = image_path.name
        if self.by_file_name.get(bare) is not None:
            return self.by_file_name[bare], "metadata", ()
        for extension in self.sidecar_extensions:
            sidecar = image_path.with_suffix(extension)
            if not sidecar.is_symlink() and not sidecar.is_file():
                continue
            refusal = self._link_refusal(sidecar)
            if refusal is not None:
                raise CaptionRejected(f"caption file {sidecar.name} {refusal}")
            if sidecar.is_file():
                text, notes = _read_text(sidecar)
                return text, f"sidecar:{sidecar.name}", tuple(("caption_decoding", note) for note in notes)
        return None, "missing", ()

    def _link_refusal(self, path: Path) -> str | None:
        """Why a caption or metadata file that is a symbolic link may not be read (None: it may)."""
        if not path.is_symlink():
            return None
        if not path.exists():
            return "is a broken symbolic link (its target does not exist)"
        if self.root is None or self.follow_external_links:
            return None
        target = path.resolve()
        if target.is_relative_to(self.root.resolve()):
            return None
        shown, root = printable_name(str(target)), printable_name(str(self.root))
        return (
            f"is a symbolic link to {shown}, outside {root}; links that leave the folder are not followed "
            "(copy the file into the folder to use it)"
        )


_BYTE_ORDER_MARKS = (  # UTF-32 first: its little-endian mark begins with UTF-16's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_FALLBACK_ENCODING = "cp1252"  # what Windows editors save when they do not save UTF-8; a superset of Latin-1's text


def decode_text(data: bytes, name: str) -> tuple[str, tuple[str, ...]]:
    """Text of a caption or metadata file and notes on how it was read (each naming `name`).

    A byte-order mark names the encoding (UTF-8, UTF-16, UTF-32); without one, NUL bytes in every other position mean
    UTF-16; else UTF-8; else Windows-1252 (Latin-1 for its five unassigned bytes), with a note. Never fails.
    """
    for mark, encoding in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            return _decode_lenient(data[len(mark) :], encoding, name, ())
    utf16 = _bomless_utf16(data)
    if utf16 is not None:
        return _decode_lenient(data, utf16, name, (f"{name} has no byte-order mark but looks like {utf16.upper()}",))
    try:
        return data.decode("utf-8"), ()
    except UnicodeDecodeError as error:
        note = (
            f"{name} is not UTF-8 (invalid byte at position {error.start}); read as Windows-1252/Latin-1: "
            "re-save it as UTF-8 if characters look wrong"
        )
    try:
        return data.decode(_FALLBACK_ENCODING), (note,)
    except UnicodeDecodeError:
        return data.decode("latin-1"), (note,)


def _decode_lenient(data: bytes, encoding: str, name: str, notes: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    try:
        return data.decode(encoding), notes
    except UnicodeDecodeError as error:
        note = f"{name}: invalid {encoding.upper()} at byte {error.start}; unreadable characters became U+FFFD"
        return data.decode(encoding, errors="replace"), (*notes, note)


def _bomless_utf16(data: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when one byte of most pairs is NUL and the other is not (mostly-ASCII UTF-16)."""
    pairs = len(data) // 2
    if pairs < 2 or len(data) % 2 or b"\x00" not in data:
        return None
    zeros_even, zeros_odd = data[0::2].count(0), data[1::2].count(0)
    if zeros_odd >= pairs / 2 and zeros_even == 0:
        return "utf-16-le"
    if zeros_even >= pairs / 2 and zeros_odd == 0:
        return "utf-16-be"
    return None


def _read_text(path: Path) -> tuple[str, tuple[str, ...]]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CaptionRejected(
            f"caption file {path.name} could not be read ({type(error).__name__}: {error.strerror or error})"
        ) from error
    return decode_text(data, f"caption file {path.name}")


def _read_metadata_text(path: Path) -> tuple[str, tuple[str, ...]]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"metadata file {path} could not be read ({error}); check the path") from error
    text, notes = decode_text(data, f"metadata file {path.name}")
    if "\x00" in text:
        notes += (f"removed {text.count(chr(0))} NUL characters from metadata file {path.name}",)
        text = text.replace("\x00", "")
    return text, notes


def _pick(row: dict, columns: tuple[str, ...], path: Path, where: str) -> str:
    for column in columns:
        if column in row and row[column] is not None:
            return str(row[column])
    raise ValueError(f"{path} {where}: needs one of the columns {columns}, found {sorted(row)}")


def _read_jsonl(path: Path, text: str) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
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


def _read_csv(path: Path, text: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(text.splitlines())
    return [
        (_pick(row, _FILE_COLUMNS, path, f"row {n}"), _pick(row, _CAPTION_COLUMNS, path, f"row {n}"))
        for n, row in enumerate(reader, start=2)
    ]
