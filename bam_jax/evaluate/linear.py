"""The official linear probe (`eval_linear.py`, §6.2 of `../shared/docs/bam_reference.md`).

A linear classifier on the features of a frozen backbone in eval mode:

* Features (`feature_layout`): for a ViT, the CLS tokens of the last `n_last_blocks`
  blocks, each through the final LayerNorm, concatenated (timm's
  `get_intermediate_layers(n, norm=True)` convention); with `avgpool` (only for n = 1)
  the mean of the normed last-block patch tokens interleaved with the CLS token,
  `[cls_0, avg_0, cls_1, avg_1, ...]`, as the official reshape of the stacked pair gives.
  A ResNet or CAFormer gives its pooled output (n = 1, no avgpool).
* Classifier: optionally a non-affine BatchNorm (eps 1e-6, PyTorch's: batch statistics
  with the biased variance in training, running statistics with momentum 0.1 and the
  unbiased variance), then a Linear layer, weight N(0, 0.01²) (the official
  trunc-normal is truncated at ±2 absolute, i.e. not at all at std 0.01), bias 0.
* SGD, momentum 0.9 (PyTorch's: v ← 0.9·v + g, θ ← θ − lr·v), no weight decay, learning
  rate `lr × global batch / 256`, annealed to 0 by a per-epoch cosine
  (`CosineAnnealingLR(epochs)`, no warm-up), cross-entropy averaged over the batch.
* Training views: `RandomResizedCrop` (bilinear, scale 0.08-1) and a flip, drawn anew
  each epoch (`bam_jax.data.eval_input.make_eval_input(random_crop=...)`); the test
  split is resized and centre-cropped. Top-1 / top-5 after every epoch; the best top-1
  (the official number) and the last are reported.

Where this runs the backbone: as the official code, on every epoch's augmented crops
(the frozen backbone's features of a random crop differ every epoch, and that is part of
the protocol). That costs one backbone forward per training image per epoch. The test
features do not change between epochs, so they are extracted once and only the
classifier is re-applied, which gives the official numbers for less. `feature_batches`
offers the cheap variant (features of the centre crops, computed once, shuffled per
epoch): no augmentation, so not the official protocol.

Two known differences from the official run: its BatchNorm head runs under DDP without
SyncBatchNorm, so its statistics are per GPU (128 images), here over the global batch;
and its last batch of an epoch is smaller, here it is padded and the padding masked out
of the loss and the statistics, which gives the same update.

Everything per batch is one jitted call on global arrays sharded over the 'data' mesh
axis; the classifier is replicated, so XLA all-reduces its gradient.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Iterable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bam_jax.evaluate.features import Features, global_batch, normalize_images
from bam_jax.evaluate.knn import TOP5, topk_accuracy
from bam_jax.models.vit import VisionTransformer
from bam_jax.train.metrics_log import duration

MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-6
BATCH_NORM_MOMENTUM = 0.1
INIT_STD = 0.01
REFERENCE_BATCH = 256  # lr × global batch / 256


# ---------------------------------------------------------------------------
# Features.
# ---------------------------------------------------------------------------
def concatenate_blocks(blocks, avgpool: bool) -> jax.Array:
    """`[N, 1 + P, D]` normed block outputs (oldest first) → the official features.

    The CLS tokens concatenated, `[N, n·D]`; with `avgpool` (n = 1) the CLS token and the
    mean patch token interleaved, `[N, 2·D]` (the official `cat(..., -1)` of the two
    `[N, D, 1]` columns, reshaped).
    """
    features = jnp.concatenate([block[:, 0] for block in blocks], axis=-1)
    if avgpool:
        average = jnp.mean(blocks[-1][:, 1:], axis=1)
        features = jnp.stack([features, average], axis=-1).reshape(features.shape[0], -1)
    return features


def feature_layout(backbone: nn.Module, *, n_last_blocks: int,
                   avgpool: bool) -> Callable[[Any, jax.Array], jax.Array]:
    """(variables, normalised images) → the probe's features, for this backbone.

    Raises a ValueError for settings the backbone cannot give: `avgpool` with more than
    one block (as the official code, whose concatenation would fail), more blocks than
    the ViT has, or anything but n = 1 without avgpool for pooled backbones.
    """
    if isinstance(backbone, VisionTransformer):
        if avgpool and n_last_blocks != 1:
            raise ValueError(f'linear.avgpool needs linear.n_last_blocks=1 (got '
                             f'{n_last_blocks}): the official code interleaves one CLS '
                             'token with the average patch token.')
        if not 1 <= n_last_blocks <= backbone.depth:
            raise ValueError(f'linear.n_last_blocks={n_last_blocks}, but the ViT has '
                             f'{backbone.depth} blocks; use 1 to {backbone.depth}.')

        def features(variables, images):
            blocks = backbone.apply(variables, images, method='encode',
                                    n_last_blocks=n_last_blocks)['blocks']
            return concatenate_blocks(blocks, avgpool)
        return features
    if n_last_blocks != 1 or avgpool:
        raise ValueError(f'{type(backbone).__name__} gives one pooled feature vector: use '
                         f'linear.n_last_blocks=1 and linear.avgpool=False (got '
                         f'{n_last_blocks} and {avgpool}).')
    return lambda variables, images: backbone.apply(variables, images, train=False)


# ---------------------------------------------------------------------------
# The classifier and its SGD step.
# ---------------------------------------------------------------------------
class ClassifierState(NamedTuple):
    """The head's weights, the SGD momentum buffer, and BatchNorm running statistics."""
    params: dict[str, jax.Array]  # 'kernel' [D, C], 'bias' [C]
    velocity: dict[str, jax.Array]
    batch_stats: dict[str, jax.Array]  # 'mean', 'var' [D]; empty without the BN head


