"""The `Batch` the loader yields, collation of one bucket's samples, and image decoding (CPU, or nvJPEG on GPU)."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .samples import CAPTION_FEATURES_KEY, LATENT_KEY, TENSORS_EXTENSION

IMAGE_MEMBERS = ("jpg", "png", "webp")


@dataclass(kw_only=True)
class Batch:
    """Samples of one bucket. Tensors absent from the shards are None."""

    keys: list[str]
    captions: list[str]
    #: Bucket size in pixels, (width, height).
    size: tuple[int, int]
    latents: torch.Tensor | None = None  # [B, 16, h, w], dtype as stored
    images: torch.Tensor | None = None  # [B, 3, H, W] uint8, raw-image shards only
    caption_features: torch.Tensor | None = None  # [B, Lmax, D] zero-padded, dtype as stored
    caption_lengths: torch.Tensor | None = None  # [B] int64
    caption_mask: torch.Tensor | None = None  # [B, Lmax] bool, True on real tokens
    #: Which DataLoader worker made the batch and its index in that worker's stream (the loader's resume position).
    worker: int = 0
    index: int = 0
    #: Undecoded JPEG bytes waiting for the main process to decode them on the GPU.
    image_bytes: list[bytes] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def _map_tensors(self, function) -> Batch:
        changes = {
            f.name: function(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **changes)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True)."""
        return self._map_tensors(lambda tensor: tensor.pin_memory())

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))


def collate(samples: list[dict], *, worker: int, index: int, decode_images: str, shared: bool = False) -> Batch:
    """One bucket's WebDataset samples -> Batch. decode_images: 'none', 'cpu', or 'defer' (keep JPEG bytes).

    shared=True (inside DataLoader workers) builds the tensors directly in shared memory, as torch's default_collate
    does, so handing the batch to the main process needs no further copy.
    """
    tensors = [read_safetensors(s[TENSORS_EXTENSION]) for s in samples] if TENSORS_EXTENSION in samples[0] else None
    bucket = _bucket_of(samples[0])
    batch = Batch(
        keys=[s["__key__"] for s in samples],
        captions=[s["txt"].decode("utf-8") for s in samples],
        size=bucket,
        worker=worker,
        index=index,
    )
    if tensors is not None and LATENT_KEY in tensors[0]:
        latents = [t[LATENT_KEY] for t in tensors]
        batch.latents = torch.stack(
            latents, out=_new_tensor((len(latents), *latents[0].shape), latents[0].dtype, shared)
        )
    if tensors is not None and CAPTION_FEATURES_KEY in tensors[0]:
        _pad_captions(batch, [t[CAPTION_FEATURES_KEY] for t in tensors], shared)
    if decode_images != "none":
        image_member = next(m for m in IMAGE_MEMBERS if m in samples[0])
        raw = [s[image_member] for s in samples]
        if decode_images == "defer":
            batch.image_bytes = raw
        else:
            batch.images = torch.stack([decode_image_cpu(data) for data in raw])
    return batch


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def read_safetensors(data: bytes) -> dict[str, torch.Tensor]:
    """Zero-copy, read-only views of a safetensors blob (safetensors.torch.load copies; this was 30x slower).

    The views alias `data`: copy them (collate stacks them into new tensors) before writing to them.
    """
    header_size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_size])
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        start, end = entry["data_offsets"]
        if dtype is None or 8 + header_size + end > len(data):
            raise ValueError(f"unsupported or truncated safetensors entry {name!r}: {entry}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-writable buffer": the views are only read
            flat = torch.frombuffer(
                data, dtype=dtype, offset=8 + header_size + start, count=(end - start) // dtype.itemsize
            )
        tensors[name] = flat.view(entry["shape"])
    return tensors


def _bucket_of(sample: dict) -> tuple[int, int]:
    width, height = json.loads(sample["json"])["bucket"].split("x")
    return int(width), int(height)


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, or a zero-filled one in shared memory (fresh shared memory reads as zeros)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _pad_captions(batch: Batch, features: list[torch.Tensor], shared: bool) -> None:
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)
    longest = int(lengths.max()) if len(features) else 0
    padded = _new_tensor((len(features), longest, features[0].shape[1]), features[0].dtype, shared)
    if not shared:
        padded.zero_()
    for row, feature in enumerate(features):
        padded[row, : feature.shape[0]] = feature
    batch.caption_features = padded
    batch.caption_lengths = lengths
    batch.caption_mask = torch.arange(longest)[None, :] < lengths[:, None]


def decode_image_cpu(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        array = np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@functools.cache
def nvjpeg_available() -> bool:
    """torchvision's GPU JPEG decoder is usable (torchvision importable and a CUDA device present)."""
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return True


def decode_images_nvjpeg(batch: Batch) -> Batch:
    """Decode the batch's JPEG bytes on the current CUDA device with nvJPEG; images land on the GPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch.image_bytes]
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
    return dataclasses.replace(batch, images=torch.stack(decoded), image_bytes=None)
