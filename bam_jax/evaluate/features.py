"""Frozen features of a whole split, as global arrays sharded over the data axis.

Each process feeds its own batches (`bam_jax.data.eval_input`); each batch becomes a
global array (`jax.make_array_from_process_local_data`), is normalised on the device
and goes through `features_fn`, and the result is written, without leaving its devices,
into a preallocated donated buffer. So a split's features never pass through a host and
never need a device-to-device copy.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD


class Features(NamedTuple):
    """A split's features `[N, D]` float32, labels int32 `[N]` and validity bool `[N]`.

    N is the number of batches times the global batch size; rows are in batch-row-major
    order (row `r · num_batches + t` is row r of global batch t), which keeps each
    device's rows on that device. Padding and unreadable images have `valid` False.
    """
    features: jax.Array
    labels: jax.Array
    valid: jax.Array


def check_features_and_labels(features, labels) -> None:
    """Features `[N, D]` and labels `[N]` (NumPy or JAX) of the same rows, else a clear
    error: what the low-label protocols take."""
    if np.ndim(features) != 2 or np.shape(labels) != np.shape(features)[:1]:
        raise ValueError(f'features must be [N, D] and labels [N]; got features '
                         f'{np.shape(features)} and labels {np.shape(labels)}.')


@jax.jit
def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 `[..., 3]` → float32 with the ImageNet mean/std, as the official transform."""
    images = images.astype(jnp.float32) / 255.0
    return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer: Features, batch: Features, step: jax.Array) -> Features:
    return jax.tree.map(lambda whole, part: whole.at[:, step].set(part), buffer, batch)


def _flatten(buffer: Features) -> Features:
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), buffer)


def global_batch(batch: dict[str, np.ndarray], rows: NamedSharding,
                 names=('image', 'label', 'valid')) -> tuple[jax.Array, ...]:
    """This process's host batch → global arrays sharded by `rows` (every process passes
    its own rows of the same global batch): uint8 images, int32 labels, bool validity."""
    dtypes = {'image': np.uint8, 'label': np.int32, 'valid': bool}
    global_size = len(batch['label']) * jax.process_count()
    arrays = []
    for name in names:
        local = np.asarray(batch[name], dtypes.get(name))
        arrays.append(jax.make_array_from_process_local_data(
            rows, local, (global_size,) + local.shape[1:]))
    return tuple(arrays)


def extract_features(features_fn: Callable[[jax.Array], jax.Array],
                     batches: Iterable[dict[str, np.ndarray]], *,
                     mesh: jax.sharding.Mesh, axis_name: str = 'data',
                     num_batches: int | None = None) -> Features:
    """`features_fn` over every batch of a split → `Features` sharded over `axis_name`.

    Args:
      features_fn: normalised float32 images `[B, H, W, 3]` → `[B, D]`; jitted, with the
        parameters bound (e.g. `functools.partial(jitted_apply, params)`), so calling it
        again for another checkpoint does not recompile.
      batches: this process's host batches with 'image', 'label', 'valid' (an
        `EvalInput`); every process must yield the same number of equal-size batches.
      num_batches: how many; default `len(batches)` or `batches.num_batches`.
    """
    if num_batches is None:
        num_batches = getattr(batches, 'num_batches', None)
        num_batches = len(batches) if num_batches is None else num_batches
    rows = NamedSharding(mesh, P(axis_name))
    buffer = None
    step = 0
    for step, batch in enumerate(batches):
        if step >= num_batches:
            raise ValueError(f'The input yielded more than the {num_batches} batches it '
                             'announced.')
        local_size = len(batch['label'])
        if local_size % jax.local_device_count():
            raise ValueError(f'The per-process batch of {local_size} does not split over '
                             f'the {jax.local_device_count()} local devices; use a batch '
                             'size divisible by it.')
        global_size = local_size * jax.process_count()
        images, labels, valid = global_batch(batch, rows)
        features = features_fn(normalize_images(images))
        part = Features(features.astype(jnp.float32), labels, valid)
        if buffer is None:
            buffer = Features(
                jnp.zeros((global_size, num_batches, features.shape[-1]), jnp.float32,
                          device=rows),
                jnp.zeros((global_size, num_batches), jnp.int32, device=rows),
                jnp.zeros((global_size, num_batches), bool, device=rows))
        buffer = _write(buffer, part, np.int32(step))
    if buffer is None or step + 1 != num_batches:
        raise ValueError(f'The input yielded {0 if buffer is None else step + 1} batches, '
                         f'not the {num_batches} it announced.')
    # [global batch, batches, ...] → [rows, ...]: merging into the sharded leading axis
    # keeps every row on its device.
    return jax.jit(_flatten, out_shardings=rows)(buffer)


# Raw pixels are compared at this side (configs/evaluate.py's `pixels_size` default): the
# MNIST digits as they are, a 224 px crop a 3,072-dimensional vector.
PIXELS_SIZE = 32


def pixel_features(size: int = PIXELS_SIZE) -> Callable[[jax.Array], jax.Array]:
    """Normalised images → the images resized to `size` (antialiased) and flattened: the
    raw-pixel baseline of every protocol."""
    @jax.jit
    def features(images):
        if images.shape[1:3] != (size, size):
            images = jax.image.resize(images, (images.shape[0], size, size, 3), 'linear',
                                      antialias=True)
        return images.reshape(images.shape[0], -1)
    return features
