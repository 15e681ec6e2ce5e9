"""The record of what a pack was made from (inputs.json: settings, encoders, every input's path and size) and what
changed since, so that a refused rerun says exactly which files and settings differ and how to continue."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..atomic import write_json_atomic
from .inputs import InputFile, inputs_digest
from .shards import PACK_VERSION, read_json

logger = logging.getLogger(__name__)

INPUTS_NAME = "inputs.json"
_NAMES_SHOWN = 5


def pack_identity(settings: dict, latent_encoder, text_encoder) -> dict:
    """Everything but the inputs that decides a pack's bytes: version, output settings, encoder identities."""
    return {
        "pack_version": PACK_VERSION,
        "settings": settings,
        "latent_encoder": getattr(latent_encoder, "identity", None),
        "text_encoder": getattr(text_encoder, "identity", None),
    }


def pack_fingerprint(identity: dict, inputs: list[InputFile]) -> str:
    """Identifies a pack's output: a rerun with the same fingerprint may reuse or resume it."""
    document = identity | {"inputs": inputs_digest(inputs)}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def write_listing(output_dir: Path, identity: dict, inputs: list[InputFile]) -> None:
    """Saves `identity` (the fingerprinted settings and encoders) and the input listing, before any shard is written."""
    document = identity | {"inputs": [[item.relative, item.size] for item in inputs]}
    write_json_atomic(output_dir / INPUTS_NAME, document, ensure_ascii=False)


def describe_changes(
    output_dir: Path, recorded_fingerprint: str | None, identity: dict, inputs: list[InputFile]
) -> str:
    """What differs between the pack recorded in output_dir/inputs.json (with `recorded_fingerprint`, from its
    manifest or pack state) and one made now from `identity` and `inputs`, e.g.
    "setting resolution: 64 -> 128; 1 file removed: a.png"."""
    path = output_dir / INPUTS_NAME
    if not path.is_file():
        return f"there is no {INPUTS_NAME} saying what it was made from (an older version made it)"
    try:
        saved = read_json(path)
        saved_inputs = {str(name): int(size) for name, size in saved.get("inputs", [])}
    except (ValueError, TypeError, AttributeError) as error:
        logger.warning("cannot compare with %s: %s", path, error)
        return f"its {INPUTS_NAME} cannot be read ({error})"
    if saved.get("fingerprint") != recorded_fingerprint:
        return f"its {INPUTS_NAME} describes another pack, so what changed is unknown"
    changes = _setting_changes(saved, identity)
    current = {item.relative: item.size for item in inputs}
    removed = sorted(saved_inputs.keys() - current.keys())
    added = sorted(current.keys() - saved_inputs.keys())
    resized = sorted(name for name in saved_inputs.keys() & current.keys() if saved_inputs[name] != current[name])
    for names, what in ((removed, "removed"), (added, "added"), (resized, "changed (new size)")):
        if names:
            shown = ", ".join(names[:_NAMES_SHOWN]) + (
                f", ... ({len(names) - _NAMES_SHOWN} more)" if len(names) > _NAMES_SHOWN else ""
            )
            changes.append(f"{len(names)} file{'s' if len(names) > 1 else ''} {what}: {shown}")
    return "; ".join(changes) or "the same files and settings, but another fingerprint"


def _setting_changes(saved: dict, identity: dict) -> list[str]:
    changes = []
    for section in ("pack_version", "latent_encoder", "text_encoder"):
        if saved.get(section) != identity.get(section):
            changes.append(f"{section.replace('_', ' ')}: {saved.get(section)!r} -> {identity.get(section)!r}")
    old, new = saved.get("settings") or {}, identity.get("settings") or {}
    for name in sorted(old.keys() | new.keys()):
        if old.get(name, "(absent)") != new.get(name, "(absent)"):
            changes.append(f"setting {name}: {old.get(name, '(absent)')!r} -> {new.get(name, '(absent)')!r}")
    return changes
