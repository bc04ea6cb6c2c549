"""The grain pipeline: shard → shuffle → repeat → crop (workers) → skip bad → batch.

Per-example randomness is seeded by grain from (seed, position in this process's stream),
and unreadable images are dropped in the main process after the workers, so the batches
are the same for any `num_workers`. The iterator's `get_state()` / `set_state()` is the
checkpointable input position; it includes the bad-image count.
"""

import functools
import logging
from typing import Any

import grain
import numpy as np

from bam_jax.data import crops as crops_lib
from bam_jax.data import sources

CROP_KEYS = ('global', 'local')


def shard(dataset: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
    """Every `shard_count`-th example from `shard_index`, cut to an equal length per shard.

    Equal lengths keep the processes in step (same number of batches per epoch); at most
    `shard_count - 1` examples per epoch are left out.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f'shard_index {shard_index} is not in [0, {shard_count}).')
    per_shard = len(dataset) // shard_count
    return dataset[shard_index::shard_count][:per_shard]


class _SkipBadAndBatch(grain.IterDataset):
    """Drops unreadable images (logged, counted) and stacks crop-major batches."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, shard_length: int,
                 max_bad_fraction: float):
        super().__init__(parent)
        self.batch_size = batch_size
        self.shard_length = shard_length
        self.max_bad_fraction = max_bad_fraction

    def __iter__(self):
        return _SkipBadAndBatchIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f'SkipBadAndBatch(batch_size={self.batch_size})'


class _SkipBadAndBatchIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, dataset: _SkipBadAndBatch):
        super().__init__(parent)
        self._dataset = dataset
        self.seen_count = 0
        self.bad_count = 0

    def _next_good(self) -> dict[str, Any]:
        while True:
            example = next(self._parent)
            self.seen_count += 1
            if 'bad_path' not in example:
                return example
            self.bad_count += 1
            logging.warning('Skipped unreadable image %s (%d skipped so far).',
                            example['bad_path'], self.bad_count)
            # The budget is a fraction of one epoch at first, then of all images seen.
            budget = self._dataset.max_bad_fraction * max(self.seen_count,
                                                          self._dataset.shard_length)
            if self.bad_count > budget:
                raise sources.DataError(
                    f'{self.bad_count} of {self.seen_count} images read were unreadable, more '
                    f'than max_bad_fraction={self._dataset.max_bad_fraction}; last: '
                    f'{example["bad_path"]}.')

    def __next__(self) -> dict[str, np.ndarray]:
        examples = [self._next_good() for _ in range(self._dataset.batch_size)]
        batch = {}
        for key in examples[0]:
            axis = 1 if key in CROP_KEYS else 0  # crops: [n_views, b, H, W, 3]
            batch[key] = np.stack([example[key] for example in examples], axis=axis)
        return batch

    def get_state(self) -> dict[str, Any]:
        return dict(parent=self._parent.get_state(), seen_count=self.seen_count,
                    bad_count=self.bad_count)

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state['parent'])
        self.seen_count = state['seen_count']
        self.bad_count = state['bad_count']


def make_pipeline(source, crops_config, *, batch_size: int, seed: int, shard_index: int = 0,
                  shard_count: int = 1, num_epochs: int | None = None, shuffle: bool = True,
                  num_workers: int = 0, max_bad_fraction: float = 0.01,
                  global_batch_size: int | None = None,
                  boxes: np.ndarray | None = None) -> grain.IterDataset:
    """This process's batches: dicts as documented in `bam_jax.data` (per-process `batch_size`).

    Raises `DataError` up front if the data set cannot fill one global batch.
    `boxes` (ContrastiveCrop, `[len(source), 4]`) are read by the workers as they were
    when the iterator was created; recreate the iterator (from its state) after updating.
    """
    global_batch_size = global_batch_size or batch_size * shard_count
    if len(source) < global_batch_size:
        raise sources.DataError(f'The data set has {len(source)} images, fewer than one '
                                f'global batch of {global_batch_size}.')
    dataset = shard(grain.MapDataset.source(source), shard_index, shard_count)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)
    dataset = dataset.random_map(
        functools.partial(crops_lib.crop_record, crops_config=crops_config, boxes=boxes),
        seed=seed)
    dataset = dataset.to_iter_dataset()
    if num_workers:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return _SkipBadAndBatch(dataset, batch_size, shard_length=len(source) // shard_count,
                            max_bad_fraction=max_bad_fraction)


def make_train_pipeline(config, *, process_index: int = 0,
                        process_count: int = 1) -> grain.IterDataset:
    """The pretraining pipeline from a run config (`config.data`, `config.crops`)."""
    if config.batch_size % process_count:
        raise sources.DataError(f'batch_size {config.batch_size} is not divisible by the '
                                f'{process_count} processes.')
    return make_pipeline(
        sources.make_source(config.data), config.crops,
        batch_size=config.batch_size // process_count, seed=config.seed,
        shard_index=process_index, shard_count=process_count,
        num_epochs=None, num_workers=config.data.num_workers,
        max_bad_fraction=config.data.max_bad_fraction,
        global_batch_size=config.batch_size)
