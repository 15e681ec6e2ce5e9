"""The planned caption length, enforced: no batch carries more caption tokens than the plan counted memory for.

``data.max_caption_tokens`` (0: no limit) with ``data.caption_overflow``: "truncate" cuts longer caption features to
the limit and logs how many samples were cut; "refuse" stops the run, before the model loads when the manifest's
caption statistics already show a longer caption, else at the first batch that holds one."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from ..data.batches import Batch
from ..data.stats import DatasetStats

logger = logging.getLogger(__name__)


class CaptionLimit:
    def __init__(self, max_tokens: int, overflow: str) -> None:
        self.max_tokens = max_tokens
        self.overflow = overflow
        self.truncated = 0  # samples whose caption was cut, this process

    def check_dataset(self, stats: DatasetStats) -> None:
        """Refuse up front when the shard set's statistics show captions the plan would not hold."""
        longest = stats.caption_tokens_max
        if not self.max_tokens or longest is None or longest <= self.max_tokens:
            return
        longer = stats.captions_longer_than(self.max_tokens)
        if self.overflow == "refuse":
            raise ValueError(
                f"{longer} of {stats.samples} captions in {stats.path} are longer than data.max_caption_tokens="
                f"{self.max_tokens} (longest {longest} tokens): plan with this dataset linked (plan --shards), or set "
                "data.caption_overflow to 'truncate'"
            )
        logger.info(
            "captions: %d of %d samples are longer than %d tokens (longest %d) and are truncated each time they come",
            longer,
            stats.samples,
            self.max_tokens,
            longest,
        )

    def apply(self, batch: Batch) -> Batch:
        lengths = batch.caption_lengths
        if not self.max_tokens or lengths is None or int(lengths.max()) <= self.max_tokens:
            return batch
        over = [key for key, length in zip(batch.keys, lengths.tolist()) if length > self.max_tokens]
        if self.overflow == "refuse":
            raise ValueError(
                f"sample(s) {over[:3]} have captions of up to {int(lengths.max())} tokens, over data.max_caption_tokens"
                f"={self.max_tokens} that the plan counted memory for: re-plan with the dataset linked, or set "
                "data.caption_overflow to 'truncate'"
            )
        batch.caption_features = batch.caption_features[:, : self.max_tokens]
        batch.caption_mask = batch.caption_mask[:, : self.max_tokens]
        batch.caption_lengths = lengths.clamp(max=self.max_tokens)
        self.truncated += len(over)
        logger.info(
            "captions: truncated %d sample(s) to %d tokens (%d so far)", len(over), self.max_tokens, self.truncated
        )
        return batch

    def wrap(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            yield self.apply(batch)
