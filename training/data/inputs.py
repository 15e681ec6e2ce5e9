"""Listing a dataset folder: every entry becomes an input image or a reported skip or note, in a deterministic order;
unique sample keys; duplicate-stem handling; symbolic links that leave the folder refused unless allowed."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .captions import METADATA_FILE_NAMES, printable_name
from .images import IMAGE_EXTENSIONS

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]+")
_KEY_STEM_CHARS = 48
#: Image formats this packer cannot read: reported so that they are converted rather than silently lost.
UNSUPPORTED_IMAGE_EXTENSIONS = (
    ".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".ico", ".exr", ".hdr",
    ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class InputFile:
    path: Path
    relative: str  # POSIX path relative to the input root; the identity of the sample in reports
    key: str  # WebDataset key: ASCII, no dots or slashes, unique per relative path
    size: int


@dataclass(frozen=True, slots=True)
class Skip:
    """An input that is not packed (or, as a note, an entry that is not an input), with its reason and kind (a key of
    outcomes.SKIP_KINDS or outcomes.NOTE_KINDS)."""

    path: str
    reason: str
    kind: str = "unreadable"

    def to_json(self) -> dict:
        return {"path": self.path, "reason": self.reason, "kind": self.kind}


@dataclass(kw_only=True)
class Scan:
    inputs: list[InputFile] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    notes: list[Skip] = field(default_factory=list)


def sample_key(relative: str) -> str:
    """A readable, dot-free ASCII key plus a hash of the full relative path (so Unicode names stay unique)."""
    stem = relative.rsplit(".", 1)[0]
    readable = _UNSAFE_KEY_CHARS.sub("_", stem).strip("_")[-_KEY_STEM_CHARS:] or "img"
    return f"{readable}-{hashlib.sha1(relative.encode('utf-8')).hexdigest()[:12]}"


def scan_images(
    input_dir: Path, *, follow_external_links: bool = False, caption_extensions: tuple[str, ...] = (".txt", ".caption")
) -> Scan:
    """Every image file below input_dir (recursive), sorted by relative path, and a skip or note for everything else.

    Hidden entries are noted, not searched. Symbolic links are followed only while they stay inside input_dir, unless
    follow_external_links. Files sharing a stem in one folder (a.jpg and a.png) would share a sidecar caption, so only
    the first in sorted order is kept; the others are skips.
    """
    scanner = _Scanner(input_dir, follow_external_links, tuple(e.lower() for e in caption_extensions))
    scanner.walk()
    scan = scanner.scan
    scan.inputs.sort(key=lambda item: item.relative)
    kept: list[InputFile] = []
    first_by_stem: dict[str, str] = {}
    for item in scan.inputs:
        stem = item.relative.rsplit(".", 1)[0]
        if stem in first_by_stem:
            reason = f"duplicate stem: {first_by_stem[stem]} has the same name and was kept"
            scan.skips.append(Skip(item.relative, reason, "duplicate_stem"))
            continue
        first_by_stem[stem] = item.relative
        kept.append(item)
    scan.inputs = kept
    return scan


def _link_text(path: Path) -> str:
    try:
        return printable_name(os.readlink(path))
    except OSError as error:
        return f"an unreadable target: {error.strerror}"


class _Scanner:
    def __init__(self, root: Path, follow_external_links: bool, caption_extensions: tuple[str, ...]) -> None:
        self.root, self.real_root = root, root.resolve()
        self.follow_external_links = follow_external_links
        self.caption_extensions = caption_extensions
        self.scan = Scan()
        self.searched = {self.real_root}  # real folders already searched: a followed link never loops

    def walk(self) -> None:
        pending = [(self.root, "")]
        while pending:
            folder, prefix = pending.pop()
            try:
                with os.scandir(folder) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
            except OSError as error:
                if not prefix:
                    raise ValueError(f"input folder {folder} cannot be listed ({error})") from error
                self._skip(prefix.rstrip("/"), f"folder cannot be listed ({error.strerror})", "unreadable_file")
                continue
            subfolders = [sub for entry in entries if (sub := self._visit(entry, prefix)) is not None]
            pending.extend(reversed(subfolders))

    def _visit(self, entry: os.DirEntry, prefix: str) -> tuple[Path, str] | None:
        """Records the entry; returns (folder, prefix) when it is a folder to search."""
        relative = prefix + entry.name
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            reason = "the name is not valid UTF-8 (shown with \\x escapes); rename it"
            self._skip(printable_name(relative), reason, "bad_name")
            return None
        if entry.name.startswith("."):
            self.scan.notes.append(Skip(relative, "hidden (name starts with '.'); ignored", "hidden"))
            return None
        path = Path(entry.path)
        if entry.is_symlink():
            return self._visit_link(path, relative)
        if entry.is_dir(follow_symlinks=False):
            return self._visit_folder(path, relative)
        if entry.is_file(follow_symlinks=False):
            self._visit_file(path, relative)
        else:
            self._skip(relative, "not a regular file (a pipe, socket or device); not read", "not_regular_file")
        return None

    def _visit_link(self, path: Path, relative: str) -> tuple[Path, str] | None:
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            self._skip(relative, f"broken symbolic link (to {_link_text(path)}, which does not exist)", "broken_link")
            return None
        inside = target.is_relative_to(self.real_root)
        shown, root = printable_name(str(target)), printable_name(str(self.root))
        if not inside and not self.follow_external_links:
            if not relative.lower().endswith(self.caption_extensions):  # a caption link is refused where it is read
                reason = (
                    f"symbolic link to {shown}, outside {root}; links that leave the folder are not followed "
                    "(copy the file into the folder to use it)"
                )
                self._skip(relative, reason, "link_outside")
            return None
        if target.is_dir():
            if inside:
                note = f"symbolic link to the folder {shown}, inside the input; not followed (that folder is searched where it is)"
                self.scan.notes.append(Skip(relative, note, "linked_folder"))
                return None
            return self._visit_folder(path, relative, real=target)
        if target.is_file():
            self._visit_file(path, relative)
        else:
            self._skip(relative, f"symbolic link to {shown}, which is not a regular file; not read", "not_regular_file")
        return None

    def _visit_folder(self, path: Path, relative: str, *, real: Path | None = None) -> tuple[Path, str] | None:
        if relative.lower().endswith(IMAGE_EXTENSIONS + UNSUPPORTED_IMAGE_EXTENSIONS):
            reason = "a folder named like an image file; not searched (rename it to pack the images it holds)"
            self._skip(relative + "/", reason, "folder_named_like_image")
            return None
        real = real or path.resolve()
        if real in self.searched:
            self.scan.notes.append(
                Skip(
                    relative + "/",
                    f"leads to {printable_name(str(real))}, already searched; not searched again",
                    "linked_folder",
                )
            )
            return None
        self.searched.add(real)
        return path, relative + "/"

    def _visit_file(self, path: Path, relative: str) -> None:
        lowered = relative.lower()
        if lowered.endswith(IMAGE_EXTENSIONS):
            try:
                size = path.stat().st_size
            except OSError as error:
                self._skip(relative, f"could not be read ({type(error).__name__}: {error.strerror})", "unreadable_file")
                return
            self.scan.inputs.append(InputFile(path=path, relative=relative, key=sample_key(relative), size=size))
        elif lowered.endswith(UNSUPPORTED_IMAGE_EXTENSIONS):
            extension = lowered.rsplit(".", 1)[-1]
            reason = f".{extension} images are not supported; convert it to JPEG or PNG to pack it"
            self._skip(relative, reason, "unsupported_format")
        elif not lowered.endswith(self.caption_extensions) and relative not in METADATA_FILE_NAMES:
            note = f"not an image ({', '.join(IMAGE_EXTENSIONS)}) or caption file; ignored"
            self.scan.notes.append(Skip(relative, note, "ignored_file"))

    def _skip(self, relative: str, reason: str, kind: str) -> None:
        self.scan.skips.append(Skip(relative, reason, kind))


def inputs_digest(inputs: list[InputFile]) -> str:
    """Identifies the input listing (paths and sizes) so a resumed pack can tell the folder did not change."""
    digest = hashlib.sha256()
    for item in inputs:
        digest.update(f"{item.relative}\0{item.size}\n".encode())
    return digest.hexdigest()
