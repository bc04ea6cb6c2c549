"""The evaluation input: every example of a split once, resized and centre-cropped, in order.

The official evaluation transform (`online_evaluation.get_knn_loaders`, §6.1) is
`Resize(256, bicubic)` of the short side, then `CenterCrop(224)`, then normalisation.
Here the host does the first two in uint8 with PIL, exactly as torchvision does on PIL
images; the normalisation (ImageNet mean/std) runs on the device
(`bam_jax.evaluate.features`).

Unlike the training pipeline nothing is shuffled, dropped or repeated: each process reads
a contiguous block of the examples and pads its last batch, so every process yields the
same number of fixed-size batches and a `valid` mask says which rows are real.
A host batch is a dict of NumPy arrays (per process, b rows):
  'image': uint8 [b, S, S, 3]   zeros on padding rows
  'label': int32 [b]            -1 on padding rows
  'index': int32 [b]            the example's index in the source, -1 on padding rows
  'valid': bool  [b]            False on padding rows and on unreadable images
No JAX here: grain worker processes import this module.
"""

import dataclasses
import functools
import logging
import math
from typing import Any, Iterator

import grain
import numpy as np
from PIL import Image

from bam_jax.data import crops as crops_lib
from bam_jax.data import pipeline
from bam_jax.data import sources

# The official eval transform crops 224 of 256: the same fraction at other sizes.
CROP_FRACTION = 224 / 256


def default_resize_size(image_size: int) -> int:
    """The short side before the centre crop: 256 for 224, 36 for 32 (timm's floor rule)."""
    return math.floor(image_size / CROP_FRACTION)


def resize_center_crop(image: Image.Image, resize_size: int, image_size: int) -> np.ndarray:
    """torchvision's `Resize(resize_size, bicubic)` then `CenterCrop(image_size)`, uint8.

    The short side becomes `resize_size` and the long side `int(resize_size · long / short)`;
    the crop's corner is `round((side - image_size) / 2)`, as torchvision computes them.
    """
    width, height = image.size
    if width <= height:
        new_width, new_height = resize_size, int(resize_size * height / width)
    else:
        new_width, new_height = int(resize_size * width / height), resize_size
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BICUBIC)
    top = int(round((new_height - image_size) / 2.0))
    left = int(round((new_width - image_size) / 2.0))
    return np.asarray(image.crop((left, top, left + image_size, top + image_size)))


def load_example(index: int, source, resize_size: int, image_size: int,
                 squash: bool = False, random_crop: tuple[int, ...] | None = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0),
                 flip_prob: float = 0.5) -> dict[str, Any]:
    """One batch row: the source's example `index`, or a padding row when `index` < 0.

    With `random_crop` (a seed, e.g. (seed, epoch)) the row is the linear probe's training
    view instead: torchvision's `RandomResizedCrop(image_size)` (bilinear, `crop_scale`)
    and a horizontal flip (probability `flip_prob`), drawn from a generator seeded with
    (*random_crop, index), so the crops do not depend on the batch, the worker or the
    process.
    """
    example = dict(image=np.zeros((image_size, image_size, 3), np.uint8),
                   label=np.int32(-1), index=np.int32(index), valid=np.bool_(False))
    if index < 0:
        return example
    record = source[int(index)]
    example['label'] = np.int32(record['label'])
    try:
        image = crops_lib.decode(record['image'])
    except crops_lib.DECODE_ERRORS:
        logging.warning('Unreadable image %s is left out of the evaluation.', record['path'])
        return example
    if random_crop is not None:
        rng = np.random.default_rng([*random_crop, int(index)])
        example['image'] = crops_lib.random_resized_crop(
            image, rng, image_size, crop_scale, flip_prob, resample=Image.BILINEAR)
    elif squash:  # the whole image, aspect ratio lost: torchvision's Resize((S, S)), bilinear
        example['image'] = np.asarray(image.resize((image_size, image_size), Image.BILINEAR))
    else:
        example['image'] = resize_center_crop(image, resize_size, image_size)
    example['valid'] = np.bool_(True)
    return example


def process_indices(indices: np.ndarray, batch_size: int, process_index: int,
                    process_count: int) -> np.ndarray:
    """This process's contiguous block of `indices`, padded with -1 to whole batches.

    Every process gets `ceil(len / process_count)` slots rounded up to whole batches, so
    all processes yield the same number of batches.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} is not in [0, {process_count}).')
    per_process = -(-len(indices) // process_count)
    slots = max(1, -(-per_process // batch_size)) * batch_size
    block = indices[process_index * per_process:(process_index + 1) * per_process]
    return np.concatenate([block, np.full(slots - len(block), -1)]).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class EvalInput:
    """This process's batches of one split (iterable, any number of times)."""
    dataset: grain.IterDataset
    num_batches: int
    batch_size: int  # per process
    num_examples: int  # real examples over all processes

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset)


