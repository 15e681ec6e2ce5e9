"""What the training loop feeds on: synthetic batches made on the device or the shard loader, endless epochs over
it, and the checks that the data can feed the run at all (encoded shards, one global batch, the planned caption
length)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from torch import nn

from ..data.batches import Batch
from ..data.encoders import REPACK_HINT, require_encoded
from ..data.stats import read_dataset_stats
from .build import load_empty_caption
from .captions import CaptionLimit
from .config import TrainConfig
from .distributed import DistInfo
from .synthetic import SyntheticBatches


def build_loader(config: TrainConfig, dist_info: DistInfo, model: nn.Module):
    """(loader, empty-caption features): synthetic batches made on the device, or the shard loader; with a
    resolution schedule, one of either per resolution (``shapes.ResolutionStreams``)."""
    if config.resolutions.active:
        from .resolution_feed import build_resolution_streams

        return build_resolution_streams(config, dist_info, model)
    run, data = config.run, config.data
    if data.synthetic:
        synthetic = SyntheticBatches(
            model_config=model.config,
            resolution=data.resolution,
            caption_tokens=data.caption_tokens,
            micro_batch=run.micro_batch,
            grad_accum=run.grad_accum,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            seed=run.seed,
            device=dist_info.device,
        )
        return synthetic, synthetic.empty_caption()
    from ..data.loader import ShardLoader
    from ..data.remote import open_shard_set
    from ..data.shards import MANIFEST_NAME, read_json

    remote = open_shard_set(data.shards, cache_dir=data.shard_cache or None)  # None: a local folder
    folder = Path(data.shards) if remote is None else remote.folder
    manifest_path = folder / MANIFEST_NAME
    contents = read_json(manifest_path).get("contents") if manifest_path.is_file() else None
    if isinstance(contents, dict):  # raw-image shards: say so before the empty-caption check, which names no fix
        require_encoded(contents, data.shards)
    empty_caption = load_empty_caption(config, dist_info.device, folder)
    _check_enough_data(config, dist_info.world_size, folder)
    loader = ShardLoader(
        data.shards if remote is None else remote,
        batch_size=run.micro_batch,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=run.seed,
        even_batches=dist_info.world_size > 1,  # every rank does the same number of steps per epoch
    )
    return loader, empty_caption


def caption_limit(config: TrainConfig) -> CaptionLimit:
    """The plan's caption length (``data.max_caption_tokens``), checked against the manifest's statistics first."""
    limit = CaptionLimit(config.data.max_caption_tokens, config.data.caption_overflow)
    if limit.max_tokens and not config.data.synthetic:
        limit.check_dataset(read_dataset_stats(config.data.shards))
    return limit


def endless_epochs(loader) -> Iterator[Batch]:
    """Endless batches: the ShardLoader iterates one epoch per pass and advances the epoch itself.

    A pass that starts at a restored position may have nothing left (a checkpoint taken after an epoch's last
    batch): it only moves the loader on to the next epoch. An empty pass from an epoch's start is a defect, since
    `_check_enough_data` refused too small a set before training.
    """
    while True:
        resumed_within_epoch = loader.batches_consumed > 0
        count = 0
        for batch in loader:
            count += 1
            yield batch
        if count == 0 and not resumed_within_epoch:
            raise RuntimeError(f"the shard loader yielded no batch in epoch {loader.epoch - 1} from its start")


def _check_enough_data(config: TrainConfig, world_size: int, folder: Path) -> None:
    """Refuse, before training, a shard set smaller than one global batch, naming the numbers."""
    from ..data.shards import load_manifest

    run = config.run
    global_batch = run.micro_batch * run.grad_accum * world_size
    folder, manifest = load_manifest(folder)
    samples = manifest.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool):
        raise ValueError(f"{folder} has a manifest whose 'samples' is {samples!r}, not a count; repack it")
    if samples < global_batch:
        raise ValueError(
            f"{config.data.shards} holds {samples} samples, fewer than one global batch of {global_batch} "
            f"(run.micro_batch {run.micro_batch} x run.grad_accum {run.grad_accum} x {world_size} process(es)): "
            "add images or lower run.micro_batch or run.grad_accum"
        )


def limited_batches(loader, captions, config: TrainConfig) -> Iterator[Batch]:
    """The batch stream under the planned caption length. Synthetic captions all have ``data.caption_tokens``
    tokens and live on the device: checking each batch would cost a device sync per micro-step for nothing, so
    they pass through the limit only when that fixed length exceeds it."""
    if isinstance(loader, SyntheticBatches):
        over = captions.max_tokens and config.data.caption_tokens > captions.max_tokens
        return captions.wrap(iter(loader)) if over else iter(loader)
    return captions.wrap(endless_epochs(loader))


def checked(batch: Batch) -> Batch:
    if batch.latents is None or batch.caption_features is None:
        raise ValueError(
            f"batch {batch.keys[:2]}... has no {'latents' if batch.latents is None else 'caption features'}: "
            f"training needs shards packed with the latent and text encoders; {REPACK_HINT}"
        )
    return batch
