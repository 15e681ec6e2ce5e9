"""What happened to each input that did not simply become a sample: the one vocabulary of skip and note kinds, and
the summary that says what was skipped, why, and how to keep it.

Every entry found under the input folder is packed, skipped (report.json "skipped") or noted (report.json "notes").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Kind:
    #: Plural phrase after a count: "3 too small for their bucket".
    label: str
    #: How to keep such inputs: a setting to change ((name, value)), else None; `advice` says the rest.
    setting: tuple[str, str] | None = None
    advice: str = ""


SKIP_KINDS: dict[str, Kind] = {
    "too_small": Kind("too small for their bucket", ("too_small", "upscale"), "or pack at a lower resolution"),
    "unreadable": Kind("not readable as images (corrupt, truncated or not images)", None, "re-save or remove them"),
    "empty_file": Kind("empty (0 bytes)", None, "copy them again"),
    "too_large": Kind("larger than max_image_pixels", ("max_image_pixels", "<more pixels>"), "if you trust them"),
    "unsupported_format": Kind("in an unsupported format", None, "convert them to JPEG or PNG"),
    "duplicate_stem": Kind("sharing a name with another image in their folder", None, "rename them"),
    "link_outside": Kind(
        "symbolic links that leave the folder", ("follow_external_links", "true"), "or copy the files into the folder"
    ),
    "broken_link": Kind("broken symbolic links", None, "fix or remove the links"),
    "bad_name": Kind("named with bytes that are not UTF-8", None, "rename them"),
    "folder_named_like_image": Kind("folders named like image files (not searched)", None, "rename the folders"),
    "not_regular_file": Kind("not regular files (pipes, sockets, devices)", None, "replace them with files"),
    "unreadable_file": Kind("unreadable files (moved, deleted or not permitted while packing)", None, "pack again"),
    "no_caption": Kind("without a caption", ("missing_caption", "empty"), "or add captions"),
    "caption_unreadable": Kind("with an unreadable or refused caption file", None, "fix the caption files"),
}

NOTE_KINDS: dict[str, Kind] = {
    "empty_caption": Kind(
        "packed with an empty caption (no sidecar .txt/.caption or metadata entry)", None, "add captions"
    ),
    "caption_decoding": Kind("with a caption that is not UTF-8 or had NUL bytes (decoded anyway)", None, ""),
    "caption_truncated": Kind("with a caption cut to max_caption_chars", None, ""),
    "animated": Kind("animated: the first frame was used", None, ""),
    "fewer_sizes": Kind(
        "too small for the larger pack resolutions: kept only at the sizes they cover",
        ("too_small", "upscale"),
        "to keep them at every size",
    ),
    "ignored_file": Kind("other files ignored (not images or captions)", None, ""),
    "hidden": Kind("hidden entries ignored (names starting with '.')", None, ""),
    "linked_folder": Kind("links to folders searched elsewhere (their images are packed once)", None, ""),
    "metadata": Kind("notes on the metadata file", None, ""),
}


def setting_for_config(name: str, value: str) -> str:
    """How a Python/node user sets it: too_small='upscale'."""
    return f"{name}={value!r}" if value not in ("true", "false") else f"{name}={value.title()}"


def summary_lines(
    skipped: Iterable[str],
    noted: Iterable[str],
    *,
    total: int,
    render_setting: Callable[[str, str], str | None] = setting_for_config,
) -> list[str]:
    """One line per kind of skip and of note, most frequent first, each with how to keep those inputs.

    render_setting(name, value) spells a setting for the caller's interface (a CLI flag, a widget), or None where
    that interface has no such setting."""
    lines = []
    skip_counts = Counter(skipped)
    if skip_counts:
        lines.append(f"skipped {sum(skip_counts.values())} of {total} inputs:")
    for kind, count in sorted(skip_counts.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"  {count} {_phrase(SKIP_KINDS, kind, render_setting)}")
    for kind, count in sorted(Counter(noted).items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"  note: {count} {_phrase(NOTE_KINDS, kind, render_setting)}")
    return lines


def _phrase(kinds: dict[str, Kind], kind: str, render_setting: Callable[[str, str], str | None]) -> str:
    described = kinds.get(kind)
    if described is None:
        return kind.replace("_", " ")
    setting = render_setting(*described.setting) if described.setting is not None else None
    advice = described.advice.removeprefix("or ") if setting is None else described.advice
    if setting is not None:
        return f"{described.label}: keep them with {setting}{' ' + advice if advice else ''}"
    return f"{described.label}: {advice}" if advice else described.label


def report_kinds(report: dict) -> tuple[list[str], list[str]]:
    """The skip kinds and note kinds of a report.json document (entries without a kind count as 'unreadable')."""
    skipped = [entry.get("kind") or "unreadable" for entry in report.get("skipped", [])]
    noted = [entry.get("kind") or "note" for entry in report.get("notes", [])]
    return skipped, noted
