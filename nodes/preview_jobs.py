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
are written again, a decoder is remembered, or FAILURE_RETRY_S pass), so a poll does not retry it. Everything read from the run folder is untrusted (`nodes.run_files`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlencode

from ..training.engine.preview import (
    MAX_LATENT_SIDE,
    MAX_PREVIEW_STEP,
    MAX_PROMPTS,
    PREVIEW_DIR,
    PREVIEW_EVENTS,
    PreviewError,
    parse_preview_events,
)
from ..training.engine.preview_images import decode_preview, event_images, is_decoded
from . import preview_vae
from .run_files import RequestRefused, internal_error, read_plain, read_tail_text, run_folder

logger = logging.getLogger(__name__)

ROUTE = "/whetstone/jobs/previews"
IMAGE_ROUTE = "/whetstone/jobs/preview_image"
MAX_EVENTS_BYTES = 1 << 20  # the newest preview events only (a line is a few hundred bytes)
CARD_EVENTS_BYTES = 16 << 10  # the jobs list reads this much of every run's events, every poll
MAX_IMAGE_BYTES = 64 << 20
MAX_PENDING = 64
CLOSE_TIMEOUT_S = 10.0
MAX_DECODERS = 2
MAX_FAILURES = 256
FAILURE_RETRY_S = 300.0  # a failed step is asked again after this (a VAE put back, a disk no longer full)
MAX_SIDE = 2048 // 8  # Preview Settings' largest width and height, in latent pixels
MAX_STEPS_LISTED = 200  # js/whetstone.js MAX_PREVIEW_STEPS
MAX_PROMPT_CHARS = 200
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WHOLE = re.compile(r"[0-9]{1,9}")  # ASCII digits only, the whole value (fullmatch)


class DecodingStopped(Exception):
    """`PreviewDecoding.close` was called while the worker decoded a step (its images written so far are whole)."""


class PreviewDecoding:
    """The queue of preview steps to decode, the decoders and the worker thread (``threaded``: started on the first
    request; tests drive `decode_next` themselves)."""

    def __init__(self, *, threaded: bool = True) -> None:
        self._changed = threading.Condition()
        self._pending: OrderedDict[tuple[Path, int], dict] = OrderedDict()
        self._busy: set[tuple[Path, int]] = set()  # being decoded (by the worker, or a node's own thread)
        self._failed: OrderedDict[tuple[Path, int], tuple[float, float, str]] = OrderedDict()  # latents time, when
        self._decoders: OrderedDict[str, object] = OrderedDict()
        self._threaded = threaded
        self._thread: threading.Thread | None = None
        self._closed = False

    def remember(self, source: preview_vae.VaeSource, decode) -> None:
        """Keep a decoder this process made (Preview Settings'), for the runs whose record has its digest; the steps
        that failed are asked again (a missing decoder may be this one)."""
        with self._changed:
            self._keep_decoder(source.digest, decode)
            self._failed.clear()

    def status(self, run_dir: Path, event: dict) -> tuple[str, str]:
        """(decoded | queued | decoding | failed | busy, message) of one step; queues it when it needs decoding."""
        if is_decoded(run_dir, event):
            return "decoded", ""
        key = step_key(run_dir, event)
        with self._changed:
            failed = self._failed.get(key)
            if failed is not None and failed[0] == latents_time(run_dir, event):
                if _now() - failed[1] < FAILURE_RETRY_S:
                    return "failed", failed[2]
                del self._failed[key]  # asked again: what made it fail may be gone
            if key in self._busy:
                return "decoding", ""
            if key not in self._pending:
                if self._closed:
                    return "busy", "preview decoding has stopped (ComfyUI is shutting down)"
                if len(self._pending) >= MAX_PENDING:
                    return "busy", f"{MAX_PENDING} preview steps wait to be decoded; this one is asked again later"
                self._pending[key] = event
                self._start_thread()
                self._changed.notify_all()
            return "queued", ""

    def decode_here(self, run_dir: Path, event: dict, decode, *, max_side: int = MAX_LATENT_SIDE) -> None:
        """Decode one step in the calling thread (Train, Wait for Run: their own decoder) unless it is decoded; waits
        while another thread decodes it, so no step is decoded twice at once. Errors are raised to the caller."""
        check_previews_folder(run_dir)  # the PNGs are never written through a link, whoever decodes
        key = step_key(run_dir, event)
        with self._changed:
            while key in self._busy:
                self._changed.wait()
            if is_decoded(run_dir, event):
                return
            self._busy.add(key)
            self._pending.pop(key, None)
        try:
            decode_preview(run_dir, event, decode, max_side=max_side)
        finally:
            self._done(key)

    def decode_recorded(self, run_dir: Path, event: dict) -> None:
        """Decode one step here with the run's recorded decoder (Training Report); errors are raised."""
        self.decode_here(run_dir, event, self._decoder(recorded_source(run_dir)), max_side=MAX_SIDE)

    def decode_next(self) -> bool:
        """Decode the oldest waiting step (one no other thread decodes); False when none waits."""
        with self._changed:
            if not self._pending:
                return False
            key, event = self._pending.popitem(last=False)
            if key in self._busy or is_decoded(key[0], event):
                return True
            self._busy.add(key)
        run_dir, step = key
        try:
            self._decode(run_dir, event)
        except DecodingStopped:
            logger.info("previews of %s step %d: decoding stopped (ComfyUI is shutting down)", run_dir.name, step)
        except (ValueError, OSError) as error:  # the run's files or its VAE: the message says which and why
            self._fail(run_dir, event, str(error))
        except Exception as error:  # the worker must outlive one bad step: logged with its traceback
            logger.exception("decoding the previews of %s step %d failed", run_dir.name, step)
            self._fail(run_dir, event, f"{type(error).__name__}: {error}")
        finally:
            self._done(key)
        return True

    def _done(self, key: tuple[Path, int]) -> None:
        with self._changed:
            self._busy.discard(key)
            self._changed.notify_all()

    def _decode(self, run_dir: Path, event: dict) -> None:
        check_previews_folder(run_dir)
        decoder = self._decoder(recorded_source(run_dir))

        def decode(latents):  # one latent at a time: `close` waits for one image, not for the whole step
            if self._closed:
                raise DecodingStopped("preview decoding has stopped")
            return decoder(latents)

        decode_preview(run_dir, event, decode, max_side=MAX_SIDE)

    def _decoder(self, source: preview_vae.VaeSource):
        with self._changed:
            decode = self._decoders.get(source.digest)
            if decode is not None:
                self._decoders.move_to_end(source.digest)
                return decode
        decode = preview_vae.load_decoder(source)  # outside the lock: seconds of reading
        with self._changed:
            self._keep_decoder(source.digest, decode)
        return decode

    def _keep_decoder(self, digest: str, decode) -> None:
        self._decoders[digest] = decode
        self._decoders.move_to_end(digest)
        while len(self._decoders) > MAX_DECODERS:
            self._decoders.popitem(last=False)

    def _fail(self, run_dir: Path, event: dict, message: str) -> None:
        logger.warning("previews of %s step %d not decoded: %s", run_dir.name, event["step"], message)
        with self._changed:
            self._failed[step_key(run_dir, event)] = (latents_time(run_dir, event), _now(), message)
            while len(self._failed) > MAX_FAILURES:
                self._failed.popitem(last=False)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Stop the worker (at exit): the waiting steps are dropped, the step being decoded is finished, so no PNG is
        left half-written; nothing is queued after. True when the thread has ended within ``timeout`` seconds."""
        with self._changed:
            self._closed = True
            self._pending.clear()
            self._changed.notify_all()
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("the preview decoding thread did not stop within %.0f s", timeout)
        return not thread.is_alive()

    def _start_thread(self) -> None:
        if self._threaded and not self._closed and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._work, name="whetstone-previews", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
            self.decode_next()


def _now() -> float:
    return time.monotonic()


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


def check_previews_folder(run_dir: Path) -> None:
    """The run's previews folder is a real folder inside it (PNGs are never written through a link)."""
    folder = run_dir / PREVIEW_DIR
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        raise PreviewError(f"run {run_dir.name!r} has no {PREVIEW_DIR} folder") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or folder.resolve().parent != run_dir.resolve():
        raise PreviewError(
            f"{run_dir.name}/{PREVIEW_DIR} is not a folder inside the run folder (links are not followed)"
        )


def recorded_source(run_dir: Path) -> preview_vae.VaeSource:
    data = read_plain(run_dir / preview_vae.SOURCE_FILE, preview_vae.MAX_SOURCE_BYTES)
    return preview_vae.parse_source(data, run_dir.name)


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


def step_key(run_dir: Path, event: dict) -> tuple[Path, int]:
    """One key per preview step, however the caller spelled its run folder."""
    return run_dir.resolve(), event["step"]


def latents_time(run_dir: Path, event: dict) -> float:
    try:
        return (run_dir / PREVIEW_DIR / event["file"]).stat().st_mtime
    except OSError:
        return 0.0


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
