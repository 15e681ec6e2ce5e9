"""Atomic file writes: readers see the old file or the complete new one, never half a file.

The bytes go to a temporary file in the target's folder (same file system, so the rename is atomic), are flushed and
fsynced, and the temporary file is renamed over the target with ``os.replace``. On any error the temporary file is
removed and the target is left as it was. Temporary names are ``.<name>.<pid>.<random>.tmp``: hidden, unique per
writer, and ending in ``.tmp`` so that a folder's leftovers of a killed process can be found by ``.*.tmp``.

This module imports nothing from the rest of ``training`` so that every part of it (model, data, hardware, engine)
may use it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = True) -> None:
    """Create or replace ``path`` with what ``write`` writes to the binary file it is given; makes the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        with open(temp, "xb") as file:
            write(file)
            file.flush()
            if fsync:
                os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    atomic_write(path, lambda file: file.write(data), fsync=fsync)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> None:
    """Writes ``text`` as is: ``\\n`` stays ``\\n`` on every platform."""
    write_bytes_atomic(path, text.encode(encoding), fsync=fsync)


def write_json_atomic(
    path: str | os.PathLike,
    data: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    ensure_ascii: bool = True,
    fsync: bool = True,
) -> None:
    """``data`` as UTF-8 JSON followed by a newline (``json.dumps`` options as given)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    write_text_atomic(path, text, fsync=fsync)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make renames inside the folder ``path`` durable across a power loss (POSIX)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
