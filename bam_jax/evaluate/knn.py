"""Weighted k-nearest-neighbour classification on frozen features, sharded over devices.

The official protocol (`online_evaluation.distributed_knn`, DINO's `knn_classifier`,
§6.1 of `../shared/docs/bam_reference.md`): L2-normalised features, cosine similarity,
the k = 20 most similar training examples vote for their class with weight
`exp(similarity / T)`, T = 0.07, and a query is right at top-1 (top-5) if its label is the
best (among the best min(5, k)) summed vote.

The memory bank (training features) stays sharded over the mesh axis. Queries go through
in chunks; for each chunk every device all-gathers the chunk's queries, scans its own
bank shard in blocks keeping a running top-k (similarity, label), and sends each device
the candidates for that device's own queries (`all_to_all`: each receives only what it
needs, not every device's candidates for every query). Each device then picks the global
top-k of its queries from the devices' candidates and votes. Memory per device is
bounded by one (query chunk × bank block) similarity tile, whatever the bank size.

Ties are deterministic and independent of the mesh: among equal similarities the
neighbour earlier in the bank wins (the bank is sharded contiguously and `lax.top_k`
keeps the lower position first); among equal votes the lower class index ranks first.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from bam_jax.evaluate import features as features_lib

K = 20
TEMPERATURE = 0.07
TOP5 = 5


class KnnResult(NamedTuple):
    """Per query, the best `min(5, k, num_classes)` classes by summed vote, best first."""
    classes: jax.Array  # int32 [M, n]
    scores: jax.Array  # float32 [M, n], the summed votes exp(sim / T) of those classes


def inverse_norms(x: jax.Array) -> jax.Array:
    """1 / the rows' L2 norms `[N]` (norms at least 1e-12, so zero rows stay zero)."""
    return 1.0 / jnp.maximum(jnp.linalg.norm(x.astype(jnp.float32), axis=-1), 1e-12)


