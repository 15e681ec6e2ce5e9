"""Which VAE decodes a run's previews, recorded in the run folder so that this ComfyUI (or a restarted one) can decode
a background run's previews with no Wait for Run node holding Preview Settings' decoder.

Preview Settings gets a ComfyUI VAE object, not a file name. When its ``vae`` input comes straight from ComfyUI's
VAELoader, the prompt names the file (``vae_name``); the node records that name, the dtype ComfyUI holds the weights
in, and a SHA-256 of the decoder's weights as the decoder sees them (float32 after that dtype) in
``<run>/preview_vae.json``. Reading it back (untrusted): the fields are validated, the name must be one of ComfyUI's
``vae`` list (resolved by folder_paths, so it cannot leave the folder), the file is read as safetensors only (nothing
unpickled), and the weights must hash to the recorded digest: a VAE file replaced since the run started is refused
rather than decoded into other images. Any other VAE source (a checkpoint's VAE...) records no name: its previews
decode while this ComfyUI still holds the decoder Preview Settings made (`nodes.preview_jobs.remember`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.atomic import write_json_atomic
from ..training.model.flux_vae import FluxEncoderShape, FluxVAE
from ..training.run.events import load_json
from . import comfy_bridge

logger = logging.getLogger(__name__)

SOURCE_FILE = "preview_vae.json"
SOURCE_FORMAT = 1
VAE_FOLDER = "vae"
VAE_LOADER = "VAELoader"
MAX_SOURCE_BYTES = 4096
MAX_NAME_CHARS = 255
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class SourceRefused(ValueError):
    """The recorded VAE cannot decode this run's previews (the message says why and what to do)."""


@dataclass(frozen=True, kw_only=True)
class VaeSource:
    """How to get the decoder back: the file in ComfyUI's vae folder (None: not known), the dtype ComfyUI held its
    weights in, and the digest of the decoder weights."""

    vae_name: str | None
    dtype: str
    digest: str

    def __post_init__(self) -> None:
        if self.vae_name is not None and not (
            isinstance(self.vae_name, str) and 0 < len(self.vae_name) <= MAX_NAME_CHARS and "\0" not in self.vae_name
        ):
            raise ValueError(f"vae_name={self.vae_name!r} is not a VAE file name")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if not (isinstance(self.digest, str) and _DIGEST.match(self.digest)):
            raise ValueError(f"digest={self.digest!r} is not a SHA-256 in hex")


def decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder half of a Flux VAE's weights in float32 on the CPU (what `FluxVAE.decode` reads)."""
    return {name: t.detach().to("cpu", torch.float32) for name, t in state.items() if name.startswith("decoder.")}


def decoder_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, shapes and float32 bytes of the decoder's weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def held_dtype(state: dict[str, torch.Tensor]) -> str | None:
    """The one dtype ComfyUI holds the decoder's weights in, or None (mixed, or one we cannot reproduce)."""
    names = {str(t.dtype).removeprefix("torch.") for name, t in state.items() if name.startswith("decoder.")}
    return next(iter(names)) if len(names) == 1 and next(iter(names)) in DTYPES else None


def loaded_vae_name(prompt, unique_id) -> str | None:
    """The ``vae_name`` of the VAELoader linked to this node's ``vae`` input in the queued prompt, or None."""
    node = prompt.get(str(unique_id)) if isinstance(prompt, dict) else None
    link = node.get("inputs", {}).get("vae") if isinstance(node, dict) else None
    if not (isinstance(link, list) and len(link) == 2):
        return None
    source = prompt.get(str(link[0]))
    if not isinstance(source, dict) or source.get("class_type") != VAE_LOADER:
        return None
    name = source.get("inputs", {}).get("vae_name")
    return name if isinstance(name, str) else None


def wired_source(held: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor], prompt, unique_id) -> VaeSource:
    """The VaeSource of the VAE wired to Preview Settings (its name when a VAELoader gave it), logged with why.
    ``held``: the weights as ComfyUI holds them; ``decoder``: their `decoder_state`."""
    dtype = held_dtype(held)
    name = loaded_vae_name(prompt, unique_id) if dtype is not None else None
    if name is not None:
        logger.info("previews: the VAE is %s (VAELoader, weights in %s), recorded for background decoding", name, dtype)
    else:
        logger.info(
            "previews: the VAE is not a VAELoader file (or its weights are of mixed dtypes): a background run's "
            "previews decode while this ComfyUI holds Preview Settings' decoder, not after a restart"
        )
    return VaeSource(vae_name=name, dtype=dtype or "float32", digest=decoder_digest(decoder))


def write_source(run_dir: Path, source: VaeSource) -> None:
    record = {"format": SOURCE_FORMAT, "vae_name": source.vae_name, "dtype": source.dtype, "digest": source.digest}
    write_json_atomic(run_dir / SOURCE_FILE, record)


def parse_source(data: bytes | None, where: str) -> VaeSource:
    """The VaeSource of a ``preview_vae.json``'s bytes (None: the file is missing, a link or too large)."""
    if data is None:
        raise SourceRefused(
            f"{where} has no readable {SOURCE_FILE} (a run started before background previews existed, or by the "
            "CLI): queue Wait for Run with the run's Preview Settings to decode its previews"
        )
    try:
        record = load_json(data.decode("utf-8"))
    except ValueError:  # not UTF-8 or JSON (the file is at most MAX_SOURCE_BYTES: no integer too long to convert)
        raise SourceRefused(f"{where}/{SOURCE_FILE} is not JSON") from None
    if not isinstance(record, dict) or type(record.get("format")) is not int or record["format"] != SOURCE_FORMAT:
        raise SourceRefused(f"{where}/{SOURCE_FILE} is not a format-{SOURCE_FORMAT} VAE record")
    if set(record) != {"format", "vae_name", "dtype", "digest"}:
        raise SourceRefused(f"{where}/{SOURCE_FILE} must hold exactly format, vae_name, dtype and digest")
    try:
        return VaeSource(vae_name=record["vae_name"], dtype=record["dtype"], digest=record["digest"])
    except ValueError as error:
        raise SourceRefused(f"{where}/{SOURCE_FILE}: {error}") from None


def load_decoder(source: VaeSource):
    """A CPU float32 decoder of the recorded VAE file, its weights checked against the recorded digest."""
    if source.vae_name is None:
        raise SourceRefused(
            "the VAE wired to Preview Settings did not come from a VAELoader and this ComfyUI no longer holds it: "
            "queue Wait for Run with the run's Preview Settings to decode the previews"
        )
    if source.vae_name not in comfy_bridge.list_files(VAE_FOLDER):
        raise SourceRefused(f"the run's VAE {source.vae_name!r} is not in ComfyUI's vae folder any more")
    path = comfy_bridge.full_path(VAE_FOLDER, source.vae_name)
    vae = FluxVAE.load(path, device=torch.device("cpu"), dtype=DTYPES[source.dtype], decoder=True)
    state = decoder_state(vae.state)
    if decoder_digest(state) != source.digest:
        raise SourceRefused(
            f"the VAE file {source.vae_name!r} changed since the run started (its decoder weights differ): its "
            "previews are not decoded with another VAE; queue Wait for Run with the run's Preview Settings"
        )
    logger.info("previews: decoder of %s loaded on the CPU (%s weights, digest matches)", source.vae_name, source.dtype)
    return decoder_from_state(vae.shape, state)


def decoder_from_state(shape: FluxEncoderShape, state: dict[str, torch.Tensor]):
    """`FluxVAE.decode` over decoder-only float32 weights."""
    return FluxVAE(shape, state).decode