def make_eval_input(source, *, image_size: int, batch_size: int,
                    resize_size: int | None = None, indices: np.ndarray | None = None,
                    process_index: int = 0, process_count: int = 1,
                    num_workers: int = 0, squash: bool = False,
                    random_crop: tuple[int, ...] | None = None,
                    crop_scale: tuple[float, float] = (0.08, 1.0),
                    flip_prob: float = 0.5) -> EvalInput:
    """Batches (per process, `batch_size` rows) of `source[indices]`, in that order.

    Args:
      source: a `bam_jax.data.sources` source (records 'image', 'label', 'index', 'path').
      image_size: the side of the centre crop.
      batch_size: rows per batch on this process.
      resize_size: the short side before the crop; default `default_resize_size`.
      indices: the examples to read (e.g. `balanced_subset`); default all of them. Every
        process must pass the same ones.
      process_index, process_count: which contiguous block this process reads.
      num_workers: grain worker processes for decoding (0: in this process).
      squash: resize the whole image to `image_size` square instead (ContrastiveCrop's
        boxes are fractions of the whole image); `resize_size` is then unused.
      random_crop, crop_scale, flip_prob: random resized crops and flips instead (the linear
        probe's training views, see `load_example`); `resize_size` is then unused. The
        order is still that of `indices`: shuffle them per epoch.
    """
    resize_size = default_resize_size(image_size) if resize_size is None else resize_size
    if resize_size < image_size:
        raise ValueError(f'resize_size {resize_size} is smaller than the crop image_size '
                         f'{image_size}; it must be at least as large.')
    if batch_size < 1:
        raise ValueError(f'batch_size must be positive, got {batch_size}.')
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    if len(indices) == 0:
        raise sources.DataError('The evaluation split is empty.')
    if indices.min() < 0 or indices.max() >= len(source):
        raise sources.DataError(f'Example indices must lie in [0, {len(source)}); got '
                                f'[{indices.min()}, {indices.max()}].')
    slots = process_indices(indices, batch_size, process_index, process_count)
    dataset = grain.MapDataset.source(slots).map(functools.partial(
        load_example, source=source, resize_size=resize_size, image_size=image_size,
        squash=squash, random_crop=random_crop, crop_scale=crop_scale,
        flip_prob=flip_prob))
    dataset = dataset.batch(batch_size).to_iter_dataset(pipeline.read_options(source))
    if num_workers:
        dataset = pipeline.worker_processes(dataset, num_workers)
    return EvalInput(dataset, num_batches=len(slots) // batch_size, batch_size=batch_size,
                     num_examples=len(indices))


def source_labels(source) -> np.ndarray:
    """Every label of a source, int32 `[N]`, without reading its images when it can.

    A source's `labels` array when it has one (folders, MNIST); a TFDS source's
    `read_labels()` (a label file, else a labels-only read of the raw records); else every
    record, read one by one.
    """
    labels = getattr(source, 'labels', None)
    if labels is None and hasattr(source, 'read_labels'):
        labels = source.read_labels()
    if labels is None:
        labels = [source[index]['label'] for index in range(len(source))]
    return np.asarray(labels, np.int32)


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced `fraction` of a labelled split, the official way.

    As `online_evaluation.get_subset_indices` (one process): `floor(floor(N·fraction) / C)`
    examples of each of the C classes present, drawn without replacement by
    `np.random.choice` class after class (classes in increasing order) from the legacy
    generator seeded with `seed` (official: 0), then shuffled. The same arguments give the
    same indices on every process. `fraction` 1 keeps everything, in order.
    """
    labels = np.asarray(labels)
    if fraction == 1:
        return np.arange(len(labels))
    if not 0 < fraction < 1:
        raise ValueError(f'fraction must be in (0, 1], got {fraction}.')
    classes = np.unique(labels)
    if classes[0] < 0:
        raise sources.DataError('A balanced subset needs labels; this split has label '
                                f'{classes[0]} (unlabelled).')
    per_class = math.floor(math.floor(len(labels) * fraction) / len(classes))
    if per_class == 0:
        raise ValueError(f'fraction {fraction} of {len(labels)} examples leaves no example '
                         f'for each of the {len(classes)} classes; use a larger fraction.')
    counts = np.bincount(np.searchsorted(classes, labels))
    if counts.min() < per_class:
        raise sources.DataError(
            f'Class {classes[np.argmin(counts)]} has {counts.min()} examples, fewer than the '
            f'{per_class} per class a balanced {fraction} subset needs.')
    rng = np.random.RandomState(seed)
    subset = np.hstack([rng.choice(np.flatnonzero(labels == label), per_class, replace=False)
                        for label in classes])
    rng.shuffle(subset)
    return subset
