"""Shard sets at a URL: ``http(s)://``, ``s3://``, ``gs://`` and the rest of fsspec's protocols.

`RemoteShardSet.open(url)` reads ``manifest.json`` beside the shards (untrusted: a size cap, JSON only, every field
the loader uses checked, shard names plain file names) and keeps a *local view* of the set in a cache folder: the
manifest, the empty-caption features, and each shard once fetched. A shard is streamed whole into a temporary file
with retries and exponential backoff, checked against the manifest's size and sha256, and only then renamed into
the view, so a file in the view is a verified shard and a reader never sees an unverified byte. The view's folder
name holds the manifest's digest: a set republished at the same URL gets a fresh view.

Without a cache folder the view is a temporary folder of the loader's process, and the whole-shard layout removes
each shard once read (disk use: about one shard per DataLoader worker).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import TEMP_SUFFIX, write_bytes_atomic
from .shards import EMPTY_CAPTION_NAME, MANIFEST_NAME, PACK_VERSION

logger = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.tar$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: A manifest larger than this is refused before parsing (10 million samples in 10 000 shards is a few MB).
MAX_MANIFEST_BYTES = 256 << 20
MAX_EMPTY_CAPTION_BYTES = 64 << 20
_CHUNK = 1 << 20


class ShardIntegrityError(ValueError):
    """A downloaded shard is not the one the manifest describes (size or sha256); retrying would not help."""


def is_url(source) -> bool:
    return isinstance(source, str) and bool(_URL.match(source))


def open_shard_set(
    source,
    *,
    cache_dir: str | Path | None = None,
    retry: RetryPolicy | None = None,
    storage_options: dict | None = None,
) -> RemoteShardSet | None:
    """The remote set behind `source` (a URL, or an open RemoteShardSet as it is); None for a local folder.

    A set opened without a cache folder removes its temporary view when the returned object is collected.
    """
    if isinstance(source, RemoteShardSet):
        return source
    if not is_url(source):
        return None
    remote = RemoteShardSet.open(source, cache_dir=cache_dir, retry=retry, storage_options=storage_options)
    if remote.transient:
        weakref.finalize(remote, _remove_folder, remote.folder.parent)
    return remote


def read_remote_manifest(url: str, *, storage_options: dict | None = None) -> dict:
    """The validated manifest of the set at `url` (a folder URL or its manifest.json), nothing else fetched."""
    url = url.rstrip("/")
    url = url if url.endswith("/" + MANIFEST_NAME) else f"{url}/{MANIFEST_NAME}"
    return parse_manifest(_fetch_small(url, MAX_MANIFEST_BYTES, RetryPolicy(), dict(storage_options or {})), url)


def _remove_folder(folder: Path) -> None:
    def report(function, path, error_info) -> None:
        logger.warning("could not remove %s from the temporary shard folder: %s", path, error_info[1])

    shutil.rmtree(folder, onerror=report)


@dataclass(kw_only=True, frozen=True)
class RetryPolicy:
    """Attempts per download and the exponential backoff between them (delay doubles, capped, with jitter)."""

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts={self.attempts!r} must be an integer >= 1")
        if not 0 <= self.first_delay_s <= self.max_delay_s:
            raise ValueError(
                f"RetryPolicy.first_delay_s={self.first_delay_s!r} must be >= 0 and <= max_delay_s={self.max_delay_s!r}"
            )

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.max_delay_s, self.first_delay_s * 2 ** (failures - 1))
        return base * (0.5 + rng.random() / 2)


@dataclass(kw_only=True)
class RemoteShardSet:
    """A validated remote manifest and the local view its shards are fetched into (plain data: workers get a copy)."""

    url: str  # the set's folder URL, without a trailing slash
    folder: Path  # the local view
    manifest: dict
    transient: bool  # the view is a temporary folder: shards may be removed once read
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    storage_options: dict = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        source: str,
        *,
        cache_dir: str | Path | None = None,
        retry: RetryPolicy | None = None,
        storage_options: dict | None = None,
    ) -> RemoteShardSet:
        url = source.rstrip("/")
        url = url[: -len(MANIFEST_NAME) - 1] if url.endswith("/" + MANIFEST_NAME) else url
        retry, storage_options = retry or RetryPolicy(), dict(storage_options or {})
        data = _fetch_small(f"{url}/{MANIFEST_NAME}", MAX_MANIFEST_BYTES, retry, storage_options)
        manifest = parse_manifest(data, f"{url}/{MANIFEST_NAME}")
        transient = cache_dir is None
        if transient:
            import tempfile

            root = Path(tempfile.mkdtemp(prefix="whetstone-shards-"))
            logger.info("no shard cache folder given: %s streams through the temporary folder %s", url, root)
        else:
            root = Path(cache_dir)
        view = root / f"{_digest(url.encode())[:16]}-{_digest(data)[:16]}"
        view.mkdir(parents=True, exist_ok=True)
        if not (view / MANIFEST_NAME).is_file():
            write_bytes_atomic(view / MANIFEST_NAME, data)
        remote = cls(
            url=url, folder=view, manifest=manifest, transient=transient, retry=retry, storage_options=storage_options
        )
        remote._fetch_empty_caption()
        logger.info("shard set %s: %d shards, local view %s", url, len(manifest["shards"]), view)
        return remote

    def _fetch_empty_caption(self) -> None:
        target = self.folder / EMPTY_CAPTION_NAME
        if target.is_file() or self.manifest["contents"].get("text_encoder") is None:
            return
        url = f"{self.url}/{EMPTY_CAPTION_NAME}"
        try:
            data = _fetch_small(url, MAX_EMPTY_CAPTION_BYTES, self.retry, self.storage_options)
        except FileNotFoundError:
            logger.info("%s has no %s (caption dropout will be refused)", self.url, EMPTY_CAPTION_NAME)
            return
        write_bytes_atomic(target, data)

    def local_path(self, name: str) -> Path:
        """The verified local copy of shard `name`, downloaded first if the view lacks it."""
        info = self._shard(name)
        path = self.folder / name
        if path.is_file() and path.stat().st_size == info["bytes"]:
            return path
        self._download(name, info, path)
        return path

    def release(self, name: str) -> None:
        """Done reading shard `name`: a temporary view frees its space; a cache keeps it."""
        if self.transient:
            (self.folder / name).unlink(missing_ok=True)

    def _shard(self, name: str) -> dict:
        for shard in self.manifest["shards"]:
            if shard["name"] == name:
                return shard
        raise ValueError(f"{self.url}: shard {name!r} is not in its manifest")

    def _download(self, name: str, info: dict, path: Path) -> None:
        url = f"{self.url}/{name}"
        rng = random.Random()
        for attempt in range(1, self.retry.attempts + 1):
            temp = path.with_name(f".{name}.{_token()}{TEMP_SUFFIX}")
            try:
                size, digest = _stream_to(url, temp, info["bytes"], self.storage_options)
                if size != info["bytes"] or digest != info["sha256"]:
                    raise ShardIntegrityError(
                        f"shard {name} from {url} does not match its manifest: {size} bytes with sha256 {digest}, "
                        f"expected {info['bytes']} bytes with sha256 {info['sha256']}; the set at {self.url} is "
                        "damaged or was changed while in use: re-upload it (or repack) and restart"
                    )
                temp.replace(path)
                logger.info("fetched %s (%d bytes) on attempt %d", url, size, attempt)
                return
            except (ShardIntegrityError, FileNotFoundError, PermissionError):
                raise
            except Exception as error:  # network errors of every fsspec backend: retried, then re-raised
                if attempt == self.retry.attempts:
                    raise OSError(
                        f"could not fetch shard {name} from {url} after {attempt} attempts: {error}; check the "
                        "connection and the URL, then resume the run"
                    ) from error
                delay = self.retry.delay(attempt, rng)
                logger.warning("fetching %s failed (%s: %s); retry %d in %.1f s", url, type(error).__name__,
                               error, attempt, delay)  # fmt: skip
                time.sleep(delay)
            finally:
                temp.unlink(missing_ok=True)

    def fetch_all(self, names: list[str]) -> None:
        for name in names:
            self.local_path(name)


class _ShortRead(OSError):
    """The server ended a shard early without an error (a dropped connection): retried."""


def _open(url: str, storage_options: dict):
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    options = {"block_size": 0} if protocol in ("http", "https") else {}  # 0: one streamed GET, no range requests
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as error:  # the protocol's optional package (s3fs, gcsfs, ...) is not installed
        raise ValueError(f"cannot read {url}: {error}") from error
    return fs.open(path, "rb", **options)


def _stream_to(url: str, temp: Path, expected: int, storage_options: dict) -> tuple[int, str]:
    """Copy `url` into `temp` (at most expected + 1 bytes), returning (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    with _open(url, storage_options) as source, open(temp, "xb") as target:
        while size <= expected and (chunk := source.read(min(_CHUNK, expected + 1 - size))):
            digest.update(chunk)
            target.write(chunk)
            size += len(chunk)
    if size < expected:
        raise _ShortRead(f"the server sent {size} of {expected} bytes")
    return size, digest.hexdigest()


def _fetch_small(url: str, limit: int, retry: RetryPolicy, storage_options: dict) -> bytes:
    rng = random.Random()
    for attempt in range(1, retry.attempts + 1):
        try:
            with _open(url, storage_options) as source:
                data = source.read(limit + 1)
            if len(data) > limit:
                raise ValueError(f"{url} is larger than {limit} bytes; it is not a manifest written by `pack`")
            return data
        except (ValueError, FileNotFoundError, PermissionError):
            raise
        except Exception as error:  # network errors of every fsspec backend: retried, then re-raised
            if attempt == retry.attempts:
                raise OSError(f"could not read {url} after {attempt} attempts: {error}; check the URL") from error
            delay = retry.delay(attempt, rng)
            logger.warning("reading %s failed (%s); retry %d in %.1f s", url, error, attempt, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def parse_manifest(data: bytes, where: str) -> dict:
    """A manifest from untrusted bytes: JSON only, and every field the loader relies on checked."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{where} is not a JSON manifest ({error}); pass the URL of a folder written by `pack`"
        ) from error
    if not isinstance(manifest, dict) or manifest.get("pack_version") != PACK_VERSION:
        version = manifest.get("pack_version") if isinstance(manifest, dict) else None
        raise ValueError(f"{where} has pack_version={version!r}; this loader reads {PACK_VERSION}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{where}: 'shards' must be a non-empty list; repack the set")
    seen: set[str] = set()
    for index, shard in enumerate(shards):
        _check_shard(shard, f"{where}: shards[{index}]")
        if shard["name"] in seen:
            raise ValueError(f"{where}: shard {shard['name']!r} is listed twice; repack the set")
        seen.add(shard["name"])
    if not isinstance(manifest.get("contents"), dict):
        raise ValueError(f"{where}: 'contents' must be an object; repack the set")
    return manifest


def _check_shard(shard, where: str) -> None:
    if not isinstance(shard, dict):
        raise ValueError(f"{where} must be an object")
    name = shard.get("name")
    if not isinstance(name, str) or not _SHARD_NAME.match(name) or ".." in name:
        raise ValueError(f"{where}: name {name!r} is not a plain shard file name like data-000000.tar")
    for key in ("bytes", "samples"):
        value = shard.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where} ({name}): {key}={value!r} must be a non-negative integer")
    if not isinstance(shard.get("sha256"), str) or not _SHA256.match(shard["sha256"]):
        raise ValueError(f"{where} ({name}): sha256={shard.get('sha256')!r} is not 64 lowercase hex digits")
    buckets = shard.get("buckets")
    if not isinstance(buckets, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in buckets.items()
    ):
        raise ValueError(f"{where} ({name}): buckets must map bucket names to sample counts")
    if sum(buckets.values()) != shard["samples"]:
        raise ValueError(f"{where} ({name}): bucket counts add up to {sum(buckets.values())}, not {shard['samples']}")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _token() -> str:
    import secrets

    return secrets.token_hex(4)
