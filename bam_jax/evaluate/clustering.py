"""k-means clustering of frozen features, scored against the labels by NMI and ARI.

The paper's clustering evaluation (appendix I): k-means with as many clusters as
classes on L2-normalised features. Here k-means++ seeding, then Lloyd iterations in a
jitted `lax.while_loop` until no assignment changes (at most `max_iters`), from
`n_init` seeds; the run with the lowest inertia (sum of squared distances to the
assigned centres) is kept. A cluster left empty keeps its previous centre.

The scores come from the contingency table of labels × clusters, in NumPy (float64):
normalised mutual information with the arithmetic-mean normalisation
MI / ((H(labels) + H(clusters)) / 2), and the adjusted Rand index; both as
scikit-learn's defaults, including their limit cases (two one-group labelings have
NMI 1; identical labelings ARI 1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bam_jax.evaluate.features import check_features_and_labels
from bam_jax.evaluate.knn import inverse_norms


def _squared_distances(x, centres):
    """`[N, k]` squared Euclidean distances, from ‖x‖² − 2 x·c + ‖c‖² (never negative)."""
    cross = jnp.dot(x, centres.T, precision=lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(x * x, axis=1)[:, None] - 2.0 * cross
                       + jnp.sum(centres * centres, axis=1)[None], 0.0)


def _kmeans_plus_plus(key, x, n_clusters):
    """k-means++ seeding: each next centre is a row drawn with probability ∝ its squared
    distance to the nearest centre so far."""
    first_key, key = jax.random.split(key)
    first = x[jax.random.randint(first_key, (), 0, x.shape[0])]
    centres = jnp.zeros((n_clusters, x.shape[1]), x.dtype).at[0].set(first)
    nearest = jnp.sum((x - first) ** 2, axis=1)

    def add_centre(index, state):
        centres, nearest = state
        centre = x[jax.random.categorical(jax.random.fold_in(key, index), jnp.log(nearest))]
        return (centres.at[index].set(centre),
                jnp.minimum(nearest, jnp.sum((x - centre) ** 2, axis=1)))

    return lax.fori_loop(1, n_clusters, add_centre, (centres, nearest))[0]


def _lloyd(key, x, *, n_clusters, max_iters):
    """One k-means run → (assignments `[N]`, inertia)."""
    def assign(centres):
        return jnp.argmin(_squared_distances(x, centres), axis=1).astype(jnp.int32)

    def keep_going(state):
        iteration, _, _, changed = state
        return changed & (iteration < max_iters)

    def iterate(state):
        iteration, centres, assignments, _ = state
        sums = jax.ops.segment_sum(x, assignments, n_clusters)
        counts = jax.ops.segment_sum(jnp.ones_like(assignments), assignments, n_clusters)
        centres = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None],
                            centres)
        updated = assign(centres)
        return iteration + 1, centres, updated, jnp.any(updated != assignments)

    centres = _kmeans_plus_plus(key, x, n_clusters)
    state = (jnp.int32(0), centres, assign(centres), jnp.bool_(True))
    _, centres, assignments, _ = lax.while_loop(keep_going, iterate, state)
    distances = _squared_distances(x, centres)
    return assignments, jnp.sum(jnp.take_along_axis(distances, assignments[:, None], 1))


@functools.partial(jax.jit, static_argnames=('n_clusters', 'n_init', 'max_iters'))
def kmeans(features, key, *, n_clusters, n_init, max_iters):
    """The assignments `[N]` and inertia of the best of `n_init` k-means runs on the
    L2-normalised features (module docstring). Runs go one after the other, so memory
    is one run's `[N, n_clusters]` distances."""
    x = features.astype(jnp.float32) * inverse_norms(features)[:, None]
    run = functools.partial(_lloyd, x=x, n_clusters=n_clusters, max_iters=max_iters)
    assignments, inertias = lax.map(run, jax.random.split(key, n_init))
    best = jnp.argmin(inertias)
    return assignments[best], inertias[best]


def contingency_table(labels_true, labels_pred) -> np.ndarray:
    """Counts `[distinct true labels, distinct predicted labels]` int64."""
    true_values, true_index = np.unique(np.asarray(labels_true), return_inverse=True)
    pred_values, pred_index = np.unique(np.asarray(labels_pred), return_inverse=True)
    flat = true_index.ravel() * len(pred_values) + pred_index.ravel()
    return np.bincount(flat, minlength=len(true_values) * len(pred_values)).reshape(
        len(true_values), len(pred_values))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def normalized_mutual_info(labels_true, labels_pred) -> float:
    """NMI in [0, 1] with the arithmetic-mean normalisation."""
    table = contingency_table(labels_true, labels_pred).astype(np.float64)
    if table.shape[0] == table.shape[1] <= 1:  # neither labeling splits the data
        return 1.0
    total = table.sum()
    rows, columns = table.sum(axis=1), table.sum(axis=0)
    i, j = np.nonzero(table)
    joint = table[i, j]
    mutual_info = max(float(np.sum(joint / total * np.log(
        joint * total / (rows[i] * columns[j])))), 0.0)
    if mutual_info == 0.0:
        return 0.0
    return mutual_info / ((_entropy(rows) + _entropy(columns)) / 2.0)


def adjusted_rand_index(labels_true, labels_pred) -> float:
    """ARI: the Rand index over pairs, corrected for chance; 1 for identical labelings."""
    table = contingency_table(labels_true, labels_pred).astype(np.float64)
    pairs = lambda counts: np.sum(counts * (counts - 1.0)) / 2.0  # noqa: E731
    total = table.sum()
    together = pairs(table)
    rows, columns = pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = rows * columns / max(total * (total - 1.0) / 2.0, 1.0)
    maximum = (rows + columns) / 2.0
    if maximum == expected:
        return 1.0
    return float((together - expected) / (maximum - expected))


def kmeans_scores(features, labels, *, n_clusters: int | None = None, n_init: int = 10,
                  max_iters: int = 100, seed: int = 0) -> dict:
    """k-means of the features scored against the labels: {'nmi': %, 'ari': %}.

    Args:
      features: `[N, D]` NumPy or JAX features of valid rows only; normalised here.
      labels: `[N]`.
      n_clusters: default the number of distinct labels, as the paper.
      seed: of the k-means++ seeding.
    """
    check_features_and_labels(features, labels)
    labels = np.asarray(labels)
    if n_clusters is None:
        n_clusters = len(np.unique(labels))
    if not 1 <= n_clusters <= len(labels):
        raise ValueError(f'n_clusters must be in [1, {len(labels)}] for {len(labels)} '
                         f'items, got {n_clusters}.')
    for name, value in (('n_init', n_init), ('max_iters', max_iters)):
        if value < 1:
            raise ValueError(f'{name} must be positive, got {value}.')
    assignments, _ = kmeans(jnp.asarray(features), jax.random.key(seed),
                            n_clusters=n_clusters, n_init=n_init, max_iters=max_iters)
    assignments = np.asarray(assignments)
    return {'nmi': 100.0 * normalized_mutual_info(labels, assignments),
            'ari': 100.0 * adjusted_rand_index(labels, assignments)}
