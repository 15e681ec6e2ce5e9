"""The queue of a ComfyUI process's preview decoding (`nodes.preview_jobs` holds the one of this process and serves
the routes): the steps waiting, the ones being decoded by any thread, the failures remembered, the decoders held, and
the worker thread. See `nodes.preview_jobs` for how it is bounded.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path

from ..training.engine.preview import MAX_LATENT_SIDE, PREVIEW_DIR, PreviewError
from ..training.engine.preview_images import decode_preview, is_decoded
from . import preview_vae
from .run_files import read_plain

logger = logging.getLogger(__name__)

MAX_PENDING = 64
CLOSE_TIMEOUT_S = 10.0
MAX_DECODERS = 2
MAX_FAILURES = 256
FAILURE_RETRY_S = 300.0  # a failed step is asked again after this (a VAE put back, a disk no longer full)
WAIT_FOR_OTHER_S = 5.0  # how long a node waits for another thread's decoding of a step, per poll
MAX_SIDE = 2048 // 8  # Preview Settings' largest width and height, in latent pixels


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

    def decode_here(self, run_dir: Path, event: dict, decode, *, max_side: int = MAX_LATENT_SIDE) -> bool:
        """Decode one step in the calling thread (Train, Wait for Run: their own decoder) unless it is decoded; waits
        up to WAIT_FOR_OTHER_S while another thread decodes it, so no step is decoded twice at once. True: the step
        is decoded; False: the other thread still decodes it (ask again later: the caller's loop stays responsive,
        to ComfyUI's Cancel too). Errors are raised to the caller."""
        check_previews_folder(run_dir)  # the PNGs are never written through a link, whoever decodes
        key = step_key(run_dir, event)
        deadline = time.monotonic() + WAIT_FOR_OTHER_S
        with self._changed:
            while key in self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            if is_decoded(run_dir, event):
                return True
            self._busy.add(key)
            self._pending.pop(key, None)
        try:
            decode_preview(run_dir, event, decode, max_side=max_side)
        finally:
            self._done(key)
        return True

    def decode_recorded(self, run_dir: Path, event: dict) -> None:
        """Decode one step here with the run's recorded decoder (Training Report); errors are raised."""
        if not self.decode_here(run_dir, event, self._decoder(recorded_source(run_dir)), max_side=MAX_SIDE):
            raise PreviewError("it is being decoded for the jobs panel; run the report again to see it")

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


def step_key(run_dir: Path, event: dict) -> tuple[Path, int]:
    """One key per preview step, however the caller spelled its run folder."""
    return run_dir.resolve(), event["step"]


def latents_time(run_dir: Path, event: dict) -> float:
    try:
        return (run_dir / PREVIEW_DIR / event["file"]).stat().st_mtime
    except OSError:
        return 0.0