def init_classifier(key: jax.Array, dim: int, num_classes: int,
                    bn_head: bool) -> ClassifierState:
    params = {'kernel': INIT_STD * jax.random.normal(key, (dim, num_classes), jnp.float32),
              'bias': jnp.zeros((num_classes,), jnp.float32)}
    stats = ({'mean': jnp.zeros((dim,), jnp.float32), 'var': jnp.ones((dim,), jnp.float32)}
             if bn_head else {})
    return ClassifierState(params, jax.tree.map(jnp.zeros_like, params), stats)


def learning_rate(lr: float, global_batch_size: int, epoch: int, epochs: int) -> float:
    """The official `lr × batch / 256`, then `CosineAnnealingLR(epochs, eta_min=0)` at `epoch`."""
    return lr * global_batch_size / REFERENCE_BATCH * 0.5 * (1 + math.cos(math.pi * epoch
                                                                          / epochs))


def _batch_norm_train(features, valid, stats):
    """PyTorch BatchNorm1d(affine=False) in training mode over the valid rows."""
    weights = valid.astype(jnp.float32)
    count = jnp.sum(weights)
    mean = jnp.sum(features * weights[:, None], axis=0) / count
    variance = jnp.sum(jnp.square(features - mean) * weights[:, None], axis=0) / count
    normalised = (features - mean) * jax.lax.rsqrt(variance + BATCH_NORM_EPSILON)
    unbiased = variance * count / jnp.maximum(count - 1, 1)
    new_stats = {'mean': (1 - BATCH_NORM_MOMENTUM) * stats['mean'] + BATCH_NORM_MOMENTUM * mean,
                 'var': (1 - BATCH_NORM_MOMENTUM) * stats['var']
                 + BATCH_NORM_MOMENTUM * unbiased}
    return normalised, new_stats


def _logits(params, features):
    return jnp.dot(features, params['kernel'], precision=jax.lax.Precision.HIGHEST) \
        + params['bias']


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: ClassifierState, features: jax.Array, labels: jax.Array,
               valid: jax.Array, lr: jax.Array) -> tuple[ClassifierState, jax.Array]:
    """One SGD step on a global batch; padding rows (`valid` False) do not count."""
    features = jax.lax.stop_gradient(features.astype(jnp.float32))
    stats = state.batch_stats
    if stats:
        features, stats = _batch_norm_train(features, valid, stats)
    weights = valid.astype(jnp.float32) / jnp.maximum(jnp.sum(valid), 1)

    def loss_fn(params):
        log_probabilities = jax.nn.log_softmax(_logits(params, features))
        picked = jnp.take_along_axis(log_probabilities,
                                     jnp.where(valid, labels, 0)[:, None], axis=1)[:, 0]
        return -jnp.sum(picked * weights)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    velocity = jax.tree.map(lambda v, g: MOMENTUM * v + g, state.velocity, grads)
    params = jax.tree.map(lambda p, v: p - lr * v, state.params, velocity)
    return ClassifierState(params, velocity, stats), loss


@jax.jit
def predict(state: ClassifierState, features: jax.Array) -> jax.Array:
    """The best `min(5, classes)` classes per row, best first, int32 `[N, n]`."""
    features = features.astype(jnp.float32)
    if state.batch_stats:
        features = (features - state.batch_stats['mean']) * jax.lax.rsqrt(
            state.batch_stats['var'] + BATCH_NORM_EPSILON)
    logits = _logits(state.params, features)
    return jax.lax.top_k(logits, min(TOP5, logits.shape[-1]))[1].astype(jnp.int32)


# ---------------------------------------------------------------------------
# The protocol.
# ---------------------------------------------------------------------------
class LinearProbeResult(NamedTuple):
    top1: float  # the best epoch's (the official number)
    top5: float  # at that epoch
    best_epoch: int  # 0-based
    last_top1: float
    last_top5: float
    per_epoch: list[dict[str, float]]  # top1, top5, lr, loss (mean over batches)
    classifier: ClassifierState

    def summary(self) -> dict[str, Any]:
        return {'top1': self.top1, 'top5': self.top5, 'best_epoch': self.best_epoch,
                'last_top1': self.last_top1, 'last_top5': self.last_top5,
                'epochs': self.per_epoch}


