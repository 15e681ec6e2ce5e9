"""A run's previews decoded in this ComfyUI for the jobs panel and the background Train node, with no Wait for Run.

Routes (registered by `nodes.register_with_comfyui`):

* ``GET /whetstone/jobs/previews?run=<name>``: the run's preview steps (newest last), each decoded or not, with the
  URLs of its images; asking queues the steps not decoded yet;
* ``GET /whetstone/jobs/preview_image?run=<name>&step=<n>&prompt=<i>``: one decoded PNG.

The jobs list (`nodes.jobs_api.describe_job`) carries each run's latest preview step (`card`), which queues it.

Decoding is lazy and bounded: nothing is decoded until someone looks; one daemon thread decodes one preview step at a
time, one latent at a time, on the CPU (the training process keeps the GPU; ComfyUI's prompt queue is never touched);
at most MAX_PENDING steps wait (later asks are turned away and asked again by the next poll); at most MAX_DECODERS
decoders are held, least recently used first out. The decoder is the one the foreground Train node uses (the wired
VAE's weights in `FluxVAE.decode`): the one Preview Settings made while this ComfyUI holds it (`remember`), else the
run's recorded VAE file, checked against its digest (`nodes.preview_vae`). The PNGs go into the run folder as the
nodes' do (Training Report draws them), so a step is decoded once; a failure is remembered per step (until its latents
are written again, a decoder is remembered, or FAILURE_RETRY_S pass), so a poll does not retry it. The queue is
`nodes.preview_queue`; everything read from the run folder is untrusted (`nodes.run_files`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlencode

from ..training.engine.preview import (
    MAX_PREVIEW_STEP,
    MAX_PROMPTS,
    PREVIEW_EVENTS,
    parse_preview_events,
)
from ..training.engine.preview_images import event_images, is_decoded
from . import preview_vae
from .preview_queue import (  # noqa: F401 (re-exported: the queue's pieces, as the nodes and tests name them)
    FAILURE_RETRY_S,
    MAX_DECODERS,
    MAX_FAILURES,
    MAX_PENDING,
    MAX_SIDE,
    DecodingStopped,
    PreviewDecoding,
    check_previews_folder,
    latents_time,
    recorded_source,
    step_key,
)
from .run_files import RequestRefused, internal_error, read_plain, read_tail_text, run_folder

logger = logging.getLogger(__name__)

ROUTE = "/whetstone/jobs/previews"
IMAGE_ROUTE = "/whetstone/jobs/preview_image"
MAX_EVENTS_BYTES = 1 << 20  # the newest preview events only (a line is a few hundred bytes)
CARD_EVENTS_BYTES = 16 << 10  # the jobs list reads this much of every run's events, every poll
MAX_IMAGE_BYTES = 64 << 20
MAX_STEPS_LISTED = 200  # js/whetstone.js MAX_PREVIEW_STEPS
MAX_PROMPT_CHARS = 200
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WHOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits only, the whole value (fullmatch)


_decoding: PreviewDecoding | None = None
_decoding_mutex = threading.Lock()


def decoding() -> PreviewDecoding:
    """This process's preview decoding (made on first use)."""
    global _decoding
    with _decoding_mutex:
        if _decoding is None:
            _decoding = PreviewDecoding()
            atexit.register(_decoding.close)  # before the interpreter kills the daemon thread mid-write
        return _decoding


def remember(source: preview_vae.VaeSource, decode) -> None:
    decoding().remember(source, decode)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the run folder (untrusted)


def decode_missing(run_dir: Path, newest: int) -> list[str]:
    """Decode here the newest ``newest`` preview steps not decoded yet (Training Report of a background run that no
    one watched); returns why a step could not be (the report draws the others)."""
    problems = []
    for event in read_events(run_dir)[-newest:]:
        if is_decoded(run_dir, event):
            continue
        try:
            decoding().decode_recorded(run_dir, event)
        except (ValueError, OSError) as error:  # the run's files or its VAE: the message says which and why
            logger.warning("previews of %s step %d not decoded: %s", run_dir.name, event["step"], error)
            problems.append(f"previews of step {event['step']} not decoded: {error}")
        except Exception as error:  # the decoder itself (out of memory...): the report is still drawn, logged in full
            logger.exception("decoding the previews of %s step %d failed", run_dir.name, event["step"])
            problems.append(f"previews of step {event['step']} not decoded: {type(error).__name__}: {error}")
    return problems