def _local_top_k(queries, bank, bank_scale, bank_labels, bank_valid, *, k, block_size,
                 precision, axis_name):
    """The k most similar valid bank rows for each query: (similarities, labels) `[q, k]`.

    Scans the bank in blocks of `block_size` rows with a running top-k. Each block's
    similarities are scaled by its rows' `bank_scale` (inverse norms), so the bank is
    never copied normalised. The last block is moved back to end at the bank's end (no
    padding copy); rows it shares with the block before are masked, so each row is seen
    once.
    """
    n_rows = bank.shape[0]
    block_size = min(block_size, n_rows)
    n_blocks = -(-n_rows // block_size)
    n_queries = queries.shape[0]

    def scan_block(best, block):
        best_similarities, best_labels = best
        start = jnp.minimum(block * block_size, n_rows - block_size)
        rows = lax.dynamic_slice_in_dim(bank, start, block_size)
        labels = lax.dynamic_slice_in_dim(bank_labels, start, block_size)
        fresh = (start + jnp.arange(block_size) >= block * block_size)
        keep = lax.dynamic_slice_in_dim(bank_valid, start, block_size) & fresh
        scale = lax.dynamic_slice_in_dim(bank_scale, start, block_size)
        similarities = jnp.dot(queries, rows.T.astype(jnp.float32), precision=precision)
        similarities = similarities * scale[None]
        similarities = jnp.where(keep[None], similarities, -jnp.inf)
        # Running best first: among equal similarities top_k keeps the earlier bank row.
        candidates = jnp.concatenate([best_similarities, similarities], axis=1)
        candidate_labels = jnp.concatenate(
            [best_labels, jnp.broadcast_to(labels, (n_queries, block_size))], axis=1)
        best_similarities, position = lax.top_k(candidates, k)
        return (best_similarities,
                jnp.take_along_axis(candidate_labels, position, axis=1)), None

    initial = (jnp.full((n_queries, k), -jnp.inf, jnp.float32),
               jnp.full((n_queries, k), -1, jnp.int32))
    if axis_name is not None:  # the carry differs per device, as the bank shard does
        initial = lax.pcast(initial, axis_name, to='varying')
    (similarities, labels), _ = lax.scan(scan_block, initial, jnp.arange(n_blocks))
    return similarities, labels


def _vote(similarities, labels, *, num_classes, temperature, n_predictions):
    """Weighted votes exp(sim / T) summed per class; the best `n_predictions` classes."""
    weights = jnp.exp(similarities / temperature)  # 0 for the -inf of masked rows
    votes = jnp.sum(weights[..., None] * jax.nn.one_hot(labels, num_classes), axis=1)
    scores, classes = lax.top_k(votes, n_predictions)  # ties: lower class index first
    return classes.astype(jnp.int32), scores


def _knn_per_device(bank, bank_labels, bank_valid, queries, *, k, num_classes, temperature,
                    n_predictions, query_chunk, block_size, precision, axis_name, n_devices):
    """One device: its bank shard and its queries `[m, D]` → `KnnResult` of its queries."""
    bank_scale = inverse_norms(bank)
    queries = queries.astype(jnp.float32) * inverse_norms(queries)[:, None]
    n_queries = queries.shape[0]
    n_chunks = -(-n_queries // query_chunk)
    queries = jnp.pad(queries, ((0, n_chunks * query_chunk - n_queries), (0, 0)))

    def classify_chunk(chunk):
        if axis_name is not None:  # every device's chunk, device after device
            chunk = lax.all_gather(chunk, axis_name, tiled=True)
        similarities, labels = _local_top_k(
            chunk, bank, bank_scale, bank_labels, bank_valid, k=k, block_size=block_size,
            precision=precision, axis_name=axis_name)
        if axis_name is not None:
            # [devices, q, k] by destination → [devices, q, k] by source, for my q queries;
            # source-major, so candidates stay in bank order for the tie rule.
            def exchange(x):
                x = lax.all_to_all(x.reshape(n_devices, query_chunk, k), axis_name, 0, 0)
                return x.transpose(1, 0, 2).reshape(query_chunk, n_devices * k)
            similarities, labels = exchange(similarities), exchange(labels)
            similarities, position = lax.top_k(similarities, k)
            labels = jnp.take_along_axis(labels, position, axis=1)
        return _vote(similarities, labels, num_classes=num_classes, temperature=temperature,
                     n_predictions=n_predictions)

    classes, scores = lax.map(classify_chunk, queries.reshape(n_chunks, query_chunk, -1))
    return (classes.reshape(-1, n_predictions)[:n_queries],
            scores.reshape(-1, n_predictions)[:n_queries])


@functools.partial(jax.jit, static_argnames=(
    'k', 'num_classes', 'temperature', 'mesh', 'axis_name', 'query_chunk_size',
    'bank_block_size', 'precision'))
def _knn_classify(bank, bank_labels, bank_valid, queries, *, k, num_classes, temperature,
                  mesh, axis_name, query_chunk_size, bank_block_size, precision):
    n_devices = 1 if mesh is None else mesh.shape[axis_name]
    n_predictions = min(TOP5, k, num_classes)
    # Whole rows per device: padding bank rows are invalid, padding queries cut off below.
    bank_padding = -bank.shape[0] % n_devices
    bank = jnp.pad(bank, ((0, bank_padding), (0, 0)))
    bank_labels = jnp.pad(bank_labels.astype(jnp.int32), (0, bank_padding),
                          constant_values=-1)
    bank_valid = jnp.pad(bank_valid.astype(bool), (0, bank_padding))
    n_queries = queries.shape[0]
    queries = jnp.pad(queries, ((0, -n_queries % n_devices), (0, 0)))
    per_device = functools.partial(
        _knn_per_device, k=k, num_classes=num_classes, temperature=temperature,
        n_predictions=n_predictions, query_chunk=max(1, query_chunk_size // n_devices),
        block_size=bank_block_size, precision=precision,
        axis_name=None if mesh is None else axis_name, n_devices=n_devices)
    if mesh is None:
        classes, scores = per_device(bank, bank_labels, bank_valid, queries)
    else:
        rows = P(axis_name)
        classes, scores = jax.shard_map(
            per_device, mesh=mesh, in_specs=(rows, rows, rows, rows),
            out_specs=(rows, rows))(bank, bank_labels, bank_valid, queries)
    return KnnResult(classes[:n_queries], scores[:n_queries])


def knn_classify(train_features: jax.Array, train_labels: jax.Array,
                 test_features: jax.Array, *, num_classes: int, k: int = K,
                 temperature: float = TEMPERATURE, train_valid: jax.Array | None = None,
                 mesh: jax.sharding.Mesh | None = None, axis_name: str = 'data',
                 query_chunk_size: int = 1024, bank_block_size: int = 16384,
                 precision=lax.Precision.HIGHEST) -> KnnResult:
    """The weighted kNN prediction of every test example (jitted, sharded over `mesh`).

    Args:
      train_features: the memory bank `[N, D]`; normalised here. Best passed sharded over
        `axis_name` (as `extract_features` returns it); any N works.
      train_labels: int `[N]`, in [0, num_classes); other labels never get a vote.
      test_features: `[M, D]` queries; the result is sharded like them.
      num_classes: the number of classes voted over.
      k, temperature: the official 20 and 0.07.
      train_valid: bool `[N]`, False for padding rows, which are never neighbours.
      mesh: a mesh with axis `axis_name`; None runs on one device.
      query_chunk_size: queries per step over all devices; with `bank_block_size` (bank
        rows per device per step) it bounds the similarity tile each device holds.
      precision: of the similarity matmul; HIGHEST keeps float32 on TPUs.

    Returns:
      `KnnResult`: the best min(5, k, num_classes) classes per test example and their votes.
    """
    if k < 1:
        raise ValueError(f'k must be positive, got {k}.')
    if not temperature > 0:
        raise ValueError(f'temperature must be positive, got {temperature}.')
    if num_classes < 1:
        raise ValueError(f'num_classes must be positive, got {num_classes}.')
    if train_features.ndim != 2 or test_features.ndim != 2 or (
            train_features.shape[1] != test_features.shape[1]):
        raise ValueError(f'features must be [N, D] and [M, D]; got train '
                         f'{train_features.shape} and test {test_features.shape}.')
    if train_labels.shape != train_features.shape[:1]:
        raise ValueError(f'train_labels {train_labels.shape} do not match train_features '
                         f'{train_features.shape}.')
    if train_valid is None:
        train_valid = jnp.ones(train_labels.shape, bool)
    return _knn_classify(train_features, train_labels, train_valid, test_features, k=k,
                         num_classes=num_classes, temperature=float(temperature),
                         mesh=mesh, axis_name=axis_name,
                         query_chunk_size=query_chunk_size,
                         bank_block_size=bank_block_size, precision=precision)


@jax.jit
def _correct_counts(classes, labels, valid):
    hits = (classes == labels[:, None].astype(classes.dtype)) & valid[:, None]
    return jnp.sum(hits[:, 0]), jnp.sum(jnp.any(hits[:, :TOP5], axis=1)), jnp.sum(valid)


def topk_accuracy(classes: jax.Array, labels: jax.Array,
                  valid: jax.Array | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (as the official code reports), over valid rows.

    `classes` are `KnnResult.classes`; with fewer than 5 columns (k < 5) top-5 counts the
    ones there are, as the official `min(5, k)`.
    """
    valid = jnp.ones(labels.shape, bool) if valid is None else valid
    top1, top5, total = (int(count) for count in _correct_counts(classes, labels, valid))
    if total == 0:
        raise ValueError('No valid test example to compute an accuracy on.')
    return {'top1': 100.0 * top1 / total, 'top5': 100.0 * top5 / total}


def knn_accuracy(features_fn: Callable[[jax.Array], jax.Array], train_input, test_input,
                 *, mesh: jax.sharding.Mesh, num_classes: int, k: int = K,
                 temperature: float = TEMPERATURE, axis_name: str = 'data',
                 **knn_options) -> dict[str, float]:
    """The whole protocol: features of both splits, kNN, top-1/top-5 (percent).

    Args:
      features_fn: normalised float32 images `[B, H, W, 3]` (sharded over `axis_name`) →
        features `[B, D]`, e.g. a jitted backbone CLS output with the parameters bound.
      train_input, test_input: `bam_jax.data.eval_input.EvalInput`s of this process.
      knn_options: passed on to `knn_classify` (chunk sizes, precision).
    """
    extract = functools.partial(features_lib.extract_features, features_fn, mesh=mesh,
                                axis_name=axis_name)
    return features_knn_accuracy(extract(train_input), extract(test_input), mesh=mesh,
                                 num_classes=num_classes, k=k, temperature=temperature,
                                 axis_name=axis_name, **knn_options)


def features_knn_accuracy(train: features_lib.Features, test: features_lib.Features, *,
                          mesh: jax.sharding.Mesh, num_classes: int, k: int = K,
                          temperature: float = TEMPERATURE, axis_name: str = 'data',
                          **knn_options) -> dict[str, float]:
    """`knn_accuracy` on features already extracted (`extract_features`)."""
    for name, split in (('train', train), ('test', test)):
        largest = int(jnp.max(jnp.where(split.valid, split.labels, -1)))
        if largest >= num_classes:
            raise ValueError(f'The {name} split has label {largest}, but num_classes is '
                             f'{num_classes}; pass the number of classes of the data set.')
    result = knn_classify(train.features, train.labels, test.features,
                          train_valid=train.valid & (train.labels >= 0),
                          num_classes=num_classes, k=k, temperature=temperature, mesh=mesh,
                          axis_name=axis_name, **knn_options)
    return topk_accuracy(result.classes, test.labels, test.valid & (test.labels >= 0))
