"""A run's loss history and state, for the Train node's chart after a browser reload or reconnect.

Served at ``GET /whetstone/run_history?run=<run_name>``. The run folder is untrusted: the name is checked, the
folder must sit inside the runs root, its files must not be links leaving it, and only numbers and short strings go
back to the browser.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..training.run.events import EVENTS_FILE, STATUS_FILE, read_events, read_status
from . import paths
from .run_files import number

logger = logging.getLogger(__name__)

ROUTE = "/whetstone/run_history"
MAX_POINTS = 5000  # js/whetstone.js MAX_POINTS: the chart keeps the newest this many
MAX_TEXT_CHARS = 500


def _inside(run_dir: Path, name: str) -> bool:
    path = run_dir / name
    return path.is_file() and path.resolve().parent == run_dir


def _text(value) -> str:
    return value[:MAX_TEXT_CHARS] if isinstance(value, str) else ""


def run_history(run_name: str) -> dict:
    """``{"run", "points": [[step, loss]...], "state", "message", "step", "updated"}``; PathRefused for a bad name.
    ``updated``: when the status was written (seconds since the epoch): a background job's chart tells a status an
    earlier run of the folder left from its own."""
    name = paths.check_name(run_name, "run")
    run_dir = paths.new_child(paths.run_roots(), name, "run")
    history = {"run": name, "points": [], "state": "", "message": "", "step": None, "updated": None}
    if not run_dir.is_dir():
        return history
    if _inside(run_dir, EVENTS_FILE):
        events = read_events(run_dir)[-MAX_POINTS:]
        history["points"] = [[event["step"], number(event.get("loss"))] for event in events]
        history["step"] = events[-1]["step"] if events else None
    if _inside(run_dir, STATUS_FILE):
        try:
            status = read_status(run_dir) or {}
        except ValueError as error:
            logger.warning("%s/%s is not JSON (%s): history without a state", run_dir, STATUS_FILE, error)
            status = {}
        if isinstance(status, dict):
            history["state"], history["message"] = _text(status.get("state")), _text(status.get("message"))
            history["updated"] = number(status.get("time"))
    return history


def respond(query: dict[str, str]) -> tuple[int, dict]:
    """(HTTP status, JSON body) for the route: 400 naming the problem for a bad run name."""
    try:
        return 200, run_history(query.get("run", ""))
    except paths.PathRefused as error:
        return 400, {"error": str(error)}
