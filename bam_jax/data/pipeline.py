"""The grain pipeline: shuffle → repeat → crop → this process's slice (workers) → skip bad → batch.

Every process defines the same global stream; per-example randomness is seeded by grain
from (seed, position in that stream), and each process crops only its own slice of each
global batch. Unreadable images are dropped in the main process after the workers. So
the batches are the same for any `num_workers`, and the global batches the same for any
number of processes. The iterator's `get_state()` / `set_state()` is the
checkpointable input position; it includes the bad-image count.
"""

import functools
import logging
from typing import Any

import grain
import numpy as np

from bam_jax import lifetime
from bam_jax.data import crops as crops_lib
from bam_jax.data import sources

CROP_KEYS = ('global', 'local')


class _ProcessSlice(grain.MapDataset):
    """This process's part of every global batch of the (shuffled, repeated) stream.

    Global batch `i` is positions `[i·B, (i+1)·B)` of one stream that every process
    defines identically; process `p` reads positions `i·B + p·b … i·B + (p+1)·b − 1`.
    Together the processes read each global batch exactly once, and a global batch, its
    crops and its seeds do not depend on how many processes there are.
    """

    def __init__(self, parent: grain.MapDataset, per_process: int, process_index: int,
                 process_count: int):
        super().__init__(parent)
        if not 0 <= process_index < process_count:
            raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
        self.per_process = per_process
        self.process_index = process_index
        self.process_count = process_count

    def __len__(self) -> int:
        global_batches, rest = divmod(len(self._parent), self.per_process * self.process_count)
        rest = min(max(rest - self.process_index * self.per_process, 0), self.per_process)
        return global_batches * self.per_process + rest

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, offset = divmod(index, self.per_process)
        return self._parent[(batch * self.process_count + self.process_index)
                            * self.per_process + offset]

    def __str__(self) -> str:
        return f'ProcessSlice({self.process_index}/{self.process_count})'


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
                    f'than config.data.max_bad_fraction={self._dataset.max_bad_fraction} '
                    f'allows; last: {example["bad_path"]}. Remove or replace the file(s), or '
                    'raise config.data.max_bad_fraction.')

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


def read_options(source) -> grain.ReadOptions:
    """How grain reads ahead of the consumer: in threads, except from memory.

    Records held in memory (the embedded MNIST) are read in the consuming thread: there is
    no I/O to overlap, and their crops are small numpy and PIL calls that hold the GIL. On
    the MNIST pipeline grain's 16 threads took 3× the CPU of none (14-18 s against 4.5-5.3
    s for 62 batches) and were slower. Files and TFDS records keep grain's default threads:
    decoding releases the GIL, and remote reads need many in flight.
    """
    if isinstance(source, sources.ArraySource):
        return grain.ReadOptions(num_threads=0)
    return grain.ReadOptions()


def worker_processes(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """`dataset` read ahead by `num_workers` processes that end with this one."""
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                               worker_init_fn=lifetime.grain_worker_init)


def make_pipeline(source, crops_config, *, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None, shuffle: bool = True,
                  num_workers: int = 0, max_bad_fraction: float = 0.01,
                  boxes: np.ndarray | None = None) -> grain.IterDataset:
    """This process's batches: dicts as documented in `bam_jax.data` (per-process `batch_size`).

    Raises `DataError` up front if the data set cannot fill one global batch.
    `boxes` (ContrastiveCrop, `[len(source), 4]`) are read by the workers as they were
    when the iterator was created; recreate the iterator (from its state) after updating.
    """
    global_batch_size = batch_size * process_count
    if len(source) < global_batch_size:
        raise sources.DataError(f'The data set has {len(source)} images, fewer than one '
                                f'global batch of {global_batch_size}.')
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs)
    dataset = dataset.random_map(
        functools.partial(crops_lib.crop_record, crops_config=crops_config, boxes=boxes),
        seed=seed)
    dataset = _ProcessSlice(dataset, batch_size, process_index, process_count)
    dataset = dataset.to_iter_dataset(read_options(source))
    if num_workers:
        dataset = worker_processes(dataset, num_workers)
    return _SkipBadAndBatch(dataset, batch_size, shard_length=len(source) // process_count,
                            max_bad_fraction=max_bad_fraction)


def make_train_pipeline(config, source=None, *, process_index: int = 0,
                        process_count: int = 1,
                        boxes: np.ndarray | None = None) -> grain.IterDataset:
    """The pretraining pipeline from a run config (`config.data`, `config.crops`)."""
    if config.batch_size % process_count:
        raise sources.DataError(f'batch_size {config.batch_size} is not divisible by the '
                                f'{process_count} processes.')
    return make_pipeline(
        sources.make_source(config.data) if source is None else source, config.crops,
        batch_size=config.batch_size // process_count, seed=config.seed,
        process_index=process_index, process_count=process_count,
        num_epochs=None, num_workers=config.data.num_workers,
        max_bad_fraction=config.data.max_bad_fraction, boxes=boxes)