def read_events(run_dir: Path, limit: int = MAX_EVENTS_BYTES) -> list[dict]:
    """The run's newest preview events, from the last ``limit`` bytes (validated: a step, a step_NNNNNNN file,
    1..MAX_PROMPTS prompt texts)."""
    text = read_tail_text(run_dir / PREVIEW_EVENTS, limit)
    return [event for event in parse_preview_events(text) if prompts_of(event) is not None]


def prompts_of(event: dict) -> list[str] | None:
    prompts = event.get("prompts")
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS:
        return None
    if not all(isinstance(p, str) for p in prompts):
        return None
    return [p[:MAX_PROMPT_CHARS] for p in prompts]


def image_urls(run_dir: Path, event: dict) -> list[str] | None:
    """The decoded images' URLs (``v``: the file's time, so a step decoded again is fetched again); None when one
    is gone (removed since it was found decoded)."""
    urls = []
    for index, path in enumerate(event_images(run_dir, event)):
        try:
            version = os.stat(path, follow_symlinks=False).st_mtime_ns
        except OSError:
            return None
        query = {"run": run_dir.name, "step": event["step"], "prompt": index, "v": version}
        urls.append(f"{IMAGE_ROUTE}?{urlencode(query)}")
    return urls


def step_entry(run_dir: Path, event: dict) -> dict:
    state, message = decoding().status(run_dir, event)
    urls = image_urls(run_dir, event) if state == "decoded" else []
    if urls is None:  # an image removed since it was found decoded: asked again (queued)
        state, message = decoding().status(run_dir, event)
        urls = image_urls(run_dir, event) if state == "decoded" else []
    if urls is None:
        state, message, urls = "busy", "its images changed while listed; asked again by the next poll", []
    entry = {"step": event["step"], "prompts": prompts_of(event), "state": state, "message": message[:300]}
    entry["images"] = urls
    return entry


def card(run_dir: Path) -> dict | None:
    """The latest preview step of a run for its jobs-panel card (queued for decoding if it is not), or None."""
    events = read_events(run_dir, CARD_EVENTS_BYTES)
    return step_entry(run_dir, events[-1]) if events else None


def steps(run_dir: Path) -> dict:
    """Every listed preview step of a run; the newest are queued first."""
    events = read_events(run_dir)[-MAX_STEPS_LISTED:]
    entries = [step_entry(run_dir, event) for event in reversed(events)]
    return {"run": run_dir.name, "steps": entries[::-1]}


# ---------------------------------------------------------------------------------------------------------------------
# Routes


def whole(query: dict, name: str, below: int) -> int:
    value = query.get(name, "")
    if not _WHOLE.fullmatch(value) or int(value) >= below:
        raise RequestRefused(f"{name} must be a whole number below {below}, got {value[:20]!r}")
    return int(value)


def image(query: dict) -> bytes:
    run_dir = run_folder(query.get("run", ""))
    step, prompt = whole(query, "step", MAX_PREVIEW_STEP), whole(query, "prompt", MAX_PROMPTS)
    check_previews_folder(run_dir)
    path = event_images(run_dir, {"step": step, "prompts": [""] * (prompt + 1)})[prompt]
    data = read_plain(path, MAX_IMAGE_BYTES)
    if data is None or not data.startswith(PNG_SIGNATURE):
        raise RequestRefused(f"run {run_dir.name!r} has no decoded preview {path.name}", 404)
    return data


def respond(action: str, query: dict[str, str], body: bytes | None) -> tuple[int, object]:
    """(HTTP status, JSON body or PNG bytes) for ``GET previews|preview_image``."""
    try:
        if action == "previews":
            return 200, steps(run_folder(query.get("run", "")))
        if action == "preview_image":
            return 200, image(query)
    except RequestRefused as error:
        return error.status, {"error": str(error)}
    except (ValueError, OSError) as error:  # a previews folder that is a link, or missing
        return 404, {"error": str(error)}
    except Exception as error:  # a bug: the browser gets one line, the log the traceback
        return internal_error(f"previews {action}", error)
    return 404, {"error": f"unknown previews action {action!r}"}
