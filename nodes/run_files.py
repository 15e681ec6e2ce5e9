"""Reading a run folder for the jobs panel's routes (`nodes.jobs_api`, `nodes.preview_jobs`). Every run folder is
untrusted: names are checked, the folder must be a real folder directly inside the runs root (a link is not
followed), its files must be plain files (not links), sizes are capped, and only numbers and short strings go back to
the browser.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
from pathlib import Path

from ..training.run.events import EVENTS_FILE, load_json
from ..training.run.jobs import check_run_name
from . import paths

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 1 << 20  # config.json, status.json: far more than a real one
EVENTS_TAIL_BYTES = 256 << 10  # the newest events only: a long run's file is tens of MB
MAX_TEXT_CHARS = 300
MAX_EXACT_INT = 2**53


class RequestRefused(ValueError):
    """A route's input is malformed (bad JSON, unknown run, path outside the runs folder): HTTP 400/404."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def internal_error(what: str, error: Exception) -> tuple[int, dict]:
    """(500, a one-line JSON message) for a route's unexpected error, logged with its traceback (never sent)."""
    logger.error("%s failed", what, exc_info=error)
    return 500, {"error": f"{what} failed: {type(error).__name__}: {str(error)[:200]} (see ComfyUI's log)"}


def runs_root() -> Path:
    roots = paths.run_roots()
    if not roots.roots:
        raise RequestRefused(f"no {roots.label} folder is configured")
    return roots.roots[0].resolve()


def run_folder(name: object) -> Path:
    """``<runs>/<name>``: a checked name, a real folder (not a link) directly inside the runs root."""
    try:
        check_run_name(name)
    except ValueError as error:
        raise RequestRefused(str(error)) from None
    root = runs_root()
    path = root / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise RequestRefused(f"no run {name!r} in {root}", 404) from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or path.resolve().parent != root:
        raise RequestRefused(f"run {name!r} is not a folder inside {root} (links are not followed)")
    return path


def read_plain(path: Path, limit: int, *, tail: bool = False) -> bytes | None:
    """A plain file's bytes (its last ``limit`` with ``tail``, else None above ``limit``); None for a link or none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # none there, or a link: nothing to say
            logger.warning("%s could not be opened (%s): not read", path, error.strerror or error)
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        if info.st_size > limit:
            if not tail:
                logger.warning("%s is %d bytes, over %d: not read", path, info.st_size, limit)
                return None
            handle.seek(info.st_size - limit)
        return handle.read(limit)


def read_object(path: Path) -> dict:
    data = read_plain(path, MAX_JSON_BYTES)
    if data is None:
        return {}
    try:
        value = load_json(data.decode("utf-8"))
    except ValueError as error:  # not UTF-8 or JSON, an integer too long to convert, nesting too deep
        logger.warning("%s is not JSON (%s): ignored", path, str(error)[:200])
        return {}
    return value if isinstance(value, dict) else {}


def read_tail_text(path: Path, limit: int) -> str:
    """The lines of a plain file that lie whole within its last ``limit`` bytes ('' for none, a link, no file): the
    line the window cuts is left out, and only that one (a window starting on a line is kept whole)."""
    data = read_plain(path, limit + 1, tail=True) or b""
    if len(data) > limit:  # the file is longer: data[0] is the byte before the window
        start = data.find(b"\n")
        data = data[start + 1 :] if start >= 0 else b""
    return data.decode("utf-8", errors="replace")


def recent_events(run_dir: Path) -> list[dict]:
    events = []
    for line in read_tail_text(run_dir / EVENTS_FILE, EVENTS_TAIL_BYTES).split("\n"):
        try:
            event = load_json(line)
        except ValueError:  # the line cut by the tail or being written; an integer too long, nesting too deep
            continue
        if isinstance(event, dict) and whole(event.get("step")) is not None:
            events.append(event)
    return events


def whole(value) -> int | None:
    """A step count as the browser can hold it exactly (a JSON number below 2**53), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_EXACT_INT:
        return None
    return value


def number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def text(value) -> str:
    return value[:MAX_TEXT_CHARS] if isinstance(value, str) else ""