def feature_batches(train: Features, batch_size: int, seed: int = 0):
    """The cheap variant's training batches: `epoch` → batches of precomputed features
    (the valid rows, reshuffled each epoch, padded to whole global batches)."""
    valid_rows = np.flatnonzero(np.asarray(jax.device_get(train.valid))
                                & (np.asarray(jax.device_get(train.labels)) >= 0))
    take = jax.jit(lambda x, rows: jnp.take(x, rows, axis=0),
                   out_shardings=train.features.sharding)

    def batches(epoch):
        order = np.random.default_rng([seed, epoch]).permutation(valid_rows)
        padded = np.concatenate([order, np.full(-len(order) % batch_size, -1)])
        for start in range(0, len(padded), batch_size):
            rows = padded[start:start + batch_size]
            gathered = np.maximum(rows, 0)
            real = jax.device_put(rows >= 0, train.valid.sharding)
            yield {'features': take(train.features, gathered),
                   'label': take(train.labels, gathered),
                   'valid': take(train.valid, gathered) & real}
    return batches


def progress_epochs(epochs: int, parts: int = 10) -> set[int]:
    """The 0-based epochs after which progress is logged: the first, then each
    `1/parts` of the run (every epoch of a short run)."""
    return {0} | {epoch for epoch in range(epochs)
                  if (epoch + 1) * parts // epochs > epoch * parts // epochs}


def linear_probe(features_fn: Callable[[jax.Array], jax.Array],
                 train_batches: Callable[[int], Iterable[dict[str, Any]]], test: Features,
                 *, mesh: jax.sharding.Mesh, num_classes: int, epochs: int, lr: float,
                 bn_head: bool = False, seed: int = 0, axis_name: str = 'data',
                 log: Callable[[str], None] | None = None) -> LinearProbeResult:
    """Trains the official linear classifier and scores it on `test` after every epoch.

    Args:
      features_fn: normalised float32 images `[B, H, W, 3]` → features `[B, D]`, jitted
        with the backbone's variables bound (e.g. `feature_layout` + `functools.partial`).
      train_batches: `epoch` → this process's batches of that epoch: host dicts with
        uint8 'image' (augmented crops), 'label', 'valid' (e.g. `make_eval_input` with
        `random_crop=(seed, epoch)` over freshly shuffled indices), or dicts of global
        'features', 'label', 'valid' (`feature_batches`). Every batch of a run has the
        same global size, which scales the learning rate.
      test: the test split's features (`extract_features` with the same `features_fn`
        on the centre crops).
      lr: per 256 images.
    """
    if epochs < 1:
        raise ValueError(f'linear.epochs must be positive, got {epochs}.')
    rows = NamedSharding(mesh, P(axis_name))
    replicated = NamedSharding(mesh, P())
    test_valid = test.valid & (test.labels >= 0)
    state = None
    per_epoch = []
    logged, start = progress_epochs(epochs), time.perf_counter()
    for epoch in range(epochs):
        losses, epoch_lr = [], None
        for batch in train_batches(epoch):
            if 'features' in batch:
                features, labels, valid = batch['features'], batch['label'], batch['valid']
            else:
                images, labels, valid = global_batch(batch, rows)
                features = features_fn(normalize_images(images))
            if state is None:
                state = jax.device_put(
                    init_classifier(jax.random.key(seed), features.shape[-1], num_classes,
                                    bn_head), replicated)
            if epoch_lr is None:
                epoch_lr = learning_rate(lr, features.shape[0], epoch, epochs)
            state, loss = train_step(state, features, labels, valid,
                                     jnp.float32(epoch_lr))
            losses.append(loss)
        if state is None:
            raise ValueError('The linear probe got no training batch.')
        accuracy = topk_accuracy(predict(state, test.features), test.labels, test_valid)
        per_epoch.append({**accuracy, 'lr': epoch_lr,
                          'loss': float(np.mean(jax.device_get(losses)))})
        if log is not None and epoch in logged:
            elapsed = time.perf_counter() - start
            remaining = elapsed / (epoch + 1) * (epochs - epoch - 1)
            log(f'linear epoch {epoch + 1}/{epochs}: loss {per_epoch[-1]["loss"]:.4f}, '
                f'top-1 {accuracy["top1"]:.2f}, top-5 {accuracy["top5"]:.2f}; '
                f'{duration(elapsed)}, ETA {duration(remaining)}')
    best = max(range(epochs), key=lambda index: per_epoch[index]['top1'])  # first best
    return LinearProbeResult(
        top1=per_epoch[best]['top1'], top5=per_epoch[best]['top5'], best_epoch=best,
        last_top1=per_epoch[-1]['top1'], last_top5=per_epoch[-1]['top5'],
        per_epoch=per_epoch, classifier=state)
