"""Image retrieval on frozen features: Recall@K, the metric-learning definition.

Every item queries all the others by cosine similarity (itself excluded); a query is a
hit at K if at least one of its K most similar items has its label. Recall@K is the
percentage of hits over all items, so an item whose class has no other member is a miss.
Among equal similarities the item earlier in the input ranks first (`lax.top_k`).

Queries go through in blocks of `QUERY_BLOCK`, so the device holds one
`[QUERY_BLOCK, N]` similarity tile (51 MB at N = 50,000) besides the features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bam_jax.evaluate.features import check_features_and_labels
from bam_jax.evaluate.knn import inverse_norms

QUERY_BLOCK = 256


@functools.partial(jax.jit, static_argnames=('max_k', 'block_size'))
def _hits_at(features, labels, *, max_k, block_size):
    """The number of queries with a same-label item among their top K, K = 1…max_k."""
    n_items = features.shape[0]
    features = features.astype(jnp.float32) * inverse_norms(features)[:, None]
    n_blocks = -(-n_items // block_size)
    queries = jnp.pad(features, ((0, n_blocks * block_size - n_items), (0, 0)))
    query_labels = jnp.pad(labels, (0, n_blocks * block_size - n_items))

    def block_hits(start):
        rows = start + jnp.arange(block_size)
        similarities = jnp.dot(lax.dynamic_slice_in_dim(queries, start, block_size),
                               features.T, precision=lax.Precision.HIGHEST)
        similarities = jnp.where(jnp.arange(n_items) == rows[:, None], -jnp.inf,
                                 similarities)
        neighbours = lax.top_k(similarities, max_k)[1]
        same = labels[neighbours] == lax.dynamic_slice_in_dim(query_labels, start,
                                                              block_size)[:, None]
        hit = jnp.cumsum(same, axis=1) > 0  # [block, max_k]: a hit among the first K
        return jnp.sum(hit & (rows < n_items)[:, None], axis=0)

    return jnp.sum(lax.map(block_hits, jnp.arange(n_blocks) * block_size), axis=0)


def recall_at_k(features, labels, ks=(1, 2, 4, 8)) -> dict:
    """Recall@K in percent for each K of `ks`: {'recall@1': %, ...}.

    Args:
      features: `[N, D]` NumPy or JAX features of valid rows only; normalised here.
      labels: int `[N]`.
      ks: each in [1, N - 1].
    """
    check_features_and_labels(features, labels)
    n_items = np.shape(features)[0]
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or max(ks) > n_items - 1:
        raise ValueError(f'Each K must be in [1, {n_items - 1}] for {n_items} items; got '
                         f'ks={ks}.')
    hits = np.asarray(_hits_at(jnp.asarray(features), jnp.asarray(labels, jnp.int32),
                               max_k=max(ks), block_size=min(QUERY_BLOCK, n_items)))
    return {f'recall@{k}': 100.0 * int(hits[k - 1]) / n_items for k in ks}
